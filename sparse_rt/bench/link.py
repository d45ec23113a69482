"""`sparse-rt bench link`: split training over a link of given bandwidth and delay, against the bound it allows.

For each link rate and each (budget, codec) the suite trains the split for a
few steps and reports samples/s next to the bound
``min(link rate / bytes per sample, samples/s of the same split unshaped)``.

The link is **half-duplex**: one medium carries both directions (as Wi-Fi
does), so bytes per sample are up + down, measured at the edge's socket. With
one edge, split training is sequential anyway (activations up, wait, gradients
down), so a full-duplex link of the same rate would give the same measured
samples/s; only its bound would be higher (rate / max(up, down)), by a factor
that training cannot use.

How the link is shaped, in order of preference:

- ``netem``: server and edge in a child process inside a throwaway network
  namespace, talking tcp over its loopback, which goes through one tc netem
  queue (bench/netns.py). The kernel's TCP is in the loop.
- ``token-bucket``: server and edge in this process over tcp://127.0.0.1,
  both sockets sharing one :class:`~sparse_rt.transport.shaper.Shaper`
  (one link state for both directions: half-duplex, as above).

Each row also carries a profile of one step: ``compute_ms`` (the unshaped
step), ``transfer_ms`` (bytes up + down at the link rate), ``delay_ms`` (one
rtt). Since the step is sequential its time is about their sum, while the
bound assumes the larger one hides the others; where they are of similar size
the ratio falls towards 0.5 and the profile shows why. ``ceiling`` is the
ratio a sequential step would reach with no overhead at all (the bound's
definition is not changed by it).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import torch

from sparse_rt.bench.common import (DEFAULT_BUDGETS, Batches, BenchReport, BudgetList, NumberList, PipelineList,
                                    bench_options, emit, pyplot, resolve_budgets, save_figure, synthetic_batches)
from sparse_rt.bench.netns import namespace, netem_problem, run_inside, shape_loopback
from sparse_rt.errors import DataError
from sparse_rt.pipeline import Pipeline, TrainingSettings, get_pipeline
from sparse_rt.assembly import build_halves
from sparse_rt.pair import SplitPair
from sparse_rt.transport.shaper import Shaper
from sparse_rt.wire.codecs import CODEC_NAMES, codec_names

DEFAULT_MBPS = "10,100,1000"
TARGET_RATIO = 0.8  # wanted at the TARGET_MBPS rates
TARGET_MBPS = (10.0, 100.0)
SHAPERS = ("auto", "netem", "token-bucket")
REQUEST_TIMEOUT = 300.0  # seconds: a full-budget fp32 step on a slow link takes seconds, never minutes
CHILD_TIMEOUT = 3600.0  # seconds for all variants of one rate inside the namespace
COLUMNS = ("mbps", "budget", "codec", "bytes_per_sample", "samples_per_s", "bound", "ratio_vs_bound", "limited_by",
           "ceiling", "step_ms", "compute_ms", "transfer_ms", "delay_ms")


class CodecList(click.ParamType):
    name = "CODECS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        items = [item.strip() for item in str(value).split(",")]
        unknown = [item for item in items if item not in codec_names()]  # after --import: one's own codecs too
        if unknown:
            self.fail(f"unknown codec '{unknown[0]}'; expected some of {', '.join(codec_names())}", param, ctx)
        return items


@dataclass(frozen=True)
class Variant:
    budget: int
    codec: str
    lz4: bool = False

    @property
    def label(self) -> str:
        return self.codec + ("+lz4" if self.lz4 else "")


@dataclass
class Measured:
    """One variant over one link: the median rate and the bytes per training sample at the edge's socket."""

    samples_per_s: float
    bytes_up: float
    bytes_down: float


@dataclass
class Plan:
    """What every measurement shares; plain data, so the netem child gets it as JSON."""

    pipeline: str
    batch_size: int
    steps: int
    repeats: int
    warmup: int
    seed: int
    synthetic: bool


