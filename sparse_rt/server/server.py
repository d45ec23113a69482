"""The server: one ROUTER, many sessions, one shared tail.

A reader task takes messages off the socket in arrival order. Handshakes are
answered at once, on the loop; tensor messages go through a bounded queue to
one worker that runs decode, the tail and encode in a worker thread, so
steps are applied in arrival order and the loop stays free for sockets.
When the queue is full the reader stops reading: ZeroMQ's own buffers fill
and the edges slow down, instead of the server's memory growing.

Every bad message gets an error reply naming the problem and a log line;
nothing a peer sends can stop the server.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from sparse_rt.errors import WireError
from sparse_rt.model.sides import CutShape
from sparse_rt.metrics import MetricsLog, StageTimer
from sparse_rt.stages.tail import TailStage
from sparse_rt.transport.connection import Connection, frame_bytes
from sparse_rt.wire.codecs import CODEC_NAMES
from sparse_rt.wire.header import MAX_HEADER_BYTES, decode_header
from sparse_rt.wire.messages import (Activations, ErrorReply, Gradients, Hello, Message, Predictions, Welcome,
                                     decode_message, encode_message)

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 2048


@dataclass
class Session:
    """One edge's settings, fixed at the handshake."""

    id: str
    route: bytes
    mode: str
    budget: int
    codec: str
    lz4: bool
    last_step: int = -1
    last_reply: Gradients | None = None


@dataclass
class ServerStats:
    steps_applied: int = 0
    inferences: int = 0
    errors: int = 0
    sessions_opened: int = 0
    steps_per_session: dict[str, int] = field(default_factory=dict)


