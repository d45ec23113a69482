"""The server's asyncio driver: one ROUTER, many sessions, one shared tail chain.

A reader task takes messages off the socket in arrival order. Handshakes are
answered at once, on the loop; tensor messages go through a bounded queue to
one worker that runs decode, the session checks (sessions.py), the chain
(your stages -> decompressor -> tail -> optimizer) and encode, so steps are
applied in arrival order. A message predicted to take long runs in a worker
thread, so the loop stays free for sockets; one predicted to take less than
the trip to that thread is worth runs on the loop itself. When the queue is
full the reader stops reading: ZeroMQ's own buffers fill and the edges slow
down, instead of the server's memory growing.

Every bad message gets an error reply naming the problem and a log line;
nothing a peer sends can stop the server.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, NamedTuple, TypeVar

import torch
import zmq

from sparse_rt.errors import WireError, printable
from sparse_rt.metrics import MetricsLog, StageTimer
from sparse_rt.model.sides import CutShape
from sparse_rt.server.sessions import (DEFAULT_MAX_BATCH, MAX_SESSIONS, SESSION_IDLE_SECONDS, ServedCut,
                                       ServerStats, Session, SessionTable, request_cut)
from sparse_rt.server import memory
from sparse_rt.server.trust import TRAIN, AllowList
from sparse_rt.stages.base import Cut, StepContext
from sparse_rt.stages.chain import ServerChain
from sparse_rt.transport.connection import Transport, frame_bytes
from sparse_rt.wire.header import MAX_HEADER_BYTES, MAX_LR_SCALE, PROTOCOL_VERSION, decode_header, encode_header
from sparse_rt.wire.messages import (Activations, Bye, Gradients, Hello, Message, Predictions, Welcome,
                                     decode_message, encode_message)

__all__ = ["SplitServer", "ServerStats", "Session", "error_frames"]

log = logging.getLogger("sparse_rt.server")

MAX_ERROR_TEXT = 2048

# A message predicted to take less than this to answer (decode, checks, chain, encode; not the trip
# to a thread), from its kind's recent cost per byte and its own size, is answered on the loop
# itself: a handshake arriving meanwhile waits at most about this long. Others go to the worker
# thread, so a long step never holds up the reader.
INLINE_STEP_MS = 5.0

# What the worker accepts from an edge (hellos are answered by the handshake); the kinds a server sends are
# refused as such, whatever their frames hold.
ACCEPTED_KINDS = frozenset({"train", "infer", "bye"})

# The worker's stages of a train/infer message before its reply is encoded, back to back from the moment the
# reader took it off the socket: their sum is the reply's server_ms.
SERVER_STAGES = ("queue", "decode", "tail")


def server_ms(timer: StageTimer) -> float:
    """A reply's ``server_ms``: from reading its request off the socket until now (queue, decode, checks, chain).

    The server's own stages of the message, one after another: a stage of one's own that times itself inside
    the chain is already in "tail", so the timer's other entries are not added.
    """
    return max(0.0, sum(timer.ms.get(stage, 0.0) for stage in SERVER_STAGES))


def error_frames(request_id: int | None, code: str, text: str, version: int | None = None) -> list[Any]:
    """An error reply whose header fits the limit even when escaping lengthens a peer's echoed text.

    ``version``: answer a peer of an older protocol in its own format, so it can read why it is refused.
    """
    text = text[:MAX_ERROR_TEXT]
    while True:
        header = encode_header({"kind": "error", "id": request_id or 0, "code": code, "message": text},
                               version or PROTOCOL_VERSION)
        if len(header) <= MAX_HEADER_BYTES:
            return [header]
        text = text[: len(text) // 2]


T = TypeVar("T")


class Between(NamedTuple):
    """A call the worker makes between two messages (a replica group's round), and where its result goes."""

    call: Callable[[], Any]
    done: asyncio.Future[Any]


ModelSetChains = Mapping[tuple[str, int], ServerChain] | Mapping[int, ServerChain]


class SplitServer:
    """Serves one pipeline's tail chain to every edge that completes the handshake.

    ``cut`` is the activation at the cut, ``cut_name`` its layer name (a
    request may then state it; without a name it may state none).
    ``model_set`` (one trained chain per (cut name, budget), or per budget
    at the default cut) serves inference only; each request's cut and budget
    pick its chain. ``cuts`` gives the activation at each further cut of
    the set.
    """

    def __init__(self, pipeline: str, chain: ServerChain, cut: CutShape, num_classes: int,
                 connection: Transport, queue_size: int = 16, metrics: MetricsLog | None = None,
                 after_step: Callable[[int], None] | None = None, after_open: Callable[[], None] | None = None,
                 model_set: ModelSetChains | None = None, allow: AllowList | None = None,
                 reveal: bool = True, max_sessions: int = MAX_SESSIONS,
                 session_idle: float = SESSION_IDLE_SECONDS, max_batch: int = DEFAULT_MAX_BATCH,
                 cut_name: str | None = None, cuts: Mapping[str, CutShape] | None = None) -> None:
        self.chain = chain
        self.allow = allow  # with CURVE: the keys let in, and which of them may train
        self.model_set = _by_cut(model_set, cut_name)
        resolution = int(getattr(chain.decompressor.module, "resolution", 0))
        self.table = SessionTable(_served(pipeline, cut, num_classes, resolution, cut_name, cuts or {},
                                          self.model_set, chain.trains), reveal, max_sessions, session_idle)
        self.connection = connection
        self.limits = self._limits(max_batch)
        self.metrics = metrics or MetricsLog(None)
        self.after_step = after_step  # called in the worker thread, after the reply, with the count of applied steps
        # Called in the worker thread when a training session opens, before its welcome: a checkpoint written
        # then lets a restarted server know the session, so steps it loses are counted, not silent.
        self.after_open = after_open
        self._queue: asyncio.Queue[tuple[bytes, list[zmq.Frame], dict[str, Any], float] | Between] = asyncio.Queue(
            queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        self._ms_per_byte: dict[str, float] = {}  # per kind: a running estimate of ms per byte received
        self._reader: asyncio.Task[None] | None = None
        self._draining = False

    def _limits(self, max_batch: int) -> dict[str, int | float]:
        """What every welcome states (docs/PROTOCOL.md 4.2), read from the parts that enforce each limit."""
        optimizer = self.chain.optimizer
        frame_limit = self.connection.socket.getsockopt(zmq.MAXMSGSIZE)
        return {"max_batch": max_batch, "max_frame_bytes": max(frame_limit, 0),
                "max_lr_scale": min(optimizer.max_lr_scale if optimizer is not None else MAX_LR_SCALE, MAX_LR_SCALE),
                "session_idle_s": self.table.idle_seconds, "sessions_per_peer": self.table.max_per_owner}

    @property
    def stats(self) -> ServerStats:
        return self.table.stats

    @property
    def sessions(self) -> dict[str, Session]:
        return self.table.sessions

    async def serve(self) -> None:
        """Run until cancelled, or until :meth:`drain` was called and every message read is answered."""
        worker = asyncio.create_task(self._work(), name="tail worker")
        self._reader = asyncio.create_task(self._read(), name="reader")
        tasks = {worker, self._reader, asyncio.create_task(self._expire(), name="session expiry")}
        try:
            # Any other ending is the end of serving: a worker that died (a bug) must not leave a reader that
            # fills the queue and then hangs every edge.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not (task is self._reader and self._draining):
                    task.result()
            if self._draining:
                answered = asyncio.create_task(self._queue.join())
                tasks.add(answered)
                await asyncio.wait({answered, worker}, return_when=asyncio.FIRST_COMPLETED)
                if worker.done():
                    worker.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._executor.shutdown(wait=True)

    def drain(self) -> None:
        """Read nothing more; :meth:`serve` returns once every message already read is answered.

        A stopping server thus sends the reply of every step it applied (an
        edge would otherwise resend a step whose gradient is gone); messages
        still unread in ZeroMQ's buffers are resent by their edges to the
        next server.
        """
        self._draining = True
        if self._reader is not None:
            self._reader.cancel()

    async def between_steps(self, call: Callable[[], T]) -> T:
        """Run ``call`` in the worker thread after the messages read so far and before the next one.

        Nothing changes the tail meanwhile, so a replica group can combine
        and save its state there. An exception in ``call`` ends serving as
        well as raising here: a replica that fell out of its group must not
        go on training alone.
        """
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(Between(call, done))
        return await done

    async def _expire(self) -> None:
        """End idle sessions now and then (a dead edge's session, and its stored reply, must not stay forever),
        and give what ended sessions freed back to the system."""
        closed = self.stats.sessions_closed
        while True:
            await asyncio.sleep(min(self.table.idle_seconds / 4, 30.0))
            if self.table.expire() or self.stats.sessions_closed != closed:
                closed = self.stats.sessions_closed
                memory.give_back()

    async def _read(self) -> None:
        while True:
            route, frames = await self.connection.recv()
            try:
                await self._dispatch(route, frames)
            except Exception:  # a bug must not stop the reader, and with it every edge
                self.stats.errors += 1
                log.exception("failed to dispatch a message from %s", route.hex())
                await self.connection.send(error_frames(None, "internal", "server error while reading"), route)

    async def _dispatch(self, route: bytes, frames: list[zmq.Frame]) -> None:
        try:
            fields = decode_header(frames[0].bytes) if frames else None
            if fields is None:
                raise WireError("empty message: expected a header frame", "bad_frames")
        except WireError as exc:
            await self._refuse(route, exc)
            return
        if fields["kind"] == "hello" and not (self.after_open is not None and fields.get("mode") == "train"):
            await self.connection.send(self._handshake(route, frames, fields)[0], route)
        else:  # steps, and training hellos that must be saved before they are answered: in order, by the worker
            await self._queue.put((route, frames, fields, time.perf_counter()))

    async def _refuse(self, route: bytes, exc: WireError) -> None:
        self.stats.errors += 1
        log.warning("refused a message from %s: %s", route.hex(), printable(exc))
        await self.connection.send(error_frames(exc.request_id, exc.code, str(exc), exc.version), route)

    def _owner(self, route: bytes, frames: list[zmq.Frame]) -> bytes:
        """Who sent it: the authenticated key with CURVE (so a reconnecting edge keeps its sessions and no
        other key can use them; behind a broker, the key the broker states), else the sending socket's routing id."""
        if self.allow is None:
            return route
        key = self.connection.peer_key(route, frames)
        if not key:  # cannot happen with CURVE at both ends: refuse rather than pool every keyless peer as one
            raise WireError("this server requires CURVE: the message came with no authenticated key",
                            "handshake_refused")
        return key.encode("ascii")

    def _handshake(self, route: bytes, frames: list[zmq.Frame], header: dict[str, Any]) -> tuple[list[Any], bool]:
        """The reply to a hello, and whether it opened a new training session."""
        try:
            hello = decode_message(frames, header)
            assert isinstance(hello, Hello)
            owner = self._owner(route, frames)
            may_train = self.allow is None or self.allow.role(owner.decode("ascii")) == TRAIN
            session, resumed = self.table.handshake(owner, hello, may_train)
        except WireError as exc:
            self.stats.errors += 1
            log.warning("refused a handshake from %s: %s", route.hex(), printable(exc))
            return error_frames(exc.request_id, exc.code, str(exc)), False
        served = self.table.served
        cut = served.shape(session.cut)  # the session's own cut's (PROTOCOL.md 4.2)
        return encode_message(Welcome(hello.id, session.id, cut.channels, cut.sent_height, cut.sent_width,
                                      served.num_classes, self.limits, resumed,
                                      session.last_step + 1)), not resumed and session.mode == "train"

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._queue.get()
            if isinstance(item, Between):
                if not (self._draining or item.done.done()):  # a stopping server holds no more rounds
                    try:
                        result = await loop.run_in_executor(self._executor, item.call)
                    except Exception as exc:
                        if not item.done.done():
                            item.done.set_exception(exc)
                        if not self._draining:
                            raise
                        log.warning("a call between steps failed while stopping: %s", exc)  # its peers stopped too
                    else:
                        if not item.done.done():  # its caller may have given up meanwhile (cancelled)
                            item.done.set_result(result)
                self._queue.task_done()
                continue
            route, frames, header, queued = item
            if header["kind"] == "hello":
                reply, opened = self._handshake(route, frames, header)
                if opened and self.after_open is not None:
                    await self._run_hook(self.after_open)
                await self.connection.send(reply, route)
                self._queue.task_done()
                continue
            timer = StageTimer()
            timer.ms["queue"] = (time.perf_counter() - queued) * 1e3
            kind, size, applied = header["kind"], frame_bytes(frames), self.stats.steps_applied
            if self._ms_per_byte.get(kind, math.inf) * size < INLINE_STEP_MS:
                answer = self._process(route, frames, header, timer)
            else:
                answer = await loop.run_in_executor(self._executor, self._process, route, frames, header, timer)
            if answer.computed:  # refusals and resent steps are quick whatever a step costs: they must not teach it
                self._learn(kind, size, sum(ms for stage, ms in timer.ms.items() if stage != "queue"))
            await self.connection.send(answer.frames, route)
            if self.after_step is not None and self.stats.steps_applied != applied:
                # e.g. a checkpoint save: off the loop, and before the next step changes the tail
                await self._run_hook(self.after_step, self.stats.steps_applied)
            self._queue.task_done()

    async def _run_hook(self, hook: Callable[..., None], *args: Any) -> None:
        """A hook (a checkpoint save) in the worker thread; its failure is logged, and serving goes on."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, hook, *args)
        except Exception:  # the step is applied and answered; a failed save must not stop serving
            log.exception("the %s hook failed; serving goes on", getattr(hook, "__name__", "server"))

    def _learn(self, kind: str, size: int, ms: float) -> None:
        """Track each kind's cost per byte received (an exponential average that forgets in a few messages).

        Per byte, so a peer cannot make a large step look cheap with small ones:
        the prediction for each message scales with its own size.
        """
        rate = ms / max(size, 1)
        previous = self._ms_per_byte.get(kind)
        self._ms_per_byte[kind] = rate if previous is None else 0.8 * previous + 0.2 * rate

    def _process(self, route: bytes, frames: list[zmq.Frame], header: dict[str, Any], timer: StageTimer) -> Answer:
        """Answer one message and record it."""
        answer = self._answer(route, frames, header, timer)
        self.metrics.record(timer, kind=answer.kind, id=answer.request_id, route=route.hex(),
                            bytes_in=frame_bytes(frames), bytes_out=frame_bytes(answer.frames))
        return answer

    def _answer(self, route: bytes, frames: list[zmq.Frame], header: dict[str, Any], timer: StageTimer) -> Answer:
        """Decode, check against the session, run the chain, encode."""
        request_id = None
        try:
            if header["kind"] not in ACCEPTED_KINDS:  # refused before its body is read: the body is not ours to judge
                raise WireError(f"a server does not accept '{header['kind']}' messages", "bad_kind", header["id"])
            with timer.stage("decode"):
                message = decode_message(frames, header)
            request_id = message.id
            if isinstance(message, Bye):  # with the steps, in order: a bye after a step ends the session after it
                self.table.close(self._owner(route, frames), message.session)
                return Answer("bye", request_id, encode_message(Bye(request_id, message.session)))
            assert isinstance(message, Activations)
            with timer.stage("tail"):
                session, reply, computed = self._apply(self._owner(route, frames), message, timer)
            with timer.stage("encode"):
                if session.timing:  # docs/PROTOCOL.md 4.5, 4.6 (a resent step's stored reply: this request's time)
                    reply.server_ms = server_ms(timer)
                return Answer("grad" if isinstance(reply, Gradients) else "pred", request_id, encode_message(reply),
                              computed)
        except WireError as exc:
            self.stats.errors += 1
            log.warning("refused a message from %s: %s", route.hex(), printable(exc))
            return Answer("error", request_id, error_frames(exc.request_id or request_id, exc.code, str(exc)))
        except Exception as exc:  # a bug must not take down everyone's server
            self.stats.errors += 1
            log.exception("failed on a message from %s", route.hex())
            return Answer("error", request_id, error_frames(request_id, "internal",
                                                            f"server error: {type(exc).__name__}: {exc}"))

    def _apply(self, owner: bytes, message: Activations, timer: StageTimer) -> tuple[Session, Message, bool]:
        """The session, the reply, and whether the chain ran for it (False: a resent step answered from its stored
        reply)."""
        session = self.table.session_for(owner, message)
        ctx = StepContext(message.kind, message.labels, message.step, session.id, message.lr_scale, timer)
        cut = Cut(message.values, message.indices)
        if message.labels is None:
            self.stats.inferences += 1
            chain = (self.chain if self.model_set is None
                     else self.model_set[request_cut(session, message), message.values.shape[1]])
            logits = chain.forward(cut, ctx)
            if not bool(torch.isfinite(logits).all()):  # PROTOCOL.md 4.6: every pred is finite
                raise WireError("the model's output for this request is not finite; nothing is sent", "bad_output")
            return session, Predictions(message.id, session.id, logits), True
        stored = self.table.replay(session, message)
        if stored is not None:
            return session, stored, False
        grad = self.chain.forward(cut, ctx)
        reply = Gradients(message.id, session.id, message.step, session.grad_codec, session.grad_lz4,
                          message.indices, grad, ctx.meta["loss"])
        self.table.applied(session, message.step, reply)
        return session, reply, True


def _by_cut(model_set: ModelSetChains | None, default: str | None) -> dict[tuple[str | None, int], ServerChain] | None:
    """A model set keyed (cut, budget): a plain {budget: chain} is the default cut's."""
    if model_set is None:
        return None
    return {key if isinstance(key, tuple) else (default, key): chain for key, chain in model_set.items()}


def _served(pipeline: str, cut: CutShape, num_classes: int, resolution: int, name: str | None,
            cuts: Mapping[str, CutShape], model_set: dict[tuple[str | None, int], ServerChain] | None,
            trains: bool) -> ServedCut:
    """What the handshake and the checks compare with: the cuts, and a model set's budgets at each."""
    if model_set is None:
        return ServedCut(pipeline, cut, num_classes, resolution, trains=trains, name=name)
    budgets: dict[str | None, set[int]] = {}
    for at, budget in model_set:
        budgets.setdefault(at, set()).add(budget)
    unknown = sorted(str(at) for at in budgets if at != name and at not in cuts)
    if unknown:
        raise ValueError(f"the model set has models at cut(s) {', '.join(unknown)}, whose shape cuts= does not give")
    default = frozenset(budgets.pop(name, ()))
    others = {at: frozenset(held) for at, held in budgets.items() if at is not None}
    return ServedCut(pipeline, cut, num_classes, resolution, default, trains=False, name=name,
                     cuts={at: cuts[at] for at in others}, cut_budgets=others)


class Answer(NamedTuple):
    """What the worker made of one message: the reply's kind and frames, and whether the chain ran for it."""

    kind: str
    request_id: int | None
    frames: list[Any]
    computed: bool = False
