"""Model sets: a trained head + tail per cut and budget (made by `sparse-rt train prune`), loaded for serving.

The server holds every model's tail and answers each inference request with
the tail of the cut and budget the request sends (its ``cut``, else its
session's, and its shape[1]); an edge holds the heads and switches between
them without reconnecting.

On disk a model set is a folder::

    DIR/manifest.json                  what every model is
    DIR/budget-B/{head,tail}.pt        the set's default cut: the first one trained into DIR
    DIR/LAYER/budget-B/{head,tail}.pt  every other cut, in a folder named after its layer

The manifest's top level holds what all its models share: ``pipeline``,
``resolution``, ``seed``, and the default ``cut`` with its ``channels``. Each
entry of ``models`` is one model: ``budget``, ``cut`` (the layer name),
``channels`` (C at that cut), ``sent_height`` and ``sent_width`` (h, w on the
wire), ``head`` and ``tail`` (paths relative to DIR), ``test_accuracy``,
``epochs``, ``bytes_per_sample``. An entry without ``cut`` (a set written
before sets held several cuts) is at the top-level cut. Training a cut into
a folder that holds a set (of the same pipeline, seed and resolution) adds
its models: an entry of the same (cut, budget) is replaced, the others kept.
The manifest is replaced in one step, so a reader sees the old one or the new.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from sparse_rt.errors import DataError
from sparse_rt.model.sides import CutShape
from sparse_rt.pipeline import Pipeline
from sparse_rt.assembly import build_halves
from sparse_rt.store.checkpoint import read_checkpoint

MANIFEST = "manifest.json"  # in a model set's folder: what each model is
SHARED = ("pipeline", "seed", "resolution")  # what every model of a set has in common


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder}: not a model set (no {MANIFEST}); make one with `sparse-rt train prune`") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest in one step: a reader (a server starting) sees the old one or the new, never half."""
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{MANIFEST}.", delete=False) as file:
        try:
            json.dump(manifest, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        except BaseException:
            os.unlink(file.name)  # a failed write leaves the old manifest, and no half-written file beside it
            raise
    os.replace(file.name, Path(folder) / MANIFEST)


def entry_cut(manifest: dict[str, Any], entry: dict[str, Any]) -> str:
    """The layer a manifest entry's model is cut after (an entry written before sets had several cuts: the set's)."""
    return str(entry.get("cut", manifest["cut"]))


def model_folder(default_cut: str, cut: str, budget: int) -> str:
    """Where a model's checkpoints go, relative to the set's folder: budget-B, or LAYER/budget-B off the default cut."""
    return f"budget-{budget}" if cut == default_cut else f"{cut}/budget-{budget}"


def check_joinable(folder: Path, manifest: dict[str, Any], shared: dict[str, Any]) -> None:
    """Refuse to add models to a set whose models were trained otherwise (another pipeline, seed or resolution)."""
    try:
        theirs = {name: manifest[name] for name in SHARED}
    except KeyError as exc:
        raise DataError(f"{Path(folder) / MANIFEST}: not a model set's manifest (no {exc})") from None
    for name in SHARED:
        if theirs[name] != shared[name]:
            raise DataError(f"{folder} holds a model set of {name} {theirs[name]!r}, this run's is "
                            f"{shared[name]!r}: a set's models share pipeline, seed and resolution; use that "
                            f"{name}, or another --out folder")


def add_models(folder: Path, top: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Add ``entries`` to the set in ``folder`` (a new set with ``top`` if there is none) and write its manifest.

    An entry of the same (cut, budget) as a new one is replaced; all others are kept, the set's default cut too.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        manifest = {**top, "models": entries}
    else:
        manifest = read_manifest(folder)
        check_joinable(folder, manifest, top)
        new = {(entry_cut(top, entry), int(entry["budget"])) for entry in entries}
        kept = [entry for entry in manifest.get("models", [])
                if (entry_cut(manifest, entry), int(entry["budget"])) not in new]
        manifest = {**manifest, "models": kept + entries}
    write_manifest(folder, manifest)
    return manifest


@dataclass
class ModelSet:
    """One side of a model set: a model per (cut, budget), the activation at each cut, the default cut."""

    models: dict[tuple[str, int], nn.Module]  # (cut, budget) -> the head (EdgeModel) or tail (ServerModel)
    cuts: dict[str, CutShape]  # the activation at each cut the set holds
    default_cut: str  # the manifest's top-level cut: where a session without `cut` starts
    resolution: int

    def budgets(self, cut: str | None = None) -> list[int]:
        """The budgets held at ``cut`` (default: the default cut), ascending."""
        cut = self.default_cut if cut is None else cut
        return sorted(budget for at, budget in self.models if at == cut)

    def at(self, cut: str | None = None) -> dict[int, nn.Module]:
        """{budget: model} at ``cut`` (default: the default cut)."""
        cut = self.default_cut if cut is None else cut
        return {budget: model for (at, budget), model in self.models.items() if at == cut}


def load_model_sets(folder: Path, pipeline: Pipeline, side: str) -> ModelSet:
    """``side`` "head" or "tail" of every model in the set, at every cut it holds."""
    return _load(Path(folder), pipeline, side, only_default=False)


def load_model_set(folder: Path, pipeline: Pipeline, side: str) -> tuple[dict[int, nn.Module], CutShape, int]:
    """``side`` "head" or "tail": {budget: model} at the set's default cut, that cut, and the set's resolution."""
    models = _load(Path(folder), pipeline, side, only_default=True)
    return models.at(), models.cuts[models.default_cut], models.resolution


def _load(folder: Path, pipeline: Pipeline, side: str, only_default: bool) -> ModelSet:
    manifest = read_manifest(folder)
    if manifest["pipeline"] != pipeline.name:
        raise DataError(f"{folder}: a model set of pipeline '{manifest['pipeline']}', not '{pipeline.name}'")
    resolution, default = int(manifest["resolution"]), str(manifest["cut"])
    loaded = ModelSet({}, {}, default, resolution)
    for entry in manifest["models"]:
        cut, budget = entry_cut(manifest, entry), int(entry["budget"])
        if only_default and cut != default:
            continue
        at = pipeline if cut == pipeline.cut else replace(pipeline, cut=cut)
        edge, server, shape = build_halves(at, int(manifest["seed"]), budget, resolution)
        if int(entry.get("channels", shape.channels)) != shape.channels:
            raise DataError(f"{folder}: the model at cut '{cut}', budget {budget} was trained with "
                            f"{entry['channels']} channels at the cut, the pipeline has {shape.channels} there now")
        model = edge if side == "head" else server
        read_checkpoint(folder / entry[side]).restore(model)
        loaded.models[cut, budget] = model.eval()
        loaded.cuts[cut] = shape
    if default not in loaded.cuts:
        raise DataError(f"{folder}: the model set holds no models" if not loaded.cuts else
                        f"{folder}: the model set holds no models at its default cut '{default}'")
    return loaded


def load_exits(folder: Path, manifest: dict[str, Any], cuts: dict[str, CutShape],
               num_classes: int) -> dict[tuple[str, int], nn.Module]:
    """The exit classifiers of a set's models, by (cut, budget): none until `sparse-rt train exit` added them."""
    from sparse_rt.stages.exit import exit_classifier

    classifiers = {}
    for entry in manifest["models"]:
        cut = entry_cut(manifest, entry)
        if "exit" not in entry or cut not in cuts:
            continue
        classifier = exit_classifier(cuts[cut].channels, num_classes)
        read_checkpoint(Path(folder) / entry["exit"]["classifier"]).restore(classifier)
        classifiers[cut, int(entry["budget"])] = classifier.eval()
    return classifiers
