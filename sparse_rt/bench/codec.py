"""`sparse-rt bench codec`: what each codec costs and loses on the activations a pipeline really sends.

Random tensors would flatter lz4 (no structure) or int8 (no outliers), so the
values come from the pipeline's real head on real images (the CIFAR-10 subset
for cifar_cnn, scikit-learn's digits for digits_cnn), after a brief training of
the whole model so its batch-norm statistics and filters are no longer their
initial values, then through the edge's compressor at each budget, batch by
batch as an edge would send them. For every codec (fp32, fp16, int8), with and
without lz4: encode + decode throughput, bytes per sample, and the error of
the decoded values against the fp32 originals.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from sparse_rt.bench.common import (DEFAULT_BUDGETS, BenchReport, BudgetList, PipelineList, bench_options, emit,
                                    median_time, pyplot, resolve_budgets, save_figure, torch_threads)
from sparse_rt.data.datasets import TensorSplit
from sparse_rt.errors import DataError
from sparse_rt.model.sides import build_sides
from sparse_rt.pipeline import Pipeline, get_pipeline
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.transport.connection import frame_bytes
from sparse_rt.wire.codecs import CODEC_NAMES, get_codec
from sparse_rt.wire.messages import Activations, encode_message

PREFERRED, FALLBACK = "cifar_cnn", "digits_cnn"


def _pipeline_and_data(name: str | None, seed: int) -> tuple[Pipeline, TensorSplit, str | None]:
    """The named pipeline, or cifar_cnn when its CIFAR-10 subset is on disk, else digits_cnn (with a note)."""
    if name is not None:
        pipeline = get_pipeline(name)
        return pipeline, pipeline.load_data(seed), None
    try:
        pipeline = get_pipeline(PREFERRED)
        return pipeline, pipeline.load_data(seed), None
    except DataError as exc:
        pipeline = get_pipeline(FALLBACK)
        return pipeline, pipeline.load_data(seed), f"{PREFERRED} unavailable ({exc}); used {FALLBACK}"


def train_briefly(model: nn.Module, pipeline: Pipeline, data: TensorSplit, steps: int, seed: int) -> float | None:
    """A few optimizer steps on the whole (unsplit) model, so the head's activations are not those of an
    untrained network; returns the last batch's loss (None for 0 steps)."""
    loss = None
    if steps == 0:
        return loss
    optimizer = build_optimizer(model.parameters(), pipeline.optimizer, pipeline.lr, pipeline.weight_decay)
    loader, _ = data.loaders(pipeline.batch_size, seed)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return float(loss.detach())


def _errors(original: torch.Tensor, decoded: torch.Tensor) -> tuple[float, float]:
    """(max abs error, RMS error / RMS of the original) over all values, in float64."""
    x, y = original.double(), decoded.double()
    rms = float(x.pow(2).mean().sqrt())
    return float((y - x).abs().max()), float((y - x).pow(2).mean().sqrt()) / rms if rms else 0.0


def measure_budget(batches: list[torch.Tensor], indices: torch.Tensor, labels: list[torch.Tensor], channels: int,
                   repeats: int, warmup: int) -> list[dict[str, Any]]:
    """One row per codec x lz4 for these batches of sent values (N, B, h, w)."""
    samples = sum(len(batch) for batch in batches)
    fp32_bytes = sum(batch.numel() * 4 for batch in batches)
    rows = []
    for name in CODEC_NAMES:
        for lz4 in (False, True):
            codec = get_codec(name, lz4)
            messages = [encode_message(Activations(id=1, session="bench", codec=name, lz4=lz4, channels=channels,
                                                   indices=indices, values=batch, labels=batch_labels))
                        for batch, batch_labels in zip(batches, labels)]
            packed = [frames[2] for frames in messages]  # header, indices, the codec's data, labels
            decoded = torch.cat([codec.decode(buf, batch.shape) for buf, batch in zip(packed, batches)])
            seconds, _ = median_time(lambda: [codec.decode(codec.encode(batch), batch.shape) for batch in batches],
                                     repeats, warmup)
            message = sum(frame_bytes(frames) for frames in messages)
            data_bytes = frame_bytes(packed)
            max_error, relative = _errors(torch.cat(batches), decoded)
            rows.append({"budget": len(indices), "channels": channels, "codec": name, "lz4": lz4,
                         "bytes_per_sample": data_bytes / samples, "vs_fp32": fp32_bytes / data_bytes,
                         "message_bytes_per_sample": message / samples, "MB_s": fp32_bytes / seconds / 1e6,
                         "max_abs_err": max_error, "rel_rms_err": relative})
    return rows


def run_codec(pipeline_name: str | None, budget_items: list[str], samples: int, train_steps: int, seed: int,
              repeats: int, warmup: int, threads: int = 0) -> BenchReport:
    """Real activations of ``pipeline`` at each budget (C, C/k or a count), through every codec with and without lz4."""
    with torch_threads(threads):
        return _run_codec(pipeline_name, budget_items, samples, train_steps, seed, repeats, warmup)


