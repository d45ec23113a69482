"""Decompressor stage (server): the received channels back into C feature maps at the cut's resolution.

In training the chain makes the received values a leaf that requires grad
(ServerChain.forward), so the gradient the edge needs, of exactly the
channels it sent, is that leaf's ``grad`` after the optimizer's backward.
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
        return self.module(cut.values, cut.indices)
