"""One side of a pipeline's split model, built the same way in every process.

Both sides seed torch with the run's seed and build the whole model before
taking their half, so a server and its edges start from the halves of one
model, and a test can rebuild either half exactly.
"""
from __future__ import annotations

import torch

from sparse_rt.model.sides import CutShape, EdgeModel, ServerModel, build_sides
from sparse_rt.pipeline import Pipeline


def build_halves(pipeline: Pipeline, seed: int, budget: int | None, resolution: int):
    torch.manual_seed(seed)
    return build_sides(pipeline.build_model(), pipeline.cut, pipeline.input_shape, budget, resolution)


def edge_side(pipeline: Pipeline, seed: int, budget: int | None, resolution: int) -> tuple[EdgeModel, CutShape]:
    edge, _, cut = build_halves(pipeline, seed, budget, resolution)
    return edge, cut


def server_side(pipeline: Pipeline, seed: int, resolution: int) -> tuple[ServerModel, CutShape]:
    _, server, cut = build_halves(pipeline, seed, None, resolution)
    return server, cut


def largest_frame(cut: CutShape, max_batch: int) -> int:
    """Bytes of the largest legal frame: fp32 data for max_batch samples of all C channels, plus lz4's worst case."""
    from sparse_rt.wire.codecs import get_codec

    shape = (max_batch, cut.channels, cut.sent_height, cut.sent_width)
    return get_codec("fp32", lz4=True).max_packed_size(shape)
