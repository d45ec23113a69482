"""Tail stage (server): decompressor + tail, the loss, and the gradient of what was sent."""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from sparse_rt.model.sides import ServerModel
from sparse_rt.stages.optimizer import LearningRateScale

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TailStage:
    """Runs the server's model; synchronous, meant to be called off the event loop."""

    def __init__(self, model: ServerModel, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn = F.cross_entropy) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.lr_scale = LearningRateScale(optimizer)

    def train_step(self, values: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor,
                   lr_scale: float = 1.0) -> tuple[torch.Tensor, float]:
        """One optimiser step on the tail at ``lr_scale`` times its base learning rate.

        The scale comes with each step from the edge that runs the schedule (e.g.
        deprune's boost after a budget raise), so a server needs no schedule of its own.
        Returns (d loss / d values, loss).
        """
        self.lr_scale.set(lr_scale)
        self.model.train()
        values = values.detach().requires_grad_(True)
        loss = self.loss_fn(self.model(values, indices), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return values.grad, float(loss.detach())

    def infer(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode():
            return self.model(values, indices)
