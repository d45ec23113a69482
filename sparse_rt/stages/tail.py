"""Tail stage (server): the model's layers after the cut, and in training the loss.

The tail itself is any ``nn.Module``; this stage adds the loss, so the
optimizer stage after it gets a scalar to step on in training and the
logits pass through untouched in inference.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from sparse_rt.stages.base import Stage, StepContext

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TailStage(Stage):
    """The tail's output; with labels (training), the batch's loss instead."""

    name = "tail"

    def __init__(self, module: nn.Module, loss_fn: LossFn = F.cross_entropy) -> None:
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        outputs = self.module(x)
        if ctx.training:
            assert ctx.labels is not None, "a training step carries labels"
            return self.loss_fn(outputs, ctx.labels)
        return outputs
