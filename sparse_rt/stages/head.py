"""Head stage (edge): the model's layers up to the cut.

Any ``nn.Module`` is a head; a chain calls a plain module as ``module(x)``,
so the head cut out of a model by :func:`~sparse_rt.model.split.split_model`
goes into a chain as it is. :class:`HeadStage` names it for metrics and
checkpoints when a wrapper is wanted.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_rt.stages.base import Stage, StepContext


class HeadStage(Stage):
    """The head as a stage: its forward is the module's; autograd carries the gradient back through it.

    A wrapper, not a module of its own: the chain collects ``module`` under
    the stage's name, so a head's checkpoint keys are the same wrapped or not.
    """

    name = "head"

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.module(x)
