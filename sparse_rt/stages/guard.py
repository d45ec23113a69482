"""The shared model's last line of defence: a step is applied whole, or not at all.

Decoding refuses NaN and inf, but finite values can still break a model
(values near 3e38 overflow in the first layer; an edge's labels or
``lr_scale`` can push a step far off). So the server's optimizer stage
applies a step only if its loss, every gradient and every updated parameter
is finite, and the gradients' norm is within an optional bound. A refused
step changes nothing: parameters, optimizer moments and buffers (batch-norm
running statistics, which the forward already updated) are put back as they
were before the step.

The snapshot costs one copy of the tail's state per step (measured in
docs/BENCHMARKS.md); against a poisoned shared model that every edge then
trains on, it is cheap.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sparse_rt.errors import WireError

BAD_STEP = "bad_step"  # the error code of a refused step (PROTOCOL.md)


class StepGuard:
    """Snapshots a module and its optimizer before a step; checks the step; restores the snapshot if it fails."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float = math.inf) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.module = module
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.refused = 0
        self._saved: list[torch.Tensor] = []
        self._had: set[Any] = set()
        self._scalars: dict[Any, dict[str, Any]] = {}

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step may change: parameters, buffers and the optimizer's per-parameter tensors."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        for state in self.optimizer.state.values():
            tensors.extend(value for value in state.values() if isinstance(value, torch.Tensor))
        return [tensor.detach() for tensor in tensors]

    def save(self) -> None:
        """Before the forward (batch-norm statistics change there)."""
        self._had = set(self.optimizer.state)
        self._scalars = {p: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                         for p, s in self.optimizer.state.items()}
        tensors = self._state()
        if len(self._saved) == len(tensors) and all(s.shape == t.shape and s.dtype == t.dtype
                                                    for s, t in zip(self._saved, tensors)):
            torch._foreach_copy_(self._saved, tensors)  # no allocation on the usual path
        else:  # the first step, or the optimizer's state grew
            self._saved = [tensor.clone() for tensor in tensors]

    def restore(self) -> None:
        for parameter in [p for p in self.optimizer.state if p not in self._had]:  # state this step created
            del self.optimizer.state[parameter]
        torch._foreach_copy_(self._state(), self._saved)
        for parameter, scalars in self._scalars.items():
            self.optimizer.state[parameter].update(scalars)

    def check_loss(self, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._refuse(f"its loss is {float(loss.detach()):g}")

    def check_gradients(self, received: torch.Tensor | None = None) -> None:
        """The parameters' gradients (and the one the edge gets, of the ``received`` leaf) are finite and bounded."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if received is not None and received.grad is not None:
            if not bool(torch.isfinite(torch.linalg.vector_norm(received.grad))):
                self._refuse("the gradient for the edge is not finite")
        if not grads:
            return
        norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        if not math.isfinite(norm):
            self._refuse("its gradients are not finite")
        if norm > self.max_grad_norm:
            self._refuse(f"its gradient norm {norm:.3g} is above this server's bound {self.max_grad_norm:g}")

    def check_update(self) -> None:
        """After the optimizer's step: the parameters and the optimizer's state are all finite."""
        tensors = [t for t in self._state() if t.is_floating_point()]
        if tensors and not bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
            self._refuse("it would make the model's parameters or optimizer state non-finite")

    def _refuse(self, why: str) -> None:
        """The step is refused; the chain that called :meth:`save` restores the snapshot as the error passes."""
        self.refused += 1
        raise WireError(f"step refused, nothing applied: {why}", BAD_STEP)
