"""The one training loop, for `sparse-rt run` and for edge nodes alike.

Per epoch it sets the compressor's exploration (annealed over the first half
of training), runs every batch through the split session and shows a
progress bar with rate and ETA. It stops cleanly between steps when asked.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from tqdm import tqdm

from sparse_rt.model.compression import annealed_exploration
from sparse_rt.runtime.edge import EdgeSession
from sparse_rt.stages.source import Batch, batches

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    loss: float  # mean loss per sample over the last epoch run
    epochs_done: int
    stopped: bool  # True when a stop request ended training early


async def train(session: EdgeSession, loader: Iterable[Batch], epochs: int, *, samples_per_epoch: int,
                first_epoch: int = 0, progress: bool = True, desc: str = "training",
                stop: asyncio.Event | None = None, after_step: Callable[[int, int], None] | None = None
                ) -> TrainingResult:
    """Train epochs ``first_epoch .. epochs-1``; ``after_step(step, epoch)`` runs after every step."""
    compressor = session.head.model.compressor
    result = TrainingResult(float("nan"), first_epoch, False)
    with tqdm(total=(epochs - first_epoch) * samples_per_epoch, unit="sample", desc=desc, leave=False,
              disable=not progress or None) as bar:
        for epoch in range(first_epoch, epochs):
            compressor.exploration = annealed_exploration(epoch / epochs)
            total, count = 0.0, 0
            async for x, y in batches(loader):
                if stop is not None and stop.is_set():
                    result.stopped = True
                    return result
                loss = await session.train_step(x, y)
                total, count = total + loss * len(y), count + len(y)
                bar.update(len(y))
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss:.3f}", refresh=False)
                if after_step is not None:
                    after_step(session.steps, epoch)
            result.loss, result.epochs_done = total / max(count, 1), epoch + 1
            log.info("epoch %d/%d: loss %.4f, %d steps", epoch + 1, epochs, result.loss, session.steps)
    return result
