"""`sparse-rt bench adaptive`: inference with a deadline over a link whose rate changes, policy against policy.

A model set (`sparse-rt train prune`, trained here unless ``--models`` is
given) is served by a `sparse-rt node --role server --models` process. An
edge streams test images as requests of ``--batch`` images, one at a
time, through a shaped link that follows a trace of rates (default 100, 5,
50, then 1 Mbit/s, 20 s each) with a fixed round trip. The images streamed
are the odd-indexed test images when every exit of the set was calibrated
on the even-indexed ones (`sparse-rt train exit`), so the exits' thresholds
were not chosen on the images they are measured on; a set whose exits were
calibrated otherwise (an older `train exit`) streams every test image, and
the notes say its exit accuracies are optimistic. The edge's sends go
through the shaper with the whole round trip as their delay; the replies
(a few logits) are not shaped.

Each policy runs the whole trace from its start, in turn:

- ``fixed-B``: every request at budget B in fp32, for every budget of the set
  (``fixed-LAYER:B`` for a model cut at another layer than the set's default);
- ``controller``: the deadline controller (edge/controller.py), which knows
  only what its own requests show;
- ``controller+exit``: the same, also choosing an early exit and its
  threshold per request (the set's exits, `sparse-rt train exit`; trained
  here on a copy of the set when it has none);
- ``oracle``: the same choice rule given the true rate and round trip of the
  segment at every request (it knows the trace), and the compute it
  measured, choosing among every option the exits included.

Per policy: ``deadline_hit_rate`` (share of requests answered within the
deadline), ``accuracy`` (of the answers given), ``mean_bytes_per_sample``
(bytes up + down at the edge's socket per image), p50/p99 latency, the
share of images answered on the device (``exit_share``) with the accuracy of
each path (``exit_accuracy``, ``server_accuracy``), and for the adaptive
policies ``switch_requests``: after each change of rate, the requests until
the choice changed (None where it kept its choice).
"""
from __future__ import annotations

import asyncio
import bisect
import json
import shutil
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
from sparse_rt.edge.controller import Choice, DeadlineController, Decision, options_from_manifest
from sparse_rt.edge.estimate import LinkEstimate
from sparse_rt.errors import DataError
from sparse_rt.pipeline import get_pipeline
from sparse_rt.store.modelset import entry_cut, read_manifest
from sparse_rt.train.exits import CALIBRATION_IMAGES, HELD_OUT_IMAGES, held_out_split
from sparse_rt.train.local import load_data
from sparse_rt.transport.shaper import Shaper

DEFAULT_TRACE = "100:20,5:20,50:20,1:20"  # Mbit/s : seconds
DEFAULT_PHASES = "C:8,16:3,8:2,2:3"  # the bench's own model set, when none is given (about a minute on 2 cores)
COLUMNS = ("policy", "requests", "deadline_hit_rate", "accuracy", "mean_bytes_per_sample", "p50_ms", "p99_ms",
           "exit_share", "exit_accuracy", "server_accuracy", "switch_requests")
ADAPTIVE = ("controller", "controller+exit", "oracle")
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
    if name in ("controller", "controller+exit"):
        options.update(deadline_ms=deadline_ms, early_exit=name == "controller+exit")
    elif name == "oracle":
        manifest = read_manifest(models)
        options["policy"] = Oracle(options_from_manifest(manifest, exits=True), deadline_ms, trace=trace,
                                   rtt_ms=rtt_ms, started=started, classes=get_pipeline(pipeline).num_classes)
    records = []
    values = values_per_sample(read_manifest(models))
    async with EdgeClient(pipeline, address, model_set=models, shaper=shaper, timeout=REQUEST_TIMEOUT,
                          **options) as edge:
        if name.startswith("fixed-"):
            edge.select(fixed_choice(name))
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
                right = logits.argmax(1).eq(y)
                local = edge.last_on_device if edge.last_on_device is not None else torch.zeros_like(right)
                records.append({"t": round(now, 4), "segment": trace.index(now), "latency_ms": round(latency, 2),
                                "right": int(right.sum()), "samples": len(y), "on_device": int(local.sum()),
                                "right_on_device": int(right[local].sum()),
                                "bytes": edge.traffic.bytes_sent + edge.traffic.bytes_received - sent,
                                "budget": edge.choice.budget, "cut": edge.choice.cut,
                                "values": values[edge.choice.cut, edge.choice.budget], "choice": edge.choice.label,
                                "predicted_ms": _rounded(decision.predicted_ms if decision else None),
                                "rate_mbps": _rounded(edge.session.estimate.snapshot()["rate_mbps"])})
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
    return summarize(name, records, deadline_ms)


