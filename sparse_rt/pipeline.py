"""What a pipeline is, and how users name one.

A :class:`Pipeline` bundles a model, the layer to cut after, the data and
training defaults. Ready ones live in the top-level ``pipelines/`` package and
are found through the ``sparse_rt.pipelines`` entry-point group; a user's own
is named as ``module:attribute`` (or registered the same way in their
package's metadata). The runtime never imports ``pipelines/`` directly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

from torch import nn

from sparse_rt.data.datasets import Normalisation, TensorSplit
from sparse_rt.errors import ConfigError

ENTRY_POINT_GROUP = "sparse_rt.pipelines"


@dataclass(frozen=True)
class Pipeline:
    """A model to split, where to cut it, its default data and training settings."""

    name: str
    build_model: Callable[[], nn.Module]
    cut: str  # module name to cut after, see sparse_rt.model.split.cut_points
    input_shape: tuple[int, int, int]  # (channels, height, width) of one sample
    num_classes: int
    load_data: Callable[[int], TensorSplit]  # seed -> train/test tensors, offline
    normalisation: Normalisation | None = None  # applied to a user's --data file
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    epochs: int = 10
    resolution: int = 0  # resolution compression r at the cut (0 = off)


@dataclass(frozen=True)
class TrainingSettings:
    """A run's training settings: the pipeline's defaults under the run's own choices, resolved once.

    Every entry point (run, train, experiment, nodes, EdgeClient, SplitPair,
    the bench suites) reads these instead of filling in defaults itself; see
    :meth:`resolve`.
    """

    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    epochs: int
    resolution: int

    @classmethod
    def resolve(cls, pipeline: Pipeline, *, batch_size: int | None = None, lr: float | None = None,
                optimizer: str | None = None, weight_decay: float | None = None, epochs: int | None = None,
                resolution: int | None = None) -> "TrainingSettings":
        """``pipeline``'s settings with every override that is given on top; ``None`` means the pipeline's default.

        So does 0 for ``batch_size``, ``lr`` and ``epochs``, which must be positive
        (as ``value or default`` always read them); 0 is a real choice for
        ``resolution`` (off) and ``weight_decay``.
        """
        return cls(batch_size=batch_size or pipeline.batch_size,
                   lr=lr or pipeline.lr,
                   optimizer=pipeline.optimizer if optimizer is None else optimizer,
                   weight_decay=pipeline.weight_decay if weight_decay is None else weight_decay,
                   epochs=epochs or pipeline.epochs,
                   resolution=pipeline.resolution if resolution is None else resolution)


def available_pipelines() -> dict[str, str]:
    """Registered pipeline names -> their entry-point targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_pipeline(name: str) -> Pipeline:
    """Resolve a registered name, or ``module:attribute`` for a user's own pipeline."""
    registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in registered:
        found = registered[name].load()
    elif ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load pipeline '{name}': {exc}") from None
    else:
        known = ", ".join(sorted(registered)) or "none installed"
        raise ConfigError(f"unknown pipeline '{name}'; available: {known} (or give module:attribute)")
    if not isinstance(found, Pipeline):
        raise ConfigError(f"'{name}' is a {type(found).__name__}, not a sparse_rt.Pipeline")
    return found
