"""`sparse-rt bench edges`: 1..32 edge processes training against one server process.

Honest window: every edge process connects and completes its handshake and
warm-up steps, then waits on a barrier; once all are there the bench sets one
start time and one end time for everyone, and each edge trains from start to
end. Samples/s count the steps that completed inside that shared window, so
a slow starter cannot shrink its own denominator.

Lost or duplicated steps: each edge counts the steps it sent and those
acknowledged; the server (`sparse-rt node --role server --json`) prints how
many steps it applied per session when it stops. The two must agree.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import queue
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click

from sparse_rt.bench.common import (BenchReport, NumberList, PipelineList, bench_options, emit, percentile, pyplot,
                                    save_figure, start_server, stop_server, synthetic_batches)

EDGE_COUNTS = (1, 2, 4, 8, 16, 32)
COLUMNS = ("edges", "agg_sps", "edge_sps_min", "edge_sps_max", "fairness", "p50_ms", "p95_ms", "p99_ms", "steps",
           "lost", "duplicated", "errors")
READY_TIMEOUT = 300.0  # seconds for every edge process to start, connect and warm up (32 on 2 cores is slow)
REQUEST_TIMEOUT = 30.0  # seconds an edge waits for one reply before resending (the runtime's default)
SYNTHETIC_BATCHES = 4  # distinct random batches each edge cycles through


def edge_worker(index: int, pipeline: str, address: str, batch_size: int, warmup: int, seed: int,
                ready: Any, go: Any, window: Any, results: Any, mode: str = "train") -> None:
    """One edge process: connect, warm up, wait for the shared window, train (or infer) in it, report.

    Torch runs one thread here: 32 edges with a pool each would fight over
    the cores and measure the scheduler instead of the runtime.
    """
    import torch

    torch.set_num_threads(1)
    report: dict[str, Any] = {"edge": index, "session": None, "sent": 0, "acked": 0, "failed": 0, "done": [],
                              "latency": [], "error": None}
    try:
        asyncio.run(_run_in_window(index, pipeline, address, batch_size, warmup, seed, ready, go, window, report,
                                   mode))
    except BaseException as exc:  # reported, never lost: the bench shows it
        report["error"] = f"{type(exc).__name__}: {exc}"
        ready.abort()  # wake the bench if it still waits for everyone
    results.put(report)


async def _run_in_window(index: int, pipeline: str, address: str, batch_size: int, warmup: int, seed: int,
                         ready: Any, go: Any, window: Any, report: dict[str, Any], mode: str) -> None:
    """Training steps (or inference requests, for bench scale) back to back inside the window.

    An inference request that fails (its server gone for longer than the
    client's resends) is counted and the next one sent; a training step that
    fails ends the edge, whose report says why.
    """
    from sparse_rt.edge.client import EdgeClient
    from sparse_rt.errors import SparseRtError
    from sparse_rt.transport.link import ServerUnreachable

    async with EdgeClient(pipeline, address, mode=mode, seed=seed, timeout=REQUEST_TIMEOUT) as client:
        assert client.session is not None
        report["session"] = client.session.session_id
        data = synthetic_batches(client.pipeline, batch_size, SYNTHETIC_BATCHES, seed + index)

        async def step(k: int) -> None:
            report["sent"] += 1
            x, y = data[k % len(data)]
            if mode == "train":
                await client.train_step(x, y)
            else:
                try:
                    await client.infer(x)
                except (ServerUnreachable, SparseRtError):
                    report["failed"] += 1
                    return
            report["acked"] += 1

        for k in range(warmup):
            await step(k)
        ready.wait(READY_TIMEOUT)  # nothing is in flight: blocking the loop here is harmless
        if not go.wait(READY_TIMEOUT):
            raise TimeoutError("the bench never set the start time")
        start, end = window[0], window[1]
        await asyncio.sleep(max(0.0, start - time.time()))
        k = 0
        while time.time() < end:
            began = time.time()
            await step(k)
            finished = time.time()
            report["done"].append(finished)
            report["latency"].append(finished - began)
            k += 1


def run_window(edges: int, address: str, pipeline: str, batch_size: int, seconds: float, warmup: int,
               seed: int, mode: str = "train", during: Callable[[float, float], None] | None = None
               ) -> tuple[list[dict[str, Any]], float, float]:
    """``edges`` edge processes train (or infer) against the server at ``address`` in one shared window.

    ``during(start, end)`` runs in a thread once the window is set (bench
    scale kills a replica from it). Returns every edge's report and the
    window's start and end (time.time()).
    """
    context = multiprocessing.get_context("forkserver")
    # Children fork from a process that already imported torch (and torch._dynamo, which creating an Adam
    # optimizer imports: seconds per process): they start fast and share those pages.
    context.set_forkserver_preload(["torch._dynamo", "sparse_rt.edge.client", "sparse_rt.bench.edges"])
    ready, go, window, results = context.Barrier(edges + 1), context.Event(), context.Array("d", 2), context.Queue()
    workers = [context.Process(target=edge_worker, name=f"edge {k}", daemon=True,
                               args=(k, pipeline, address, batch_size, warmup, seed, ready, go, window, results,
                                     mode))
               for k in range(edges)]
    reports: list[dict[str, Any]] = []
    try:
        for worker in workers:
            worker.start()
        try:
            ready.wait(READY_TIMEOUT)
        except threading.BrokenBarrierError:  # an edge failed before the start; its report says why
            pass
        start = time.time() + 0.2 + 0.02 * edges  # time for every edge to wake up before the window opens
        window[0], window[1] = start, start + seconds
        go.set()
        if during is not None:
            threading.Thread(target=during, args=(start, start + seconds), name="during the window",
                             daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT + seconds + 3 * REQUEST_TIMEOUT
        while len(reports) < edges:
            try:
                reports.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                break
        for worker in workers:
            worker.join(timeout=10)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    failed = [report["error"] for report in reports if report["error"]]
    if len(reports) < edges or failed:
        causes = [error for error in failed if "BrokenBarrierError" not in error]  # the others were woken by it
        detail = (causes or failed or ["no report within the time limit"])[0]
        raise click.ClickException(f"{edges} edges: {edges - len(reports) + len(failed)} edge(s) failed: {detail}")
    return reports, window[0], window[1]


def summarize(edges: int, reports: list[dict[str, Any]], applied: dict[str, int], start: float, end: float,
              batch_size: int, repeats: int) -> dict[str, Any]:
    """Rates in the shared window, latency percentiles, and the edges' step counts against the server's."""
    seconds = end - start
    in_window = [[t for t in report["done"] if start <= t <= end] for report in reports]
    per_edge = [len(done) * batch_size / seconds for done in in_window]
    slices = [0] * repeats  # the window cut in `repeats` equal parts: the median part is the reported rate
    for done in in_window:
        for t in done:
            slices[min(int((t - start) / seconds * repeats), repeats - 1)] += 1
    latencies = [lat * 1e3 for report in reports for t, lat in zip(report["done"], report["latency"])
                 if start <= t <= end]
    lost = sum(max(0, report["sent"] - applied.get(report["session"], 0)) for report in reports)
    duplicated = sum(max(0, applied.get(report["session"], 0) - report["sent"]) for report in reports)
    return {"edges": edges, "agg_sps": statistics.median(count * batch_size * repeats / seconds for count in slices),
            "agg_sps_window": sum(per_edge), "edge_sps_min": min(per_edge), "edge_sps_max": max(per_edge),
            "fairness": min(per_edge) / max(per_edge) if max(per_edge) > 0 else 0.0,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "steps": sum(report["acked"] for report in reports),
            "lost": lost, "duplicated": duplicated, "errors": sum(report["sent"] - report["acked"] for report in reports),
            "per_edge_sps": per_edge}


def run_edges_bench(counts: list[int], pipeline: str, batch_size: int, seconds: float, repeats: int,
                    warmup: int, seed: int) -> BenchReport:
    """One server process; each edge count in turn against it (fresh edge processes, fresh sessions)."""
    server, address = start_server({"pipeline": pipeline, "seed": seed, "max_batch": max(1024, batch_size)})
    failed = True
    try:
        windows = [run_window(n, address, pipeline, batch_size, seconds, warmup, seed) for n in counts]
        failed = False
    finally:
        summary = stop_server(server, failed)
    applied = summary["steps_per_session"]
    report = BenchReport("edges", COLUMNS)
    report.rows = [summarize(n, reports, applied, start, end, batch_size, repeats)
                   for n, (reports, start, end) in zip(counts, windows)]
    ours = {edge["session"] for reports, _, _ in windows for edge in reports}
    report.settings = {"edges": counts, "pipeline": pipeline, "batch_size": batch_size, "seconds": seconds,
                       "repeats": repeats, "warmup_steps": warmup, "seed": seed, "budget": "all channels (B = C)",
                       "codec": "fp32", "transport": "tcp://127.0.0.1", "edge_torch_threads": 1,
                       "server_errors": summary["errors"], "server_steps_applied": summary["steps_applied"],
                       "server_steps_for_unknown_sessions": sum(count for session, count in applied.items()
                                                                if session not in ours)}
    report.notes = [
        "each edge is a process (multiprocessing forkserver) with its own EdgeClient and torch set to 1 thread; "
        "one `sparse-rt node --role server` process (torch's default threads) serves every row",
        "all edges connect, handshake and warm up, wait on a barrier, then train in one shared window of "
        f"{seconds:g} s; steps completing inside it count; inputs are synthetic (random, the pipeline's shape)",
        f"agg_sps: median over the window cut into {repeats} equal parts (--repeats); edge_sps_*: per edge over the "
        "whole window; fairness = min / max of per-edge samples/s",
        "latency: wall time of one EdgeClient.train_step (head, encode, round trip, decode, backward), all edges",
        "lost = sent but not applied, duplicated = applied more than sent, per session, against the server's "
        "per-session counts at exit; errors = steps the edges sent without an acknowledgement; steps = acknowledged "
        "steps, warm-up included",
    ]
    if summary["errors"]:
        report.notes.append(f"the server counted {summary['errors']} errors (see its log)")
    return report


def plot(report: BenchReport, path: Path) -> None:
    """Aggregate samples/s and fairness vs edges; latency percentiles vs edges."""
    plt = pyplot()
    edges = [row["edges"] for row in report.rows]
    figure, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    rate.plot(edges, [row["agg_sps"] for row in report.rows], "o-", label="aggregate samples/s")
    rate.set_xscale("log", base=2)
    rate.set_xticks(edges, [str(n) for n in edges])
    rate.set_ylim(bottom=0)
    rate.set_xlabel("edge processes")
    rate.set_ylabel("samples / s")
    fairness = rate.twinx()
    fairness.plot(edges, [row["fairness"] for row in report.rows], "s--", color="tab:orange", label="fairness")
    fairness.set_ylim(0, 1.05)
    fairness.set_ylabel("fairness (min / max per edge)")
    rate.legend(loc="lower left")
    fairness.legend(loc="lower right")
    rate.set_title(f"{report.settings['pipeline']}, batch {report.settings['batch_size']}")
    for q in (50, 95, 99):
        latency.plot(edges, [row[f"p{q}_ms"] for row in report.rows], "o-", label=f"p{q}")
    latency.set_xscale("log", base=2)
    latency.set_xticks(edges, [str(n) for n in edges])
    latency.set_yscale("log")
    latency.set_xlabel("edge processes")
    latency.set_ylabel("training step latency (ms)")
    latency.legend()
    save_figure(figure, path, dpi=120)


@click.command("edges")
@bench_options
@click.option("--edges", "counts", type=NumberList(int, "1,2,4", "edge counts must be at least 1"),
              default=",".join(map(str, EDGE_COUNTS)), show_default=True,
              help="Comma-separated numbers of edge processes to run, one row each.")
@click.option("--pipeline", type=PipelineList(), default="digits_cnn", show_default=True,
              help="Pipeline the server and the edges run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Samples per step.")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Length of the shared training window per row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model and the synthetic data.")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, counts: list[int], pipeline: str,
            batch_size: int, seconds: float, seed: int) -> None:
    """Many edge processes on one server: throughput, fairness, latency, lost and duplicated steps.

    --warmup is the number of untimed training steps per edge before the
    window; --repeats cuts the window into that many equal parts and reports
    the median part's aggregate rate.

    \b
    Example:
      sparse-rt bench edges --edges 1,4,16 --seconds 5 --out bench/
    """
    emit(run_edges_bench(counts, pipeline, batch_size, seconds, repeats, warmup, seed), as_json, out, plot)
