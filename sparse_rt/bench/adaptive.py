"""`sparse-rt bench adaptive`: inference with a deadline over a link whose rate changes, policy against policy.

A model set (`sparse-rt train prune`, trained here unless ``--models`` is
given) is served by a `sparse-rt node --role server --models` process. An
edge streams the test images as requests of ``--batch`` images, one at a
time, through a shaped link that follows a trace of rates (default 100, 5,
50, then 1 Mbit/s, 20 s each) with a fixed round trip. The edge's sends go
through the shaper with the whole round trip as their delay; the replies
(a few logits) are not shaped.

Each policy runs the whole trace from its start, in turn:

- ``fixed-B``: every request at budget B in fp32, for every budget of the set;
- ``controller``: the deadline controller (edge/controller.py), which knows
  only what its own requests show;
- ``oracle``: the same choice rule given the true rate and round trip of the
  segment at every request (it knows the trace), and the compute it measured.

Per policy: ``deadline_hit_rate`` (share of requests answered within the
deadline), ``accuracy`` (of the answers given), ``mean_bytes_per_sample``
(bytes up + down at the edge's socket per image), p50/p99 latency, and for
the adaptive policies ``switch_requests``: after each change of rate, the
requests until the choice changed (None where it did not need to).
"""
from __future__ import annotations

import asyncio
import bisect
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click
import torch

from sparse_rt.bench.common import (BenchReport, PipelineList, percentile, pyplot, save_figure, start_server,
                                    stop_server)
from sparse_rt.config import RunConfig
from sparse_rt.edge.client import EdgeClient
from sparse_rt.edge.controller import DeadlineController, Decision, options_from_manifest
from sparse_rt.edge.estimate import LinkEstimate
from sparse_rt.errors import DataError
from sparse_rt.pipeline import get_pipeline
from sparse_rt.store.modelset import read_manifest
from sparse_rt.train.local import load_data
from sparse_rt.transport.shaper import Shaper

DEFAULT_TRACE = "100:20,5:20,50:20,1:20"  # Mbit/s : seconds
DEFAULT_PHASES = "C:8,16:3,8:2,2:3"  # the bench's own model set, when none is given (about a minute on 2 cores)
COLUMNS = ("policy", "requests", "deadline_hit_rate", "accuracy", "mean_bytes_per_sample", "p50_ms", "p99_ms",
           "switch_requests")
TARGET_HIT_RATE = 0.95
REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True)
class Segment:
    mbps: float
    seconds: float


def parse_trace(text: str) -> list[Segment]:
    """``MBPS:SECONDS,...`` as segments; a clear error for anything else."""
    segments = []
    for item in text.split(","):
        try:
            mbps, seconds = (float(part) for part in item.split(":"))
        except ValueError:
            raise click.BadParameter(f"'{item}' is not MBPS:SECONDS (e.g. {DEFAULT_TRACE})", param_hint="'--trace'")
        if not (mbps > 0 and seconds > 0):
            raise click.BadParameter(f"'{item}': rate and duration must be positive", param_hint="'--trace'")
        segments.append(Segment(mbps, seconds))
    return segments


