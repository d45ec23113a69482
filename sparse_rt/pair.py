"""A server and an edge in one process, joined by a real ZeroMQ socket.

The quickest way to run a model split: everything a deployment does (the
handshake, the codec, every byte through a socket) without a second process.
`sparse-rt run` is built on it; so is the example in examples/.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from typing import Any, Iterable, Sequence

import torch
import zmq
import zmq.asyncio
from torch import nn

from sparse_rt.assembly import edge_chain, server_chain
from sparse_rt.model.compression import PruneLossWeights
from sparse_rt.errors import ConfigError
from sparse_rt.model.sides import CutShape, build_sides, evaluating
from sparse_rt.pipeline import Pipeline
from sparse_rt.edge.session import EdgeSession, SessionSettings
from sparse_rt.server.server import SplitServer
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.stages.source import Batch
from sparse_rt.transport.connection import Traffic, bind_router, connect_dealer
from sparse_rt.transport.link import RequestLink
from sparse_rt.transport.shaper import Shaper


def local_address(transport: str) -> str:
    """A fresh address on this machine: inproc:// (same process), an ipc:// socket file, or tcp:// on loopback."""
    if transport == "tcp":
        return "tcp://127.0.0.1:*"  # a free port, read back after binding
    if transport == "ipc":
        return f"ipc://{os.path.join(tempfile.gettempdir(), f'sparse-rt-{uuid.uuid4().hex[:12]}.sock')}"
    return f"inproc://sparse-rt-{uuid.uuid4().hex}"


