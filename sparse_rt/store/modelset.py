"""Model sets: one trained head + tail per budget (made by `sparse-rt train prune`), loaded for serving.

The server holds every budget's tail and answers each inference request with
the tail of the budget the request sends (its shape[1]); an edge holds the
heads and switches between them without reconnecting.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sparse_rt.errors import DataError
from sparse_rt.model.sides import CutShape
from sparse_rt.pipeline import Pipeline
from sparse_rt.assembly import build_halves
from sparse_rt.store.checkpoint import read_checkpoint

MANIFEST = "manifest.json"  # in a model set's folder: what each budget's model is


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder}: not a model set (no {MANIFEST}); make one with `sparse-rt train prune`") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def load_model_set(folder: Path, pipeline: Pipeline, side: str) -> tuple[dict[int, nn.Module], CutShape, int]:
    """``side`` "head" or "tail": {budget: model}, the cut, and the set's resolution."""
    manifest = read_manifest(folder)
    if manifest["pipeline"] != pipeline.name:
        raise DataError(f"{folder}: a model set of pipeline '{manifest['pipeline']}', not '{pipeline.name}'")
    resolution = int(manifest["resolution"])
    models: dict[int, nn.Module] = {}
    cut = None
    for entry in manifest["models"]:
        budget = int(entry["budget"])
        edge, server, cut = build_halves(pipeline, int(manifest["seed"]), budget, resolution)
        model = edge if side == "head" else server
        read_checkpoint(Path(folder) / entry[side]).restore(model)
        models[budget] = model.eval()
    if cut is None:
        raise DataError(f"{folder}: the model set holds no models")
    return models, cut, resolution
