"""The summary of a split training run: `sparse-rt run --json` and `sparse-rt node --role edge --json` print it."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from sparse_rt.model.sides import CutShape
from sparse_rt.transport.connection import Traffic


@dataclass
class RunSummary:
    """What a run did; ``--json`` prints exactly this as one object."""

    pipeline: str
    cut: str
    budget: int
    channels: int
    sent_shape: list[int]  # (budget, height, width) sent per sample
    codec: str
    lz4: bool
    resolution: int
    epochs: int
    seed: int
    test_accuracy: float
    final_train_loss: float
    bytes_up: int  # edge -> server, all frames, training and evaluation
    bytes_down: int  # server -> edge
    train_bytes_up: int
    train_bytes_down: int
    train_samples: int  # samples per epoch
    test_samples: int
    steps: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(*, pipeline: str, cut_name: str, cut: CutShape, budget: int, codec: str, lz4: bool, resolution: int,
              epochs: int, seed: int, accuracy: float, loss: float, traffic: Traffic, trained: Traffic,
              train_samples: int, test_samples: int, steps: int, started: float) -> RunSummary:
    """``trained`` is the traffic when training ended, ``traffic`` after evaluation too; ``started`` a perf_counter."""
    return RunSummary(
        pipeline=pipeline, cut=cut_name, budget=budget, channels=cut.channels,
        sent_shape=[budget, cut.sent_height, cut.sent_width], codec=codec, lz4=lz4, resolution=resolution,
        epochs=epochs, seed=seed, test_accuracy=accuracy, final_train_loss=loss, bytes_up=traffic.bytes_sent,
        bytes_down=traffic.bytes_received, train_bytes_up=trained.bytes_sent, train_bytes_down=trained.bytes_received,
        train_samples=train_samples, test_samples=test_samples, steps=steps,
        seconds=round(time.perf_counter() - started, 3),
    )
