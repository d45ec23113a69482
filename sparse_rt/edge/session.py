"""The edge's asyncio driver: runs its chain (head -> ... -> compressor -> codec) and the transport, and back.

The protocol state (session id, step numbers, the handshake) is in
protocol.py; the stages are in the chain; this layer only decides where
each piece runs and moves frames. The edge's torch work runs one step at a
time, in one worker thread or on the loop itself (``offload``).
"""
from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, TypeVar

import torch

from sparse_rt.edge.estimate import LinkEstimate
from sparse_rt.edge.protocol import EdgeProtocol, SessionSettings
from sparse_rt.errors import ConfigError, RemoteError, SparseRtError
from sparse_rt.metrics import MetricsLog, StageTimer
from sparse_rt.stages.base import StepContext
from sparse_rt.stages.chain import EdgeChain
from sparse_rt.stages.codec import decode_reply
from sparse_rt.stages.source import Batch, batches
from sparse_rt.stages.transport import TransportStage
from sparse_rt.transport.connection import frame_bytes
from sparse_rt.transport.link import RequestLink, ServerUnreachable
from sparse_rt.wire.messages import Bye, Welcome, encode_message, readdressed

__all__ = ["EdgeSession", "SessionSettings"]

T = TypeVar("T")

log = logging.getLogger("sparse_rt.edge")

# Replies up to this size are decoded on the event loop instead of the worker thread.
INLINE_DECODE_BYTES = 64 * 1024
# How long a closing edge waits for the server to acknowledge the end of its session.
BYE_TIMEOUT = 2.0


