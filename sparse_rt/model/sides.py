"""The two sides of a split model, each an ordinary nn.Module.

The edge side is the head followed by the compressor; the server side is the
decompressor followed by the tail. Channel counts and feature-map sizes at
the cut are measured by running a dummy batch through the head, never typed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from sparse_rt.errors import ConfigError
from sparse_rt.model.compression import Compressor, Decompressor, PruneLossWeights
from sparse_rt.model.split import split_model


@dataclass(frozen=True)
class CutShape:
    """The activation at the cut, per sample, and what crosses the network."""

    channels: int
    height: int
    width: int
    sent_height: int  # after resolution compression
    sent_width: int


class EdgeModel(nn.Module):
    """head -> compressor: returns the sent channels and their indices."""

    def __init__(self, head: nn.Module, compressor: Compressor) -> None:
        super().__init__()
        self.head = head
        self.compressor = compressor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compressor(self.head(x))


class ServerModel(nn.Module):
    """decompressor -> tail: from the received channels to the model's output."""

    def __init__(self, decompressor: Decompressor, tail: nn.Module) -> None:
        super().__init__()
        self.decompressor = decompressor
        self.tail = tail

    def forward(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.tail(self.decompressor(values, indices))


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode without autograd for a dummy sample, then every submodule's own mode back.

    Each submodule's flag is restored, not only the top one's, so a caller's
    mixed modes (a frozen, evaluating part inside a training model) survive the probe.
    """
    saved = [(module, module.training) for top in modules for module in top.modules()]
    for top in modules:
        top.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in saved:
            module.training = training


def measure_cut(head: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of the head's output for one sample."""
    with evaluating(head):
        out = head(torch.zeros(1, *input_shape))
    if out.dim() != 4:
        raise ValueError(f"the cut must produce feature maps (N, C, H, W); this head gives shape {tuple(out.shape)}")
    return tuple(out.shape[1:])  # type: ignore[return-value]


def build_sides(
    model: nn.Module,
    cut: str,
    input_shape: tuple[int, ...],
    budget: int | None = None,
    resolution: int = 0,
    weights: PruneLossWeights = PruneLossWeights(),
) -> tuple[EdgeModel, ServerModel, CutShape]:
    """Split ``model`` after ``cut`` and wrap both halves with the compression modules.

    ``budget=None`` sends every channel (B = C).
    """
    split = split_model(model, cut)
    channels, height, width = measure_cut(split.head, input_shape)
    if budget is not None and not 1 <= budget <= channels:
        raise ConfigError(f"budget must be between 1 and {channels} (the channels at the cut after '{cut}'), "
                          f"got {budget}")
    compressor = Compressor(channels, budget or channels, resolution, weights=weights)
    decompressor = Decompressor(channels, height, width, resolution)
    sent_height, sent_width = compressor.output_size(height, width)
    shape = CutShape(channels, height, width, sent_height, sent_width)
    return EdgeModel(split.head, compressor), ServerModel(decompressor, split.tail), shape
