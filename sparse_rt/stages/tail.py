"""Tail stage (server): decompressor + tail, the loss, and the gradient of what was sent."""
from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from sparse_rt.model.sides import ServerModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TailStage:
    """Runs the server's model; synchronous, meant to be called off the event loop."""

    def __init__(self, model: ServerModel, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn = F.cross_entropy) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn

    def train_step(self, values: torch.Tensor, indices: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step on the tail; returns (d loss / d values, loss)."""
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
