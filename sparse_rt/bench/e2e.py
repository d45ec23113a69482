"""`sparse-rt bench e2e`: split training and inference over loopback vs the same model unsplit.

The split side is what a deployment gets: a real server process
(`sparse-rt node --role server`, tcp://127.0.0.1) and an :class:`EdgeClient`
in this process. The baseline is plain torch in this process: the same
pipeline's model from the same seed, the same optimizer and learning rate,
the same batches. ``ratio_vs_local`` is split samples/s over local samples/s,
so 1.0 means splitting costs nothing.

The per-stage breakdown comes from the runtime's own ``--metrics`` records
(edge: head, encode, wait, decode, backward; server: queue, decode, tail,
encode), matched by request id, so ``net_ms`` (the edge's wait minus the
server's time on the request) is what the sockets and both event loops cost.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import click
import torch
from torch.nn import functional as F

from sparse_rt.bench.common import (Batches, BenchReport, PipelineList, bench_options, check_applied, emit, median_time,
                                    pyplot, save_figure, start_server, stop_server, synthetic_batches, torch_threads)
from sparse_rt.pipeline import Pipeline, get_pipeline
from sparse_rt.edge.client import EdgeClient
from sparse_rt.stages.optimizer import build_optimizer

PIPELINES = ("digits_cnn", "cifar_cnn", "vgg11_cifar10")
SLOW_PIPELINES = {"vgg11_cifar10": 4}  # most batches per timed run: a VGG11 step takes about a second on a CPU
MODES = ("train", "infer", "infer_pipelined")
EDGE_STAGES = ("head", "encode", "wait", "decode", "backward")
SERVER_STAGES = ("queue", "decode", "tail", "encode")
COLUMNS = ("pipeline", "mode", "batches", "split_sps", "local_sps", "ratio_vs_local", "split_ms", "local_ms",
           "call_p50_ms",           *(f"{stage}_ms" for stage in EDGE_STAGES), *(f"srv_{stage}_ms" for stage in SERVER_STAGES), "net_ms")
REQUEST_TIMEOUT = 120.0  # seconds per reply; no resends, so a dead server fails the run instead of hanging it

def local_runs(pipeline: Pipeline, batches: Batches, seed: int) -> dict[str, Callable[[], None]]:
    """The unsplit baseline: one plain torch model, one optimizer, over the same batches."""
    torch.manual_seed(seed)
    model = pipeline.build_model()
    optimizer = build_optimizer(model.parameters(), pipeline.optimizer, pipeline.lr, pipeline.weight_decay)

    def train() -> None:
        model.train()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            for x, _ in batches:
                model(x)

    return {"train": train, "infer": infer, "infer_pipelined": infer}  # local has nothing to pipeline


def split_runs(client: EdgeClient, loop: asyncio.AbstractEventLoop, batches: Batches, inflight: int,
               calls: list[float]) -> dict[str, Callable[[], None]]:
    """What an app using EdgeClient gets: train_step / infer one at a time, or infer_many with requests in flight.

    The wall seconds of each train_step / infer call go to ``calls``: their median next to the mean
    per batch shows how much of a slow run is a few slow requests (a busy machine's scheduler).
    """
    async def timed(call: Callable[[torch.Tensor, torch.Tensor], Awaitable[Any]]) -> None:
        for x, y in batches:
            started = time.perf_counter()
            await call(x, y)
            calls.append(time.perf_counter() - started)

    async def infer_pipelined() -> None:
        async for _ in client.infer_many((x for x, _ in batches), inflight):
            pass

    return {"train": lambda: loop.run_until_complete(timed(client.train_step)),
            "infer": lambda: loop.run_until_complete(timed(lambda x, _: client.infer(x))),
            "infer_pipelined": lambda: loop.run_until_complete(infer_pipelined())}


def _records(path: Path, skip: int) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines[skip:]]


def _count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def stage_medians(edge: list[dict[str, Any]], server: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median milliseconds per stage per request; ``net_ms`` = edge wait - server time, per matched request id."""
    by_id = {record["id"]: record["ms"] for record in server}
    medians: dict[str, float | None] = {}
    for stage in EDGE_STAGES:
        values = [record["ms"][stage] for record in edge if stage in record["ms"]]
        medians[f"{stage}_ms"] = statistics.median(values) if values else None
    for stage in SERVER_STAGES:
        values = [ms[stage] for ms in by_id.values() if stage in ms]
        medians[f"srv_{stage}_ms"] = statistics.median(values) if values else None
    net = [record["ms"]["wait"] - sum(by_id[record["id"]].values()) for record in edge if record["id"] in by_id]
    medians["net_ms"] = statistics.median(net) if net else None
    return medians


def measure_pipeline(name: str, batch_size: int, batches: int, repeats: int, warmup: int, seed: int,
                     inflight: int, workdir: Path) -> list[dict[str, Any]]:
    """One row per mode for one pipeline: split (server process + EdgeClient here) and local, same batches."""
    pipeline = get_pipeline(name)
    data = synthetic_batches(pipeline, batch_size, batches, seed)
    local_run = local_runs(pipeline, data, seed)
    samples = batch_size * batches
    edge_log, server_log = workdir / f"{name}-edge.jsonl", workdir / f"{name}-server.jsonl"
    server, address = start_server({"pipeline": name, "seed": seed, "metrics": server_log,
                                    "max_batch": max(1024, batch_size)})
    loop = asyncio.new_event_loop()
    client: EdgeClient | None = None
    rows = []
    failed = True
    try:
        client = EdgeClient(pipeline, address, mode="train", seed=seed, timeout=REQUEST_TIMEOUT, retries=0,
                            metrics=edge_log)
        loop.run_until_complete(client.connect())
        calls: list[float] = []
        for mode, run in split_runs(client, loop, data, inflight, calls).items():
            # local right before split, mode by mode: a busy machine's load drifts less between the two
            local_s = median_time(local_run[mode], repeats, warmup)[0]
            for _ in range(warmup):
                run()
            edge_skip, server_skip = _count(edge_log), _count(server_log)
            calls.clear()
            seconds, _ = median_time(run, repeats, warmup=0)
            stages = stage_medians(_records(edge_log, edge_skip), _records(server_log, server_skip))
            rows.append({"pipeline": name, "mode": mode, "batch_size": batch_size, "batches": batches,
                         "split_sps": samples / seconds, "local_sps": samples / local_s,
                         "ratio_vs_local": local_s / seconds, "split_ms": seconds / batches * 1e3,
                         "local_ms": local_s / batches * 1e3,
                         "call_p50_ms": statistics.median(calls) * 1e3 if calls else None, **stages})
        assert client.session is not None  # connect() made it
        steps_sent = client.session.steps
        failed = False
    finally:
        if client is not None:
            loop.run_until_complete(client.close())
        loop.close()
        summary = stop_server(server, failed)
    check_applied(summary, steps_sent, name)
    return rows


def run_e2e(pipelines: list[str], batch_size: int, batches: int, repeats: int, warmup: int, seed: int,
            inflight: int, threads: int) -> BenchReport:
    """Measure every pipeline, split vs local; returns the report."""
    report = BenchReport("e2e", COLUMNS)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="sparse-rt-e2e-") as folder:
        used_threads = torch.get_num_threads()
        for name in pipelines:
            count = min(batches, SLOW_PIPELINES.get(name, batches))
            report.rows += measure_pipeline(name, batch_size, count, repeats, warmup, seed, inflight, Path(folder))
    report.settings = {"pipelines": pipelines, "batch_size": batch_size, "batches": batches, "repeats": repeats,
                       "warmup": warmup, "seed": seed, "inflight": inflight, "budget": "all channels (B = C)",
                       "codec": "fp32", "transport": "tcp://127.0.0.1", "torch_threads": used_threads}
    report.notes = [
        "inputs are synthetic (random normal, pipeline's input shape; random labels): rates do not depend on pixels",
        "split = a `sparse-rt node --role server` process + EdgeClient in the bench process over tcp loopback; "
        "local = the same model, optimizer, lr and batches in plain torch in the bench process",
        "mode train: EdgeClient.train_step, one step at a time; infer: EdgeClient.infer, one request at a time; "
        f"infer_pipelined: EdgeClient.infer_many with {inflight} requests in flight; both compare with local infer",
        "stage columns: median ms per request from the runtime's metrics records (edge and server); net_ms = edge "
        "wait - server (queue+decode+tail+encode) per request: sockets, loops and thread hand-offs",
        f"torch threads per process: {used_threads} (bench process with the edge and the local baseline; server "
        "process the same); train and infer run one side at a time, infer_pipelined overlaps both processes",
        f"split_ms / local_ms: wall ms per batch (median run / batches); call_p50_ms: median wall ms of one "
        f"train_step / infer call (none when pipelined); {', '.join(SLOW_PIPELINES)} runs at most "
        f"{min(SLOW_PIPELINES.values())} batches per timed run (slow on CPU)",
    ]
    return report


