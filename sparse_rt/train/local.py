"""`sparse-rt run`: train a pipeline split across a server and an edge in one process, then evaluate.

The two sides share nothing but the frames on a ZeroMQ socket (see pair.py).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import torch

from sparse_rt.config import RunConfig
from sparse_rt.data.datasets import TensorSplit, load_npz
from sparse_rt.pipeline import Pipeline, get_pipeline
from sparse_rt.pair import SplitPair
from sparse_rt.train.summary import RunSummary, summarize
from sparse_rt.train.loop import train
from sparse_rt.train.schedules import fixed


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
    training = config.resolved(pipeline)
    resolution, epochs = training.resolution, training.epochs
    train_loader, test_loader = data.loaders(training.batch_size, config.seed)
    pair = SplitPair.for_pipeline(pipeline, budget=config.budget, codec=config.codec, lz4=config.lz4,
                                  resolution=resolution, lr=training.lr, transport=config.transport,
                                  request_timeout=config.request_timeout)
    async with pair:
        result = await train(pair.edge, train_loader, fixed(pair.budget, epochs), samples_per_epoch=len(data.y_train),
                             progress=config.progress, desc=f"{pipeline.name} B={pair.budget}/{pair.cut.channels}")
        trained = replace(pair.traffic)
        accuracy = await pair.evaluate(test_loader)
        return summarize(pipeline=pipeline.name, cut_name=pipeline.cut, cut=pair.cut, budget=pair.budget,
                         codec=config.codec, lz4=config.lz4, resolution=resolution, epochs=epochs, seed=config.seed,
                         accuracy=accuracy, loss=result.loss, traffic=pair.traffic, trained=trained,
                         train_samples=len(data.y_train), test_samples=len(data.y_test), steps=pair.edge.steps,
                         started=started)


def run_local(config: RunConfig) -> RunSummary:
    """Synchronous entry point for scripts and the CLI."""
    return asyncio.run(run_split(config))
