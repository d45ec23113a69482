"""`sparse-rt run`: train a pipeline split across a server and an edge in one process, then evaluate.

The two sides share nothing but the frames on a ZeroMQ socket (see pair.py).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from sparse_rt.config import RunConfig
from sparse_rt.data.datasets import TensorSplit, load_npz
from sparse_rt.model.compression import annealed_exploration
from sparse_rt.pipeline import Pipeline, get_pipeline
from sparse_rt.runtime.pair import SplitPair


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


def load_data(pipeline: Pipeline, config: RunConfig) -> TensorSplit:
    if config.data is not None:
        return load_npz(config.data, pipeline.input_shape, pipeline.num_classes, config.seed, pipeline.normalisation)
    return pipeline.load_data(config.seed)


async def run_split(config: RunConfig) -> RunSummary:
    """Train ``config.pipeline`` split across a server and an edge, then evaluate split inference."""
    started = time.perf_counter()
    pipeline = get_pipeline(config.pipeline)
    data = load_data(pipeline, config)
    torch.manual_seed(config.seed)
    resolution = pipeline.resolution if config.resolution is None else config.resolution
    epochs = config.epochs or pipeline.epochs
    train_loader, test_loader = data.loaders(config.batch_size or pipeline.batch_size, config.seed)
    pair = SplitPair(pipeline.build_model(), pipeline.cut, pipeline.input_shape, budget=config.budget,
                     codec=config.codec, lz4=config.lz4, resolution=resolution, optimizer=pipeline.optimizer,
                     lr=config.lr or pipeline.lr, weight_decay=pipeline.weight_decay, transport=config.transport,
                     name=pipeline.name, request_timeout=config.request_timeout)
    async with pair:
        loss = float("nan")
        with tqdm(total=epochs * len(data.y_train), unit="sample", disable=not config.progress or None,
                  desc=f"{pipeline.name} B={pair.budget}/{pair.cut.channels}", leave=False) as bar:
            def on_batch(samples: int, batch_loss: float) -> None:
                bar.update(samples)
                bar.set_postfix(loss=f"{batch_loss:.3f}", refresh=False)

            for epoch in range(epochs):
                pair.edge_model.compressor.exploration = annealed_exploration(epoch / epochs)
                loss = await pair.train_epoch(train_loader, on_batch)
        trained = replace(pair.traffic)
        accuracy = await pair.evaluate(test_loader)
        traffic = pair.traffic
        cut = pair.cut
        return RunSummary(
            pipeline=pipeline.name, cut=pipeline.cut, budget=pair.budget, channels=cut.channels,
            sent_shape=[pair.budget, cut.sent_height, cut.sent_width], codec=config.codec, lz4=config.lz4,
            resolution=resolution, epochs=epochs, seed=config.seed, test_accuracy=accuracy,
            final_train_loss=loss, bytes_up=traffic.bytes_sent, bytes_down=traffic.bytes_received,
            train_bytes_up=trained.bytes_sent, train_bytes_down=trained.bytes_received,
            train_samples=len(data.y_train), test_samples=len(data.y_test), steps=pair.edge.steps,
            seconds=round(time.perf_counter() - started, 3),
        )


def run_local(config: RunConfig) -> RunSummary:
    """Synchronous entry point for scripts and the CLI."""
    return asyncio.run(run_split(config))
