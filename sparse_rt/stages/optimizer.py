"""Optimizer stage: each side steps only the parameters it owns (the edge its head and filter, the server its tail).

On the server it ends the chain: in training it takes the loss, runs the
backward and steps; in inference it passes the logits on. On the edge the
chain calls :meth:`OptimizerStage.step` once the server's gradient has been
backpropagated. Either way the step's learning-rate factor (a schedule's
boost, sent with every training step) is applied first.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from sparse_rt.errors import ConfigError
from sparse_rt.stages.base import Stage, StepContext
from sparse_rt.stages.guard import StepGuard

OPTIMIZERS = ("adam", "sgd")


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A torch optimizer by name; SGD uses momentum 0.9, the usual choice for VGG-style training."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer '{name}'; expected one of {', '.join(OPTIMIZERS)}")


class LearningRateScale:
    """Sets an optimizer's learning rates to their values at construction times a scale.

    Schedules boost the learning rate for a few epochs (deprune's gamma); the
    edge scales its head and sends the scale with each step, so the server's
    tail follows without a schedule of its own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.scale = 1.0

    def set(self, scale: float) -> None:
        for group, base_lr in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base_lr * scale
        self.scale = scale


class OptimizerStage(Stage):
    """A torch optimizer as a stage, at the learning-rate factor each step asks for."""

    name = "optimizer"

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr_scale: float = math.inf) -> None:
        self.optimizer = optimizer
        self.lr_scale = LearningRateScale(optimizer)
        self.max_lr_scale = max_lr_scale  # a server's cap on the factor a peer may ask for
        self.guard: StepGuard | None = None  # on a server: a step is applied whole or not at all (guard.py)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, ctx: StepContext) -> None:
        self.lr_scale.set(min(ctx.lr_scale, self.max_lr_scale))
        self.optimizer.step()

    def forward(self, x: Any, ctx: StepContext) -> Any:
        """Server: backward from the loss and step; the loss's value goes into ``ctx.meta['loss']``."""
        if not ctx.training:
            return x
        self.zero_grad()
        if self.guard is not None:
            self.guard.check_loss(x)
        x.backward()
        if self.guard is not None:
            self.guard.check_gradients(ctx.meta.get("received"))
        self.step(ctx)
        if self.guard is not None:
            self.guard.check_update()
        ctx.meta["loss"] = float(x.detach())
        return x

    def on_epoch(self, plan: Any, steps_per_epoch: int) -> None:
        """A schedule's epoch: its learning-rate factor, for this side and (sent with each step) the other."""
        self.lr_scale.set(plan.lr_factor)
