"""Chains: the stages of one side, in order, and the one place that runs them.

Edge: ``head -> [your stages] -> compressor -> codec -> transport``, with the
edge's optimizer; the source feeds it batches. Server: ``[your stages] ->
decompressor -> tail -> optimizer``, after the codec (decode and checks,
server/). A chain is written like ``nn.Sequential``::

    chain = EdgeChain([head, ConfidenceExit(channels=32, num_classes=10), CompressorStage(compressor),
                       CodecStage("int8", down="fp16")], torch.optim.Adam)

(``ConfidenceExit`` is stages/exit.py's; an optimizer factory is
given the parameters of every stage.)

Stages that hold parameters are collected in :attr:`EdgeChain.module` (an
``nn.ModuleDict`` whose keys are the stages' names), so one optimizer, one
checkpoint and one ``train()``/``eval()`` reach them all; with only a head
and the paper's compressor its state dict is an EdgeModel's.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

from sparse_rt.errors import ConfigError
from sparse_rt.stages.base import Cut, Stage, StepContext, call_stage
from sparse_rt.stages.codec import CodecStage
from sparse_rt.stages.compressor import CompressorStage
from sparse_rt.stages.decompressor import DecompressorStage
from sparse_rt.stages.optimizer import OptimizerStage
from sparse_rt.stages.tail import TailStage
from sparse_rt.stages.transport import TransportStage


# An optimizer, or a function that builds one from the chain's parameters (e.g. torch.optim.Adam).
OptimizerLike = Union[OptimizerStage, torch.optim.Optimizer, Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]]


def _stage_name(stage: Any, index: int) -> str:
    if isinstance(stage, Stage):
        return stage.name
    return "head" if index == 0 else f"stage{index}"


def _module_of(stage: Any) -> nn.Module | None:
    """The parameters' owner: the stage itself, or the module a wrapper stage runs."""
    if isinstance(stage, nn.Module):
        return stage
    module = getattr(stage, "module", None)
    return module if isinstance(module, nn.Module) else None


def collect_modules(stages: Sequence[Any]) -> nn.ModuleDict:
    modules = nn.ModuleDict()
    for index, stage in enumerate(stages):
        module = _module_of(stage)
        if module is None:
            continue
        name = _stage_name(stage, index)
        if name in modules:
            raise ConfigError(f"two stages are named '{name}'; give one of them another name")
        modules[name] = module
    return modules


class _Modes:
    """Puts a chain's modules in train or eval mode for each step, whatever mode a caller left them in."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, training: bool) -> contextlib.AbstractContextManager[Any]:
        self.module.train(training)  # every step: a caller's own .eval() of one stage must not outlive its use
        return contextlib.nullcontext() if training else torch.inference_mode()


class EdgeChain:
    """The edge's stages: the compute up to the cut, the codec, the transport, and the optimizer."""

    def __init__(self, stages: Sequence[Any], optimizer: OptimizerLike | None = None) -> None:
        stages = list(stages)
        compressors = [i for i, stage in enumerate(stages) if isinstance(stage, CompressorStage)]
        if len(compressors) != 1:
            raise ConfigError(f"an edge chain needs exactly one CompressorStage (it chooses what crosses the "
                              f"network), got {len(compressors)}")
        cut = compressors[0]
        rest = stages[cut + 1:]
        codecs = [stage for stage in rest if isinstance(stage, CodecStage)]
        transports = [stage for stage in rest if isinstance(stage, TransportStage)]
        if len(codecs) > 1 or len(transports) > 1 or len(codecs) + len(transports) != len(rest):
            raise ConfigError("after the compressor an edge chain has only its codec and its transport")
        self.local = stages[:cut + 1]  # head ... compressor: torch work, run in one go
        self.compressor: CompressorStage = stages[cut]
        self.codec: CodecStage = codecs[0] if codecs else CodecStage()
        self.codec.channels = int(getattr(self.compressor.module, "channels", self.codec.channels))
        self.transport: TransportStage | None = transports[0] if transports else None
        self.module = collect_modules(self.local)
        if optimizer is None:
            optimizer = torch.optim.Adam
        if not isinstance(optimizer, (OptimizerStage, torch.optim.Optimizer)):
            optimizer = optimizer(self.module.parameters())  # a factory: every stage's parameters, found here
        self.optimizer = optimizer if isinstance(optimizer, OptimizerStage) else OptimizerStage(optimizer)
        self._modes = _Modes(self.module)

    @property
    def budget(self) -> int:
        return self.compressor.budget

    def scheduled(self) -> Iterator[Any]:
        """The stages a training schedule drives, each through ``on_epoch(plan, steps_per_epoch)``."""
        for stage in (*self.local, self.optimizer):
            if callable(getattr(stage, "on_epoch", None)):
                yield stage

    def forward(self, x: torch.Tensor, ctx: StepContext) -> list[Any] | None:
        """Head to codec: the request's frames, or None when stages answered every row themselves."""
        with ctx.timer.stage("head"), self._modes(ctx.training):
            for stage in self.local:
                x = call_stage(stage, x, ctx)
                if ctx.finished:
                    self._train_locally(ctx)
                    return None
        cut: Cut = x
        with ctx.timer.stage("encode"):
            return self.codec.forward(cut, ctx)

    def _train_locally(self, ctx: StepContext) -> None:
        """A training batch answered whole on the edge still trains what it added losses for."""
        if ctx.training and ctx.losses:
            self.optimizer.zero_grad()
            torch.autograd.backward(ctx.losses)
            self.optimizer.step(ctx)

    def backward(self, reply: Any, ctx: StepContext) -> torch.Tensor | None:
        """Codec back to head: decodes the reply; in training backpropagates it and steps. Returns the logits in inference."""
        with ctx.timer.stage("decode"):
            answer = self.codec.backward(reply, ctx)
        if not ctx.training:
            return ctx.merge(answer)
        with ctx.timer.stage("backward"):
            self.optimizer.zero_grad()
            grad = answer
            for stage in reversed(self.local):
                if isinstance(stage, Stage):
                    grad = stage.backward(grad, ctx)
            self.optimizer.step(ctx)
        return None


