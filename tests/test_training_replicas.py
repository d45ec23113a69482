"""Training replicas: a group of server processes started by torchrun trains one tail behind a broker.

Real processes throughout: a broker, ``torchrun --nproc-per-node 2`` running
the plain server command, and edge processes training their heads against
the broker's address. One test kills a replica with SIGKILL mid-training and
lets torchrun's elastic restart bring the group back from its checkpoint.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sparse_rt.cluster.group import state_digest
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.errors import DataError
from sparse_rt.store.checkpoint import read_checkpoint

PIPELINE = "digits_cnn"
ACCURACY = 0.9  # digits_cnn's test accuracy after a few epochs at full budget (about 0.97 on one server)


def _group(broker: NodeProcess, checkpoint: Path, restarts: int = 0) -> NodeProcess:
    group = NodeProcess("server", {"pipeline": PIPELINE, "join": broker.backend, "threads": 1,
                                   "checkpoint": checkpoint, "checkpoint_every": 20, "json": True},
                        torchrun=["--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts)])
    group.wait_for("serving", count=2, timeout=120)
    broker.wait_for("joined", count=2, timeout=60)
    return group


def _edges(broker: NodeProcess, epochs: int) -> list[NodeProcess]:
    return [NodeProcess("edge", {"pipeline": PIPELINE, "connect": broker.address, "shard": f"{k}/2", "epochs": epochs,
                                 "threads": 1, "timeout": 3, "retries": 30, "json": True}) for k in (1, 2)]


def _wait_quiet(group: NodeProcess, timeout: float = 30) -> None:
    """Until both replicas have checked that they agree since the last edge finished (the group's quiet round)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = list(group.log)
        last_close = max((i for i, line in enumerate(lines) if "closed by its edge" in line), default=-1)
        if sum("replicas agree" in line for line in lines[last_close + 1:]) >= 2:
            return
        time.sleep(0.1)
    raise AssertionError("the replicas did not report agreeing after the edges finished:\n" + "".join(group.log[-20:]))


def _stop(group: NodeProcess, broker: NodeProcess) -> list[dict[str, Any]]:
    _wait_quiet(group)
    group.stop()
    broker.stop()
    broker.finish(timeout=30)
    return group.results(timeout=60)


def _wait_for_checkpoint(path: Path, sessions: int, steps: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            meta = read_checkpoint(path).meta
            if len(meta["sessions"]) >= sessions and meta["steps"] >= steps:
                return
        except DataError:  # not written yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint with {sessions} sessions and {steps} steps at {path} in {timeout} s")


@pytest.fixture
def broker():
    node = NodeProcess("broker", {"bind": "tcp://127.0.0.1:*", "backend": "tcp://127.0.0.1:*", "json": True})
    node.wait_ready(60)
    yield node
    node.process.kill()
    node.finish(timeout=10)


def test_two_replicas_train_one_tail_and_end_identical(broker, tmp_path):
    checkpoint = tmp_path / "tail.pt"
    group = _group(broker, checkpoint)
    try:
        edges = [edge.result(timeout=180) for edge in _edges(broker, epochs=4)]
        replicas = _stop(group, broker)
    finally:
        group.kill()
    assert all(edge["test_accuracy"] >= ACCURACY for edge in edges), [edge["test_accuracy"] for edge in edges]
    assert sorted(r["group"]["rank"] for r in replicas) == [0, 1]
    assert all(r["steps_applied"] > 0 for r in replicas)  # the broker gave each replica an edge
    total = sum(edge["steps"] for edge in edges)
    assert sum(r["steps_applied"] for r in replicas) == total
    assert all(r["group"]["group_steps"] == total and r["group"]["rounds"] >= 1 for r in replicas)
    # The same bits on both replicas (hashed by each, without collectives) and by the group's own check:
    assert len({r["group"]["digest"] for r in replicas}) == 1
    assert all(r["group"]["max_param_diff"] <= 1e-6 for r in replicas)
    # One checkpoint for the group, written by rank 0: the replicas' state and both replicas' sessions.
    saved = read_checkpoint(checkpoint)
    assert state_digest(saved.model_state) == replicas[0]["group"]["digest"]
    assert saved.meta["steps"] == total
    assert [path.name for path in tmp_path.iterdir()] == ["tail.pt"]
    # A group started afresh next to its checkpoint (as Kubernetes may) goes on from it, every replica.
    again = NodeProcess("server", {"pipeline": PIPELINE, "join": "tcp://127.0.0.1:9", "threads": 1,
                                   "checkpoint": checkpoint}, torchrun=["--standalone", "--nproc-per-node", "2"])
    try:
        again.wait_for(f"resumed the tail from {checkpoint} after {total} steps", count=2, timeout=120)
    finally:
        again.kill()


def test_a_replica_killed_mid_training_is_restarted_by_torchrun_and_the_rolled_back_steps_counted(broker, tmp_path):
    checkpoint = tmp_path / "tail.pt"
    group = _group(broker, checkpoint, restarts=2)
    try:
        edges = _edges(broker, epochs=25)
        _wait_for_checkpoint(checkpoint, sessions=2, steps=60)
        os.kill(group.workers()[-1], signal.SIGKILL)
        results = [edge.result(timeout=240) for edge in edges]
        group.wait_for("restart 1)", count=2, timeout=60)
        replicas = _stop(group, broker)
    finally:
        group.kill()
    assert all(edge["test_accuracy"] >= ACCURACY for edge in results), [edge["test_accuracy"] for edge in results]
    after = [r for r in replicas if r["group"]["restarts"] == 1]
    assert sorted(r["group"]["rank"] for r in after) == [0, 1]
    assert len({r["group"]["digest"] for r in after}) == 1 and all(r["group"]["max_param_diff"] <= 1e-6 for r in after)
    # Every step an edge took is in the tail exactly once, or was applied after the last checkpoint, lost with the
    # group, and counted: the checkpoint's steps + the restarted group's + the rolled back = the edges' steps.
    restored = int(next(line for line in group.log if "resumed the tail" in line).rsplit("after ", 1)[1].split()[0])
    rolled_back = sum(r["steps_rolled_back"] for r in after)
    assert restored + after[0]["group"]["group_steps"] + rolled_back == sum(edge["steps"] for edge in results)
    assert read_checkpoint(checkpoint).meta["steps"] == restored + after[0]["group"]["group_steps"]
