"""The edge: head -> compressor -> codec -> link, and back.

Torch and codec work run in one worker thread (the edge's model is used by
one step at a time); the event loop only moves frames.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch

from sparse_rt.errors import RemoteError, WireError
from sparse_rt.stages.head import HeadStage, Sent
from sparse_rt.stages.source import Batch, batches
from sparse_rt.transport.link import RequestLink
from sparse_rt.wire.messages import (Activations, ErrorReply, Gradients, Hello, Message, Predictions, Welcome,
                                     decode_message, encode_message)

T = TypeVar("T")


@dataclass(frozen=True)
class SessionSettings:
    """What the edge proposes in its handshake."""

    pipeline: str
    channels: int
    budget: int
    codec: str = "fp32"
    lz4: bool = False
    mode: str = "train"


class EdgeSession:
    """One edge's session with the server: training steps and inference requests."""

    def __init__(self, head: HeadStage, link: RequestLink, settings: SessionSettings) -> None:
        self.head = head
        self.link = link
        self.settings = settings
        self.session_id: str | None = None
        self.steps = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head")

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _exchange(self, request_id: int, frames: list[Any], expected: type) -> Message:
        reply = await self._off_loop(decode_message, await self.link.request(request_id, frames))
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        if not isinstance(reply, expected):
            raise WireError(f"expected a {expected.__name__} reply, got {type(reply).__name__}", "bad_kind")
        return reply

    async def open(self) -> str:
        """Handshake: the server checks pipeline, channels, budget and codec, or refuses with a reason."""
        s = self.settings
        request_id = self.link.next_id()
        hello = Hello(request_id, s.pipeline, s.channels, s.budget, s.codec, s.lz4, s.mode)
        welcome = await self._exchange(request_id, encode_message(hello), Welcome)
        self.session_id = welcome.session
        return welcome.session

    def _activations(self, request_id: int, values: torch.Tensor, indices: torch.Tensor,
                     labels: torch.Tensor | None) -> list[Any]:
        assert self.session_id is not None, "open() the session first"
        message = Activations(request_id, self.session_id, self.settings.codec, self.settings.lz4,
                              self.settings.channels, indices, values.detach(), labels, self.steps)
        return encode_message(message)

    def _forward_train(self, request_id: int, x: torch.Tensor, y: torch.Tensor) -> tuple[Sent, list[Any]]:
        sent = self.head.forward_train(x)
        return sent, self._activations(request_id, sent.values, sent.indices, y)

    async def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One split-learning step; returns the server's task loss for the batch."""
        request_id = self.link.next_id()
        sent, frames = await self._off_loop(self._forward_train, request_id, x, y)
        reply = await self._exchange(request_id, frames, Gradients)
        if not torch.equal(reply.indices, sent.indices) or reply.values.shape != sent.values.shape:
            raise WireError("the gradient reply does not match the channels sent", "bad_reply")
        await self._off_loop(self.head.backward, sent, reply.values)
        self.steps += 1
        return reply.loss

    def _forward_infer(self, request_id: int, x: torch.Tensor) -> list[Any]:
        values, indices = self.head.forward_infer(x)
        return self._activations(request_id, values, indices, None)

    async def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the batch, computed by the server's tail."""
        request_id = self.link.next_id()
        frames = await self._off_loop(self._forward_infer, request_id, x)
        reply = await self._exchange(request_id, frames, Predictions)
        return reply.logits

    async def train_epoch(self, loader: Iterable[Batch], on_batch: Callable[[int, float], None] | None = None) -> float:
        """Train on every batch of ``loader``; returns the mean loss per sample."""
        total, count = 0.0, 0
        async for x, y in batches(loader):
            loss = await self.train_step(x, y)
            total, count = total + loss * len(y), count + len(y)
            if on_batch is not None:
                on_batch(len(y), loss)
        return total / max(count, 1)

    async def evaluate(self, loader: Iterable[Batch]) -> float:
        """Accuracy of split inference over ``loader``."""
        correct, count = 0, 0
        async for x, y in batches(loader):
            logits = await self.infer(x)
            correct += int((logits.argmax(dim=1) == y).sum())
            count += len(y)
        return correct / max(count, 1)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