def _run_codec(pipeline_name: str | None, budget_items: list[str], samples: int, train_steps: int, seed: int,
               repeats: int, warmup: int) -> BenchReport:
    pipeline, data, fallback = _pipeline_and_data(pipeline_name, seed)
    torch.manual_seed(seed)
    model = pipeline.build_model()
    loss = train_briefly(model, pipeline, data, train_steps, seed)
    x, y = data.x_test[:samples], data.y_test[:samples]
    report = BenchReport("codec", columns=("budget", "codec", "lz4", "bytes_per_sample", "vs_fp32",
                                           "message_bytes_per_sample", "MB_s", "max_abs_err", "rel_rms_err"))
    _, _, cut = build_sides(model, pipeline.cut, pipeline.input_shape, None, pipeline.resolution)
    budgets = resolve_budgets(budget_items, cut.channels)
    for budget in budgets:
        edge, _, cut = build_sides(model, pipeline.cut, pipeline.input_shape, budget, pipeline.resolution)
        edge.eval()  # exact top-B, batch norm with the running statistics: what inference sends
        with torch.no_grad():
            sent = [edge(chunk) for chunk in x.split(pipeline.batch_size)]
        batches = [values.contiguous() for values, _ in sent]
        report.rows += measure_budget(batches, sent[0][1], list(y.split(pipeline.batch_size)), cut.channels,
                                      repeats, warmup)
    report.settings = {"pipeline": pipeline.name, "cut": pipeline.cut, "channels": cut.channels,
                       "sent_hw": [cut.sent_height, cut.sent_width], "budgets": budgets, "samples": len(x),
                       "batch_size": pipeline.batch_size, "train_steps": train_steps, "train_loss": loss,
                       "seed": seed, "repeats": repeats, "warmup": warmup,
                       "torch_threads": torch.get_num_threads()}
    head = f"briefly trained, {train_steps} steps" if train_steps else "untrained"
    report.notes += [
        f"values: {pipeline.name}'s head ({head}) on the first {len(x)} test images, then the edge's compressor "
        "in eval mode: its filter is untrained (all entries equal), so top-B keeps the B lowest-index channels, "
        "each multiplied by f = B/C (0.99 at B = C)",
        "bytes_per_sample: the codec's data frame only; message_bytes_per_sample: the whole train message (header, "
        "indices, data, labels) per sample, batches of batch_size",
        "MB_s: MB (1e6 bytes) of fp32 input per second through encode + decode (all checks), batch by batch, "
        f"median of {repeats} after {warmup} warm-up",
        "errors are over all sent values: max |decoded - fp32| and RMS(decoded - fp32) / RMS(fp32)",
        f"fp16 and int8 pack with torch ops, which run on {torch.get_num_threads()} thread(s); on a machine busy with "
        "other jobs, intra-op threads can make them many times slower than --threads 1",
        *([fallback] if fallback else [])]
    return report


def plot(report: BenchReport, path: Path) -> None:
    """Left: bytes per sample against relative error (each codec, with and without lz4, per budget).
    Right: encode + decode throughput bars."""
    plt = pyplot()
    figure, (trade, speed) = plt.subplots(1, 2, figsize=(12, 5))
    budgets = sorted({row["budget"] for row in report.rows}, reverse=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = dict(zip(CODEC_NAMES, "os^"))
    configs = [(name, lz4) for name in CODEC_NAMES for lz4 in (False, True)]
    width = 0.8 / len(budgets)
    for b, budget in enumerate(budgets):
        rows = [row for row in report.rows if row["budget"] == budget]
        for row in rows:
            trade.scatter(row["rel_rms_err"], row["bytes_per_sample"], marker=markers[row["codec"]], s=60,
                          color=colours[b % len(colours)], facecolors="none" if row["lz4"] else None)
        speed.bar([i + b * width for i in range(len(configs))],
                  [next(row["MB_s"] for row in rows if (row["codec"], row["lz4"]) == config) for config in configs],
                  width, label=f"B={budget}", color=colours[b % len(colours)])
    trade.set_xscale("symlog", linthresh=1e-4)
    trade.set_yscale("log")
    trade.set_xlabel("relative RMS error vs fp32 (symlog; fp32 at 0)")
    trade.set_ylabel("data bytes per sample (log)")
    trade.set_title(f"{report.settings.get('pipeline')}: bytes vs error (colour = budget as right, open = lz4)")
    trade.legend(handles=[trade.scatter([], [], marker=markers[name], color="grey", label=name) for name in CODEC_NAMES],
                 loc="upper right")
    trade.grid(True, which="both", alpha=0.3)
    speed.set_xticks([i + width * (len(budgets) - 1) / 2 for i in range(len(configs))],
                     [f"{name}{'+lz4' if lz4 else ''}" for name, lz4 in configs])
    speed.set_ylabel("encode + decode throughput (MB/s of fp32 input)")
    speed.set_title("codec throughput per budget")
    speed.legend()
    speed.grid(True, axis="y", alpha=0.3)
    save_figure(figure, path, dpi=100)


@click.command("codec")
@bench_options
@click.option("--pipeline", type=PipelineList(), default=None,
              help=f"Pipeline whose activations are encoded [default: {PREFERRED} if the CIFAR-10 subset is on disk, "
                   f"else {FALLBACK}].")
@click.option("--budgets", type=BudgetList(), default=DEFAULT_BUDGETS, show_default=True,
              help="Comma-separated budgets: a channel count, C (all channels) or C/k.")
@click.option("--samples", type=click.IntRange(min=1), default=512, show_default=True,
              help="Test images run through the head (in batches of the pipeline's batch size).")
@click.option("--train-steps", type=click.IntRange(min=0), default=30, show_default=True,
              help="Optimizer steps on the whole model before measuring (0 = untrained head).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the model, training and data split.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="torch intra-op threads while measuring (0 = torch's default).")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, pipeline: str | None,
            budgets: list[str], samples: int, train_steps: int, seed: int, threads: int) -> None:
    """fp32 / fp16 / int8, each with and without lz4, on a pipeline's real activations.

    Per budget and codec: bytes per sample, encode + decode throughput, and
    the reconstruction error (max abs, relative RMS) against fp32.
    """
    emit(run_codec(pipeline, budgets, samples, train_steps, seed, repeats, warmup, threads), as_json, out, plot)
