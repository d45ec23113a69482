"""`sparse-rt train exit`: an early exit for every model of a model set, trained with its head frozen, then calibrated.

Each budget's head was trained for that budget (prune fine-tunes it per
phase), so each gets its own exit classifier, trained on the head's features
of the training images while the head stays as it was: the model set's
predictions do not change, and the exit costs seconds, not a training run.

Calibration is what lets a controller choose an exit threshold without
trying it: for every threshold of a grid, on the test images (where the
manifest's ``test_accuracy`` is measured too), the share of samples that
exit, the accuracy of those answers, the accuracy the server's tail gives
the others, and the two together. The table goes into the manifest entry as
``exit``, next to the classifier's checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from sparse_rt.assembly import build_halves
from sparse_rt.config import RunConfig
from sparse_rt.errors import DataError
from sparse_rt.pipeline import Pipeline, get_pipeline
from sparse_rt.stages.exit import exit_classifier
from sparse_rt.store.checkpoint import read_checkpoint, save_checkpoint
from sparse_rt.store.modelset import entry_cut, read_manifest, write_manifest
from sparse_rt.train.local import load_data

# Confidence thresholds the calibration measures: 0 answers every sample on the device, 1 about none.
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FEATURE_BATCH = 512  # images per forward pass when computing features (inference only, no graph kept)


@dataclass(frozen=True)
class ExitTraining:
    """How each exit classifier is trained on its frozen head's features."""

    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 1e-4
    seed: int = 0


def entry_pipeline(pipeline: Pipeline, manifest: dict[str, Any], entry: dict[str, Any]) -> Pipeline:
    """The pipeline cut where this entry's model is (a set may hold models cut at several layers)."""
    cut = entry_cut(manifest, entry)
    return pipeline if cut == pipeline.cut else replace(pipeline, cut=cut)


def _in_batches(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), FEATURE_BATCH):
        yield x[start:start + FEATURE_BATCH]


@torch.inference_mode()
def head_features(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every channel at the cut for ``x`` (before the compressor), as the exit sees them."""
    head.eval()
    return torch.cat([head(part) for part in _in_batches(x)])


def train_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     settings: ExitTraining) -> nn.Module:
    """An exit classifier fitted to fixed features (the head does not move)."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    classifier = exit_classifier(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    classifier.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(classifier(features[rows]), labels[rows]).backward()
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
        share = float(exits.float().mean())
        table.append({
            "threshold": threshold, "share": round(share, 4),
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
    for entry in tqdm(entries, desc="exits", unit="model", disable=not progress, leave=False):
        budget = int(entry["budget"])
        edge, server, _ = build_halves(entry_pipeline(pipeline, manifest, entry), seed, budget, resolution)
        read_checkpoint(folder / entry["head"]).restore(edge)
        read_checkpoint(folder / entry["tail"]).restore(server)
        edge.eval(), server.eval()
        classifier = train_classifier(head_features(edge.head, split.x_train), split.y_train, pipeline.num_classes,
                                      settings)
        with torch.inference_mode():
            test_features = head_features(edge.head, split.x_test)
            exit_logits = classifier(test_features)
            server_logits = torch.cat([server(*edge.compressor(part)) for part in _in_batches(test_features)])
        path = Path(entry["head"]).parent / "exit.pt"
        save_checkpoint(folder / path, classifier, pipeline=pipeline.name, budget=budget,
                        cut=entry_cut(manifest, entry), channels=int(test_features.shape[1]))
        entry["exit"] = {"classifier": str(path), "epochs": settings.epochs,
                         "calibration": calibrate(exit_logits, server_logits, split.y_test)}
    write_manifest(folder, manifest)
    return manifest
