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
Training rows (bench/scale_training.py): the same tail trained by 4
edges on 1 server process and on a torchrun group of 2, and the group with
one replica killed; by default cifar_cnn, whose training reaches a
meaningful accuracy in a few minutes on this machine.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from sparse_rt.bench.common import BenchReport, PipelineList, percentile, pyplot, save_figure
from sparse_rt.bench.edges import run_window
from sparse_rt.bench.scale_training import run_training
from sparse_rt.cluster.group import MERGES, ROUND_SECONDS
from sparse_rt.nodes.launch import NodeProcess

COLUMNS = ("scenario", "replicas", "edges", "samples_per_s", "p50_ms", "p99_ms", "lost_requests", "recovery_s",
           "speedup")
TRAINING_COLUMNS = ("scenario", "replicas", "edges", "epochs", "samples_per_s", "p99_ms", "accuracy", "max_param_diff",
                    "steps_rolled_back", "recovery_s", "speedup")
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


def run_scale(pipeline: str, edges: int, batch: int, seconds: float, warmup: int, seed: int, threads: int,
              training: TrainingPlan | None = None, inference: bool = True) -> tuple[BenchReport, BenchReport]:
    """The inference rows and the training rows (either may be left out: an empty report)."""
    rows = []
    if inference:
        one = run_inference("steady", 1, edges, pipeline, batch, seconds, warmup, seed, threads)
        two = run_inference("steady", 2, edges, pipeline, batch, seconds, warmup, seed, threads)
        kill = run_inference("kill", 2, edges, pipeline, batch, seconds, warmup, seed, threads, one["p99_ms"])
        for row in (two, kill):
            row["speedup"] = row["samples_per_s"] / one["samples_per_s"]
        rows = [one, two, kill]
    report = BenchReport("scale", COLUMNS, rows)
    report.settings = {"pipeline": pipeline, "edges": edges, "batch": batch, "seconds": seconds,
                       "warmup_requests": warmup, "seed": seed, "replica_torch_threads": threads,
                       "edge_torch_threads": 1, "transport": "tcp://127.0.0.1", "kill_at": KILL_AT}
    report.notes = [
        f"inference: {edges} edge processes send requests of {batch} synthetic images back to back in one "
        f"{seconds:g} s window, through a broker, to replicas of the same tail (torch at {threads} thread(s) each)",
        f"speedup = samples/s against 1 replica (target: 2 replicas >= 1.6x); kill: a replica is SIGKILLed "
        f"{KILL_AT:.0%} into the window; recovery_s: from the kill to the end of the last request slower than "
        "twice the 1-replica p99 (target: within 5 s, 0 lost requests)",
    ]
    trained = BenchReport("scale-training", TRAINING_COLUMNS, [])
    if training is not None:
        plan = training
        single = _repeated([run_training("steady", 1, plan.edges, plan.pipeline, plan.epochs, seed + k, threads)
                            for k in range(plan.repeats)])
        group = _repeated([run_training("steady", 2, plan.edges, plan.pipeline, plan.epochs, seed + k, threads,
                                        plan.merge, plan.round_seconds) for k in range(plan.repeats)])
        kill = run_training("kill", 2, plan.edges, plan.pipeline, plan.epochs, seed, threads, plan.merge,
                            plan.round_seconds)
        for row in (group, kill):
            row["speedup"] = row["samples_per_s"] / single["samples_per_s"]
        trained.rows = [single, group, kill]
        trained.settings = {"pipeline": plan.pipeline, "edges": plan.edges, "epochs": plan.epochs, "merge": plan.merge,
                            "repeats": plan.repeats,
                            "round_seconds": plan.round_seconds, "seed": seed, "replica_torch_threads": threads}
        trained.notes = [
            f"training: {plan.edges} edge processes, each on its {plan.edges}th of the training data, train their "
            f"heads for {plan.epochs} epochs with one tail: one server process, or a torchrun group of 2 combining "
            f"by {plan.merge} every {plan.round_seconds:g} s; accuracy: the edges' mean test accuracy (target: 2 "
            "replicas "
            "within 1 point of 1); max_param_diff: the group's own check after the edges finished (target: <= 1e-6)",
            "kill: a replica is SIGKILLed after the group's checkpoint holds every session; torchrun restarts the "
            "group from it; recovery_s: from the kill until both replicas serve again",
            f"steady rows: the mean of {plan.repeats} run(s), seeds {seed}..{seed + plan.repeats - 1} (accuracy_runs "
            "lists each); the kill row: one run at the first seed",
        ]
    return report, trained


