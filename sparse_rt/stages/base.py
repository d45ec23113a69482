"""The stage interface: one small protocol for every stage, on both sides of the cut.

A stage does one job for one batch: ``forward(x, ctx)`` turns its input into
the next stage's input, and on the edge ``backward(grad, ctx)`` carries the
server's answer back the other way. A chain is a list of stages run in
order (stages/chain.py); a plain ``nn.Module`` is a stage too, called as
``module(x)``, so a head or tail cut out of a model needs no wrapper.

The :class:`StepContext` travels with the batch: the step's metadata
(kind, labels, step number, session), the per-stage timings, the losses the
edge adds to the server's gradient (the prune loss, an exit head's loss),
and the rows still in flight. A stage may answer some rows itself (an
early exit); those rows leave the chain, and a batch whose rows are all
answered never reaches the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from sparse_rt.metrics import StageTimer

Kind = Literal["train", "infer"]


@dataclass
class Cut:
    """What crosses the network: the B sent channels and which of the C channels they are."""

    values: torch.Tensor  # (N, B, h, w); on the edge in training, part of the autograd graph
    indices: torch.Tensor  # (B,) int64, strictly ascending


@dataclass
class StepContext:
    """One batch's metadata and bookkeeping, handed to every stage of a chain."""

    kind: Kind
    labels: torch.Tensor | None = None  # (N,) class indices in training
    step: int = 0
    session: str | None = None
    lr_scale: float = 1.0  # the schedule's learning-rate factor for this step, on both sides
    timer: StageTimer = field(default_factory=StageTimer)
    losses: list[torch.Tensor] = field(default_factory=list)  # edge losses backpropagated with the server's grad
    meta: dict[str, Any] = field(default_factory=dict)  # free for user stages (e.g. an audit record)
    rows: torch.Tensor | None = None  # indices into the original batch of the rows still in the chain
    answers: torch.Tensor | None = None  # (N, K) outputs of rows answered on this side; NaN elsewhere

    @property
    def training(self) -> bool:
        return self.kind == "train"

    @property
    def finished(self) -> bool:
        """True when a stage answered every row: nothing is left to send."""
        return self.rows is not None and self.rows.numel() == 0

    def add_loss(self, loss: torch.Tensor) -> None:
        """A loss of this side's own parameters, backpropagated together with the peer's gradient."""
        self.losses.append(loss)

    def answer(self, done: torch.Tensor, outputs: torch.Tensor, batch_size: int) -> None:
        """Rows ``done`` (a bool mask over the rows still in the chain) are answered here with ``outputs``.

        The caller passes on only the other rows; :meth:`merge` puts the
        peer's outputs for those back in their places.
        """
        if self.rows is None:
            self.rows = torch.arange(batch_size)
        if self.answers is None:
            self.answers = torch.full((batch_size, outputs.shape[1]), float("nan"), device=outputs.device)
        self.answers[self.rows[done].to(self.answers.device)] = outputs.detach().float().to(self.answers.device)
        self.rows = self.rows[~done]
        if self.labels is not None:
            self.labels = self.labels[~done]

    def merge(self, outputs: torch.Tensor | None) -> torch.Tensor:
        """The whole batch's outputs: the peer's ``outputs`` for the rows it got, this side's for the rest."""
        if self.answers is None:
            assert outputs is not None, "nothing was answered and nothing came back"
            return outputs
        merged = self.answers.clone()
        if outputs is not None and self.rows is not None and self.rows.numel():
            merged[self.rows.to(merged.device)] = outputs.to(merged.device)
        return merged


class Stage:
    """One job in a chain; subclasses implement :meth:`forward` and, where gradients flow back, :meth:`backward`.

    Stages that hold parameters subclass ``torch.nn.Module`` as well, so a
    chain's optimizer, checkpoints and ``train()``/``eval()`` reach them.
    """

    name: str = "stage"

    def forward(self, x: Any, ctx: StepContext) -> Any:
        raise NotImplementedError

    def backward(self, grad: Any, ctx: StepContext) -> Any:
        """The gradient with respect to this stage's input; autograd already covers torch stages."""
        return grad


def call_stage(stage: Any, x: Any, ctx: StepContext) -> Any:
    """Run one stage: a :class:`Stage` gets the context, a plain ``nn.Module`` is called as ``module(x)``."""
    if isinstance(stage, Stage):
        return stage.forward(x, ctx)
    return stage(x)
