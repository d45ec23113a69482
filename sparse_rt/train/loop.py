"""The one training loop, for `sparse-rt run`, `sparse-rt train` and edge nodes alike.

It follows a schedule (sparse_rt/train/schedules.py), one plan per epoch,
handed to every stage that owns a part of it through one call
(``on_epoch``): the compressor sets its budget, resets filter entries as
the plan says and anneals its exploration over the first quarter of every
phase below full budget; the optimizer takes the learning-rate factor. It runs every batch through the split
session, shows a progress bar with rate and ETA, calls ``on_epoch_end``
(evaluation, CSV rows, model sets) and stops cleanly between steps when asked.
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

from tqdm import tqdm

from sparse_rt.edge.session import EdgeSession
from sparse_rt.train.schedules import EpochPlan
from sparse_rt.stages.source import Batch, batches

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    loss: float  # mean loss per sample over the last epoch run
    epochs_done: int
    stopped: bool  # True when a stop request ended training early


async def train(session: EdgeSession, loader: Iterable[Batch], plan: list[EpochPlan], *, samples_per_epoch: int,
                first_epoch: int = 0, skip_steps: int = 0, progress: bool = True, desc: str = "training",
                stop: asyncio.Event | None = None, after_step: Callable[[int, int], None] | None = None,
                on_epoch_end: Callable[[EpochPlan, float], object] | None = None) -> TrainingResult:
    """Train the epochs of ``plan`` from ``first_epoch``; ``after_step(step, epoch)`` runs after every step.

    ``on_epoch_end(plan, loss)`` may be a coroutine function (e.g. to evaluate over the network).
    ``skip_steps`` steps of the first epoch were trained before (a restarted edge goes on mid-epoch:
    that many batches are passed over, so the run ends at the planned number of steps).
    """
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    result = TrainingResult(float("nan"), first_epoch, False)
    remaining = plan[first_epoch:]
    with tqdm(total=len(remaining) * samples_per_epoch, unit="sample", desc=desc, leave=False,
              disable=not progress or None) as bar:
        for epoch in remaining:
            session.on_epoch(epoch, steps_per_epoch)  # budget, filter reset, exploration, learning rate
            total, count = 0.0, 0
            source = batches(loader)  # loads ahead in a background thread
            async for x, y in source:
                if stop is not None and stop.is_set():
                    result.stopped = True
                    return result
                if skip_steps:
                    skip_steps -= 1
                    bar.update(len(y))
                    continue
                loss = await session.train_step(x, y, data_ms=source.last_wait_ms)
                if session.rows_sent:  # rows answered on the edge carry no server loss
                    total, count = total + loss * session.rows_sent, count + session.rows_sent
                bar.update(len(y))
                bar.set_postfix(epoch=f"{epoch.epoch + 1}/{len(plan)}", B=epoch.budget, loss=f"{loss:.3f}",
                                refresh=False)
                if after_step is not None:
                    after_step(session.steps, epoch.epoch)
            result.loss, result.epochs_done = (total / count if count else math.nan), epoch.epoch + 1
            log.info("epoch %d/%d (budget %d): loss %.4f, %d steps", epoch.epoch + 1, len(plan), epoch.budget,
                     result.loss, session.steps)
            if on_epoch_end is not None:
                done = on_epoch_end(epoch, result.loss)
                if asyncio.iscoroutine(done):
                    await done
    return result
