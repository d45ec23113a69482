"""Checkpoints: a side's state_dict and its optimizer's, written atomically, read without running code.

A stop can come at any moment (SIGTERM, a full disk): the checkpoint is
written to a temporary file in the same directory and renamed over the old
one, so a reader sees either the previous checkpoint or the new one, never a
half-written file. Loading uses ``weights_only=True``: a checkpoint holds
tensors and plain containers only, and a crafted file cannot execute code.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_rt.errors import DataError

FORMAT = "sparse-rt-checkpoint/1"


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    **meta: int | float | str) -> None:
    """Atomically write model (and optimizer) state plus small metadata (step, pipeline, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"format": FORMAT, "model": model.state_dict(), "meta": dict(meta)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk, not yet applied to a model."""

    path: Path
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    meta: dict[str, Any]

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Load the state into ``model`` (and ``optimizer``); returns the metadata.

        The optimizer keeps the learning rates it was built with: the
        checkpoint brings back its moments and step counts, but the rate is this
        run's configuration (and one a schedule had boosted at save time must
        not become the new base).
        """
        try:
            model.load_state_dict(self.model_state)
            if optimizer is not None and self.optimizer_state is not None:
                rates = [group["lr"] for group in optimizer.param_groups]
                optimizer.load_state_dict(self.optimizer_state)
                for group, rate in zip(optimizer.param_groups, rates):
                    group["lr"] = rate
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"{self.path}: does not fit this model: {str(exc).splitlines()[0]}") from None
        return self.meta


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file; its metadata (budget, resolution, ...) can shape the model first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint there (nothing to resume from)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, foreign or malicious file
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("model"), dict):
        raise DataError(f"{path}: not a sparse-rt checkpoint (expected format {FORMAT})")
    return Checkpoint(path, state["model"], state.get("optimizer"), dict(state.get("meta", {})))
