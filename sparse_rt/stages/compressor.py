"""Compressor stage (edge): the cut's learned channel selection, and the way back for the server's gradient.

Any ``nn.Module`` whose ``forward(x)`` returns ``(values, indices)`` (the B
sent channels and which of the C channels they are) can compress: the
paper's :class:`~sparse_rt.model.compression.Compressor`, a fixed random
choice, a 1x1-conv bottleneck. If it has ``prune_loss()``, that loss is
trained with the server's gradient; if it has ``schedule_phase``, the
training schedule drives its budget and exploration.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparse_rt.stages.base import Cut, Stage, StepContext


class CompressorStage(Stage):
    """Wraps a compression module; its ``backward`` runs the edge's whole backward in one autograd call."""

    name = "compressor"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def budget(self) -> int:
        return int(self.module.budget)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> Cut:
        values, indices = self.module(x)
        if ctx.training and hasattr(self.module, "prune_loss"):
            ctx.add_loss(self.module.prune_loss())
        return Cut(values, indices)

    def backward(self, grad: torch.Tensor, ctx: StepContext) -> None:
        """The server's gradient of the sent channels plus every loss the edge added, through head and filter.

        The prune loss depends only on the filter, which the edge owns, so its
        gradient never has to cross the network.
        """
        cut: Cut = ctx.meta["cut"]
        torch.autograd.backward([cut.values, *ctx.losses], [grad.to(cut.values.dtype), *([None] * len(ctx.losses))])

    def on_epoch(self, plan: Any, steps_per_epoch: int) -> None:
        """A schedule's epoch: its budget, filter reset and exploration (an anneal over the phase's first quarter)."""
        schedule_phase = getattr(self.module, "schedule_phase", None)
        if schedule_phase is not None:
            schedule_phase(plan.budget, plan.reset, plan.explore, plan.phase_epochs * steps_per_epoch,
                           hold=steps_per_epoch, position=plan.phase_epoch * steps_per_epoch)
        elif plan.budget != self.budget:
            self.module.budget = plan.budget