def _repeated(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one row at several seeds as one row: means of the rates and accuracies, the worst of the rest."""
    row = dict(rows[0])
    for key in ("samples_per_s", "p50_ms", "p99_ms", "accuracy"):
        row[key] = sum(r[key] for r in rows) / len(rows)
    row["accuracy_runs"] = [r["accuracy"] for r in rows]
    row["lost_requests"] = sum(r["lost_requests"] for r in rows)
    diffs = [r["max_param_diff"] for r in rows if r["max_param_diff"] is not None]
    row["max_param_diff"] = max(diffs) if diffs else None
    row["digests_equal"] = None if row["digests_equal"] is None else all(r["digests_equal"] for r in rows)
    row["steps_applied_runs"] = [r["steps_applied"] for r in rows]
    return row


@dataclass(frozen=True)
class TrainingPlan:
    pipeline: str = "cifar_cnn"
    edges: int = 4
    epochs: int = 6
    merge: str = "sum"
    repeats: int = 1  # seeds per steady row
    round_seconds: float = ROUND_SECONDS  # between the group's rounds


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
@click.option("--inference/--no-inference", default=True, show_default=True, help="Run the inference rows.")
@click.option("--training/--no-training", default=True, show_default=True, help="Run the training rows.")
@click.option("--training-pipeline", type=PipelineList(), default=TrainingPlan.pipeline, show_default=True)
@click.option("--training-edges", type=click.IntRange(min=2), default=TrainingPlan.edges, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=TrainingPlan.epochs, show_default=True,
              help="Training epochs of every edge.")
@click.option("--merge", type=click.Choice(MERGES), default=TrainingPlan.merge, show_default=True,
              help="How the training group combines its replicas' steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=TrainingPlan.repeats, show_default=True,
              help="Seeds per steady training row (its accuracy is their mean).")
@click.option("--round-seconds", type=click.FloatRange(min=0, min_open=True), default=TrainingPlan.round_seconds,
              show_default=True, help="Seconds between the training group's rounds.")
def command(as_json: bool, out: Path | None, pipeline: str, edges: int, batch: int, seconds: float, warmup: int,
            threads: int, seed: int, inference: bool, training: bool, training_pipeline: str, training_edges: int,
            epochs: int, merge: str, repeats: int, round_seconds: float) -> None:
    """Replicas of the tail: inference behind a broker (1 against 2 under N edges, one killed mid-run), and
    training by a torchrun group (1 server process against 2 replicas, one killed mid-run).

    \b
    Example:
      sparse-rt bench scale --out docs/bench         # vgg11_cifar10 inference, cifar_cnn training
    """
    plan = (TrainingPlan(training_pipeline, training_edges, epochs, merge, repeats, round_seconds) if training
            else None)
    report, trained = run_scale(pipeline, edges, batch, seconds, warmup, seed, threads, plan, inference)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps({"inference": report.to_dict(), "training": trained.to_dict()},
                                                   separators=(",", ":")))
        if report.rows:
            plot(report, out / "scale.png")
    rows = [{k: v for k, v in row.items() if k != "timeline"} for row in report.rows]
    if as_json:
        click.echo(json.dumps({"suite": "scale", "settings": report.settings, "inference": rows,
                               "training_settings": trained.settings, "training": trained.rows,
                               "notes": report.notes + trained.notes}))
    else:
        if rows:
            click.echo(BenchReport("scale", COLUMNS, rows).table())
        if trained.rows:
            click.echo(trained.table())
