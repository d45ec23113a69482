"""Each side steps only the parameters it owns: the edge its head and filter, the server its tail."""
from __future__ import annotations

from typing import Iterable

import torch

from sparse_rt.errors import ConfigError

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
