"""`sparse-rt bench scale`: the tail on several processes behind one broker, against one.

Inference: a `sparse-rt node --role broker` and R `sparse-rt node --role
server --join` replicas (torch at ``--threads`` each, one per core by
default), the same tail in each (the same seed); edge processes stream
inference requests at the broker's address in one shared window, as `bench
edges` does (bench/edges.py). Rows: 1 replica, 2 replicas, and 2 replicas
with one killed (SIGKILL) a third into the window.

Per row: ``samples_per_s`` over the window, p50/p99 latency of one request,
``lost_requests`` (requests the edges saw fail; the client resends and
reopens its session on its own, so this counts what that did not save), and
for the kill ``recovery_s``: from the kill to the end of the last request
slower than twice the 1-replica p99.

The default pipeline, vgg11_cifar10, cut after its second conv block, puts
about six sevenths of the compute in the tail: what replicas share out.
Training replicas (issue 12, part 2) are not built yet; ``training`` is
empty.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from sparse_rt.bench.common import BenchReport, PipelineList, percentile, pyplot, save_figure
from sparse_rt.bench.edges import run_window
from sparse_rt.nodes.launch import NodeProcess

COLUMNS = ("scenario", "replicas", "edges", "samples_per_s", "p50_ms", "p99_ms", "lost_requests", "recovery_s",
           "speedup")
READY_TIMEOUT = 300.0
KILL_AT = 1 / 3  # of the window


def _start(replicas: int, pipeline: str, seed: int, threads: int) -> tuple[NodeProcess, list[NodeProcess]]:
    broker = NodeProcess("broker", {"bind": "tcp://127.0.0.1:*", "backend": "tcp://127.0.0.1:*", "json": True})
    broker.wait_ready(READY_TIMEOUT)
    nodes = [NodeProcess("server", {"pipeline": pipeline, "join": broker.backend, "seed": seed, "threads": threads,
                                    "max_batch": 1024}) for _ in range(replicas)]
    broker.wait_for("joined", count=replicas, timeout=READY_TIMEOUT)
    return broker, nodes


def _stop(broker: NodeProcess, nodes: list[NodeProcess]) -> dict[str, Any]:
    for node in nodes:
        if node.process.poll() is None:
            node.stop()
    for node in nodes:
        node.finish(timeout=60)
    broker.stop()
    return broker.result(timeout=60)


def run_inference(scenario: str, replicas: int, edges: int, pipeline: str, batch: int, seconds: float, warmup: int,
                  seed: int, threads: int, normal_p99_ms: float | None = None) -> dict[str, Any]:
    """One row: ``edges`` edges streaming at ``replicas`` replicas; ``scenario`` "kill" kills one mid-window."""
    broker, nodes = _start(replicas, pipeline, seed, threads)
    killed: list[float] = []

    def kill_one(start: float, end: float) -> None:
        time.sleep(max(0.0, start + (end - start) * KILL_AT - time.time()))
        nodes[0].process.kill()
        killed.append(time.time())

    try:
        reports, start, end = run_window(edges, broker.address, pipeline, batch, seconds, warmup, seed,
                                         mode="infer", during=kill_one if scenario == "kill" else None)
    finally:
        summary = _stop(broker, nodes)
    done = [(t, lat * 1e3) for report in reports for t, lat in zip(report["done"], report["latency"])
            if start <= t <= end]
    latencies = [ms for _, ms in done]
    row = {"scenario": scenario, "replicas": replicas, "edges": edges,
           "samples_per_s": len(done) * batch / (end - start), "p50_ms": percentile(latencies, 50),
           "p99_ms": percentile(latencies, 99), "lost_requests": sum(r["failed"] for r in reports),
           "recovery_s": None, "speedup": None, "accuracy": None, "max_param_diff": None,
           "broker": {k: summary[k] for k in ("requests", "replies", "resent", "dropped", "lost", "per_replica")}}
    if killed:
        slow = 2 * (normal_p99_ms if normal_p99_ms is not None else row["p99_ms"])
        late = [t for t, ms in done if t >= killed[0] and ms > slow]
        row["recovery_s"] = max(late) - killed[0] if late else 0.0
        row["killed_at_s"] = killed[0] - start
        row["timeline"] = [(round(t - start, 3), round(ms, 2)) for t, ms in sorted(done)]
    return row


def run_scale(pipeline: str, edges: int, batch: int, seconds: float, warmup: int, seed: int,
              threads: int) -> BenchReport:
    one = run_inference("steady", 1, edges, pipeline, batch, seconds, warmup, seed, threads)
    two = run_inference("steady", 2, edges, pipeline, batch, seconds, warmup, seed, threads)
    kill = run_inference("kill", 2, edges, pipeline, batch, seconds, warmup, seed, threads, one["p99_ms"])
    for row in (two, kill):
        row["speedup"] = row["samples_per_s"] / one["samples_per_s"]
    report = BenchReport("scale", COLUMNS, [one, two, kill])
    report.settings = {"pipeline": pipeline, "edges": edges, "batch": batch, "seconds": seconds,
                       "warmup_requests": warmup, "seed": seed, "replica_torch_threads": threads,
                       "edge_torch_threads": 1, "transport": "tcp://127.0.0.1", "kill_at": KILL_AT,
                       "training": "not built yet (issue 12, part 2)"}
    report.notes = [
        f"inference: {edges} edge processes send requests of {batch} synthetic images back to back in one "
        f"{seconds:g} s window, through a broker, to replicas of the same tail (torch at {threads} thread(s) each)",
        f"speedup = samples/s against 1 replica (target: 2 replicas >= 1.6x); kill: a replica is SIGKILLed "
        f"{KILL_AT:.0%} into the window; recovery_s: from the kill to the end of the last request slower than "
        "twice the 1-replica p99 (target: within 5 s, 0 lost requests)",
    ]
    return report


def plot(report: BenchReport, path: Path) -> None:
    """Each request's latency over the kill run's window, with the kill and the 1-replica p99."""
    plt = pyplot()
    kill = next(row for row in report.rows if row["scenario"] == "kill")
    one = report.rows[0]
    figure, axes = plt.subplots(figsize=(8, 4))
    times, latencies = zip(*kill["timeline"]) if kill["timeline"] else ((), ())
    axes.plot(times, latencies, ".", markersize=2, label="request latency (2 replicas, one killed)")
    axes.axvline(kill["killed_at_s"], color="red", linestyle="--", label="kill -9 of a replica")
    axes.axhline(one["p99_ms"], color="gray", linestyle=":", label="1 replica's p99")
    axes.set_yscale("log")
    axes.set_xlabel("seconds into the window")
    axes.set_ylabel("ms")
    axes.set_title(f"{report.settings['pipeline']}: {report.settings['edges']} edges, batch {report.settings['batch']}")
    axes.legend(fontsize=7)
    save_figure(figure, path, dpi=120)


@click.command("scale")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results, nothing else.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Also write scale.json and scale.png (the kill run's latencies) into this directory.")
@click.option("--pipeline", type=PipelineList(), default="vgg11_cifar10", show_default=True)
@click.option("--edges", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Images per request.")
@click.option("--seconds", type=click.FloatRange(min=1), default=15.0, show_default=True, help="Window per row.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Requests per edge before the window.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch threads per replica.")
@click.option("--seed", type=int, default=0, show_default=True)
def command(as_json: bool, out: Path | None, pipeline: str, edges: int, batch: int, seconds: float, warmup: int,
            threads: int, seed: int) -> None:
    """Inference replicas behind a broker: 1 against 2 under N edges, and one replica killed mid-run.

    \b
    Example:
      sparse-rt bench scale --out docs/bench         # vgg11_cifar10, 8 edges, 15 s per row
    """
    report = run_scale(pipeline, edges, batch, seconds, warmup, seed, threads)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(report.to_dict(), separators=(",", ":")))
        plot(report, out / "scale.png")
    rows = [{k: v for k, v in row.items() if k != "timeline"} for row in report.rows]
    if as_json:
        click.echo(json.dumps({"suite": "scale", "settings": report.settings, "inference": rows, "training": [],
                               "notes": report.notes}))
    else:
        click.echo(BenchReport("scale", COLUMNS, rows).table())