class ServerChain:
    """The server's stages after the codec: your stages, the decompressor, the tail (and loss), the optimizer."""

    def __init__(self, stages: Sequence[Any]) -> None:
        self.stages = list(stages)
        decompressors = [stage for stage in self.stages if isinstance(stage, DecompressorStage)]
        optimizers = [stage for stage in self.stages if isinstance(stage, OptimizerStage)]
        if len(decompressors) != 1 or not any(isinstance(stage, TailStage) for stage in self.stages):
            raise ConfigError("a server chain needs one DecompressorStage and a TailStage")
        if len(optimizers) > 1 or (optimizers and self.stages[-1] is not optimizers[0]):
            raise ConfigError("a server chain has at most one OptimizerStage, and it comes last")
        self.decompressor: DecompressorStage = decompressors[0]
        self.optimizer: OptimizerStage | None = optimizers[0] if optimizers else None
        self.module = collect_modules(self.stages)
        self._modes = _Modes(self.module)

    @property
    def trains(self) -> bool:
        return self.optimizer is not None

    def forward(self, cut: Cut, ctx: StepContext) -> torch.Tensor:
        """The logits (inference) or, after the optimizer's step, the gradient of the received values (training).

        In training the received values become the graph's leaf before the
        first stage, so stages of one's own before the decompressor are
        trained too and the edge's gradient is that leaf's ``grad``.
        """
        if ctx.training:
            values = cut.values.detach().requires_grad_(True)
            ctx.meta["received"] = values
            cut = Cut(values, cut.indices)
        guard = self.optimizer.guard if self.optimizer is not None and ctx.training else None
        if guard is None:
            return self._run(cut, ctx)
        guard.save()  # before the forward: batch-norm statistics change there
        try:
            return self._run(cut, ctx)
        except Exception:
            guard.restore()  # a step that failed anywhere leaves the tail as it was
            raise

    def _run(self, cut: Cut, ctx: StepContext) -> torch.Tensor:
        with self._modes(ctx.training):
            x: Any = cut
            for index, stage in enumerate(self.stages):
                x = call_stage(stage, x, ctx)
                if ctx.answers is not None and ctx.training:
                    raise ConfigError(f"stage '{_stage_name(stage, index)}' answered rows of a training step on the "
                                      "server; a server stage may answer rows only in inference (the edge "
                                      "needs a gradient for every row it sent)")
                if ctx.finished:
                    return ctx.merge(None)
        if ctx.training:
            return ctx.meta["received"].grad
        return ctx.merge(x)
