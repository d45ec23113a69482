"""Nodes come back by themselves: kill -9 and SIGTERM restarts of the server mid-training, real processes."""
from __future__ import annotations

import json
import signal
import time

import pytest

from sparse_rt.nodes.launch import NodeProcess

DIGITS = {"pipeline": "digits_cnn", "seed": 0}


@pytest.fixture
def start():
    started: list[NodeProcess] = []

    def launch(role: str, **options) -> NodeProcess:
        node = NodeProcess(role, {**DIGITS, **options})
        started.append(node)
        return node

    yield launch
    for node in started:
        if node.process.poll() is None:
            node.process.kill()
        node.finish(timeout=10)


@pytest.mark.parametrize("how", ["kill", "term"])
def test_edges_go_on_by_themselves_when_the_server_restarts_mid_training(start, tmp_path, how):
    checkpoint = tmp_path / "tail.pt"
    first = start("server", bind="tcp://127.0.0.1:*", checkpoint=checkpoint, checkpoint_every=10)
    address = first.wait_ready()
    edges = [start("edge", connect=address, shard=f"{k}/2", epochs=6, budget=8, json=True) for k in (1, 2)]
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:  # some steps applied and saved
        time.sleep(0.05)
    time.sleep(0.5)  # and some more after that save
    assert checkpoint.exists() and all(edge.process.poll() is None for edge in edges)
    if how == "kill":
        first.process.kill()  # kill -9: whatever was applied after the last checkpoint is lost
    else:
        first.process.send_signal(signal.SIGTERM)  # a clean stop: the final checkpoint has every step
    first.finish(timeout=60)
    killed_at = time.monotonic()
    second = start("server", bind=address, checkpoint=checkpoint, checkpoint_every=10, resume=True, json=True)
    second.wait_ready()
    back_at = time.monotonic()
    results = [edge.result(timeout=300) for edge in edges]  # both finish on their own, exit code 0
    second.stop()
    summary = second.result(timeout=60)
    assert all(result["test_accuracy"] > 0.85 for result in results), results
    edge_steps = sum(result["steps"] for result in results)
    planned = sum(6 * -(-result["train_samples"] // 64) for result in results)
    assert edge_steps == planned  # no step repeated, none skipped, on the edges' side
    # Every step an edge saw applied is in the tail, or was rolled back by the crash and reported as such.
    assert summary["steps_total"] + summary["steps_rolled_back"] == edge_steps, summary
    if how == "term":
        assert summary["steps_rolled_back"] == 0
    assert summary["errors"] == 0 and summary["sessions_opened"] == 0  # the edges kept their sessions
    resumed = [line for edge in edges for line in edge.log if "is back: resending" in line]
    assert resumed, "the edges resent on the server's return instead of waiting out their timeout"
    assert back_at - killed_at < 60


def test_an_edge_killed_mid_epoch_resumes_where_its_checkpoint_was(start, tmp_path):
    server = start("server", bind="tcp://127.0.0.1:*", json=True)
    address = server.wait_ready()
    head = tmp_path / "head.pt"
    options = dict(connect=address, epochs=3, budget=8, checkpoint=head, checkpoint_every=5, json=True)
    edge = start("edge", **options)
    deadline = time.monotonic() + 120
    while not head.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    edge.process.kill()
    edge.finish(timeout=30)
    again = start("edge", resume=True, **options)
    result = again.result(timeout=300)
    steps_per_epoch = -(-result["train_samples"] // 64)
    assert result["steps"] == 3 * steps_per_epoch  # not a whole epoch again, and none missing
    assert result["test_accuracy"] > 0.85
    server.stop()
    summary = server.result(timeout=60)
    # The server applied what the first edge sent and then the rest from the checkpoint's step on: at most
    # checkpoint_every - 1 steps twice (trained after the edge's last save, lost with it).
    assert result["steps"] <= summary["steps_total"] < result["steps"] + 5 + 1
    assert summary["errors"] == 0
