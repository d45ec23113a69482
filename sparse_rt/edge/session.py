"""The edge: head -> compressor -> codec -> link, and back.

Torch and codec work run in one worker thread (the edge's model is used by
one step at a time); the event loop only moves frames.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch

from sparse_rt.errors import RemoteError, WireError
from sparse_rt.metrics import MetricsLog, StageTimer
from sparse_rt.stages.head import HeadStage, Sent
from sparse_rt.stages.source import Batch, batches
from sparse_rt.transport.connection import frame_bytes
from sparse_rt.transport.link import RequestLink
from sparse_rt.wire.messages import (Activations, ErrorReply, Gradients, Hello, Message, Predictions, Welcome,
                                     decode_message, encode_message)

T = TypeVar("T")

# Replies up to this size are decoded on the event loop instead of the worker thread.
INLINE_DECODE_BYTES = 64 * 1024


@dataclass(frozen=True)
class SessionSettings:
    """What the edge proposes in its handshake."""

    pipeline: str
    channels: int
    budget: int
    codec: str = "fp32"
    lz4: bool = False
    mode: str = "train"
    resolution: int = 0


class EdgeSession:
    """One edge's session with the server: training steps and inference requests.

    With a :class:`MetricsLog`, every message is recorded with its bytes and
    the milliseconds spent in each stage (head, encode, wait, decode, backward).
    """

    def __init__(self, head: HeadStage, link: RequestLink, settings: SessionSettings,
                 metrics: MetricsLog | None = None) -> None:
        self.head = head
        self.link = link
        self.settings = settings
        self.metrics = metrics or MetricsLog(None)
        self.session_id: str | None = None
        self.steps = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head")

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @staticmethod
    def _decode(header: dict[str, Any], frames: list[Any], expected: type, timer: StageTimer) -> Message:
        with timer.stage("decode"):
            reply = decode_message(frames, header)
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        if not isinstance(reply, expected):
            raise WireError(f"expected a {expected.__name__} reply, got {type(reply).__name__}", "bad_kind")
        return reply

    async def _exchange(self, request_id: int, frames: list[Any], expected: type,
                        timer: StageTimer) -> tuple[Message, int]:
        """Send, wait, decode; returns the reply and its size in bytes.

        A small reply (predictions, a welcome) is decoded right here: a trip
        to the worker thread and back costs more than the decode.
        """
        with timer.stage("wait"):
            header, raw = await self.link.request(request_id, frames)
        size = frame_bytes(raw)
        if size <= INLINE_DECODE_BYTES:
            return self._decode(header, raw, expected, timer), size
        return await self._off_loop(self._decode, header, raw, expected, timer), size

    async def open(self) -> str:
        """Handshake: the server checks pipeline, channels, budget, resolution and codec, or refuses with a reason."""
        s = self.settings
        request_id = self.link.next_id()
        hello = Hello(request_id, s.pipeline, s.channels, s.budget, s.codec, s.lz4, s.mode, s.resolution)
        frames, timer = encode_message(hello), StageTimer()
        welcome, bytes_down = await self._exchange(request_id, frames, Welcome, timer)
        self.metrics.record(timer, kind="hello", id=request_id, bytes_up=frame_bytes(frames), bytes_down=bytes_down)
        self.session_id = welcome.session
        return welcome.session

    def _encode(self, request_id: int, values: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor | None,
                timer: StageTimer) -> list[Any]:
        assert self.session_id is not None, "open() the session first"
        with timer.stage("encode"):
            return encode_message(Activations(request_id, self.session_id, self.settings.codec, self.settings.lz4,
                                              self.settings.channels, indices, values.detach(), labels, self.steps,
                                              self.head.lr_scale.scale if labels is not None else 1.0))

    def set_lr_scale(self, scale: float) -> None:
        """Train head and tail at ``scale`` times their base learning rates from the next step on.

        The head is scaled here; the scale travels with every training step
        (``lr_scale``), so the server's tail follows.
        """
        self.head.lr_scale.set(scale)

    def _forward_train(self, request_id: int, x: torch.Tensor, y: torch.Tensor,
                       timer: StageTimer) -> tuple[Sent, list[Any]]:
        with timer.stage("head"):
            sent = self.head.forward_train(x)
        return sent, self._encode(request_id, sent.values, sent.indices, y, timer)

    def _backward(self, header: dict[str, Any], raw: list[Any], sent: Sent, timer: StageTimer) -> Gradients:
        """Decode the gradient and run the head's backward: one trip to the worker thread for both."""
        reply = self._decode(header, raw, Gradients, timer)
        if not torch.equal(reply.indices, sent.indices) or reply.values.shape != sent.values.shape:
            raise WireError("the gradient reply does not match the channels sent", "bad_reply")
        with timer.stage("backward"):
            self.head.backward(sent, reply.values)
        return reply

    async def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One split-learning step; returns the server's task loss for the batch."""
        timer, request_id = StageTimer(), self.link.next_id()
        sent, frames = await self._off_loop(self._forward_train, request_id, x, y, timer)
        with timer.stage("wait"):
            header, raw = await self.link.request(request_id, frames)
        reply = await self._off_loop(self._backward, header, raw, sent, timer)
        self.metrics.record(timer, kind="train", id=request_id, step=self.steps, samples=len(y), loss=reply.loss,
                            bytes_up=frame_bytes(frames), bytes_down=frame_bytes(raw))
        self.steps += 1
        return reply.loss

    def _forward_infer(self, request_id: int, x: torch.Tensor, timer: StageTimer) -> list[Any]:
        with timer.stage("head"):
            values, indices = self.head.forward_infer(x)
        return self._encode(request_id, values, indices, None, timer)

    async def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the batch, computed by the server's tail."""
        timer, request_id = StageTimer(), self.link.next_id()
        frames = await self._off_loop(self._forward_infer, request_id, x, timer)
        reply, bytes_down = await self._exchange(request_id, frames, Predictions, timer)
        self.metrics.record(timer, kind="infer", id=request_id, samples=len(x), bytes_up=frame_bytes(frames),
                            bytes_down=bytes_down)
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

    async def infer_many(self, inputs: Iterable[torch.Tensor] | AsyncIterable[torch.Tensor],
                         inflight: int = 4) -> AsyncIterator[torch.Tensor]:
        """Logits for each input batch, in order, with up to ``inflight`` requests on the wire at once.

        The head works on the next batch while earlier ones are on the network
        or in the server's tail, so neither side waits for the other.
        """
        if inflight < 1:
            raise ValueError(f"inflight must be at least 1, got {inflight}")
        pending: deque[asyncio.Task[torch.Tensor]] = deque()
        try:
            async for x in _async_iter(inputs):
                if len(pending) >= inflight:
                    yield await pending.popleft()
                pending.append(asyncio.create_task(self.infer(x)))
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()

    async def evaluate(self, loader: Iterable[Batch], inflight: int = 4) -> float:
        """Accuracy of split inference over ``loader``, pipelined as :meth:`infer_many`."""
        labels: deque[torch.Tensor] = deque()

        async def inputs() -> AsyncIterator[torch.Tensor]:
            async for x, y in batches(loader):
                labels.append(y)
                yield x

        right, count = 0, 0
        async for logits in self.infer_many(inputs(), inflight):
            y = labels.popleft()
            right, count = right + int(logits.argmax(dim=1).eq(y).sum()), count + len(y)
        return right / max(count, 1)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


async def _async_iter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