def values_per_sample(manifest: dict[str, Any]) -> dict[tuple[str | None, int], int]:
    """(cut, budget) -> the values a sample sends with that model (None: the set's default cut)."""
    values = {}
    for entry in manifest["models"]:
        cut = entry_cut(manifest, entry)
        height, width = entry.get("sent_height"), entry.get("sent_width")
        if height is None or width is None:  # a set written before entries said so: from the fp32 size
            count = int(entry["bytes_per_sample"]["fp32"] // 4)
        else:
            count = int(entry["budget"]) * int(height) * int(width)
        values[None if cut == manifest["cut"] else cut, int(entry["budget"])] = count
    return values


def _model_order(model: tuple[str | None, int]) -> tuple[bool, str, int]:
    return model[0] is not None, model[0] or "", -model[1]  # the default cut first, larger budgets first


def fixed_name(model: tuple[str | None, int]) -> str:
    cut, budget = model
    return f"fixed-{budget}" if cut is None else f"fixed-{cut}:{budget}"


def fixed_choice(name: str) -> Choice:
    """``fixed-8`` or ``fixed-block3:8`` as the choice it always sends (fp32)."""
    model = name.removeprefix("fixed-")
    cut, _, budget = model.rpartition(":")
    return Choice(int(budget), cut=cut or None)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summarize(name: str, records: list[dict[str, Any]], deadline_ms: float) -> dict[str, Any]:
    latencies = [r["latency_ms"] for r in records]
    samples = sum(r["samples"] for r in records)
    local = sum(r["on_device"] for r in records)
    right, right_local = sum(r["right"] for r in records), sum(r["right_on_device"] for r in records)
    return {"policy": name, "name": name, "requests": len(records),
            "deadline_hit_rate": sum(ms <= deadline_ms for ms in latencies) / max(len(records), 1),
            "accuracy": right / max(samples, 1),
            "mean_bytes_per_sample": sum(r["bytes"] for r in records) / max(samples, 1),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "exit_share": local / max(samples, 1),
            "exit_accuracy": right_local / local if local else None,
            "server_accuracy": (right - right_local) / (samples - local) if samples > local else None,
            "switch_requests": None, "timeline": records}


def switch_requests(policy: dict[str, Any]) -> list[int | None]:
    """After each change of segment, the requests until the policy's choice changed (None: it kept its choice).

    Not judged against the oracle's: with the exits among the options, the
    oracle's choice may stay where a policy without them has to move.
    """
    result: list[int | None] = []
    timeline = policy["timeline"]
    for segment in sorted({r["segment"] for r in timeline} - {0}):
        before = [r["choice"] for r in timeline if r["segment"] == segment - 1]
        after = [r["choice"] for r in timeline if r["segment"] == segment]
        if before and after:
            result.append(next((i + 1 for i, choice in enumerate(after) if choice != before[-1]), None))
    return result


def model_set(pipeline: str, models: Path | None, data: Path | None, phases: str, folder: Path) -> Path:
    """The given model set, or one trained now with `train prune` (progress bar on stderr); with early exits.

    A given set without exits is copied and the copy gets them: the bench does not write into the user's set.
    """
    from sparse_rt.train.exits import train_exits

    out = folder / "models"
    if models is None:
        from sparse_rt.train import schedules
        from sparse_rt.train.scheduled import run_schedule

        asyncio.run(run_schedule("prune", RunConfig(pipeline=pipeline, data=data, progress=True),
                                 lambda c: schedules.prune(schedules.parse_phases(phases, c)), out))
    elif all("exit" in entry for entry in read_manifest(models)["models"]):
        return models
    else:
        shutil.copytree(models, out)
    train_exits(out, data, progress=True)
    return out


def run_adaptive(pipeline: str, models: Path | None, data: Path | None, phases: str, trace: list[Segment],
                 rtt_ms: float, deadline_ms: float, batch: int, seed: int = 0) -> BenchReport:
    with tempfile.TemporaryDirectory(prefix="sparse-rt-adaptive-") as folder:
        models = model_set(pipeline, models, data, phases, Path(folder))
        manifest = read_manifest(models)
        if manifest["pipeline"] != pipeline:
            raise DataError(f"{models} is a model set of '{manifest['pipeline']}', not '{pipeline}'")
        split = load_data(get_pipeline(pipeline), RunConfig(pipeline=pipeline, data=data, seed=seed))
        held_out = all(entry["exit"].get("calibration_images") == CALIBRATION_IMAGES for entry in manifest["models"])
        if held_out:  # the images no exit's calibration saw
            (images, labels), streamed = held_out_split(split.x_test, split.y_test), HELD_OUT_IMAGES
        else:
            images, labels, streamed = split.x_test, split.y_test, "test"
        names = [fixed_name(choice) for choice in sorted(values_per_sample(manifest), key=_model_order)]
        names += list(ADAPTIVE)
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
    for row in rows:
        if row["policy"] in ADAPTIVE:
            row["switch_requests"] = switch_requests(row)
    report = BenchReport("adaptive", COLUMNS, rows)
    report.settings = {"pipeline": pipeline, "models": str(models), "manifest": manifest, "trace":
                       [vars(s) for s in trace], "rtt_ms": rtt_ms, "deadline_ms": deadline_ms, "batch": batch,
                       "shaped": "the edge's sends (delay = the round trip); replies unshaped",
                       "transport": "tcp://127.0.0.1", "streamed": streamed, "test_images": len(labels)}
    report.notes = _notes(rows, deadline_ms)
    if not held_out:
        report.notes.append(f"not every exit of the set was calibrated on {CALIBRATION_IMAGES} alone (an older "
                            f"`sparse-rt train exit`), so every test image was streamed, images the calibration may "
                            f"have seen: exit accuracies are optimistic; `sparse-rt train exit` on the set again "
                            f"lets the bench stream {HELD_OUT_IMAGES} only")
    return report


def _notes(rows: list[dict[str, Any]], deadline_ms: float) -> list[str]:
    """The targets, judged: controller+exit against the oracle, every fixed budget against controller+exit."""
    by_name = {row["policy"]: row for row in rows}
    oracle = by_name["oracle"]
    notes = [f"deadline {deadline_ms:g} ms (hit-rate target {TARGET_HIT_RATE}); oracle accuracy {oracle['accuracy']:.3f}"]
    for name in ("controller", "controller+exit"):
        row = by_name[name]
        notes.append(f"{name}: hit rate {row['deadline_hit_rate']:.3f}, accuracy {row['accuracy']:.3f} "
                     f"({(row['accuracy'] - oracle['accuracy']) * 100:+.1f} points vs the oracle), "
                     f"{row['exit_share']:.1%} answered on the device")
    best = by_name["controller+exit"]
    for row in rows:
        if row["policy"].startswith("fixed-"):
            misses = 1 - row["deadline_hit_rate"]
            worse = best["accuracy"] - row["accuracy"]
            verdict = ("misses the deadline on more than 20% of requests" if misses > 0.2 else
                       "at least 5 points less accurate than controller+exit" if worse >= 0.05 else
                       "NEITHER: as good as controller+exit here")
            notes.append(f"{row['policy']}: misses {misses:.1%}, accuracy {worse * 100:+.1f} points below "
                         f"controller+exit: {verdict}")
    return notes


def plot(report: BenchReport, path: Path) -> None:
    """Timeline: the link's rate, each adaptive policy's choice (values it sends) and exit share, and latency."""
    plt = pyplot()
    figure, (rate, budget, exits, latency) = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    trace, deadline = report.settings["trace"], report.settings["deadline_ms"]
    edges, t = [0.0], 0.0
    for segment in trace:
        t += segment["seconds"]
        edges.append(t)
    rate.step(edges, [trace[0]["mbps"]] + [s["mbps"] for s in trace], where="pre", color="black", label="link")
    rate.set_yscale("log")
    rate.set_ylabel("Mbit/s")
    for row in report.rows:
        if row["policy"] in ADAPTIVE:
            times = [r["t"] for r in row["timeline"]]
            if row["policy"] != "oracle":
                estimates = [r["rate_mbps"] for r in row["timeline"]]
                rate.plot(times, [e if e else float("nan") for e in estimates], ".", markersize=2,
                          label=f"{row['policy']}'s estimate")
            budget.plot(times, [r["values"] for r in row["timeline"]], drawstyle="steps-post", label=row["policy"])
            exits.plot(times, _rolling_share(row["timeline"]), label=row["policy"])
            latency.plot(times, [r["latency_ms"] for r in row["timeline"]], ".", markersize=2, label=row["policy"])
    budget.set_ylabel("values / sample\n(budget x h x w)")
    budget.set_yscale("log")
    exits.set_ylabel(f"on device (last {SHARE_WINDOW})")
    exits.set_ylim(-0.05, 1.05)
    latency.axhline(deadline, color="red", linestyle="--", label=f"deadline {deadline:g} ms")
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.set_xlabel("seconds into the trace")
    for axes in (rate, budget, exits, latency):
        axes.legend(fontsize=7, loc="upper right")
    rate.set_title(f"{report.settings['pipeline']}: batches of {report.settings['batch']}, "
                   f"rtt {report.settings['rtt_ms']:g} ms")
    save_figure(figure, path, dpi=120)


SHARE_WINDOW = 10  # requests over which the plot's share answered on the device is taken


def _rolling_share(timeline: list[dict[str, Any]]) -> list[float]:
    shares = []
    for i in range(len(timeline)):
        window = timeline[max(0, i - SHARE_WINDOW + 1):i + 1]
        shares.append(sum(r["on_device"] for r in window) / max(sum(r["samples"] for r in window), 1))
    return shares


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
