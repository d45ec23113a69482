"""`sparse-rt bench fuzz`: hostile messages at a live server, and the memory that many sessions hold.

A server shared by many edges reads whatever any peer sends it, so one peer's
garbage must cost that peer an error reply and nothing else. The protocol
tests send a thousand hostile messages; this suite sends ``--messages`` (100,000)
to a real `sparse-rt node --role server` process (digits_cnn, tcp loopback) and
counts what would hurt the other edges:

- ``crashes``: the server process died (0 or 1);
- ``hangs``: stalls (the server read nothing, or answered nothing, for 10 s
  while requests were waiting) plus requests whose reply never came within
  10 s of the last send;
- ``non_finite``: pred logits, grad values or a grad loss that are NaN or
  infinite, checked on the raw frames (``decode_message`` would refuse such a
  reply and so hide it);
- ``wrong_replies``: a reply that does not decode, one to an id never sent,
  more replies than requests for an id, a reply of a kind the request cannot
  have (a ``pred`` for a ``hello``), a welcome or bye for another peer's
  session, a template session lost while it was in use;
- the server's RSS (VmRSS, about 20 samples): its growth from the end of the
  first 10 % of the messages (the warm-up: allocator pools, caches) to the end;
- replies by kind and error code, and messages per second.

Messages are templates made with sparse-rt's own encoder (hellos, inference on
four sessions of different codecs, training steps on real training sessions
with valid and hostile values, server->edge kinds) passed through
:func:`mutate`. At most WINDOW requests are unanswered at any time, so the run
measures the server and not ZeroMQ's buffers.

A second phase (``--sessions``, 2,000) opens that many short training sessions on
a server of its own, one real training step each (batch 64, every channel), so
each keeps its last gradient reply as the exactly-once rule requires, and then
lets them expire: server RSS at baseline, with the sessions, after their
expiry, and with as many new sessions again (memory the allocator kept is
reused then, a leak adds up), and the server's count of expired sessions. A
server's memory must not keep what its departed edges left behind. Its
``--session-idle`` is 2 s plus 20 ms per session beyond the first hundred,
not 2 s flat: opening 2,000 sessions with a training step each takes longer
than 2 s, and the first must still be open when the last one is
(``sessions_alive_at_peak`` checks it).
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import torch
import zmq

from sparse_rt.bench.common import SERVER_TIMEOUT, BenchReport, bench_options, emit, pyplot, save_figure
from sparse_rt.bench.hostile import Reply, dump_header, header_of, inspect_reply, mutate
from sparse_rt.model.sides import build_sides
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.pipeline import get_pipeline
from sparse_rt.server.sessions import MAX_SESSIONS_PER_PEER
from sparse_rt.wire.header import MAX_ID, PROTOCOL_VERSION
from sparse_rt.wire.messages import (Activations, Bye, ErrorReply, Gradients, Hello, Predictions,
                                     encode_message)

PIPELINE = "digits_cnn"
CODECS = ("fp32", "fp16", "int8")
WINDOW = 256  # most requests without a reply at any time
HANG_SECONDS = 10.0  # no progress for this long while requests wait: the server is stuck
REPLY_TIMEOUT = 10.0  # seconds after the last send for the last replies
SETUP_TIMEOUT = 30.0  # seconds for one reply during setup and the sessions phase
RSS_SAMPLES = 20
WARMUP_SHARE = 0.1  # rss_growth_mib is counted from the end of this share of the messages
FIRST_ID = 10**12  # request ids count from here: far from the small ids the mutations write
SESSION_BATCH = 64  # samples of each session's training step in the sessions phase
MIN_SESSION_IDLE = 2.0  # seconds: the sessions phase's server lets sessions expire after this, at least
IDLE_PER_SESSION = 0.02  # ... plus this per session beyond 100: the first is still open when the last trains
KEEP_LOG_LINES = 200  # the server's log lines kept in this process (a refusal is one line each)

# ---- the fuzzing phase -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutInfo:
    """The served cut, as an edge must match it."""

    channels: int
    height: int
    width: int
    classes: int
    resolution: int


def cut_info(pipeline_name: str = PIPELINE) -> CutInfo:
    """The pipeline's cut, measured the way the server measures it."""
    pipeline = get_pipeline(pipeline_name)
    _, _, cut = build_sides(pipeline.build_model(), pipeline.cut, pipeline.input_shape, None, pipeline.resolution)
    return CutInfo(cut.channels, cut.sent_height, cut.sent_width, pipeline.num_classes, pipeline.resolution)


class Peer:
    """One DEALER socket: the server keys sessions (and its per-peer cap) by it."""

    def __init__(self, context: zmq.Context, address: str, index: int) -> None:
        self.index = index
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.opened = 0  # hellos this bench sent on it that may open a session

    def exchange(self, frames: list[Any], timeout: float = SETUP_TIMEOUT) -> list[bytes]:
        """Send one request and wait for one reply (setup only: nothing else may be in flight on this socket)."""
        self.socket.send_multipart(frames)
        if not self.socket.poll(int(timeout * 1000)):
            raise RuntimeError(f"the server did not answer a setup request within {timeout:g} s")
        return self.socket.recv_multipart()


