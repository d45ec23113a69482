"""Fixtures shared by the tests that run real node processes."""
from __future__ import annotations

import pytest

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
