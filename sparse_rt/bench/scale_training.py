"""`sparse-rt bench scale`'s training rows: one tail trained by N edges on 1 server process, or on a torchrun group.

Every row: a broker, the tail (one `sparse-rt node --role server --join`, or
`torchrun --nproc-per-node R` running that same command), and N `sparse-rt
node --role edge` processes, each training its own head on its N-th of the
training data for the same epochs and then evaluating on the whole test
set. The edges' metrics files time every step: ``samples_per_s`` is the
samples trained over the window from the first step to the last, ``p99_ms``
the 99th percentile of one step's round trip. ``accuracy`` is the mean of
the edges' test accuracies; ``max_param_diff`` the group's own check once
the edges are done (the digests each replica prints are compared as well).
"kill" SIGKILLs one replica after the group's first checkpoint with every
session: torchrun restarts the group from it, the edges resend, and the row
says how many acknowledged steps were rolled back and how long the group
took to serve again.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sparse_rt.bench.common import percentile
from sparse_rt.errors import DataError
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.store.checkpoint import read_checkpoint

READY_TIMEOUT = 300.0
RUN_TIMEOUT = 1800.0
CHECKPOINT_EVERY = 20  # the group's steps between checkpoints in the kill row


def run_training(scenario: str, replicas: int, edges: int, pipeline: str, epochs: int, seed: int, threads: int,
                 merge: str = "sum", round_seconds: float | None = None) -> dict[str, Any]:
    """One row: ``edges`` edges train one tail on ``replicas`` server processes; "kill" kills one replica."""
    with tempfile.TemporaryDirectory(prefix="sparse-rt-scale-") as folder:
        work = Path(folder)
        broker = NodeProcess("broker", {"bind": "tcp://127.0.0.1:*", "backend": "tcp://127.0.0.1:*", "json": True})
        broker.wait_ready(READY_TIMEOUT)
        checkpoint = work / "tail.pt" if scenario == "kill" else None
        options = {"pipeline": pipeline, "join": broker.backend, "seed": seed, "threads": threads, "json": True,
                   "checkpoint": checkpoint, "checkpoint_every": CHECKPOINT_EVERY if checkpoint else None}
        if replicas > 1:
            options.update(merge=merge, round_seconds=round_seconds)
        torchrun = (["--standalone", "--nproc-per-node", str(replicas), "--max-restarts", "2"]
                    if replicas > 1 else None)
        tail = NodeProcess("server", options, torchrun=torchrun)
        try:
            tail.wait_for("serving", count=replicas, timeout=READY_TIMEOUT)
            broker.wait_for("joined", count=replicas, timeout=READY_TIMEOUT)
            nodes = [NodeProcess("edge", {"pipeline": pipeline, "connect": broker.address, "shard": f"{k}/{edges}",
                                          "epochs": epochs, "seed": seed, "threads": 1, "timeout": 10, "retries": 30,
                                          "metrics": work / f"edge{k}.jsonl", "json": True})
                     for k in range(1, edges + 1)]
            killed = _kill_one(tail, checkpoint, edges) if scenario == "kill" else None
            results, lost = [], 0
            for node in nodes:
                try:
                    results.append(node.result(timeout=RUN_TIMEOUT))
                except RuntimeError:  # it gave up on a step its resends did not get answered (its log says)
                    lost += 1
            _wait_quiet(tail, replicas)
            tail.stop()
            summaries = tail.results(timeout=120)
        finally:
            tail.kill()
            broker.stop()
            broker.finish(timeout=30)
        steps = [record for k in range(1, edges + 1) for record in _records(work / f"edge{k}.jsonl")]
    return _row(scenario, replicas, edges, results, lost, summaries, steps, killed, tail.log)


def _kill_one(tail: NodeProcess, checkpoint: Path | None, edges: int) -> float:
    """SIGKILL the last replica once the group has saved every edge's session and some steps; when it was."""
    assert checkpoint is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            meta = read_checkpoint(checkpoint).meta
            if len(meta["sessions"]) >= edges and meta["steps"] >= CHECKPOINT_EVERY:
                break
        except DataError:  # not written yet
            pass
        time.sleep(0.1)
    os.kill(tail.workers()[-1], signal.SIGKILL)
    return time.time()


def _wait_quiet(tail: NodeProcess, replicas: int, timeout: float = 60.0) -> None:
    """A group's replicas have checked they agree since the last edge finished (a single server: nothing to wait for)."""
    if replicas == 1:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = list(tail.log)
        last = max((i for i, line in enumerate(lines) if "closed by its edge" in line), default=-1)
        if sum("replicas agree" in line for line in lines[last + 1:]) >= replicas:
            return
        time.sleep(0.1)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("kind") == "train"]


def _log_time(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _row(scenario: str, replicas: int, edges: int, results: list[dict[str, Any]], lost: int,
         summaries: list[dict[str, Any]],
         steps: list[dict[str, Any]], killed: float | None, log: list[str]) -> dict[str, Any]:
    times = sorted(record["time"] for record in steps)
    window = times[-1] - times[0] if len(times) > 1 else float("nan")
    samples = sum(record["samples"] for record in steps)
    round_trips = [record["ms"].get("wait", 0.0) for record in steps]
    accuracies = [result["test_accuracy"] for result in results]
    restarts = max((s.get("group", {}).get("restarts", 0) for s in summaries), default=0)
    last = [s for s in summaries if s.get("group", {}).get("restarts", 0) == restarts]
    groups = [s["group"] for s in last if "group" in s]
    row: dict[str, Any] = {
        "scenario": scenario, "replicas": replicas, "edges": edges, "epochs": results[0]["epochs"],
        "samples_per_s": samples / window, "p50_ms": percentile(round_trips, 50), "p99_ms": percentile(round_trips, 99),
        "lost_requests": lost,  # edges that stopped on a step never answered (each loses that one request)
        "accuracy": sum(accuracies) / len(accuracies), "accuracies": accuracies,
        "max_param_diff": max((g["max_param_diff"] or 0.0 for g in groups), default=None) if groups else None,
        "digests_equal": len({g["digest"] for g in groups}) == 1 if groups else None,
        "steps_applied": [s["steps_applied"] for s in last],
        "steps_rolled_back": sum(s["steps_rolled_back"] for s in last), "restarts": restarts,
        "recovery_s": None, "speedup": None,
    }
    if killed is not None:
        back = [_log_time(line) for line in log if "serving" in line and _log_time(line) > killed]
        row["recovery_s"] = back[replicas - 1] - killed if len(back) >= replicas else None
    return row
