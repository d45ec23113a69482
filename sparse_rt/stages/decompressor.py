"""Decompressor stage (server): the received channels back into C feature maps at the cut's resolution.

In training the received values become a leaf that requires grad, so the
gradient the edge needs (of exactly the channels it sent) is that leaf's
``grad`` after the optimizer stage's backward.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_rt.stages.base import Cut, Stage, StepContext


class DecompressorStage(Stage):
    """Wraps a module ``(values, indices) -> (N, C, H, W)``, e.g. the paper's Decompressor."""

    name = "decompressor"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def forward(self, cut: Cut, ctx: StepContext) -> torch.Tensor:
        values = cut.values
        if ctx.training:
            values = values.detach().requires_grad_(True)
            ctx.meta["received"] = values
        return self.module(values, cut.indices)
