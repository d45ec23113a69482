"""The early exit: a small classifier on the head's features that answers the samples it is sure of on the device.

It sits between the head and the compressor, so it reads every channel at
the cut, not only the sent ones. In inference a row whose softmax confidence
is at least ``threshold`` is answered here (``ctx.answer``) and never sent; a
batch answered completely sends nothing at all. The threshold may change
between requests (a controller lowers it when the link is slow): above 1
nothing exits, 0 answers everything here.

In training the exit adds its own loss (``ctx.add_loss``), so it can learn
in the same backward as the split model; `sparse-rt train exit` trains one
afterwards instead, with the head frozen (train/exits.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sparse_rt.stages.base import Stage, StepContext

# The classifier pools the features to 2x2 places rather than one: a global pool loses where things are,
# which on digits_cnn left the exit sure of a tenth of the test digits instead of most of them.
POOLED = 2
NEVER = math.inf  # a threshold no confidence reaches: every row goes on to the server


def exit_classifier(channels: int, num_classes: int) -> nn.Sequential:
    """The exit's model: the cut's features, pooled, then one linear layer."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(POOLED), nn.Flatten(), nn.Linear(channels * POOLED * POOLED,
                                                                               num_classes))


class ConfidenceExit(Stage, nn.Module):
    """Answers confident rows on the device; the rest go on to the compressor and the network."""

    name = "exit"

    def __init__(self, channels: int, num_classes: int, threshold: float = 0.9, weight: float = 0.5,
                 classifier: nn.Module | None = None) -> None:
        nn.Module.__init__(self)
        self.classifier = classifier if classifier is not None else exit_classifier(channels, num_classes)
        self.threshold = threshold
        self.weight = weight  # in training, the exit's loss next to the server's task loss
        self.answered = 0  # rows answered here in inference, and all rows seen there
        self.seen = 0

    def confidence(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exit's logits for ``x`` and each row's confidence (the largest softmax probability)."""
        logits = self.classifier(x)
        return logits, logits.softmax(dim=1).amax(dim=1)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if ctx.training:
            assert ctx.labels is not None, "a training step carries labels"
            ctx.add_loss(self.weight * F.cross_entropy(self.classifier(x), ctx.labels))
            return x  # every row trains the tail too
        self.seen += len(x)
        if self.threshold > 1:  # nothing can exit: skip the classifier's work
            return x
        logits, confidence = self.confidence(x)
        confident = confidence >= self.threshold
        if not confident.any():
            return x
        self.answered += int(confident.sum())
        ctx.answer(confident, logits[confident], len(x))
        return x[~confident]