def plot(report: BenchReport, path: Path) -> None:
    """Bars of samples/s, split next to local, per pipeline and mode (log scale: the pipelines differ 100x)."""
    plt = pyplot()
    rows = report.rows
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [row["split_sps"] for row in rows], 0.4, label="split (loopback)")
    axes.bar([p + 0.2 for p in positions], [row["local_sps"] for row in rows], 0.4, label="local (unsplit)")
    for p, row in zip(positions, rows):
        axes.annotate(f"{row['ratio_vs_local']:.2f}x", (p, max(row["split_sps"], row["local_sps"])),
                      ha="center", va="bottom", fontsize=8)
    axes.set_xticks(list(positions), [f"{row['pipeline']}\n{row['mode']}" for row in rows], fontsize=7)
    axes.set_yscale("log")
    axes.set_ylabel("samples / s")
    axes.set_title(f"split vs local, batch {report.settings['batch_size']} (labels: split / local samples/s)")
    axes.legend()
    save_figure(figure, path, dpi=120)


@click.command("e2e")
@bench_options
@click.option("--pipelines", type=PipelineList(several=True), default=",".join(PIPELINES), show_default=True,
              help="Comma-separated pipelines to measure.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Samples per step.")
@click.option("--batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="Batches per timed run (vgg11_cifar10: at most 4, it is slow on a CPU).")
@click.option("--inflight", type=click.IntRange(min=1), default=4, show_default=True,
              help="Inference requests in flight for the infer_pipelined mode (EdgeClient.infer_many).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch threads in this process (edge and local baseline) and in the server (0: torch's default).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model and the synthetic data.")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, pipelines: list[str], batch_size: int,
            batches: int, inflight: int, threads: int, seed: int) -> None:
    """Split training and inference over tcp loopback vs the same model unsplit, with a per-stage breakdown.

    \b
    Example:
      sparse-rt bench e2e --pipelines cifar_cnn --batch-size 64 --out bench/
    """
    emit(run_e2e(pipelines, batch_size, batches, repeats, warmup, seed, inflight, threads), as_json, out, plot)