@dataclass
class TrainSession:
    """A training session the train template uses; ``next_step`` stays above every step sent in it."""

    id: str
    peer: Peer
    codec: str
    next_step: int = 0
    last: list[bytes] | None = None  # the last valid step's frames, for resends


@dataclass
class Tally:
    """What the replies said."""

    codes: Counter = field(default_factory=Counter)
    replies: int = 0
    non_finite: int = 0
    wrong: int = 0
    problems: list[str] = field(default_factory=list)

    def wrong_reply(self, problem: str, count: int = 1) -> None:
        self.wrong += count
        self.note(problem)

    def note(self, problem: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(problem)


def rss_mib(pid: int) -> float | None:
    """A process's resident memory (VmRSS) in MiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Fuzzer:
    """The sockets, template sessions and bookkeeping of one fuzzing run against one server."""

    def __init__(self, server: NodeProcess, address: str, cut: CutInfo, seed: int) -> None:
        self.server, self.address, self.cut = server, address, cut
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.context = zmq.Context()
        self.poller = zmq.Poller()
        self.peers: list[Peer] = []
        self.next_id = FIRST_ID
        self.sent: dict[tuple[int, int], list[Any]] = defaultdict(list)  # (peer, id) -> kinds of requests sent
        self.answered: Counter = Counter()
        self.total_sent = 0
        self.tally = Tally()
        self.watched: dict[tuple[int, int], str] = {}  # request -> the template session it used
        self.lost: set[str] = set()
        self.control: dict[tuple[int, int], str] = {}  # hellos this bench sent for new training sessions
        self.train_pool: list[TrainSession] = []
        self.train_ids: set[str] = set()
        self.owners: dict[str, int] = {}  # session -> the peer it was opened on
        self.template_sessions: set[str] = set()
        self.throwaway: list[str] = []  # sessions the fuzzed hellos opened on the main peer
        self.burned = 0
        self.replies_kept: list[list[bytes]] = []  # real server replies, sent back to the server
        self.main = self._peer()
        self.trainer = self._peer()
        self.infer_sessions: list[tuple[str, str, bool]] = []
        self.per_peer = MAX_SESSIONS_PER_PEER
        self.hello_fields = {f.name for f in dataclasses.fields(Hello)}

    # -- setup --

    def _peer(self) -> Peer:
        peer = Peer(self.context, self.address, len(self.peers))
        self.peers.append(peer)
        self.poller.register(peer.socket, zmq.POLLIN)
        return peer

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _hello(self, codec: str, lz4: bool, mode: str, budget: int) -> Hello:
        cut = self.cut
        return Hello(self._id(), PIPELINE, cut.channels, budget, codec, lz4, mode, cut.resolution)

    def _open(self, peer: Peer, hello: Hello) -> str:
        reply = peer.exchange(encode_message(hello))
        fields = header_of(reply) or {}
        if fields.get("kind") != "welcome":
            raise RuntimeError(f"the server refused a setup hello: {reply[0][:300]!r}")
        self.per_peer = int(fields.get("limits", {}).get("sessions_per_peer", self.per_peer))
        self.replies_kept.append(reply)
        peer.opened += 1
        self.template_sessions.add(fields["session"])
        self.owners[fields["session"]] = peer.index
        return fields["session"]

    def setup(self) -> None:
        """Template sessions, and one real reply of each kind to send back to the server."""
        for codec, lz4 in (("fp32", False), ("fp32", True), ("fp16", False), ("int8", True)):
            self.infer_sessions.append((self._open(self.main, self._hello(codec, lz4, "infer", 8)), codec, lz4))
        for codec in ("fp32", "fp16", "int8", "fp32"):
            session = self._open(self.trainer, self._hello(codec, False, "train", self.cut.channels))
            self.train_pool.append(TrainSession(session, self.trainer, codec))
            self.train_ids.add(session)
        self.replies_kept.append(self.main.exchange(self._infer_frames(self.infer_sessions[0], self._id())))
        first = self.train_pool[0]
        self.replies_kept.append(first.peer.exchange(self._step_frames(first, self._id(), hostile=False)))
        self.replies_kept.append(self.main.exchange(self._infer_frames(("0" * 16, "fp32", False), self._id())))
        for reply in self.replies_kept:
            found = inspect_reply(reply)
            if found.non_finite or found.problem:
                raise RuntimeError(f"a setup reply is not right: {found}")

    # -- templates: each returns (peer, frames) --

    def _values(self, n: int, b: int) -> torch.Tensor:
        return torch.randn((n, b, self.cut.height, self.cut.width), generator=self.generator)

    def _indices(self, b: int) -> torch.Tensor:
        return torch.tensor(sorted(self.rng.sample(range(self.cut.channels), b)))

    def _infer_frames(self, session: tuple[str, str, bool], rid: int, budget: int = 8) -> list[Any]:
        sid, codec, lz4 = session
        b = self.rng.randint(1, budget)
        return encode_message(Activations(rid, sid, codec, lz4, self.cut.channels, self._indices(b),
                                          self._values(self.rng.randint(1, 16), b)))

    def _step_frames(self, session: TrainSession, rid: int, hostile: bool) -> list[Any]:
        rng = self.rng
        n, b = rng.randint(1, 64), rng.randint(1, self.cut.channels)
        values = self._values(n, b)
        if hostile:  # finite, so they pass the decoder: the step's loss or gradients overflow instead (bad_step)
            values = values.sign() * rng.choice([3e38, 1e30, 1e20]) if rng.random() < 0.7 else values
            values.view(-1)[rng.randrange(values.numel())] = 3e38
        lr_scale = rng.choice([1.0] * 8 + [1e-6, 0.5, 2.0, 10.0, 99.9, 100.0])
        labels = torch.randint(0, self.cut.classes, (n,), generator=self.generator)
        return encode_message(Activations(rid, session.id, session.codec, False, self.cut.channels,
                                          self._indices(b), values, labels, session.next_step, lr_scale))

    def _infer(self, rid: int) -> tuple[Peer, list[Any]]:
        if self.train_pool and self.rng.random() < 0.15:  # a training session may infer too
            session = self.rng.choice(self.train_pool)
            return session.peer, self._infer_frames((session.id, session.codec, False), rid, self.cut.channels)
        return self.main, self._infer_frames(self.rng.choice(self.infer_sessions), rid)

    def _train(self, rid: int) -> tuple[Peer, list[Any]]:
        if not self.train_pool:
            return self._infer(rid)
        session = self.rng.choice(self.train_pool)
        choice = self.rng.random()
        if choice < 0.15 and session.last is not None:  # a resend: answered from the stored reply
            return session.peer, _with_id(session.last, rid)
        frames = self._step_frames(session, rid, hostile=choice > 0.75)
        if choice <= 0.75:
            session.last = [bytes(frame) for frame in frames]
        return session.peer, frames

    def _train_in_infer_session(self, rid: int) -> tuple[Peer, list[Any]]:
        sid, codec, lz4 = self.rng.choice(self.infer_sessions)
        n, b = self.rng.randint(1, 4), self.rng.randint(1, 8)
        labels = torch.randint(0, self.cut.classes, (n,), generator=self.generator)
        return self.main, encode_message(Activations(rid, sid, codec, lz4, self.cut.channels, self._indices(b),
                                                     self._values(n, b), labels, self.rng.randint(0, 5)))

    def _fuzzed_hello(self, rid: int) -> tuple[Peer, list[Any]]:
        rng, cut = self.rng, self.cut
        fields: dict[str, Any] = {
            "id": rid, "pipeline": PIPELINE if rng.random() < 0.9 else rng.choice(["cifar_cnn", "x", PIPELINE + " "]),
            "channels": cut.channels if rng.random() < 0.9 else rng.choice([1, cut.channels + 1, 65535]),
            "budget": rng.randint(1, cut.channels), "codec": rng.choice(CODECS + ("fp64",)),
            "lz4": rng.random() < 0.5, "mode": rng.choice(["infer", "train"]),
            "resolution": cut.resolution if rng.random() < 0.9 else rng.choice([1, 2, 255])}
        if rng.random() < 0.3:
            fields["grad_codec"] = rng.choice(CODECS + ("fp64",))
        if rng.random() < 0.3:
            fields["grad_lz4"] = rng.random() < 0.5
        if "resume" in self.hello_fields and rng.random() < 0.3:  # its own session, another peer's, or none
            fields["resume"] = rng.choice(self.throwaway[-8:] + sorted(self.train_ids)[:2] + ["%016x" % rid])
        return self.main, encode_message(Hello(**fields))

    def _server_kinds(self, rid: int) -> tuple[Peer, list[Any]]:
        """Server -> edge kinds sent to the server: made here, or real replies it sent, readdressed."""
        rng, cut = self.rng, self.cut
        sid = self.infer_sessions[0][0]
        choice = rng.randrange(4)
        if choice == 0:
            return self.main, _with_id(rng.choice(self.replies_kept), rid)
        if choice == 1:
            return self.main, encode_message(ErrorReply(rid, "internal", "m"))
        if choice == 2:
            return self.main, encode_message(Predictions(rid, sid, torch.zeros(1, cut.classes)))
        return self.main, encode_message(Gradients(rid, sid, 0, "fp32", False, torch.arange(1),
                                                   torch.zeros(1, 1, cut.height, cut.width), 0.5))

    def _bye_template(self, rid: int) -> tuple[Peer, list[Any]]:
        """A bye for a session the fuzzed hellos opened, another peer's, or none (protocol versions with bye)."""
        choice = self.rng.random()
        if choice < 0.6 and self.throwaway:
            session = self.throwaway.pop(self.rng.randrange(len(self.throwaway)))
        elif choice < 0.8:
            session = self.rng.choice(sorted(self.train_ids))
        else:
            session = "%016x" % self.rng.getrandbits(64)
        return self.main, encode_message(Bye(rid, session))

    def templates(self) -> list[Callable[[int], tuple[Peer, list[Any]]]]:
        chosen = [self._infer] * 6 + [self._train] * 4 + [self._train_in_infer_session, self._fuzzed_hello,
                                                          self._server_kinds]
        return chosen + [self._bye_template]

    # -- sending and receiving --

    def _record(self, peer: Peer, frames: list[bytes]) -> None:
        """Remember what the server will read: its id and kind, the session it names, a training step's number."""
        self.total_sent += 1
        fields = header_of(frames) or {}
        rid = fields.get("id") if type(fields.get("id")) is int else None
        if rid is None:
            return
        key = (peer.index, rid)
        self.sent[key].append(fields.get("kind"))
        session = fields.get("session") if isinstance(fields.get("session"), str) else None
        if (fields.get("kind") in ("train", "infer") and session in self.template_sessions
                and self.owners.get(session) == peer.index):
            self.watched[key] = session  # an unknown_session for it: the server lost a session in use
        step = fields.get("step")
        if fields.get("kind") == "train" and type(step) is int and step >= 0:
            for train in self.train_pool:
                if train.id == session and train.peer is peer:
                    train.next_step = max(train.next_step, step + 1)
                    if train.next_step > MAX_ID:  # its last step may be the largest there is: no later one
                        self._replace(train)
                    break

    def _replace(self, train: TrainSession) -> None:
        self.train_pool.remove(train)
        self.burned += 1
        if self.trainer.opened >= self.per_peer - 1:
            self.trainer = self._peer()
        hello = self._hello(train.codec, False, "train", self.cut.channels)
        self.control[(self.trainer.index, hello.id)] = train.codec
        self.trainer.opened += 1
        self._send(self.trainer, [bytes(frame) for frame in encode_message(hello)])

    def _send(self, peer: Peer, frames: list[bytes]) -> bool:
        """Send, unless the server has not read for HANG_SECONDS; False then."""
        if not peer.socket.poll(int(HANG_SECONDS * 1000), zmq.POLLOUT):
            return False
        peer.socket.send_multipart(frames)
        self._record(peer, frames)
        return True

    def receive(self, timeout_ms: int) -> int:
        """Take every reply that is there (waiting up to ``timeout_ms`` for the first); how many."""
        count = 0
        for socket, _ in self.poller.poll(timeout_ms):
            peer = next(peer for peer in self.peers if peer.socket is socket)
            while True:
                try:
                    frames = socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_reply(peer, frames)
                count += 1
        return count

    def _on_reply(self, peer: Peer, frames: list[bytes]) -> None:
        tally = self.tally
        tally.replies += 1
        reply = inspect_reply(frames)
        tally.codes[reply.label] += 1
        if reply.non_finite:
            tally.non_finite += 1
            tally.note(f"non-finite reply: {frames[0][:200]!r}")
        if reply.problem:
            tally.wrong_reply(reply.problem)
        if reply.id is None or (reply.kind == "error" and reply.id == 0):
            return  # an error to a request whose header could not be read: it names no request
        key = (peer.index, reply.id)
        self._check_match(key, reply, frames)
        if reply.label == "unknown_session" and key in self.watched and len(self.sent[key]) == 1:
            self.lost.add(self.watched[key])  # (a mutated id sent more than once cannot tell which it answers)
        if reply.kind == "welcome" and reply.session:
            self._on_welcome(peer, key, reply.session)
        if reply.kind == "bye" and self.owners.get(reply.session, peer.index) != peer.index:
            tally.wrong_reply(f"a bye closed another peer's session: {frames[0][:200]!r}")

    def _check_match(self, key: tuple[int, int], reply: Reply, frames: list[bytes]) -> None:
        kinds = self.sent.get(key)
        if kinds is None:
            self.tally.wrong_reply(f"reply to an id never sent: {frames[0][:200]!r}")
            return
        self.answered[key] += 1
        if self.answered[key] > len(kinds):
            self.tally.wrong_reply(f"more replies than requests for id {key[1]}: {frames[0][:200]!r}")
        expected = {"welcome": "hello", "pred": "infer", "grad": "train", "bye": "bye"}.get(reply.kind or "")
        if expected is not None and expected not in kinds:
            self.tally.wrong_reply(f"a {reply.kind} reply to a request of kind {kinds}: {frames[0][:200]!r}")

    def _on_welcome(self, peer: Peer, key: tuple[int, int], session: str) -> None:
        if self.owners.setdefault(session, peer.index) != peer.index:
            self.tally.wrong_reply(f"a welcome for another peer's session {session}")
        elif key in self.control:
            train = TrainSession(session, peer, self.control.pop(key))
            self.train_pool.append(train)
            self.train_ids.add(session)
            self.template_sessions.add(session)
        elif session not in self.template_sessions:
            self.throwaway = self.throwaway[-63:] + [session]

    def in_flight(self) -> int:
        return self.total_sent - self.tally.replies

    def still_serving(self) -> bool:
        """A new peer's hello and inference are answered as before the run."""
        peer = Peer(self.context, self.address, -1)
        try:
            session = header_of(peer.exchange(encode_message(self._hello("int8", True, "infer", 8)))) or {}
            if session.get("kind") != "welcome":
                return False
            reply = inspect_reply(peer.exchange(self._infer_frames((session["session"], "int8", True), self._id())))
            return reply.label == "pred" and not reply.non_finite
        except RuntimeError:
            return False
        finally:
            peer.socket.close(linger=0)

    def close(self) -> None:
        for peer in self.peers:
            peer.socket.close(linger=0)
        self.context.term()


def _with_id(frames: list[Any], rid: int) -> list[bytes]:
    """The same message with another request id, the other frames untouched."""
    fields = json.loads(bytes(frames[0]))
    fields["id"] = rid
    return [dump_header(fields), *(bytes(frame) for frame in frames[1:])]


@dataclass
class FuzzProgress:
    """RSS samples taken as the messages go, and where the run stopped."""

    samples: list[tuple[int, float]] = field(default_factory=list)
    warm: float | None = None
    stalls: int = 0
    stopped_at: int | None = None


def _fuzz_loop(fuzzer: Fuzzer, messages: int, progress: Callable[[str], None]) -> FuzzProgress:
    """Send ``messages`` mutated templates with at most WINDOW unanswered; sample the server's RSS on the way."""
    pid, rng, templates = fuzzer.server.process.pid, fuzzer.rng, fuzzer.templates()
    sample_at = {round(i * messages / RSS_SAMPLES) for i in range(RSS_SAMPLES)}
    warm_at = max(1, int(messages * WARMUP_SHARE))
    report_every = max(1, messages // 10)
    state, started = FuzzProgress(), time.perf_counter()
    for number in range(messages):
        if number in sample_at or number == warm_at:
            rss = rss_mib(pid)
            if rss is None:  # the process is gone
                state.stopped_at = number
                break
            state.samples.append((number, rss))
            if number == warm_at:
                state.warm = rss
            del fuzzer.server.log[:-KEEP_LOG_LINES]
        if number and number % report_every == 0:
            rate = number / (time.perf_counter() - started)
            progress(f"fuzz: {number:,}/{messages:,} messages, {rate:,.0f} msg/s, server RSS "
                     f"{state.samples[-1][1]:.0f} MiB, replies so far: {dict(fuzzer.tally.codes.most_common(4))}")
        fuzzer.receive(0)
        while fuzzer.in_flight() >= WINDOW:
            if not fuzzer.receive(int(HANG_SECONDS * 1000)):
                break
        peer, frames = rng.choice(templates)(fuzzer._id())
        if fuzzer.in_flight() >= WINDOW or not fuzzer._send(peer, mutate(rng, frames)):
            state.stalls += 1
            state.stopped_at = number
            progress(f"fuzz: the server made no progress for {HANG_SECONDS:g} s at message {number:,}; stopping")
            break
        if fuzzer.server.process.poll() is not None:
            state.stopped_at = number + 1
            progress(f"fuzz: the server died at message {number:,}")
            break
    return state


def _drain(fuzzer: Fuzzer) -> None:
    """The last replies: wait until none is missing or none came for REPLY_TIMEOUT."""
    while fuzzer.in_flight() > 0 and fuzzer.receive(int(REPLY_TIMEOUT * 1000)):
        pass


def fuzz_phase(messages: int, seed: int, progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Phase 1: ``messages`` hostile messages at a fresh server; one report row."""
    cut = cut_info()
    server = NodeProcess("server", {"pipeline": PIPELINE, "bind": "tcp://127.0.0.1:*", "seed": seed, "json": True})
    fuzzer = None
    try:
        address = server.wait_ready(SERVER_TIMEOUT)
        fuzzer = Fuzzer(server, address, cut, seed)
        fuzzer.setup()
        rss_start = rss_mib(server.process.pid)
        started = time.perf_counter()
        state = _fuzz_loop(fuzzer, messages, progress)
        sent = fuzzer.total_sent
        seconds = time.perf_counter() - started
        _drain(fuzzer)
        crashed = server.process.poll() is not None
        rss_end = rss_mib(server.process.pid)
        serving = not crashed and fuzzer.still_serving()
        row = _fuzz_row(fuzzer, state, messages, sent, seconds, rss_start, rss_end, crashed, serving)
    except BaseException:
        _kill(server)
        raise
    finally:
        if fuzzer is not None:
            fuzzer.close()
    row["server"] = _stop(server, row["crashes"])
    return row


def _fuzz_row(fuzzer: Fuzzer, state: FuzzProgress, messages: int, sent: int, seconds: float,
              rss_start: float | None, rss_end: float | None, crashed: bool, serving: bool) -> dict[str, Any]:
    tally = fuzzer.tally
    unanswered = max(0, fuzzer.in_flight())
    extra = max(0, tally.replies - fuzzer.total_sent)
    if extra:
        tally.wrong_reply(f"{extra} more replies than messages sent", extra)
    if fuzzer.lost:
        tally.wrong_reply(f"template sessions lost while in use: {sorted(fuzzer.lost)}", len(fuzzer.lost))
    warm = state.warm if state.warm is not None else rss_start
    return {
        "phase": "fuzz", "messages": sent, "messages_asked": messages, "replies": tally.replies,
        "seconds": seconds, "messages_s": sent / seconds if seconds > 0 else None,
        "crashes": int(crashed), "hangs": state.stalls + unanswered, "stalls": state.stalls,
        "unanswered": unanswered, "non_finite": tally.non_finite, "wrong_replies": tally.wrong,
        "lost_sessions": len(fuzzer.lost), "codes": dict(sorted(tally.codes.items())),
        "rss_start_mib": rss_start, "rss_warm_mib": warm, "rss_end_mib": rss_end,
        "rss_growth_mib": None if rss_end is None or warm is None else rss_end - warm,
        "rss_samples": [list(sample) for sample in state.samples] + ([[sent, rss_end]] if rss_end else []),
        "stopped_at": state.stopped_at, "train_sessions_replaced": fuzzer.burned, "peers": len(fuzzer.peers),
        "serving_after": serving, "problems": tally.problems[:20]}


def _kill(server: NodeProcess) -> None:
    """A server whose run failed here: it must not outlive the bench."""
    if server.process.poll() is None:
        server.process.kill()
    server.finish(10)


def _stop(server: NodeProcess, crashed: int) -> dict[str, Any]:
    """The server's summary (a few of its counts), or how it died."""
    if crashed:
        code, _ = server.finish(10)
        return {"exit_code": code, "log_tail": "".join(server.log[-20:])}
    server.stop()
    try:
        summary = server.result(SERVER_TIMEOUT)
    except RuntimeError as exc:
        return {"stop_failed": str(exc)}
    keys = ("steps_applied", "steps_refused", "inferences", "errors", "sessions_opened", "sessions_expired",
            "sessions_closed", "seconds")
    return {key: summary[key] for key in keys if key in summary}


# ---- the sessions phase ----------------------------------------------------------------------------------------

class SessionLoad:
    """Many short training sessions on one server, on as many DEALERs as the per-peer cap of sessions needs."""

    def __init__(self, address: str, cut: CutInfo, seed: int) -> None:
        self.address, self.cut = address, cut
        self.context = zmq.Context()
        self.peers: list[Peer] = []
        self.opened: list[tuple[Peer, str]] = []
        self.next_id = 0
        generator = torch.Generator().manual_seed(seed)
        values = torch.randn((SESSION_BATCH, cut.channels, cut.height, cut.width), generator=generator)
        labels = torch.randint(0, cut.classes, (SESSION_BATCH,), generator=generator)
        self.step = [bytes(frame) for frame in encode_message(
            Activations(0, "0" * 16, "fp32", False, cut.channels, torch.arange(cut.channels), values, labels))]
        self.tiny = [bytes(frame) for frame in encode_message(
            Activations(0, "0" * 16, "fp32", False, cut.channels, torch.arange(1), values[:1, :1]))]
        self.steps_ok = self.non_finite = self.wrong = 0
        self.per_peer = MAX_SESSIONS_PER_PEER

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _hello(self) -> list[Any]:
        cut = self.cut
        return encode_message(Hello(self._id(), PIPELINE, cut.channels, cut.channels, "fp32", False, "train",
                                    cut.resolution))

    def _collect(self, peer: Peer, count: int) -> dict[int, list[bytes]]:
        """``count`` replies on ``peer``, by id."""
        replies: dict[int, list[bytes]] = {}
        while len(replies) < count:
            if not peer.socket.poll(int(SETUP_TIMEOUT * 1000)):
                raise RuntimeError(f"the server did not answer within {SETUP_TIMEOUT:g} s ({len(replies)} of {count})")
            frames = peer.socket.recv_multipart()
            replies[(header_of(frames) or {}).get("id", -len(replies))] = frames
        return replies

    def open_batch(self, count: int) -> None:
        """``count`` sessions on a new peer: all hellos, then one training step in each."""
        peer = Peer(self.context, self.address, len(self.peers))
        self.peers.append(peer)
        hellos = [self._hello() for _ in range(count)]
        for frames in hellos:
            peer.socket.send_multipart(frames)
        welcomes = self._collect(peer, count)
        sessions = []
        for reply in welcomes.values():
            fields = header_of(reply) or {}
            if fields.get("kind") != "welcome":
                raise RuntimeError(f"the server refused a session: {reply[0][:300]!r}")
            self.per_peer = int(fields.get("limits", {}).get("sessions_per_peer", self.per_peer))
            sessions.append(fields["session"])
        for session in sessions:
            peer.socket.send_multipart(self.addressed(self.step, session))
        for reply in self._collect(peer, count).values():
            found = inspect_reply(reply)
            self.steps_ok += found.label == "grad"
            self.non_finite += found.non_finite
            self.wrong += found.problem is not None
        self.opened += [(peer, session) for session in sessions]

    def addressed(self, frames: list[bytes], session: str) -> list[bytes]:
        fields = json.loads(frames[0])
        fields.update(id=self._id(), session=session)
        return [dump_header(fields), *frames[1:]]

    def probe(self, index: int) -> str:
        """What an inference in the index-th session gets: 'pred' while it is open (which keeps it open)."""
        peer, session = self.opened[index]
        return inspect_reply(peer.exchange(self.addressed(self.tiny, session))).label

    def alive(self) -> int:
        """How many sessions are still open; the oldest go first, so a bisection finds the first one open."""
        low, high = 0, len(self.opened)  # sessions [high:] are known open, [:low] known expired
        while low < high:
            middle = (low + high) // 2
            if self.probe(middle) == "pred":
                high = middle
            else:
                low = middle + 1
        return len(self.opened) - low

    def close(self) -> None:
        for peer in self.peers:
            peer.socket.close(linger=0)
        self.context.term()


def _open_all(load: SessionLoad, sessions: int, server: NodeProcess,
              progress: Callable[[str], None] = lambda line: None) -> None:
    """Open ``sessions`` new sessions (one training step each), on new peers of at most the per-peer cap each."""
    load.opened.clear()
    while len(load.opened) < sessions:
        load.open_batch(min(load.per_peer, sessions - len(load.opened)))
        del server.log[:-KEEP_LOG_LINES]
        if len(load.peers) % 8 == 0:
            progress(f"sessions: {len(load.opened):,}/{sessions:,} open, server RSS "
                     f"{rss_mib(server.process.pid) or 0:.0f} MiB")


def session_idle_for(sessions: int) -> float:
    """A session idle time long enough that the first session is still open when the last one has trained."""
    return MIN_SESSION_IDLE + IDLE_PER_SESSION * max(0, sessions - 100)


def sessions_phase(sessions: int, seed: int, idle: float | None = None,
                   progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Phase 2: ``sessions`` one-step training sessions on a fresh server, then their expiry; one report row."""
    cut, idle = cut_info(), idle or session_idle_for(sessions)
    server = NodeProcess("server", {"pipeline": PIPELINE, "bind": "tcp://127.0.0.1:*", "seed": seed, "json": True,
                                    "session_idle": idle, "max_sessions": sessions + 100})
    load, row = None, {"phase": "sessions", "sessions": sessions, "session_idle_s": idle}
    try:
        load = SessionLoad(server.wait_ready(SERVER_TIMEOUT), cut, seed)
        load.open_batch(1)  # warm-up: the first step's allocations are not the sessions' memory
        load.opened.clear()
        pid = server.process.pid
        time.sleep(0.5)
        row["rss_baseline_mib"] = rss_mib(pid)
        started = time.perf_counter()
        _open_all(load, sessions, server, progress)
        row["open_seconds"] = time.perf_counter() - started
        time.sleep(0.2)
        row["rss_with_sessions_mib"] = rss_mib(pid)
        row["sessions_alive_at_peak"] = load.alive()
        touched = time.monotonic()
        progress(f"sessions: {sessions:,} open, {row['sessions_alive_at_peak']:,} of them at the peak; waiting "
                 f"{idle * 1.25 + 1:.1f} s for them to expire")
        time.sleep(max(0.0, touched + idle * 1.25 + 1.0 - time.monotonic()))
        row["expiry_confirmed"] = sessions == 0 or load.probe(len(load.opened) - 1) == "unknown_session"
        time.sleep(0.5)
        row["rss_after_expiry_mib"] = rss_mib(pid)
        _open_all(load, sessions, server)  # as many again: memory kept for reuse, or a leak that adds up?
        time.sleep(0.2)
        row["rss_reopened_mib"] = rss_mib(pid)
        row.update(steps_ok=load.steps_ok, non_finite=load.non_finite, wrong_replies=load.wrong,
                   peers=len(load.peers))
    except BaseException:
        _kill(server)
        raise
    finally:
        if load is not None:
            load.close()
    crashed = server.process.poll() is not None
    row["crashes"] = int(crashed)
    row["server"] = _stop(server, int(crashed))
    row["sessions_expired"] = row["server"].get("sessions_expired")
    base, peak, after = row.get("rss_baseline_mib"), row.get("rss_with_sessions_mib"), row.get("rss_after_expiry_mib")
    if None not in (base, peak, after):
        row["rss_per_1000_sessions_mib"] = (peak - base) * 1000 / max(sessions, 1)
        row["rss_kept_after_expiry_mib"] = after - base
    if None not in (peak, row.get("rss_reopened_mib")):
        row["rss_growth_on_reopen_mib"] = row["rss_reopened_mib"] - peak
    row["stored_reply_bytes"] = 4 * SESSION_BATCH * cut.channels * cut.height * cut.width
    return row


# ---- report, plot, command -------------------------------------------------------------------------------------

COLUMNS = ("phase", "messages", "messages_s", "crashes", "hangs", "non_finite", "wrong_replies", "rss_start_mib",
           "rss_end_mib", "rss_growth_mib", "sessions", "rss_baseline_mib", "rss_with_sessions_mib",
           "rss_after_expiry_mib", "sessions_expired")


def run_fuzz(messages: int, sessions: int, seed: int = 0, session_idle: float | None = None,
             progress: Callable[[str], None] = lambda line: None) -> BenchReport:
    """Both phases (either skipped at 0), each on a server process of its own."""
    report = BenchReport("fuzz", COLUMNS)
    if messages:
        report.rows.append(fuzz_phase(messages, seed, progress))
    if sessions:
        report.rows.append(sessions_phase(sessions, seed, session_idle, progress))
    report.settings = {"pipeline": PIPELINE, "messages": messages, "sessions": sessions, "seed": seed,
                       "window": WINDOW, "hang_seconds": HANG_SECONDS, "reply_timeout_s": REPLY_TIMEOUT,
                       "protocol_version": PROTOCOL_VERSION, "session_batch": SESSION_BATCH,
                       "transport": "tcp://127.0.0.1"}
    report.notes = [
        "fuzz: hangs = stalls (no progress for 10 s) + requests unanswered 10 s after the last send; rss_growth_mib "
        f"= end minus the sample after the first {WARMUP_SHARE:.0%} of the messages",
        "sessions: one training step (batch 64, every channel) per session, each its last grad reply stored; "
        "sessions_alive_at_peak is found by bisection (an inference in the oldest open session); rss_reopened_mib: "
        "as many sessions again after the expiry (memory kept by the allocator is reused; a leak adds up)"]
    for row in report.rows:
        if row["phase"] == "fuzz":
            report.notes.append("fuzz replies: " + ", ".join(f"{k}={v:,}" for k, v in row["codes"].items()))
    return report


def plot(report: BenchReport, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for row in report.rows:
        if row["phase"] == "fuzz" and row["rss_samples"]:
            xs, ys = zip(*row["rss_samples"])
            axes[0].plot(xs, ys, marker="o", markersize=3)
        if row["phase"] == "sessions":
            labels = ["baseline", f"{row['sessions']:,}\nsessions", "after\nexpiry", "as many\nagain"]
            values = [row.get(key) or 0 for key in ("rss_baseline_mib", "rss_with_sessions_mib",
                                                    "rss_after_expiry_mib", "rss_reopened_mib")]
            axes[1].bar(labels, values, color=["tab:gray", "tab:orange", "tab:green", "tab:orange"])
            axes[1].set_ylim(bottom=min(values) * 0.9 if min(values) > 0 else 0)
    axes[0].set_xlabel("hostile messages sent")
    axes[0].set_ylabel("server RSS (MiB)")
    axes[0].set_title("server memory under fuzzing", fontsize=10)
    axes[1].set_ylabel("server RSS (MiB)")
    axes[1].set_title("training sessions, then their expiry", fontsize=10)
    save_figure(figure, path, dpi=120)


@click.command("fuzz")
@bench_options
@click.option("--messages", type=click.IntRange(min=0), default=100_000, show_default=True,
              help="Hostile messages to send to the server (0 skips this phase).")
@click.option("--sessions", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Short training sessions to open, then let expire, on a second server (0 skips this phase).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mutations and the values.")
@click.option("--session-idle", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sessions phase: the server's --session-idle.  [default: 2 s + 20 ms per session beyond 100]")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, messages: int, sessions: int, seed: int,
            session_idle: float | None) -> None:
    """Hostile messages at a live server (crashes, hangs, NaN, wrong replies, memory), and many sessions' memory.

    One run per phase (--repeats and --warmup do not apply): a fuzz run is a
    count of failures, not a timing to take the median of.

    \b
    Example:
      sparse-rt bench fuzz --messages 100000 --sessions 2000 --json
    """
    progress = (lambda line: None) if as_json else (lambda line: click.echo(line, err=True))
    emit(run_fuzz(messages, sessions, seed, session_idle, progress), as_json, out, plot)
