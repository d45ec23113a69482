"""`sparse-rt train`: a schedule (deprune, prune, fixed) run split, with a CSV per epoch and model sets.

The run is a :class:`~sparse_rt.pair.SplitPair` (edge and server in
one process, every byte through a ZeroMQ socket) or, given a server's
address, an :class:`~sparse_rt.edge.client.EdgeClient` connected to a
running `sparse-rt node --role server`, as an edge node is; either way it
is driven by the one training loop, which also sends the schedule's
learning-rate boost to the server with every step. After every epoch it
evaluates split inference and appends a CSV row: epoch, phase, budget, lr, train loss, test accuracy and the cumulative bytes
of training traffic up and down, counted at the socket (evaluation traffic
is not counted: it is measurement, not training). A prune run also saves
each phase's model into a model set: one head + tail checkpoint per budget
and a manifest.json describing them (store/modelset.py). ``--cut LAYER``
trains at another layer than the pipeline's; a prune run into a folder that
holds a model set adds that cut's models to it.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from sparse_rt.config import RunConfig
from sparse_rt.errors import ConfigError
from sparse_rt.pipeline import Pipeline, get_pipeline
from sparse_rt.store.checkpoint import save_checkpoint
from sparse_rt.edge.client import EdgeClient
from sparse_rt.train.local import load_data
from sparse_rt.store.modelset import MANIFEST, add_models, check_joinable, model_folder, read_manifest
from sparse_rt.pair import SplitPair
from sparse_rt.train.loop import train
from sparse_rt.train.schedules import EpochPlan
from sparse_rt.transport.connection import Traffic
from sparse_rt.wire.codecs import CODEC_NAMES, get_codec

CSV_FIELDS = ("epoch", "phase", "budget", "lr", "train_loss", "test_accuracy", "bytes_up", "bytes_down", "seconds")


@dataclass
class EpochRow:
    epoch: int  # 1-based
    phase: int
    budget: int
    lr: float
    train_loss: float
    test_accuracy: float
    bytes_up: int  # cumulative training bytes, edge -> server
    bytes_down: int
    seconds: float  # since the run started


def payload_bytes_per_sample(budget: int, height: int, width: int) -> dict[str, float]:
    """Packed channel bytes per sample for each codec (a batch of 64; headers, indices and labels aside)."""
    shape = (64, budget, height, width)
    return {name: get_codec(name).max_packed_size(shape) / 64 for name in CODEC_NAMES}


def _split(config: RunConfig, pipeline: Pipeline, resolution: int, lr: float,
           connect: str | None, retries: int) -> SplitPair | EdgeClient:
    """This run's edge: with a server in this process, or connected to a running one (the edge node's code path).

    The session is opened at budget C, the most any message may send; the plan sends fewer.
    """
    if connect is not None:
        return EdgeClient(pipeline, connect, mode="train", codec=config.codec, lz4=config.lz4, resolution=resolution,
                          seed=config.seed, lr=lr, timeout=config.request_timeout, retries=retries)
    return SplitPair.for_pipeline(pipeline, budget=None, codec=config.codec, lz4=config.lz4, resolution=resolution,
                                  lr=lr, transport=config.transport)


async def run_schedule(method: str, config: RunConfig, plan_for: Callable[[int], list[EpochPlan]],
                       out: Path, connect: str | None = None, retries: int = 2) -> dict[str, Any]:
    """Train by ``plan_for(channels at the cut)``; write out/metrics.csv, out/summary.json and, for prune, the model set.

    With ``connect``, the edge trains against the server running there (which
    owns the tail, so a prune run's model set needs the server in this process).
    """
    if connect is not None and method == "prune":
        raise ConfigError("prune saves each budget's head and tail as a model set, and a running server keeps its "
                          "tail: run `sparse-rt train prune` without --connect")
    started = time.perf_counter()
    registered = get_pipeline(config.pipeline)
    pipeline = config.cut_pipeline(registered)
    if connect is not None and pipeline.cut != registered.cut:
        raise ConfigError(f"--cut {pipeline.cut} with --connect: a running server's tail is cut where its pipeline "
                          f"is ('{registered.cut}'); train at another cut without --connect")
    training = config.resolved(pipeline)
    resolution, lr = training.resolution, training.lr
    shared = {"pipeline": pipeline.name, "seed": config.seed, "resolution": resolution}
    default_cut = _default_cut(out, shared, pipeline.cut) if method == "prune" else pipeline.cut
    data = load_data(pipeline, config)
    torch.manual_seed(config.seed)
    train_loader, test_loader = data.loaders(training.batch_size, config.seed)
    pair = _split(config, pipeline, resolution, lr, connect, retries)
    plan = plan_for(pair.cut.channels)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[EpochRow] = []
    models: list[dict[str, Any]] = []
    training_bytes = [0, 0]
    mark: list[Traffic] = []  # the socket's counts at the last epoch's end (the handshake not counted)

    async def on_epoch_end(epoch: EpochPlan, loss: float) -> None:
        now = pair.traffic
        training_bytes[0] += now.bytes_sent - mark[0].bytes_sent
        training_bytes[1] += now.bytes_received - mark[0].bytes_received
        accuracy = await pair.evaluate(test_loader)
        mark[0] = replace(pair.traffic)
        rows.append(EpochRow(epoch.epoch + 1, epoch.phase, epoch.budget, lr * epoch.lr_factor, loss, accuracy,
                             training_bytes[0], training_bytes[1], round(time.perf_counter() - started, 3)))
        with open(out / "metrics.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(asdict(row) for row in rows)
        if method == "prune" and epoch.phase_epoch == epoch.phase_epochs - 1:
            entry = _save_model(out, model_folder(default_cut, pipeline.cut, epoch.budget), pair, pipeline, epoch,
                                accuracy, config.seed, resolution, sum(1 for e in plan if e.phase <= epoch.phase))
            models.append(entry)
            # after every phase: the manifest always describes the checkpoints on disk, a stopped run's included
            add_models(out, {"pipeline": pipeline.name, "cut": pipeline.cut, "channels": pair.cut.channels,
                             "resolution": resolution, "seed": config.seed}, [entry])

    async with pair:
        mark.append(replace(pair.traffic))
        await train(pair.session, train_loader, plan, samples_per_epoch=len(data.y_train), progress=config.progress,
                    desc=f"{method} {pipeline.name}", on_epoch_end=on_epoch_end)
    summary = {"method": method, "pipeline": pipeline.name, "cut": pipeline.cut, "seed": config.seed,
               "codec": config.codec, "lz4": config.lz4, "channels": pair.cut.channels, "epochs": len(plan),
               "final_test_accuracy": rows[-1].test_accuracy, "bytes_up": rows[-1].bytes_up,
               "bytes_down": rows[-1].bytes_down, "seconds": round(time.perf_counter() - started, 3)}
    if models:
        summary["models"] = [model["budget"] for model in models]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _default_cut(out: Path, shared: dict[str, Any], cut: str) -> str:
    """The default cut of the model set this run adds to: the set's in ``out`` (checked to fit), else this run's."""
    if not (out / MANIFEST).exists():
        return cut
    manifest = read_manifest(out)
    check_joinable(out, manifest, shared)
    return str(manifest["cut"])


def _save_model(out: Path, folder: str, pair: SplitPair, pipeline: Pipeline, epoch: EpochPlan, accuracy: float,
                seed: int, resolution: int, epochs: int) -> dict[str, Any]:
    """Save this phase's head and tail in ``out/folder`` as one member of the model set; returns its manifest entry."""
    meta = {"pipeline": pipeline.name, "cut": pipeline.cut, "budget": epoch.budget, "resolution": resolution,
            "seed": seed}
    save_checkpoint(out / folder / "head.pt", pair.edge_model, **meta)
    save_checkpoint(out / folder / "tail.pt", pair.server_model, **meta)
    cut = pair.cut
    return {"budget": epoch.budget, "cut": pipeline.cut, "channels": cut.channels, "sent_height": cut.sent_height,
            "sent_width": cut.sent_width, "channels_sent": epoch.budget, "head": f"{folder}/head.pt",
            "tail": f"{folder}/tail.pt", "test_accuracy": accuracy, "epochs": epochs, "seed": seed,
            "pipeline": pipeline.name,
            "bytes_per_sample": payload_bytes_per_sample(epoch.budget, cut.sent_height, cut.sent_width)}