class Trace:
    """Where in the trace a moment falls, from the start of a policy's run."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = list(segments)
        self.ends = []
        elapsed = 0.0
        for segment in self.segments:
            elapsed += segment.seconds
            self.ends.append(elapsed)

    @property
    def seconds(self) -> float:
        return self.ends[-1]

    def index(self, t: float) -> int:
        return min(bisect.bisect_right(self.ends, t), len(self.segments) - 1)

    def rate_bps(self, t: float) -> float:
        return self.segments[self.index(t)].mbps * 1e6


class Oracle(DeadlineController):
    """The controller's rule with the true link of the moment in place of its estimate."""

    def __init__(self, *args: Any, trace: Trace, rtt_ms: float, started: list[float], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace, self.rtt_ms, self.started = trace, rtt_ms, started

    def choose(self, estimate: LinkEstimate, samples: int) -> Decision:
        now = time.monotonic() - self.started[0]
        truth = LinkEstimate.known(self.rtt_ms, self.trace.rate_bps(now), estimate.server_ms)
        return super().choose(truth, samples)


async def _drive(shaper: Shaper, trace: Trace, started: float) -> None:
    """The link follows the trace: each segment's rate from its start."""
    for segment, end in zip(trace.segments, trace.ends):
        shaper.rate_bps = segment.mbps * 1e6
        await asyncio.sleep(max(started + end - time.monotonic(), 0.0))


async def run_policy(name: str, pipeline: str, address: str, models: Path, images: torch.Tensor, labels: torch.Tensor,
                     trace: Trace, rtt_ms: float, deadline_ms: float, batch: int) -> dict[str, Any]:
    """One policy over the whole trace: per-request records and the policy's row."""
    shaper = Shaper(trace.segments[0].mbps * 1e6, rtt_ms / 1e3)
    options: dict[str, Any] = {}
    started = [0.0]
    if name == "controller":
        options["deadline_ms"] = deadline_ms
    elif name == "oracle":
        manifest = read_manifest(models)
        options["policy"] = Oracle(options_from_manifest(manifest), deadline_ms, trace=trace, rtt_ms=rtt_ms,
                                   started=started, classes=get_pipeline(pipeline).num_classes)
    else:
        options["budget"] = int(name.removeprefix("fixed-"))
    records = []
    async with EdgeClient(pipeline, address, model_set=models, shaper=shaper, timeout=REQUEST_TIMEOUT,
                          **options) as edge:
        started[0] = time.monotonic()
        driver = asyncio.create_task(_drive(shaper, trace, started[0]))
        position = 0
        try:
            while (now := time.monotonic() - started[0]) < trace.seconds:
                x, y = images[position:position + batch], labels[position:position + batch]
                position = (position + batch) % max(len(images) - batch, 1)
                sent = edge.traffic.bytes_sent + edge.traffic.bytes_received
                began = time.perf_counter()
                logits = await edge.infer(x)
                latency = (time.perf_counter() - began) * 1e3
                decision = edge.last_decision
                records.append({"t": round(now, 4), "segment": trace.index(now), "latency_ms": round(latency, 2),
                                "right": int(logits.argmax(1).eq(y).sum()), "samples": len(y),
                                "bytes": edge.traffic.bytes_sent + edge.traffic.bytes_received - sent,
                                "budget": decision.choice.budget if decision else edge.budget,
                                "choice": decision.choice.label if decision else f"{edge.budget}/fp32",
                                "predicted_ms": _rounded(decision.predicted_ms if decision else None),
                                "rate_mbps": _rounded(edge.session.estimate.snapshot()["rate_mbps"])})
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
    return summarize(name, records, deadline_ms)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarize(name: str, records: list[dict[str, Any]], deadline_ms: float) -> dict[str, Any]:
    latencies = [r["latency_ms"] for r in records]
    samples = sum(r["samples"] for r in records)
    return {"policy": name, "name": name, "requests": len(records),
            "deadline_hit_rate": sum(ms <= deadline_ms for ms in latencies) / max(len(records), 1),
            "accuracy": sum(r["right"] for r in records) / max(samples, 1),
            "mean_bytes_per_sample": sum(r["bytes"] for r in records) / max(samples, 1),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "switch_requests": None, "timeline": records}


def switch_requests(policy: dict[str, Any], oracle: dict[str, Any] | None) -> list[int | None]:
    """After each change of segment, the requests until the policy's choice changed, where the oracle's did."""
    result: list[int | None] = []
    timeline = policy["timeline"]
    for segment in sorted({r["segment"] for r in timeline} - {0}):
        before = [r["choice"] for r in timeline if r["segment"] == segment - 1]
        after = [r["choice"] for r in timeline if r["segment"] == segment]
        if not before or not after:
            continue
        if oracle is not None:
            wanted = ({r["choice"] for r in oracle["timeline"] if r["segment"] == segment - 1}
                      != {r["choice"] for r in oracle["timeline"] if r["segment"] == segment})
            if not wanted:
                result.append(None)
                continue
        changed = next((i + 1 for i, choice in enumerate(after) if choice != before[-1]), None)
        result.append(changed)
    return result


def model_set(pipeline: str, models: Path | None, data: Path | None, phases: str, folder: Path) -> Path:
    """The given model set, or one trained now with `train prune` (progress bar on stderr)."""
    if models is not None:
        return models
    from sparse_rt.train import schedules
    from sparse_rt.train.scheduled import run_schedule

    out = folder / "models"
    asyncio.run(run_schedule("prune", RunConfig(pipeline=pipeline, data=data, progress=True),
                             lambda c: schedules.prune(schedules.parse_phases(phases, c)), out))
    return out


def run_adaptive(pipeline: str, models: Path | None, data: Path | None, phases: str, trace: list[Segment],
                 rtt_ms: float, deadline_ms: float, batch: int, seed: int = 0) -> BenchReport:
    with tempfile.TemporaryDirectory(prefix="sparse-rt-adaptive-") as folder:
        models = model_set(pipeline, models, data, phases, Path(folder))
        manifest = read_manifest(models)
        if manifest["pipeline"] != pipeline:
            raise DataError(f"{models} is a model set of '{manifest['pipeline']}', not '{pipeline}'")
        split = load_data(get_pipeline(pipeline), RunConfig(pipeline=pipeline, data=data, seed=seed))
        images, labels = split.x_test, split.y_test
        budgets = sorted((int(m["budget"]) for m in manifest["models"]), reverse=True)
        names = [f"fixed-{b}" for b in budgets] + ["controller", "oracle"]
        server, address = start_server({"pipeline": pipeline, "models": models})
        rows, failed = [], True
        try:
            timeline = Trace(trace)
            for name in names:
                rows.append(asyncio.run(run_policy(name, pipeline, address, models, images, labels, timeline,
                                                   rtt_ms, deadline_ms, batch)))
            failed = False
        finally:
            stop_server(server, failed)
    oracle = next(row for row in rows if row["policy"] == "oracle")
    for row in rows:
        if row["policy"] in ("controller", "oracle"):
            row["switch_requests"] = switch_requests(row, oracle if row is not oracle else None)
    report = BenchReport("adaptive", COLUMNS, rows)
    report.settings = {"pipeline": pipeline, "models": str(models), "manifest": manifest, "trace":
                       [vars(s) for s in trace], "rtt_ms": rtt_ms, "deadline_ms": deadline_ms, "batch": batch,
                       "shaped": "the edge's sends (delay = the round trip); replies unshaped",
                       "transport": "tcp://127.0.0.1", "test_images": len(labels)}
    report.notes = _notes(rows, deadline_ms)
    return report


def _notes(rows: list[dict[str, Any]], deadline_ms: float) -> list[str]:
    by_name = {row["policy"]: row for row in rows}
    controller, oracle = by_name["controller"], by_name["oracle"]
    notes = [f"deadline {deadline_ms:g} ms; controller: hit rate {controller['deadline_hit_rate']:.3f} "
             f"(target {TARGET_HIT_RATE}), accuracy {controller['accuracy']:.3f} vs the oracle's "
             f"{oracle['accuracy']:.3f}"]
    for row in rows:
        if row["policy"].startswith("fixed-"):
            misses = 1 - row["deadline_hit_rate"]
            worse = controller["accuracy"] - row["accuracy"]
            verdict = ("misses the deadline on more than 20% of requests" if misses > 0.2 else
                       "at least 5 points less accurate than the controller" if worse >= 0.05 else
                       "NEITHER: as good as the controller here")
            notes.append(f"{row['policy']}: misses {misses:.1%}, accuracy {worse * 100:+.1f} points below the "
                         f"controller: {verdict}")
    return notes


def plot(report: BenchReport, path: Path) -> None:
    """Timeline: the link's rate, each adaptive policy's budget, and latency against the deadline."""
    plt = pyplot()
    figure, (rate, budget, latency) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    trace, deadline = report.settings["trace"], report.settings["deadline_ms"]
    edges, t = [0.0], 0.0
    for segment in trace:
        t += segment["seconds"]
        edges.append(t)
    rate.step(edges, [trace[0]["mbps"]] + [s["mbps"] for s in trace], where="pre", color="black", label="link")
    rate.set_yscale("log")
    rate.set_ylabel("Mbit/s")
    for row in report.rows:
        if row["policy"] in ("controller", "oracle"):
            times = [r["t"] for r in row["timeline"]]
            estimates = [r["rate_mbps"] for r in row["timeline"]]
            if row["policy"] == "controller":
                rate.plot(times, [e if e else float("nan") for e in estimates], ".", markersize=2,
                          label="controller's estimate")
            budget.plot(times, [r["budget"] for r in row["timeline"]], drawstyle="steps-post", label=row["policy"])
            latency.plot(times, [r["latency_ms"] for r in row["timeline"]], ".", markersize=2, label=row["policy"])
    budget.set_ylabel("budget (channels)")
    latency.axhline(deadline, color="red", linestyle="--", label=f"deadline {deadline:g} ms")
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_xlabel("seconds into the trace")
    for axes in (rate, budget, latency):
        axes.legend(fontsize=7, loc="upper right")
    rate.set_title(f"{report.settings['pipeline']}: batches of {report.settings['batch']}, "
                   f"rtt {report.settings['rtt_ms']:g} ms")
    save_figure(figure, path, dpi=120)


@click.command("adaptive")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results, nothing else.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Also write adaptive.json and a PNG timeline into this directory.")
@click.option("--pipeline", type=PipelineList(), default="cifar_cnn", show_default=True)
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A model set from `sparse-rt train prune`. Default: train one now with --phases.")
@click.option("--phases", default=DEFAULT_PHASES, show_default=True, help="The model set's prune phases, "
              "when --models is not given.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own .npz data instead of the pipeline's.")
@click.option("--trace", default=DEFAULT_TRACE, show_default=True, help="The link's rates: MBPS:SECONDS,...",
              callback=lambda ctx, param, value: parse_trace(value))
@click.option("--rtt-ms", type=click.FloatRange(min=0), default=20.0, show_default=True, help="The link's round trip.")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Images per request.")
def command(as_json: bool, out: Path | None, pipeline: str, models: Path | None, phases: str, data: Path | None,
            trace: list[Segment], rtt_ms: float, deadline_ms: float, batch: int) -> None:
    """Inference with a deadline over a link whose rate follows a trace: fixed budgets, the controller, an oracle.

    \b
    Example:
      sparse-rt bench adaptive --out docs/bench        # cifar_cnn, 100/5/50/1 Mbit/s, 20 s each
      sparse-rt bench adaptive --pipeline digits_cnn --trace 100:2,1:2 --deadline-ms 30
    """
    report = run_adaptive(pipeline, models, data, phases, trace, rtt_ms, deadline_ms, batch)
    if out is not None:  # with every request's record, for the plot and for a second look
        out.mkdir(parents=True, exist_ok=True)
        (out / "adaptive.json").write_text(json.dumps(report.to_dict(), separators=(",", ":")))  # ~10,000 records
        plot(report, out / "adaptive.png")
    if as_json:  # one object with a `policies` list (the per-request timelines stay in --out's file)
        click.echo(json.dumps({"suite": "adaptive", "settings": {k: v for k, v in report.settings.items()
                                                                 if k != "manifest"},
                               "policies": [{k: v for k, v in row.items() if k != "timeline"} for row in report.rows],
                               "notes": report.notes}))
    else:
        click.echo(report.table())
        if out is not None:
            click.echo(f"wrote {out / 'adaptive.json'} and adaptive.png")