def training_batches(pipeline: Pipeline, plan: Plan) -> tuple[Batches, str]:
    """Up to ``steps`` batches to cycle through, and what they are: the pipeline's real data, else synthetic."""
    reason = "asked for with --synthetic"
    if not plan.synthetic:
        try:
            data = pipeline.load_data(plan.seed)
        except (DataError, OSError) as exc:
            reason = f"the pipeline's data could not be loaded: {exc}"
        else:
            size, count = plan.batch_size, min(plan.steps, len(data.y_train) // plan.batch_size)
            if count:
                return ([(data.x_train[i * size:(i + 1) * size], data.y_train[i * size:(i + 1) * size])
                         for i in range(count)], f"real ({pipeline.name}'s own training data)")
            reason = f"the pipeline's data holds fewer than {size} training samples"
    return synthetic_batches(pipeline, plan.batch_size, 1, plan.seed), f"synthetic (random normal inputs; {reason})"


def _split(pipeline: Pipeline, plan: Plan, variant: Variant, shaper: Shaper | None) -> SplitPair:
    """A server and an edge in one loop over tcp://127.0.0.1, both sockets on ``shaper`` (None: unshaped)."""
    torch.manual_seed(plan.seed)
    return SplitPair.for_pipeline(pipeline, budget=variant.budget, codec=variant.codec, lz4=variant.lz4,
                                  transport="tcp", request_timeout=REQUEST_TIMEOUT, shaper=shaper)


def measure(pipeline: Pipeline, plan: Plan, variant: Variant, batches: Batches,
            shapers: Sequence[Shaper | None]) -> list[Measured]:
    """One split per link (None: unshaped), timed in turn, run by run.

    Interleaving the runs means a change of load on a shared machine hits the
    shaped splits and the unshaped one (the bound) alike. Each split's rate is
    the median over ``plan.repeats`` runs of ``plan.steps`` steps, after ``plan.warmup`` rounds.
    """
    loop = asyncio.new_event_loop()
    splits: list[SplitPair] = []
    try:
        for shaper in shapers:
            splits.append(_split(pipeline, plan, variant, shaper))
            loop.run_until_complete(splits[-1].start())
        before = [replace(split.traffic) for split in splits]  # the handshake is not a training sample's bytes
        seconds: list[list[float]] = [[] for _ in splits]

        async def steps(split: SplitPair) -> None:
            for i in range(plan.steps):
                await split.edge.train_step(*batches[i % len(batches)])

        for _ in range(plan.warmup + plan.repeats):
            for split, times in zip(splits, seconds):
                started = time.perf_counter()
                loop.run_until_complete(steps(split))
                times.append(time.perf_counter() - started)
        per_run = sum(len(batches[i % len(batches)][1]) for i in range(plan.steps))
        samples = per_run * (plan.warmup + plan.repeats)
        return [Measured(per_run / statistics.median(times[plan.warmup:]),
                         (split.traffic.bytes_sent - start.bytes_sent) / samples,
                         (split.traffic.bytes_received - start.bytes_received) / samples)
                for split, start, times in zip(splits, before, seconds)]
    finally:
        for split in splits:
            loop.run_until_complete(split.close())
        loop.close()


def _child_main() -> None:
    """Inside the netem namespace: measure the variants given as JSON on stdin, print the results as JSON."""
    spec = json.loads(sys.stdin.read())
    plan = Plan(**spec["plan"])
    pipeline = get_pipeline(plan.pipeline)
    batches, _ = training_batches(pipeline, plan)
    results = [asdict(measure(pipeline, plan, Variant(**variant), batches, [None])[0]) for variant in spec["variants"]]
    print(json.dumps(results))


def _measure_netem(plan: Plan, variants: list[Variant], rate_bps: float, delay_s: float) -> list[Measured]:
    with namespace() as name:
        shape_loopback(name, rate_bps, delay_s)
        stdin = json.dumps({"plan": asdict(plan), "variants": [asdict(variant) for variant in variants]})
        argv = [sys.executable, "-c", "from sparse_rt.bench.link import _child_main; _child_main()"]
        return [Measured(**result) for result in json.loads(run_inside(name, argv, stdin, CHILD_TIMEOUT))]


def choose_shaper(requested: str) -> tuple[str, str]:
    """The shaper to use and a note on why: netem when it works (or is demanded), else the token bucket."""
    if requested == "token-bucket":
        return "token-bucket", "token-bucket shaper inside the transport, as asked (--shaper token-bucket)"
    problem = netem_problem()
    if problem is None:
        return "netem", "kernel shaper: tc netem on the loopback of a network namespace made for this run"
    if requested == "netem":
        raise click.BadParameter(f"the kernel shaper cannot run here: {problem}", param_hint="--shaper")
    return "token-bucket", f"token-bucket shaper inside the transport; the kernel one was not used: {problem}"


def _row(mbps: float, rtt_ms: float, variant: Variant, shaper: str, shaped: Measured, free: Measured,
         batch_size: int) -> dict[str, Any]:
    per_sample = shaped.bytes_up + shaped.bytes_down
    link_rate = mbps * 1e6 / (8 * per_sample)
    bound = min(link_rate, free.samples_per_s)
    compute_ms, transfer_ms = batch_size / free.samples_per_s * 1e3, batch_size / link_rate * 1e3
    sequential = batch_size / (compute_ms + transfer_ms + rtt_ms) * 1e3  # samples/s if nothing overlaps
    return {"mbps": mbps, "budget": variant.budget, "codec": variant.label, "bytes_per_sample": per_sample,
            "samples_per_s": shaped.samples_per_s, "bound": bound, "ratio_vs_bound": shaped.samples_per_s / bound,
            "limited_by": "link" if link_rate < free.samples_per_s else "compute", "ceiling": sequential / bound,
            "step_ms": batch_size / shaped.samples_per_s * 1e3, "compute_ms": compute_ms, "transfer_ms": transfer_ms,
            "delay_ms": rtt_ms,
            "bytes_up_per_sample": shaped.bytes_up, "bytes_down_per_sample": shaped.bytes_down,
            "unshaped_samples_per_s": free.samples_per_s, "link_samples_per_s": link_rate, "shaper": shaper}


def _target_notes(rows: list[dict[str, Any]]) -> list[str]:
    judged = [row for row in rows if row["mbps"] in TARGET_MBPS]
    missed = [row for row in judged if row["ratio_vs_bound"] < TARGET_RATIO]
    if not judged:
        return []
    notes = [f"target ratio_vs_bound >= {TARGET_RATIO} at {', '.join(f'{m:g}' for m in TARGET_MBPS)} Mbit/s: "
             f"met by {len(judged) - len(missed)} of {len(judged)} rows"]
    if missed:
        notes.append("misses, step ms measured vs compute + transfer + delay: " + "; ".join(
            f"{row['mbps']:g} Mbit/s B={row['budget']} {row['codec']}: {row['step_ms']:.0f} vs "
            f"{row['compute_ms']:.0f}+{row['transfer_ms']:.0f}+{row['delay_ms']:.0f}" for row in missed))
        notes.append("why: a split training step is sequential (activations up, wait, gradients down), so it takes "
                     "compute + transfer + delay, while the bound takes only the larger of compute and transfer; "
                     "ceiling = (batch / (compute + transfer + delay)) / bound, the ratio a step reaches when "
                     "nothing overlaps: the most this runtime's sequential training can show")
    return notes


def run_link(pipeline_name: str, mbps: list[float], rtt_ms: float, budgets: list[str], codecs: list[str], lz4: bool,
             steps: int, batch_size: int | None, shaper: str, synthetic: bool, seed: int, repeats: int,
             warmup: int, progress: Callable[[str], None] = lambda line: None) -> BenchReport:
    """Measure every (rate, budget, codec) and the same variants unshaped; one row each."""
    pipeline = get_pipeline(pipeline_name)
    mbps = list(dict.fromkeys(mbps))
    used, why = choose_shaper(shaper)
    training = TrainingSettings.resolve(pipeline, batch_size=batch_size)
    plan = Plan(pipeline.name, training.batch_size, steps, repeats, warmup, seed, synthetic)
    channels = build_halves(pipeline, seed, None, training.resolution)[2].channels
    resolved = resolve_budgets(budgets, channels)
    variants = [Variant(budget, codec, with_lz4) for budget in resolved for codec in codecs
                for with_lz4 in ((False, True) if lz4 else (False,))]
    batches, data = training_batches(pipeline, plan)
    free: dict[Variant, Measured] = {}
    shaped: dict[tuple[float, Variant], Measured] = {}
    for variant in variants:
        progress(f"B={variant.budget} {variant.label}: unshaped" + ("" if used == "netem" else " and shaped"))
        if used == "netem":  # the namespace's loopback is all shaped: the bound's run stays out here
            free[variant] = measure(pipeline, plan, variant, batches, [None])[0]
        else:
            links = [None, *(Shaper(rate * 1e6, rtt_ms / 2e3) for rate in mbps)]
            free[variant], *measured = measure(pipeline, plan, variant, batches, links)
            shaped.update({(rate, variant): result for rate, result in zip(mbps, measured)})
    if used == "netem":
        for rate in mbps:
            progress(f"{rate:g} Mbit/s, rtt {rtt_ms:g} ms, netem")
            measured = _measure_netem(plan, variants, rate * 1e6, rtt_ms / 2e3)
            shaped.update({(rate, variant): result for variant, result in zip(variants, measured)})
    rows = [_row(rate, rtt_ms, variant, used, shaped[rate, variant], free[variant], plan.batch_size)
            for rate in mbps for variant in variants]
    notes = [why,
             "half-duplex link: both directions share it (one Shaper for both sockets, or one netem queue), so "
             "bytes_per_sample and the bound use up + down; a full-duplex link's bound would be rate / max(up, down), "
             "about twice as high for training, which a sequential split step cannot use",
             "server and edge run in one process over tcp://127.0.0.1" if used == "token-bucket" else
             "server and edge run in one child process inside the namespace, over its loopback",
             f"bound = min(link rate / bytes_per_sample, unshaped samples/s of the same variant); "
             f"training steps of {plan.batch_size} samples; data: {data}",
             *_target_notes(rows)]
    settings = {"pipeline": pipeline.name, "channels": channels, "mbps": mbps, "rtt_ms": rtt_ms,
                "budgets": resolved, "codecs": codecs, "lz4": lz4, "batch_size": plan.batch_size, "steps": steps,
                "repeats": repeats, "warmup": warmup, "seed": seed, "shaper": used, "duplex": "half", "data": data}
    return BenchReport("link", COLUMNS, rows, settings, notes)


def plot(report: BenchReport, path: Path) -> None:
    """Samples/s per budget and codec, one panel per rate; the bound a black tick, the sequential ceiling a dot."""
    plt = pyplot()
    rates = list(dict.fromkeys(row["mbps"] for row in report.rows))
    figure, axes = plt.subplots(1, len(rates), figsize=(4.5 * len(rates), 4), sharey=True, squeeze=False)
    for axis, rate in zip(axes[0], rates):
        rows = [row for row in report.rows if row["mbps"] == rate]
        labels = [f"{row['budget']}\n{row['codec']}" for row in rows]
        positions = range(len(rows))
        colors = ["tab:red" if row["limited_by"] == "link" else "tab:blue" for row in rows]
        axis.bar(positions, [row["samples_per_s"] for row in rows], color=colors)
        axis.scatter(positions, [row["bound"] for row in rows], marker="_", s=300, color="black", zorder=3,
                     label="bound")
        axis.scatter(positions, [row["ceiling"] * row["bound"] for row in rows], marker=".", color="grey", zorder=3,
                     label="sequential ceiling")
        axis.set_xticks(list(positions), labels, fontsize=7)
        axis.set_yscale("log")
        axis.set_title(f"{rate:g} Mbit/s, rtt {report.settings['rtt_ms']:g} ms")
        axis.set_xlabel("budget (channels) / codec")
    axes[0][0].set_ylabel("training samples/s (red: link-limited)")
    axes[0][0].legend(loc="upper left")
    figure.suptitle(f"{report.settings['pipeline']} over a shaped link ({report.settings['shaper']})")
    save_figure(figure, path, dpi=120)


@click.command("link")
@bench_options
@click.option("--pipeline", "pipeline_name", type=PipelineList(), default="cifar_cnn", show_default=True,
              help="Registered pipeline (or module:attribute) to train split.")
@click.option("--mbps", type=NumberList(float, DEFAULT_MBPS, "every link rate must be a positive number of Mbit/s"),
              default=DEFAULT_MBPS, show_default=True,
              help="Comma-separated link rates in Mbit/s (1e6 bit/s).")
@click.option("--rtt-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Round-trip time of the link in ms (half of it each way).")
@click.option("--budgets", type=BudgetList(), default=DEFAULT_BUDGETS, show_default=True,
              help="Comma-separated budgets: C (no compression), C/k, or a channel count.")
@click.option("--codecs", type=CodecList(), default=",".join(CODEC_NAMES), show_default=True,
              help="Comma-separated value codecs.")
@click.option("--lz4", is_flag=True, help="Also run every codec with lz4 on top.")
@click.option("--steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Training steps per timed run.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per step [default: the pipeline's].")
@click.option("--shaper", type=click.Choice(SHAPERS), default="auto", show_default=True,
              help="auto: tc netem in a network namespace when the kernel has it, else the token bucket.")
@click.option("--synthetic", is_flag=True, help="Random inputs instead of the pipeline's data.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the model and the data.")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, pipeline_name: str, mbps: list[float],
            rtt_ms: float, budgets: list[str], codecs: list[str], lz4: bool, steps: int, batch_size: int | None,
            shaper: str, synthetic: bool, seed: int) -> None:
    """Split training over a link of limited rate and delay, against the bound the link allows."""
    report = run_link(pipeline_name, mbps, rtt_ms, budgets, codecs, lz4, steps, batch_size, shaper, synthetic, seed,
                      repeats, warmup, progress=lambda line: None if as_json else click.echo(line, err=True))
    emit(report, as_json, out, plot)
