"""Checkpoints: a side's state_dict and its optimizer's, written atomically, read without running code.

A stop can come at any moment (SIGTERM, a full disk): the checkpoint is
written to a temporary file in the same directory and renamed over the old
one, so a reader sees either the previous checkpoint or the new one, never a
half-written file. Loading uses ``weights_only=True``: a checkpoint holds
tensors and plain containers only, and a crafted file cannot execute code.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sparse_rt.errors import ConfigError, DataError

log = logging.getLogger("sparse_rt.checkpoint")

FORMAT = "sparse-rt-checkpoint/1"


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    **meta: Any) -> None:
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


def check_writable(path: Path) -> None:
    """At start, not at the first save: a checkpoint that cannot be written is a one-line ConfigError now."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write a checkpoint there ({exc.strerror or exc})") from None


class Checkpointer:
    """A node's saves: every ``every`` steps and at the end, where a failed save is a warning, not a crash.

    A failed periodic save (a full or read-only disk) is logged and tried
    again at the next step, so training goes on and the checkpoint catches up
    once the disk does; a failed final save is logged and reported by
    :meth:`final` returning False (the node's own exit code).
    """

    def __init__(self, path: Path | None, every: int, write: Callable[[Path], None], what: str) -> None:
        self.path, self.every, self.write, self.what = path, every, write, what
        self.failures = 0
        self._behind = False  # the last attempt failed: try again at the next step

    def after_step(self, steps: int) -> None:
        if self.path is not None and self.every and (self._behind or steps % self.every == 0):
            self._attempt(f"after step {steps}")

    def now(self, why: str) -> None:
        """Save at once (e.g. a new session: a restart must know it), when saving periodically at all."""
        if self.every:
            self.save(why)

    def save(self, why: str) -> None:
        """Save at once, whatever ``every`` says (a replica group's round decides when itself)."""
        if self.path is not None:
            self._attempt(why)

    def final(self) -> bool:
        """Save once more (a clean stop); False if that failed."""
        return self.path is None or self._attempt("at the end")

    def _attempt(self, when: str) -> bool:
        assert self.path is not None
        try:
            self.write(self.path)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
            self.failures += 1
            self._behind = True
            final = when == "at the end"
            if final or self.failures & (self.failures - 1) == 0:  # the 1st, 2nd, 4th, 8th... failure: no flood
                then = "the node stops without it" if final else "training goes on; retried at every step"
                log.error("could not save the %s %s to %s (%s; %d failed so far): %s", self.what, when, self.path,
                          exc, self.failures, then)
            return False
        if self._behind:
            log.info("saved the %s to %s again after %d failed attempts", self.what, self.path, self.failures)
        self._behind = False
        return True