def count_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Classes the model predicts, measured with a dummy sample."""
    with evaluating(model):
        return int(model(torch.zeros(1, *input_shape)).shape[-1])


def check_compressor(compressor: nn.Module, head: nn.Module, cut: CutShape, input_shape: tuple[int, ...],
                     resolution: int) -> None:
    """A compressor of one's own must send B of the cut's C channels at the cut's size; ConfigError if not.

    Checked with a dummy sample now, so a mistake is told at construction
    instead of as a refusal from the server at the first step.
    """
    channels, budget = getattr(compressor, "channels", None), getattr(compressor, "budget", None)
    if channels != cut.channels or not isinstance(budget, int) or not 1 <= budget <= cut.channels:
        raise ConfigError(f"a compressor needs attributes channels (here {cut.channels}) and budget (1 to "
                          f"{cut.channels}), got channels={channels!r}, budget={budget!r}")
    if resolution:
        raise ConfigError("resolution compression is the paper's Compressor's; a compressor of your own sends "
                          "the cut at its full size (resolution=0)")
    with evaluating(head, compressor):
        values, indices = compressor(head(torch.zeros(1, *input_shape)))
    expected = (1, budget, cut.sent_height, cut.sent_width)
    if tuple(values.shape) != expected or tuple(indices.shape) != (budget,):
        raise ConfigError(f"the compressor must return values {expected} and indices ({budget},) for one sample, "
                          f"got {tuple(values.shape)} and {tuple(indices.shape)}")


class SplitPair:
    """``model`` cut after ``cut``: head + compressor on an edge, decompressor + tail on a server.

    Use ``async with SplitPair(...) as pair`` and call :meth:`train_step`,
    :meth:`infer`, :meth:`evaluate`. Each side gets its own optimizer over its
    own parameters; ``budget=None`` sends all channels. ``edge_stages`` go
    between the head and the compressor, ``server_stages`` before the
    decompressor (stages/base.py); ``grad_codec`` sends gradients in another
    codec than the activations. ``compressor`` replaces the paper's
    Compressor with a module of your own that chooses what crosses the
    network (stages/compressor.py): ``forward(x) -> (values, indices)``, with
    attributes ``channels`` (C) and ``budget`` (B); ``budget`` and ``weights``
    are then its business, and the server's Decompressor scatters what it sends.
    ``shaper`` puts both sockets on one modelled link of limited rate and delay
    (transport/shaper.py), e.g. with ``transport="tcp"`` for `sparse-rt bench link`.
    """

    def __init__(self, model: nn.Module, cut: str, input_shape: tuple[int, int, int], *, budget: int | None = None,
                 codec: str = "fp32", lz4: bool = False, resolution: int = 0, optimizer: str = "adam",
                 lr: float = 1e-3, weight_decay: float = 0.0, transport: str = "inproc", name: str = "custom",
                 request_timeout: float = 60.0, weights: PruneLossWeights = PruneLossWeights(),
                 shaper: Shaper | None = None, edge_stages: Sequence[Any] = (), server_stages: Sequence[Any] = (),
                 grad_codec: str | None = None, offload: bool = True, compressor: nn.Module | None = None) -> None:
        num_classes = count_outputs(model, input_shape)
        self.edge_model, self.server_model, self.cut = build_sides(model, cut, input_shape, budget, resolution,
                                                                   weights)
        if compressor is not None:
            check_compressor(compressor, self.edge_model.head, self.cut, input_shape, resolution)
            self.edge_model.compressor = compressor
        self.budget = self.edge_model.compressor.budget
        self.name = name
        self.address = local_address(transport)
        self._context = zmq.asyncio.Context()
        tail = server_chain(self.server_model, build_optimizer(self.server_model.parameters(), optimizer, lr,
                                                               weight_decay), stages=server_stages)
        server_socket = bind_router(self._context, self.address, shaper=shaper)
        self.address = server_socket.socket.getsockopt_string(zmq.LAST_ENDPOINT)  # the port, for tcp
        self.server = SplitServer(name, tail, self.cut, num_classes, server_socket, cut_name=cut)
        chain = edge_chain(self.edge_model, lambda params: build_optimizer(params, optimizer, lr, weight_decay),
                           stages=edge_stages, codec=codec, lz4=lz4, grad_codec=grad_codec)
        self.link = RequestLink(connect_dealer(self._context, self.address, shaper=shaper), self.address,
                                request_timeout)
        self.edge = EdgeSession(chain, self.link, SessionSettings.of_chain(chain, name, resolution=resolution),
                                offload=offload)
        self._serving: asyncio.Task[None] | None = None

    @classmethod
    def for_pipeline(cls, pipeline: Pipeline, *, lr: float | None = None, resolution: int | None = None,
                     **options: Any) -> "SplitPair":
        """A pair for a registered pipeline: its model (built now, from torch's current seed), cut and defaults.

        ``options`` are the other keyword arguments of the constructor (budget, codec, transport, ...).
        """
        from sparse_rt.pipeline import TrainingSettings

        training = TrainingSettings.resolve(pipeline, lr=lr, resolution=resolution)
        return cls(pipeline.build_model(), pipeline.cut, pipeline.input_shape, optimizer=training.optimizer,
                   lr=training.lr, weight_decay=training.weight_decay, name=pipeline.name,
                   resolution=training.resolution, **options)

    @property
    def session(self) -> EdgeSession:
        """The edge's session, as :attr:`EdgeClient.session` (code that trains takes either)."""
        return self.edge

    @property
    def traffic(self) -> Traffic:
        """Bytes the edge's socket sent (up) and received (down) so far."""
        return self.link.connection.traffic

    async def start(self) -> "SplitPair":
        self._serving = asyncio.create_task(self.server.serve(), name="server")
        await self.edge.open()
        return self

    async def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return await self.edge.train_step(x, y)

    async def infer(self, x: torch.Tensor) -> torch.Tensor:
        return await self.edge.infer(x)

    async def evaluate(self, loader: Iterable[Batch]) -> float:
        return await self.edge.evaluate(loader)

    async def close(self) -> None:
        if self._serving is not None and not self._serving.done():
            await self.edge.end()
        await self.link.close()
        self.edge.close()
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        self.server.connection.close()
        self._context.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address.removeprefix("ipc://"))
            except FileNotFoundError:
                pass

    async def __aenter__(self) -> "SplitPair":
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
