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


def scale_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    """Set every group's learning rate to base_lr * factor (schedules call this per epoch)."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor
