"""`sparse-rt train exit`: an early exit for every model of a model set, trained with its head frozen, then calibrated.

Each budget's head was trained for that budget (prune fine-tunes it per
phase), so each gets its own exit classifier, trained on the head's features
of the training images while the head stays as it was: the model set's
predictions do not change, and the exit costs seconds, not a training run.
The classifier pools before its one linear layer, so only the pooled
features of the training images are kept (computed batch by batch): the
full features at an early cut of CIFAR's training set would take gigabytes.

Calibration is what lets a controller choose an exit threshold without
trying it: for every threshold of a grid, the share of samples that exit,
the accuracy of those answers, the accuracy the server's tail gives the
others, and the two together. It is measured on the even-indexed test
images only (``test[0::2]``, recorded as ``calibration_images``), so that
the odd-indexed ones stay unseen by the thresholds: `sparse-rt bench
adaptive` streams those, and its exit accuracies are not measured on the
images the controller's thresholds were chosen on. The table goes into the
manifest entry as ``exit``, next to the classifier's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from sparse_rt.assembly import at_cut, build_halves
from sparse_rt.config import RunConfig
from sparse_rt.errors import DataError
from sparse_rt.pipeline import get_pipeline
from sparse_rt.stages.exit import exit_classifier
from sparse_rt.store.checkpoint import read_checkpoint, save_checkpoint
from sparse_rt.store.modelset import entry_cut, read_manifest, write_manifest
from sparse_rt.train.local import load_data

# Confidence thresholds the calibration measures: 0 answers every sample on the device, 1 about none.
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FEATURE_BATCH = 512  # images per forward pass when computing features (inference only, no graph kept)
CALIBRATION_IMAGES = "test[0::2]"  # the test images the exits are calibrated on ...
HELD_OUT_IMAGES = "test[1::2]"  # ... and the others, unseen by the calibration, for measuring a set with exits


@dataclass(frozen=True)
class ExitTraining:
    """How each exit classifier is trained on its frozen head's features."""

    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 1e-4
    seed: int = 0


def calibration_split(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels the exits are calibrated on (CALIBRATION_IMAGES)."""
    return x[0::2], y[0::2]


def held_out_split(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels the calibration never saw (HELD_OUT_IMAGES)."""
    return x[1::2], y[1::2]


def _in_batches(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), FEATURE_BATCH):
        yield x[start:start + FEATURE_BATCH]


@torch.inference_mode()
def head_features(head: nn.Module, x: torch.Tensor, reduce: nn.Module | None = None) -> torch.Tensor:
    """Every channel at the cut for ``x`` (before the compressor), as the exit sees them.

    ``reduce`` (e.g. the exit's pool and flatten) is applied to each batch's
    features before they are kept, so only the reduced ones are ever held whole.
    """
    head.eval()
    parts = (head(part) for part in _in_batches(x))
    return torch.cat([part if reduce is None else reduce(part) for part in parts])


def train_classifier(head: nn.Module, x: torch.Tensor, labels: torch.Tensor, channels: int, num_classes: int,
                     settings: ExitTraining) -> nn.Sequential:
    """An exit classifier (pool, flatten, linear) fitted to the frozen ``head``'s features of ``x``.

    The pool and flatten have no parameters, so they are applied once, batch
    by batch, and only the linear layer is trained on what they give.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    classifier = exit_classifier(channels, num_classes)
    reduce, linear = classifier[:2], classifier[2]
    features = head_features(head, x, reduce)  # (images, channels x POOLED x POOLED)
    optimizer = torch.optim.Adam(linear.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    classifier.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(linear(features[rows]), labels[rows]).backward()
            optimizer.step()
    return classifier.eval()


def calibrate(exit_logits: torch.Tensor, server_logits: torch.Tensor, labels: torch.Tensor,
              thresholds: tuple[float, ...] = THRESHOLDS) -> list[dict[str, float | None]]:
    """Per threshold: the share that exits, the accuracy of each path, and of the answers together."""
    confidence = exit_logits.softmax(dim=1).amax(dim=1)
    exit_right = exit_logits.argmax(dim=1).eq(labels)
    server_right = server_logits.argmax(dim=1).eq(labels)
    table: list[dict[str, float | None]] = []
    for threshold in thresholds:
        exits = confidence >= threshold
        share = int(exits.sum()) / len(exits)  # unrounded: 1.0 only when every sample exits, 0 when none
        table.append({
            "threshold": threshold, "share": share,
            "exit_accuracy": round(float(exit_right[exits].float().mean()), 4) if exits.any() else None,
            "server_accuracy": round(float(server_right[~exits].float().mean()), 4) if (~exits).any() else None,
            "accuracy": round(float(torch.where(exits, exit_right, server_right).float().mean()), 4)})
    return table


def train_exits(folder: Path, data: Path | None = None, settings: ExitTraining = ExitTraining(),
                progress: bool = False) -> dict[str, Any]:
    """Train and calibrate an exit for every model of the set in ``folder``; returns the updated manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    pipeline = get_pipeline(manifest["pipeline"])
    seed, resolution = int(manifest["seed"]), int(manifest["resolution"])
    split = load_data(pipeline, RunConfig(pipeline=pipeline.name, data=data, seed=seed))
    entries = manifest["models"]
    if not entries:
        raise DataError(f"{folder}: the model set holds no models")
    x_calibration, y_calibration = calibration_split(split.x_test, split.y_test)
    for entry in tqdm(entries, desc="exits", unit="model", disable=not progress, leave=False):
        budget = int(entry["budget"])
        cut = entry_cut(manifest, entry)
        edge, server, shape = build_halves(at_cut(pipeline, cut), seed, budget, resolution)
        read_checkpoint(folder / entry["head"]).restore(edge)
        read_checkpoint(folder / entry["tail"]).restore(server)
        edge.eval(), server.eval()
        classifier = train_classifier(edge.head, split.x_train, split.y_train, shape.channels, pipeline.num_classes,
                                      settings)
        exit_logits, server_logits = [], []
        with torch.inference_mode():
            for part in _in_batches(x_calibration):
                features = edge.head(part)
                exit_logits.append(classifier(features))
                server_logits.append(server(*edge.compressor(features)))
        path = Path(entry["head"]).parent / "exit.pt"
        save_checkpoint(folder / path, classifier, pipeline=pipeline.name, budget=budget, cut=cut,
                        channels=shape.channels)
        server_right = torch.cat(server_logits).argmax(dim=1).eq(y_calibration)
        # The model without its exit, on the same images: what the exit's rows are weighed against.
        entry["exit"] = {"classifier": str(path), "epochs": settings.epochs,
                         "calibration_images": CALIBRATION_IMAGES, "calibration_count": len(y_calibration),
                         "server_accuracy": round(float(server_right.float().mean()), 4),
                         "calibration": calibrate(torch.cat(exit_logits), torch.cat(server_logits), y_calibration)}
    write_manifest(folder, manifest)
    return manifest
