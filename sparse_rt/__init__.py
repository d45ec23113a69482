"""sparse-rt: split computing for PyTorch over ZeroMQ.

The public API, importable from here. Names load on first use, so the
command line starts without importing torch for ``--help``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # splitting and the compression at the cut
    "split_model": "sparse_rt.model.split",
    "cut_points": "sparse_rt.model.split",
    "SplitModel": "sparse_rt.model.split",
    "Compressor": "sparse_rt.model.compression",
    "Decompressor": "sparse_rt.model.compression",
    "PruneLossWeights": "sparse_rt.model.compression",
    "build_sides": "sparse_rt.model.sides",
    # pipelines and runs
    "Pipeline": "sparse_rt.pipeline",
    "get_pipeline": "sparse_rt.pipeline",
    "RunConfig": "sparse_rt.config",
    "run_local": "sparse_rt.train.local",
    "RunSummary": "sparse_rt.train.summary",
    "EdgeClient": "sparse_rt.edge.client",
    "SyncEdgeClient": "sparse_rt.edge.client",
    "SplitPair": "sparse_rt.pair",
    # the stage engine: compose a side from stages
    "Stage": "sparse_rt.stages.base",
    "StepContext": "sparse_rt.stages.base",
    "Cut": "sparse_rt.stages.base",
    "EdgeChain": "sparse_rt.stages.chain",
    "ServerChain": "sparse_rt.stages.chain",
    "HeadStage": "sparse_rt.stages.head",
    "CompressorStage": "sparse_rt.stages.compressor",
    "CodecStage": "sparse_rt.stages.codec",
    "DecompressorStage": "sparse_rt.stages.decompressor",
    "TailStage": "sparse_rt.stages.tail",
    "OptimizerStage": "sparse_rt.stages.optimizer",
    "Prefetcher": "sparse_rt.stages.source",
    "edge_chain": "sparse_rt.assembly",
    "server_chain": "sparse_rt.assembly",
    # wire
    "get_codec": "sparse_rt.wire.codecs",
    "register_codec": "sparse_rt.wire.codecs",
    "codec_names": "sparse_rt.wire.codecs",
    "CODEC_NAMES": "sparse_rt.wire.codecs",
    # errors
    "SparseRtError": "sparse_rt.errors",
    "WireError": "sparse_rt.errors",
    "SplitError": "sparse_rt.errors",
    "DataError": "sparse_rt.errors",
    "ConfigError": "sparse_rt.errors",
    "RemoteError": "sparse_rt.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparse_rt' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # let type checkers and IDEs see the real names
    from sparse_rt.assembly import edge_chain, server_chain
    from sparse_rt.config import RunConfig
    from sparse_rt.errors import ConfigError, DataError, RemoteError, SparseRtError, SplitError, WireError
    from sparse_rt.model.compression import Compressor, Decompressor, PruneLossWeights
    from sparse_rt.model.sides import build_sides
    from sparse_rt.model.split import SplitModel, cut_points, split_model
    from sparse_rt.pipeline import Pipeline, get_pipeline
    from sparse_rt.edge.client import EdgeClient, SyncEdgeClient
    from sparse_rt.train.local import run_local
    from sparse_rt.train.summary import RunSummary
    from sparse_rt.pair import SplitPair
    from sparse_rt.stages.base import Cut, Stage, StepContext
    from sparse_rt.stages.chain import EdgeChain, ServerChain
    from sparse_rt.stages.codec import CodecStage
    from sparse_rt.stages.compressor import CompressorStage
    from sparse_rt.stages.decompressor import DecompressorStage
    from sparse_rt.stages.head import HeadStage
    from sparse_rt.stages.optimizer import OptimizerStage
    from sparse_rt.stages.source import Prefetcher
    from sparse_rt.stages.tail import TailStage
    from sparse_rt.wire.codecs import CODEC_NAMES, codec_names, get_codec, register_codec
