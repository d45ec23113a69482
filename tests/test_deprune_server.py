"""deprune against a running server: the learning-rate boost travels with each step, and the train command
and the edge node both run a schedule against a `sparse-rt node --role server` process."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from sparse_rt.errors import WireError
from sparse_rt.pipeline import get_pipeline
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.pair import SplitPair
from sparse_rt.wire.header import decode_header
from sparse_rt.wire.messages import Activations, decode_message, encode_message


def _activations(lr_scale: float) -> Activations:
    return Activations(7, "s", "fp32", False, 4, torch.tensor([1, 3]), torch.ones(2, 2, 1, 1), torch.tensor([0, 1]),
                       step=5, lr_scale=lr_scale)


def test_lr_scale_is_sent_only_when_it_is_not_one_and_checked_on_receipt():
    assert "lr_scale" not in decode_header(encode_message(_activations(1.0))[0])
    frames = encode_message(_activations(2.5))
    assert decode_message(frames).lr_scale == 2.5
    header = json.loads(bytes(frames[0]))
    for bad in (0, -1.0, 1e9, "2", None, True):
        header["lr_scale"] = bad
        with pytest.raises(WireError, match="lr_scale") as caught:
            decode_message([json.dumps(header).encode(), *frames[1:]])
        assert caught.value.code == "bad_header"


async def test_the_boost_reaches_the_servers_tail_through_the_socket():
    pipeline = get_pipeline("digits_cnn")
    torch.manual_seed(0)
    async with SplitPair(pipeline.build_model(), pipeline.cut, pipeline.input_shape, lr=0.003) as pair:
        x, y = torch.randn(8, *pipeline.input_shape), torch.randint(0, 10, (8,))
        tail_lr = lambda: pair.server.chain.optimizer.optimizer.param_groups[0]["lr"]
        head_lr = lambda: pair.session.chain.optimizer.optimizer.param_groups[0]["lr"]
        await pair.train_step(x, y)
        assert (head_lr(), tail_lr()) == pytest.approx((0.003, 0.003))
        pair.session.set_lr_scale(2.0)
        await pair.train_step(x, y)
        assert (head_lr(), tail_lr()) == pytest.approx((0.006, 0.006))
        pair.session.set_lr_scale(1.0)
        await pair.train_step(x, y)
        assert (head_lr(), tail_lr()) == pytest.approx((0.003, 0.003))


@pytest.fixture
def server():
    node = NodeProcess("server", {"pipeline": "digits_cnn", "seed": 0, "bind": "tcp://127.0.0.1:*", "json": True})
    try:
        yield node, node.wait_ready()
    finally:
        if node.process.poll() is None:
            node.process.kill()
        node.finish(timeout=10)


def test_deprune_trains_against_a_running_server_from_the_cli_and_as_an_edge_node(server, tmp_path):
    node, address = server
    edge = NodeProcess("edge", {"pipeline": "digits_cnn", "seed": 1, "connect": address, "phases": "4:3,C:2",
                                "boost": 2, "boost_epochs": 1, "json": True})
    command = [sys.executable, "-m", "sparse_rt", "train", "deprune", "digits_cnn", "--phases", "4:3,C:2",
               "--boost", "2", "--boost-epochs", "1", "--connect", address, "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    edge_summary = edge.result(timeout=300)
    node.stop()
    counts = node.result(timeout=60)

    with open(tmp_path / "run" / "metrics.csv", newline="") as file:
        rows = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]
    assert [int(row["budget"]) for row in rows] == [4, 4, 4, 32, 32]
    assert [row["lr"] for row in rows] == pytest.approx([0.003] * 3 + [0.006, 0.003])
    small = rows[2]["bytes_up"] / 3
    large = (rows[4]["bytes_up"] - rows[2]["bytes_up"]) / 2
    assert small < large / 6  # 4 of 32 channels: an eighth of the values, plus indices, labels and headers
    assert rows[-1]["test_accuracy"] >= 0.90
    assert edge_summary["test_accuracy"] >= 0.90 and edge_summary["budget"] == 32
    assert counts["errors"] == 0 and counts["sessions_opened"] == 2
    assert counts["steps_applied"] == sum(counts["steps_per_session"].values())
    assert edge_summary["steps"] in counts["steps_per_session"].values()


def test_train_prune_refuses_a_running_server_and_phases_refuse_a_budget(tmp_path):
    from sparse_rt.config import NodeConfig
    from sparse_rt.errors import ConfigError

    with pytest.raises(ConfigError, match="leave out --budget"):
        NodeConfig(role="edge", pipeline="digits_cnn", connect="tcp://127.0.0.1:1", phases="4:2,C:2", budget=4)
    done = subprocess.run([sys.executable, "-m", "sparse_rt", "train", "prune", "digits_cnn", "--phases", "C:1,4:1",
                           "--connect", "tcp://127.0.0.1:1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no such option" in done.stderr.lower()


def test_bad_phases_and_a_missing_server_are_clear_errors_without_a_long_wait(tmp_path):
    node = [sys.executable, "-m", "sparse_rt", "node", "--role", "edge", "--pipeline", "digits_cnn",
            "--connect", "tcp://127.0.0.1:9"]
    for phases, message in (("4:x", "BUDGET:EPOCHS"), ("8:1,4:1", "ascending")):
        done = subprocess.run([*node, "--phases", phases], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr  # refused before connecting
    train = [sys.executable, "-m", "sparse_rt", "train", "deprune", "digits_cnn", "--phases", "4:1,C:1",
             "--connect", "tcp://127.0.0.1:9", "--timeout", "0.3", "--retries", "1", "--out", str(tmp_path)]
    done = subprocess.run(train, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "after 2 tries of 0.3 s" in done.stderr, done.stderr