class EdgeSession:
    """One edge's session with the server: runs its chain for training steps and inference requests.

    With a :class:`MetricsLog`, every message is recorded with its bytes and
    the milliseconds spent in each stage (head, encode, wait, decode, backward).
    ``offload`` runs the chain's torch work in one worker thread instead of on
    the event loop (docs/ARCHITECTURE.md says when each pays).
    """

    def __init__(self, chain: EdgeChain, link: RequestLink, settings: SessionSettings,
                 metrics: MetricsLog | None = None, offload: bool = True, resume: str | None = None) -> None:
        self.chain = chain
        self.link = link
        if chain.transport is not None and chain.transport.link is not link:
            raise ConfigError("the chain's TransportStage sends over another link than this session's; give the "
                              "session the stage's link, or leave the stage out and the session adds one")
        self.transport = chain.transport or TransportStage(link)
        self.protocol = EdgeProtocol(settings, resume)
        self.metrics = metrics or MetricsLog(None)
        self.rows_sent = 0  # rows of the last training step that reached the server (its loss is over them)
        self.estimate = LinkEstimate()  # the link and the server, as this session's own requests see them
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="head") if offload else None

    @property
    def settings(self) -> SessionSettings:
        return self.protocol.settings

    @property
    def session_id(self) -> str | None:
        return self.protocol.session_id

    @property
    def steps(self) -> int:
        return self.protocol.steps

    async def _local(self, fn: Callable[..., T], *args: Any) -> T:
        """Torch work: in the worker thread when offloading, else right here on the loop."""
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> str:
        """Handshake: the server checks pipeline, channels, budget, resolution and codec, or refuses with a reason."""
        request_id = self.link.next_id()
        frames, timer = encode_message(self.protocol.hello(request_id)), StageTimer()
        with timer.stage("wait"):
            header, raw = await self.link.request(request_id, frames)
        with timer.stage("decode"):
            try:
                welcome = decode_reply(header, raw, Welcome)
            except RemoteError as exc:
                asked = [name for name in ("timing", "codecs") if name in exc.reason]
                if exc.code == "bad_header" and asked and (self.settings.timing or self.settings.codecs):
                    raise ConfigError(f"the server at {self.link.address} predates the handshake's "
                                      f"{' and '.join(asked)} (docs/PROTOCOL.md 10): a deadline or a policy needs a "
                                      "newer server; without deadline_ms/policy this edge works with it") from exc
                raise
        self.metrics.record(timer, kind="hello", id=request_id, bytes_up=frame_bytes(frames),
                            bytes_down=frame_bytes(raw))
        self.estimate.observe_round_trip(timer.ms["wait"])
        session = self.protocol.opened(welcome)
        if welcome.resumed:
            log.info("resumed session %s at step %d%s", session, self.steps,
                     f" ({self.protocol.steps_skipped} step(s) the tail had after the head's checkpoint are "
                     "skipped)" if self.protocol.steps_skipped else "")
        return session

    async def end(self, timeout: float = BYE_TIMEOUT) -> None:
        """Tell the server the session is over, so it frees it now rather than after its idle time.

        Best effort, with a short timeout: a server that is gone ends it by expiry anyway.
        """
        if self.session_id is None or not self.link.answering:  # a server that stopped answering is not waited for
            return
        request_id, timer = self.link.next_id(), StageTimer()
        frames = encode_message(Bye(request_id, self.session_id))
        try:
            with timer.stage("wait"):
                header, raw = await self.link.request(request_id, frames, timeout=timeout, retries=0)
            decode_reply(header, raw, Bye)
            self.metrics.record(timer, kind="bye", id=request_id, bytes_up=frame_bytes(frames),
                                bytes_down=frame_bytes(raw))
        except (ServerUnreachable, SparseRtError) as exc:
            log.info("could not end session %s (%s); the server ends it when idle", self.session_id, exc)
        self.protocol.session_id = None

    def set_lr_scale(self, scale: float) -> None:
        """Train head and tail at ``scale`` times their base learning rates from the next step on.

        The head is scaled here; the scale travels with every training step
        (``lr_scale``), so the server's tail follows.
        """
        self.chain.optimizer.lr_scale.set(scale)

    def on_epoch(self, plan: Any, steps_per_epoch: int) -> None:
        """A schedule's epoch reaches every stage it drives (budget, exploration, learning rate) through one call."""
        for stage in self.chain.scheduled():
            stage.on_epoch(plan, steps_per_epoch)

    async def _run(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor | None, int, int]:
        """The chain for one request: (its result, bytes up, bytes down)."""
        frames = await self._local(self.chain.forward, x, ctx)
        if frames is None:  # the edge's own stages answered every row
            return ctx.merge(None), 0, 0
        with ctx.timer.stage("wait"):
            reply = await self.transport.forward(frames, ctx)
            if _refused(reply, "unknown_session"):  # the server lost it (a restart without it, or idle expiry)
                log.warning("the server no longer knows session %s; opening a new one and going on",
                            self.session_id)
                await self.open()
                ctx.session, ctx.meta["request_id"], ctx.meta["reopened"] = self.session_id, self.link.next_id(), True
                frames = readdressed(frames, ctx.session, ctx.meta["request_id"])
                reply = await self.transport.forward(frames, ctx)
        up, down = frame_bytes(frames), frame_bytes(reply[1])
        ctx.meta["server_ms"] = reply[0].get("server_ms")  # with timing: its queue and compute, not the network's
        if not ctx.meta.get("reopened"):  # a wait that held a new handshake says nothing of one request's time
            self.estimate.observe(up, down, ctx.timer.ms["wait"], ctx.meta["server_ms"])
        if ctx.training and _refused(reply, "reply_lost"):
            # Applied and checkpointed by the server before it restarted; only its gradient is gone. The head
            # skips this one update, the step counts as applied, and training goes on with the next.
            log.warning("step %d was applied before the server restarted, its reply lost; going on", ctx.step)
            return None, up, down
        if not ctx.training and down <= INLINE_DECODE_BYTES:  # a trip to the worker costs more than this decode
            return self.chain.backward(reply, ctx), up, down
        return await self._local(self.chain.backward, reply, ctx), up, down

    async def train_step(self, x: torch.Tensor, y: torch.Tensor, data_ms: float | None = None) -> float:
        """One split-learning step; returns the server's task loss for the rows it got.

        That is NaN when the edge's own stages answered every row (nothing
        was sent); :attr:`rows_sent` says how many rows the loss is over.
        ``data_ms``, the time the step waited for its batch (the source's),
        goes into its metrics record.
        """
        request_id = self.link.next_id()
        ctx = self.protocol.context("train", request_id, y, self.chain.optimizer.lr_scale.scale)
        if data_ms is not None:
            ctx.timer.ms["data"] = data_ms
        _, bytes_up, bytes_down = await self._run(x, ctx)
        self.rows_sent = len(ctx.labels) if bytes_up and ctx.labels is not None else 0
        loss = ctx.meta.get("loss", math.nan)
        self.metrics.record(ctx.timer, kind="train", id=request_id, step=ctx.step, samples=len(y), loss=loss,
                            bytes_up=bytes_up, bytes_down=bytes_down)
        if bytes_up:  # the server applied it (rows all answered on the edge never left it)
            self.protocol.applied()
        return loss

    async def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for the batch: the server's tail's, or an edge stage's for rows it answered itself."""
        return (await self.infer_traced(x))[0]

    async def infer_traced(self, x: torch.Tensor, **record: Any) -> tuple[torch.Tensor, StepContext]:
        """:meth:`infer`, with the request's context (stage times, bytes, the server's own time).

        ``record``: more fields for this request's metrics record (a policy's decision).
        """
        request_id = self.link.next_id()
        ctx = self.protocol.context("infer", request_id)
        logits, bytes_up, bytes_down = await self._run(x, ctx)
        ctx.meta.update(bytes_up=bytes_up, bytes_down=bytes_down)
        self.metrics.record(ctx.timer, kind="infer", id=request_id, samples=len(x), bytes_up=bytes_up,
                            bytes_down=bytes_down, **record)
        return logits, ctx

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
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _refused(reply: tuple[dict[str, Any], list[Any]], code: str) -> bool:
    header = reply[0]
    return header.get("kind") == "error" and header.get("code") == code


async def _async_iter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