def error_frames(request_id: int | None, code: str, text: str) -> list[Any]:
    """An error reply whose header fits the limit even when escaping lengthens a peer's echoed text."""
    text = text[:MAX_ERROR_TEXT]
    while True:
        frames = encode_message(ErrorReply(request_id or 0, code, text))
        if len(frames[0]) <= MAX_HEADER_BYTES:
            return frames
        text = text[: len(text) // 2]


class SplitServer:
    """Serves one pipeline's tail to every edge that completes the handshake."""

    def __init__(self, pipeline: str, tail: TailStage, cut: CutShape, num_classes: int,
                 connection: Connection, queue_size: int = 16, metrics: MetricsLog | None = None,
                 after_step: Callable[[int], None] | None = None,
                 model_set: dict[int, TailStage] | None = None) -> None:
        self.pipeline = pipeline
        self.resolution = tail.model.decompressor.resolution
        self.tail = tail
        # A model set (one trained tail per budget) serves inference only; each request's budget picks its tail.
        self.model_set = model_set
        self.cut = cut
        self.num_classes = num_classes
        self.connection = connection
        self.sessions: dict[str, Session] = {}
        self.stats = ServerStats()
        self.metrics = metrics or MetricsLog(None)
        self.after_step = after_step  # called in the worker thread with the count of applied steps
        self._queue: asyncio.Queue[tuple[bytes, list[zmq.Frame], dict[str, Any], float]] = asyncio.Queue(queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")

    async def serve(self) -> None:
        """Run until cancelled."""
        worker = asyncio.create_task(self._work(), name="tail worker")
        try:
            while True:
                route, frames = await self.connection.recv()
                try:
                    await self._dispatch(route, frames)
                except Exception:  # a bug must not stop the reader, and with it every edge
                    self.stats.errors += 1
                    log.exception("failed to dispatch a message from %s", route.hex())
                    await self.connection.send(error_frames(None, "internal", "server error while reading"), route)
        finally:
            worker.cancel()
            self._executor.shutdown(wait=True)

    async def _dispatch(self, route: bytes, frames: list[zmq.Frame]) -> None:
        try:
            fields = decode_header(frames[0].bytes) if frames else None
            if fields is None:
                raise WireError("empty message: expected a header frame", "bad_frames")
        except WireError as exc:
            await self._refuse(route, exc)
            return
        if fields["kind"] == "hello":
            await self.connection.send(self._handshake(route, frames, fields), route)
        else:
            await self._queue.put((route, frames, fields, time.perf_counter()))

    async def _refuse(self, route: bytes, exc: WireError) -> None:
        self.stats.errors += 1
        log.warning("refused a message from %s: %s", route.hex(), exc)
        await self.connection.send(error_frames(exc.request_id, exc.code, str(exc)), route)

    def _handshake(self, route: bytes, frames: list[zmq.Frame], header: dict[str, Any]) -> list[Any]:
        try:
            hello = decode_message(frames, header)
            assert isinstance(hello, Hello)
            problem = self._check_hello(hello)
            if problem:
                raise WireError(problem, "handshake_refused", hello.id)
        except WireError as exc:
            self.stats.errors += 1
            log.warning("refused a handshake from %s: %s", route.hex(), exc)
            return error_frames(exc.request_id, exc.code, str(exc))
        session = Session(secrets.token_hex(8), route, hello.mode, hello.budget, hello.codec, hello.lz4)
        self.sessions[session.id] = session
        self.stats.sessions_opened += 1
        log.info("session %s opened: %s, budget %d/%d, codec %s%s", session.id, hello.mode, hello.budget,
                 self.cut.channels, hello.codec, "+lz4" if hello.lz4 else "")
        return encode_message(Welcome(hello.id, session.id))

    def _held(self) -> str:
        return ", ".join(str(budget) for budget in sorted(self.model_set or ()))

    def _check_hello(self, hello: Hello) -> str | None:
        if hello.pipeline != self.pipeline:
            return f"this server runs pipeline '{self.pipeline}', not '{hello.pipeline}'"
        if hello.channels != self.cut.channels:
            return f"the cut has {self.cut.channels} channels here, the edge says {hello.channels}"
        if not 1 <= hello.budget <= self.cut.channels:
            return f"budget must be between 1 and {self.cut.channels} channels, got {hello.budget}"
        if self.model_set is not None:
            if hello.mode != "infer":
                return "this server serves a model set: inference only"
            if hello.budget not in self.model_set:
                return f"budget {hello.budget} is not in this model set; it holds {self._held()}"
        if hello.resolution != self.resolution:
            return f"this server restores resolution r={self.resolution}, the edge compresses with r={hello.resolution}"
        if hello.codec not in CODEC_NAMES:
            return f"unknown codec '{hello.codec}'; this server knows {', '.join(CODEC_NAMES)}"
        return None

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            route, frames, header, queued = await self._queue.get()
            timer = StageTimer()
            timer.ms["queue"] = (time.perf_counter() - queued) * 1e3
            reply = await loop.run_in_executor(self._executor, self._process, route, frames, header, timer)
            await self.connection.send(reply, route)

    def _process(self, route: bytes, frames: list[zmq.Frame], header: dict[str, Any],
                 timer: StageTimer) -> list[Any]:
        """Answer one message and record it (worker thread)."""
        kind, request_id, reply = self._answer(route, frames, header, timer)
        self.metrics.record(timer, kind=kind, id=request_id, route=route.hex(), bytes_in=frame_bytes(frames),
                            bytes_out=frame_bytes(reply))
        return reply

    def _answer(self, route: bytes, frames: list[zmq.Frame], header: dict[str, Any],
                timer: StageTimer) -> tuple[str, int | None, list[Any]]:
        """Decode, check against the session, run the tail, encode: (reply kind, request id, reply frames)."""
        request_id = None
        try:
            with timer.stage("decode"):
                message = decode_message(frames, header)
            request_id = message.id
            if not isinstance(message, Activations):
                raise WireError(f"a server does not accept '{type(message).__name__}' messages", "bad_kind")
            with timer.stage("tail"):
                reply = self._apply(route, message)
            with timer.stage("encode"):
                return ("grad" if isinstance(reply, Gradients) else "pred"), request_id, encode_message(reply)
        except WireError as exc:
            self.stats.errors += 1
            log.warning("refused a message from %s: %s", route.hex(), exc)
            return "error", request_id, error_frames(exc.request_id or request_id, exc.code, str(exc))
        except Exception as exc:  # a bug must not take down everyone's server
            self.stats.errors += 1
            log.exception("failed on a message from %s", route.hex())
            return "error", request_id, error_frames(request_id, "internal",
                                                     f"server error: {type(exc).__name__}: {exc}")

    def _session_for(self, route: bytes, message: Activations) -> Session:
        session = self.sessions.get(message.session)
        if session is None or session.route != route:
            raise WireError(f"unknown session '{message.session}'; open one with a hello first", "unknown_session")
        return session

    def _check(self, session: Session, message: Activations) -> None:
        n, budget, height, width = message.values.shape
        if message.kind == "train" and session.mode != "train":
            raise WireError(f"session {session.id} was opened for inference only, got a training step",
                            "wrong_mode")
        if (message.codec, message.lz4) != (session.codec, session.lz4):
            raise WireError(f"session uses codec {session.codec} (lz4 {session.lz4}), message has "
                            f"{message.codec} (lz4 {message.lz4})", "bad_codec")
        if self.model_set is not None and budget not in self.model_set:
            raise WireError(f"budget {budget} is not in this model set; it holds {self._held()}", "bad_budget")
        if message.channels != self.cut.channels or (self.model_set is None and budget > session.budget):
            raise WireError(f"expected at most {session.budget} of {self.cut.channels} channels, got {budget} of "
                            f"{message.channels}", "bad_budget")
        if (height, width) != (self.cut.sent_height, self.cut.sent_width) or n == 0:
            raise WireError(f"expected channels of {self.cut.sent_height}x{self.cut.sent_width} for a non-empty "
                            f"batch, got shape {list(message.values.shape)}", "bad_shape")
        if message.labels is not None and message.labels.numel() and int(message.labels.max()) >= self.num_classes:
            raise WireError(f"labels must be below {self.num_classes}, got {int(message.labels.max())}", "bad_labels")

    def _apply(self, route: bytes, message: Activations) -> Message:
        session = self._session_for(route, message)
        self._check(session, message)
        if message.labels is None:
            self.stats.inferences += 1
            tail = self.tail if self.model_set is None else self.model_set[message.values.shape[1]]
            logits = tail.infer(message.values, message.indices)
            return Predictions(message.id, session.id, logits)
        if message.step == session.last_step and session.last_reply is not None:
            log.info("session %s resent step %d: answering again, not applying twice", session.id, message.step)
            session.last_reply.id = message.id
            return session.last_reply
        if message.step < session.last_step:
            raise WireError(f"step {message.step} is older than the last applied step {session.last_step}",
                            "stale_step")
        grad, loss = self.tail.train_step(message.values, message.indices, message.labels, message.lr_scale)
        session.last_step = message.step
        session.last_reply = Gradients(message.id, session.id, message.step, session.codec, session.lz4,
                                       message.indices, grad, loss)
        self.stats.steps_applied += 1
        self.stats.steps_per_session[session.id] = self.stats.steps_per_session.get(session.id, 0) + 1
        if self.after_step is not None:
            self.after_step(self.stats.steps_applied)
        return session.last_reply
