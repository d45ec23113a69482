"""`sparse-rt bench restart`: a server killed (or stopped) mid-training and started again; how its edges come back.

Two edge processes train digits_cnn (6 epochs, half the data each) against a
`sparse-rt node --role server` that checkpoints every 10 steps. Once its
checkpoint holds both sessions and some steps, the server is killed with SIGKILL (``kill``) or
stopped with SIGTERM (``term``) and a new one is started on the same address
with ``--resume``. Reported per way (medians over the repeats):

- ``server_back_s``: from the signal to the new server serving (process start, imports, restore);
- ``edge_resend_ms``: from the new server serving to each edge's resend of its request in flight
  (the edge's log line), which is what the edges add to the outage;
- ``edge_steps``, ``tail_steps``, ``rolled_back``: steps the edges saw applied, steps in the tail
  at the end, and those lost with a killed server (reported by it): edge_steps = tail_steps + rolled_back;
- ``min_accuracy`` of the two edges, and whether every edge exited 0 on its own.
"""
from __future__ import annotations

import datetime
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from sparse_rt.bench.common import BenchReport, bench_options, emit, pyplot, save_figure
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.store.checkpoint import read_checkpoint

WAYS = ("kill", "term")
COLUMNS = ("way", "server_back_s", "edge_resend_ms", "edge_steps", "tail_steps", "rolled_back", "min_accuracy",
           "edges_exit_0")
TIMEOUT = 300.0  # seconds for any one process


def _stamp(line: str) -> float:
    """The time of a node's log line (logging's asctime)."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _saved_with(checkpoint: Path, sessions: int) -> bool:
    """The server's checkpoint (replaced atomically) holds every edge's session and some applied steps."""
    if not checkpoint.exists():
        return False
    meta = read_checkpoint(checkpoint).meta
    return len(meta.get("sessions", [])) == sessions and meta.get("steps", 0) > 0


def one_restart(way: str, folder: Path) -> dict[str, Any]:
    """One run: two edges, the server signalled once its checkpoint holds both, a new one resuming."""
    base, checkpoint = {"pipeline": "digits_cnn", "seed": 0}, folder / "tail.pt"
    first = NodeProcess("server", {**base, "bind": "tcp://127.0.0.1:*", "checkpoint": checkpoint,
                                   "checkpoint_every": 10})
    nodes = [first]
    try:
        address = first.wait_ready()
        edges = [NodeProcess("edge", {**base, "connect": address, "shard": f"{k}/2", "epochs": 6, "budget": 8,
                                      "json": True}) for k in (1, 2)]
        nodes += edges
        deadline = time.monotonic() + TIMEOUT
        while not _saved_with(checkpoint, len(edges)) and time.monotonic() < deadline:
            time.sleep(0.02)
        signalled = time.time()
        first.process.send_signal(signal.SIGKILL if way == "kill" else signal.SIGTERM)
        first.finish(TIMEOUT)
        second = NodeProcess("server", {**base, "bind": address, "checkpoint": checkpoint, "checkpoint_every": 10,
                                        "resume": True, "json": True})
        nodes.append(second)
        second.wait_ready(TIMEOUT)
        serving = time.time()
        results = [edge.result(TIMEOUT) for edge in edges]
        second.stop()
        summary = second.result(TIMEOUT)
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.kill()
            node.finish(10)
    resends = [(_stamp(line) - serving) * 1e3 for edge in edges for line in edge.log if "is back: resending" in line]
    return {"way": way, "server_back_s": serving - signalled,
            "edge_resend_ms": statistics.median(resends) if resends else None,
            "edge_steps": sum(result["steps"] for result in results), "tail_steps": summary["steps_total"],
            "rolled_back": summary["steps_rolled_back"],
            "min_accuracy": min(result["test_accuracy"] for result in results),
            "edges_exit_0": all(edge.process.returncode == 0 for edge in edges)}


def run_restart(repeats: int) -> BenchReport:
    report = BenchReport("restart", COLUMNS)
    for way in WAYS:
        runs = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix="sparse-rt-restart-") as folder:
                runs.append(one_restart(way, Path(folder)))
        row = {"way": way, **{key: statistics.median(run[key] for run in runs)
                              for key in ("server_back_s", "edge_steps", "tail_steps", "rolled_back", "min_accuracy")}}
        resends = [run["edge_resend_ms"] for run in runs if run["edge_resend_ms"] is not None]
        row["edge_resend_ms"] = statistics.median(resends) if resends else None
        row["edges_exit_0"] = all(run["edges_exit_0"] for run in runs)
        row["runs"] = runs
        report.rows.append(row)
    report.settings = {"pipeline": "digits_cnn", "edges": 2, "epochs": 6, "budget": 8, "checkpoint_every": 10,
                       "repeats": repeats, "transport": "tcp://127.0.0.1"}
    report.notes = ["server_back_s: the signal to the new server serving; edge_resend_ms: the new server serving "
                    "to each edge's resend (median over edges and runs); edge_steps = tail_steps + rolled_back "
                    "(steps lost with a killed server after its last checkpoint, counted by the new one)"]
    return report


def plot(report: BenchReport, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    ways = [row["way"] for row in report.rows]
    axes.bar(ways, [row["server_back_s"] for row in report.rows], label="server back (s)")
    axes.bar(ways, [(row["edge_resend_ms"] or 0) / 1e3 for row in report.rows],
             bottom=[row["server_back_s"] for row in report.rows], label="edges resend (s)")
    axes.set_ylabel("seconds from the signal")
    axes.set_title("server restart mid-training, 2 edges")
    axes.legend(fontsize=8)
    save_figure(figure, path, dpi=120)


@click.command("restart")
@bench_options
def command(as_json: bool, out: Path | None, repeats: int, warmup: int) -> None:
    """A server killed (kill -9) or stopped (SIGTERM) mid-training, restarted with --resume: recovery times.

    \b
    Example:
      sparse-rt bench restart --repeats 3
    """
    emit(run_restart(repeats), as_json, out, plot)
