"""Fixtures shared by the tests that run real node processes."""
from __future__ import annotations

import pytest

from sparse_rt.cli import main
from sparse_rt.nodes.launch import NodeProcess

DIGITS_NODE = {"pipeline": "digits_cnn", "seed": 0}


@pytest.fixture
def start():
    """Start `sparse-rt node` processes (digits_cnn, seed 0, unless told otherwise); any still running at the
    end of the test is killed, so a failed test leaves no process behind."""
    started: list[NodeProcess] = []

    def launch(role: str, **options) -> NodeProcess:
        node = NodeProcess(role, {**DIGITS_NODE, **options})
        started.append(node)
        return node

    yield launch
    for node in started:
        if node.process.poll() is None:
            node.process.kill()
        node.finish(timeout=10)


@pytest.fixture(scope="session")
def model_set(tmp_path_factory):
    """A digits_cnn model set from `sparse-rt train prune` (budgets 32, 8 and 2), trained once per run."""
    folder = tmp_path_factory.mktemp("set") / "digits"
    with pytest.raises(SystemExit) as info:
        main(["train", "prune", "digits_cnn", "--phases", "C:3,8:2,2:2", "--out", str(folder)])
    assert info.value.code == 0
    return folder


def _serve(folder):
    """A `sparse-rt node --role server` serving the model set in ``folder``: its address, until the fixture ends."""
    server = NodeProcess("server", {"pipeline": "digits_cnn", "bind": "tcp://127.0.0.1:*", "models": folder,
                                    "json": True})
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        server.finish(timeout=30)


@pytest.fixture(scope="module")
def served_set(model_set):
    """The address of a `sparse-rt node --role server` serving that model set."""
    yield from _serve(model_set)


@pytest.fixture(scope="session")
def two_cut_set(tmp_path_factory):
    """A digits_cnn model set cut at two layers: block1 (32 channels of 4x4; budgets 32 and 8, the set's default
    cut, in budget-B/) and block2 (64 channels of 2x2; budgets 64 and 8, in block2/budget-B/), trained once per run
    by two `sparse-rt train prune` runs into one folder."""
    folder = tmp_path_factory.mktemp("cuts") / "digits"
    for cut in ("block1", "block2"):
        with pytest.raises(SystemExit) as info:
            main(["train", "prune", "digits_cnn", "--phases", "C:2,8:1", "--cut", cut, "--out", str(folder)])
        assert info.value.code == 0
    return folder


@pytest.fixture(scope="module")
def served_two_cut_set(two_cut_set):
    """The address of a `sparse-rt node --role server` serving that two-cut model set."""
    yield from _serve(two_cut_set)
