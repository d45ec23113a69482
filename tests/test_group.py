"""The replica group's round, on a real gloo group of two processes (no server around it).

Each test spawns two processes that join a group as torchrun's environment
would describe it, change their copies of a small model differently, run
rounds, and send back what they saw.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sparse_rt.cluster.group import GroupPlace, ReplicaGroup, state_digest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _replica(rank: int, port: int, merge: str, scenario: str, results: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2"})
    torch.manual_seed(100 + rank)  # different initial weights: the start must make them equal
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    place = GroupPlace.from_environment()
    assert place is not None
    group = ReplicaGroup(place, model, merge)
    group.saving = True
    group.start()
    seen: dict[str, Any] = {"start": state_digest(model.state_dict())}
    weight = model[0].weight
    before = weight.detach().clone()
    steps = 0
    with torch.no_grad():
        if scenario == "overflow":
            weight += 3e38  # each replica's step is finite, their sum is not
        elif rank == 0 or scenario != "one_idle":
            weight += rank + 1  # rank 0 moves by 1, rank 1 by 2
        steps = 0 if scenario == "one_idle" and rank == 1 else 1
    sessions = [{"id": f"session-of-{rank}", "last_step": rank}]
    outcome = group.round(steps, lambda: sessions, None, save_every=0)
    seen.update(change=float((weight - before).mean()), merged=outcome.merged, steps=outcome.steps,
                refused=group.refused, digest=state_digest(model.state_dict()), finite=bool(torch.isfinite(weight).all()))
    quiet = group.round(steps, lambda: sessions, None, save_every=0)  # nothing new: the check, and a save
    seen.update(quiet_merged=quiet.merged, quiet_saved=quiet.saved, max_param_diff=group.max_param_diff,
                sessions=sorted(s["id"] for s in group.sessions))
    group.stop()
    results.put((rank, seen))


def _run(merge: str, scenario: str) -> dict[int, dict[str, Any]]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_replica, args=(rank, port, merge, scenario, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    seen = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    return seen


@pytest.mark.parametrize("merge, expected", [("sum", 3.0), ("mean", 1.5)])
def test_a_round_combines_both_replicas_changes_onto_the_same_state(merge, expected):
    seen = _run(merge, "both")
    assert seen[0]["start"] == seen[1]["start"]  # rank 0's state broadcast at the start
    for rank in (0, 1):
        assert seen[rank]["change"] == pytest.approx(expected)  # 1 + 2, or their mean
        assert seen[rank]["merged"] and seen[rank]["steps"] == 2
        assert seen[rank]["sessions"] == ["session-of-0", "session-of-1"]  # every replica's, for rank 0's save
        assert not seen[rank]["quiet_merged"] and seen[rank]["quiet_saved"] and seen[rank]["max_param_diff"] == 0.0
    assert seen[0]["digest"] == seen[1]["digest"]


def test_an_idle_replica_does_not_hold_back_the_others_steps():
    seen = _run("sum", "one_idle")
    assert seen[0]["change"] == seen[1]["change"] == pytest.approx(1.0)  # rank 0's step, whole, on both
    assert seen[0]["digest"] == seen[1]["digest"]


def test_combined_steps_that_overflow_are_dropped_on_every_replica():
    seen = _run("sum", "overflow")
    for rank in (0, 1):
        assert seen[rank]["refused"] == 1 and seen[rank]["finite"] and seen[rank]["change"] == 0.0
    assert seen[0]["digest"] == seen[1]["digest"]
