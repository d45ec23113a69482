"""Where stages are wired: one function per side builds its chain, and every entry point calls them.

Both sides seed torch with the run's seed and build the whole model before
taking their half, so a server and its edges start from the halves of one
model, and a test can rebuild either half exactly.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from sparse_rt.errors import SplitError
from sparse_rt.model.sides import CutShape, EdgeModel, ServerModel, build_sides, measure_cut
from sparse_rt.model.split import cut_points, split_model
from sparse_rt.pipeline import Pipeline
from sparse_rt.stages.chain import EdgeChain, OptimizerLike, ServerChain, collect_modules
from sparse_rt.stages.codec import CodecStage
from sparse_rt.stages.compressor import CompressorStage
from sparse_rt.stages.decompressor import DecompressorStage
from sparse_rt.stages.guard import StepGuard
from sparse_rt.stages.optimizer import OptimizerStage
from sparse_rt.stages.tail import LossFn, TailStage

# The largest learning-rate factor a server applies for a peer (the protocol lets a peer ask up to 100):
# deprune's boost is 2 by default; a factor far above it is a mistake or an attack on the shared tail.
DEFAULT_MAX_LR_SCALE = 10.0


def at_cut(pipeline: Pipeline, cut: str | None) -> Pipeline:
    """``pipeline`` cut after layer ``cut`` instead of its own (``None``: its own), checked now.

    A layer that cannot be cut at raises SplitError listing the valid cut
    points before anything is trained. Checking builds the model once, with
    torch's random state put back after, so a run's seed gives the same
    model with or without the check.
    """
    if cut is None or cut == pipeline.cut:
        return pipeline
    with torch.random.fork_rng(devices=[]):
        model = pipeline.build_model()
        head = split_model(model, cut).head
        try:
            measure_cut(head, pipeline.input_shape)
        except ValueError as exc:  # a cut after the features are flattened
            raise SplitError(f"cannot cut {pipeline.name} after {cut!r}: {exc}. Cut before the model flattens its "
                             f"features; cut points (in forward order): {', '.join(cut_points(model))}") from None
    return replace(pipeline, cut=cut)


def build_halves(pipeline: Pipeline, seed: int, budget: int | None, resolution: int):
    torch.manual_seed(seed)
    return build_sides(pipeline.build_model(), pipeline.cut, pipeline.input_shape, budget, resolution)


def edge_side(pipeline: Pipeline, seed: int, budget: int | None, resolution: int) -> tuple[EdgeModel, CutShape]:
    edge, _, cut = build_halves(pipeline, seed, budget, resolution)
    return edge, cut


def server_side(pipeline: Pipeline, seed: int, resolution: int) -> tuple[ServerModel, CutShape]:
    _, server, cut = build_halves(pipeline, seed, None, resolution)
    return server, cut


def edge_chain(model: EdgeModel, optimizer: OptimizerLike, *, stages: Sequence[Any] = (),
               codec: str = "fp32", lz4: bool = False, grad_codec: str | None = None,
               grad_lz4: bool | None = None, cut: str | None = None) -> EdgeChain:
    """head -> ``stages`` -> compressor -> codec, stepping ``optimizer``; the transport joins at connect.

    ``cut``: the layer ``model`` is cut after, stated in every request it sends, for a model-set server
    that holds several cuts; ``None`` (the server's default cut) states none.
    """
    return EdgeChain([model.head, *stages, CompressorStage(model.compressor),
                      CodecStage(codec, grad_codec, lz4=lz4, down_lz4=grad_lz4, cut=cut)], optimizer)


def server_chain(model: ServerModel, optimizer: torch.optim.Optimizer | None, *, stages: Sequence[Any] = (),
                 loss_fn: LossFn = F.cross_entropy, max_grad_norm: float = math.inf,
                 max_lr_scale: float = DEFAULT_MAX_LR_SCALE) -> ServerChain:
    """``stages`` -> decompressor -> tail (+ loss) -> optimizer; without an optimizer it serves inference only.

    The optimizer also steps the parameters of ``stages`` (a group of their
    own at its defaults), so a trainable stage of one's own is trained with
    the tail. Every step is guarded (stages/guard.py): applied whole, with a
    finite result and a gradient norm of at most ``max_grad_norm``, or not
    at all; a peer's ``lr_scale`` is capped at ``max_lr_scale``.
    """
    chain: list[Any] = [*stages, DecompressorStage(model.decompressor), TailStage(model.tail, loss_fn)]
    if optimizer is not None:
        _add_missing_parameters(optimizer, collect_modules(stages).parameters())
        chain.append(OptimizerStage(optimizer, max_lr_scale))
    built = ServerChain(chain)
    if built.optimizer is not None:
        built.optimizer.guard = StepGuard(built.module, optimizer, max_grad_norm)
    return built


def _add_missing_parameters(optimizer: torch.optim.Optimizer, parameters: Iterator[nn.Parameter]) -> None:
    known = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in parameters if id(p) not in known]
    if missing:
        optimizer.add_param_group({"params": missing})


def largest_frame(cut: CutShape | Sequence[CutShape], max_batch: int) -> int:
    """Bytes of the largest legal frame: max_batch samples of all C channels in the largest registered codec.

    With several cuts (a model set's), the largest at any of them. Read when
    the server starts, after ``--import`` has registered codecs of one's own.
    """
    from sparse_rt.wire.codecs import codec_names, get_codec

    sizes = []
    for shape in (cut,) if isinstance(cut, CutShape) else cut:
        for name in codec_names():
            for lz4 in (False, True):
                try:
                    sizes.append(get_codec(name, lz4).max_packed_size(
                        (max_batch, shape.channels, shape.sent_height, shape.sent_width)))
                except ValueError:  # lz4 does not wrap this codec
                    pass
    return max(sizes)
