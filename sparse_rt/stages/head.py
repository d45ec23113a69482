"""Head stage (edge): head + compressor forward, and backward from the server's gradient."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_rt.model.sides import EdgeModel
from sparse_rt.stages.optimizer import LearningRateScale


@dataclass
class Sent:
    """What one training forward produced: the channels to send, kept with their graph."""

    values: torch.Tensor  # (N, B, h, w), part of the autograd graph
    indices: torch.Tensor  # (B,)
    prune_loss: torch.Tensor


class HeadStage:
    """Runs the edge's model; synchronous, meant to be called off the event loop."""

    def __init__(self, model: EdgeModel, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scale = LearningRateScale(optimizer)

    def forward_train(self, x: torch.Tensor) -> Sent:
        self.model.train()
        values, indices = self.model(x)
        return Sent(values, indices, self.model.compressor.prune_loss())

    def backward(self, sent: Sent, grad: torch.Tensor) -> None:
        """Backpropagate the server's gradient of the sent channels plus the edge's own prune loss.

        The prune loss depends only on the filter, which the edge owns, so its
        gradient never has to cross the network.
        """
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward([sent.values, sent.prune_loss], [grad.to(sent.values.dtype), None])
        self.optimizer.step()

    def forward_infer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        with torch.inference_mode():
            return self.model(x)
