"""The server's protocol state, with no sockets in it: sessions, their checks and the exactly-once rule.

Every check a message must pass before it reaches the tail lives here: the
handshake against the server's cut, each message against its session
(owner, mode, codec, cut, budget, shape, labels) and the step rule (a resent
last step is answered again from the stored reply, an older one refused).
The asyncio driver (server.py) only moves frames to and from it.

A server serves one cut (a layer name), or, with a model set trained at
several layers, several: a session starts at one (the hello's ``cut``, else
the default) and each request may name another the set holds; its channels,
budget and sent size are checked against that cut's.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from sparse_rt.errors import WireError, printable
from sparse_rt.model.sides import CutShape
from sparse_rt.wire.codecs import codec_names, get_codec
from sparse_rt.wire.header import codec_entry, entry_name
from sparse_rt.wire.messages import Activations, Hello

log = logging.getLogger("sparse_rt.server")

MAX_SESSIONS = 1024  # open sessions at once, all peers together
MAX_SESSIONS_PER_PEER = 64  # open sessions of one peer (key, or socket without CURVE)
SESSION_IDLE_SECONDS = 600.0  # a session without a message for this long ends
DEFAULT_MAX_BATCH = 1024  # samples a message may carry in any codec (it sizes the server's frame limit)


@dataclass
class Session:
    """One edge's settings, fixed at the handshake."""

    id: str
    owner: bytes  # who may use it: the peer's authenticated key (CURVE), else its socket's routing id
    mode: str
    budget: int
    codec: str
    lz4: bool
    grad_codec: str = ""  # the gradients' encoding (the handshake's grad_codec, else codec)
    grad_lz4: bool = False
    timing: bool = False  # the hello asked for timing: every pred and grad states server_ms
    codecs: frozenset[tuple[str, bool]] = frozenset()  # (codec, lz4) its infer messages may use besides its own
    cut: str | None = None  # the cut it started at (the hello's, else the server's default; None: an unnamed cut)
    last_step: int = -1
    last_reply: Any = None  # the Gradients of last_step, answered again if that step is resent
    last_seen: float = field(default_factory=time.monotonic)  # for idle expiry
    restored: bool = False  # read from a checkpoint and not used since (its next step tells what was lost)

    def accepted(self) -> str:
        """The encodings its messages may use, for a refusal's text."""
        own = (self.codec, self.lz4)
        if not self.codecs:
            return f"uses codec {self.codec} (lz4 {self.lz4})"
        return "accepts " + ", ".join([entry_name(own), *sorted(map(entry_name, self.codecs - {own}))])


@dataclass
class ServerStats:
    steps_applied: int = 0
    inferences: int = 0
    errors: int = 0
    sessions_opened: int = 0
    sessions_expired: int = 0
    sessions_closed: int = 0  # ended by their edge's bye
    steps_per_session: dict[str, int] = field(default_factory=dict)  # open sessions only (bounded with them)
    steps_in_ended_sessions: int = 0  # steps of every session expired or closed
    ended_steps: OrderedDict[str, int] = field(default_factory=OrderedDict)  # the most recent ended sessions' steps

    def ended(self, session_id: str) -> None:
        """Move a session's step count out of the open ones; the last few stay on view for the summary."""
        steps = self.steps_per_session.pop(session_id, 0)
        self.steps_in_ended_sessions += steps
        self.ended_steps[session_id] = steps
        while len(self.ended_steps) > MAX_SESSIONS:
            self.ended_steps.popitem(last=False)

    def all_steps(self) -> dict[str, int]:
        """Steps per session: the open ones and the most recently ended ones."""
        return {**self.ended_steps, **self.steps_per_session}
    steps_rolled_back: int = 0  # acknowledged steps lost because the server died after its last checkpoint


@dataclass(frozen=True)
class ServedCut:
    """What this server serves: the pipeline, its cut or cuts, and which budgets (all, or a model set's).

    ``cut`` and ``budgets`` are the default cut's, where a hello without
    ``cut`` opens its session. A model set trained at several layers adds
    the others in ``cuts`` (by layer name) with their budgets in
    ``cut_budgets``. ``name`` None is a server that does not name its one cut
    (a SplitServer built without ``cut_name``): a message naming a cut is
    refused there.
    """

    pipeline: str
    cut: CutShape
    num_classes: int
    resolution: int
    budgets: frozenset[int] | None = None  # a model set's budgets (inference only); None = any up to C
    trains: bool = True  # False: a chain without an optimizer, which refuses training sessions
    name: str | None = None  # the default cut's layer name
    cuts: Mapping[str, CutShape] = field(default_factory=dict)  # every cut served, by name (the default's added)
    cut_budgets: Mapping[str, frozenset[int]] = field(default_factory=dict)  # a model set's budgets per cut

    def __post_init__(self) -> None:
        if self.name is None and self.cuts:
            raise ValueError("a server with several cuts names its default one (name=...)")
        if self.name is not None:  # the default cut is one of the cuts, with the default budgets
            object.__setattr__(self, "cuts", MappingProxyType({**self.cuts, self.name: self.cut}))
            budgets = {**self.cut_budgets, **({} if self.budgets is None else {self.name: self.budgets})}
            object.__setattr__(self, "cut_budgets", MappingProxyType(budgets))
        if self.cut_budgets and set(self.cut_budgets) != set(self.cuts):
            raise ValueError(f"a model set has budgets at every cut it serves: cuts {sorted(self.cuts)}, budgets "
                             f"at {sorted(self.cut_budgets)}")

    def shape(self, name: str | None) -> CutShape:
        """The activation at a served cut (``None``: the default one)."""
        return self.cut if name is None or name == self.name else self.cuts[name]

    def budgets_at(self, name: str | None) -> frozenset[int] | None:
        """A model set's budgets at a served cut; None: any budget up to its C."""
        return self.budgets if name is None or name == self.name else self.cut_budgets.get(name)

    def held(self, name: str | None = None) -> str:
        return ", ".join(str(budget) for budget in sorted(self.budgets_at(name) or ()))

    def held_cuts(self) -> str:
        return ", ".join(sorted(self.cuts))

    def where(self, name: str | None) -> str:
        """' at cut NAME' where a server has several cuts (a refusal's text says which), else nothing."""
        return f" at cut '{name}'" if len(self.cuts) > 1 else ""

    def cut_problem(self, name: str | None) -> str | None:
        """Why a hello or request may not name this cut, or None (``None``: it names none, the default)."""
        if name is None or name in self.cuts:
            return None
        if not self.cuts:
            return f"this server does not name its cut: leave cut out (got '{name}')"
        return f"cut '{name}' is not served here; this server serves {self.held_cuts()}"


def request_cut(session: Session, message: Activations) -> str | None:
    """The cut a request's values are cut after: its own ``cut``, else its session's."""
    return session.cut if message.cut is None else message.cut


class SessionTable:
    """Opens sessions and checks every message against its session and the step rule."""

    def __init__(self, served: ServedCut, reveal: bool = True, max_sessions: int = MAX_SESSIONS,
                 idle_seconds: float = SESSION_IDLE_SECONDS, max_per_owner: int = MAX_SESSIONS_PER_PEER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.served = served
        self.reveal = reveal  # False: a refused handshake is told nothing about the model (the log has why)
        self.max_sessions = max_sessions
        self.max_per_owner = max(1, min(max_per_owner, max_sessions))
        self.idle_seconds = idle_seconds
        self.clock = clock  # seconds, for idle expiry (a test drives its own)
        self.sessions: dict[str, Session] = {}
        self.stats = ServerStats()

    def handshake(self, owner: bytes, hello: Hello, may_train: bool = True) -> tuple[Session, bool]:
        """The session for an acceptable hello and whether it is the one the hello resumes.

        A hello resumes a session when that session is still here, is this
        owner's and has the same settings; its edge goes on at the step after
        the last one applied. Otherwise a new session opens, and a resumed
        session of this owner with other settings ends (its edge has given
        it up). Another owner's session is treated as unknown: the reply
        says nothing about it.
        """
        resumed = self.sessions.get(hello.resume) if hello.resume is not None else None
        if resumed is not None and resumed.owner != owner:
            resumed = None
        if resumed is not None and self._check_hello(hello) is None and (hello.mode == "infer" or may_train):
            settings = self._settings(hello)
            if settings == {name: getattr(resumed, name) for name in settings}:
                resumed.last_seen = self.clock()
                log.info("session %s resumed at step %d", resumed.id, resumed.last_step + 1)
                return resumed, True
            self.close(owner, resumed.id)
        return self.open(owner, hello, may_train), False

    def _settings(self, hello: Hello) -> dict[str, Any]:
        """The session's settings a hello asks for (a checked one): a resumed session must have all of them."""
        grad_codec = hello.codec if hello.grad_codec is None else hello.grad_codec
        grad_lz4 = hello.lz4 if hello.grad_lz4 is None else hello.grad_lz4
        return {"mode": hello.mode, "budget": hello.budget, "codec": hello.codec, "lz4": hello.lz4,
                "grad_codec": grad_codec, "grad_lz4": grad_lz4, "timing": bool(hello.timing),
                "codecs": frozenset(map(codec_entry, hello.codecs or ())),
                "cut": self.served.name if hello.cut is None else hello.cut}

    def close(self, owner: bytes, session_id: str) -> Session:
        """End a session at its owner's word (a ``bye``), freeing it and its stored reply at once."""
        session = self.sessions.get(session_id)
        if session is None or session.owner != owner:
            raise WireError(f"unknown session '{session_id}'", "unknown_session")
        del self.sessions[session_id]
        self.stats.sessions_closed += 1
        self.stats.ended(session_id)
        log.info("session %s closed by its edge after step %d", session_id, session.last_step)
        return session

    def open(self, owner: bytes, hello: Hello, may_train: bool = True) -> Session:
        """A new session for an acceptable hello, or WireError('handshake_refused') saying why not.

        ``may_train`` is False for a key allowed to infer only.
        """
        problem = self._check_hello(hello)
        if problem is None and hello.mode == "train" and not may_train:
            problem = "this key is allowed inference only"
        if problem is None:
            self._make_room(owner, hello.id)
        if problem:
            if not self.reveal:
                log.warning("refused a handshake: %s", printable(problem))
                problem = "handshake refused (the server's log says why)"
            raise WireError(problem, "handshake_refused", hello.id)
        session = Session(secrets.token_hex(8), owner, **self._settings(hello), last_seen=self.clock())
        self.sessions[session.id] = session
        self.stats.sessions_opened += 1
        log.info("session %s opened: %s, budget %d/%d%s, codec %s%s", session.id, hello.mode, hello.budget,
                 self.served.shape(session.cut).channels, self.served.where(session.cut), hello.codec,
                 "+lz4" if hello.lz4 else "")
        return session

    def _check_hello(self, hello: Hello) -> str | None:
        served = self.served
        if hello.pipeline != served.pipeline:
            return f"this server runs pipeline '{served.pipeline}', not '{hello.pipeline}'"
        problem = served.cut_problem(hello.cut)
        if problem:
            return problem
        cut, at, budgets = served.shape(hello.cut), served.where(hello.cut), served.budgets_at(hello.cut)
        if hello.channels != cut.channels:
            which = f"cut '{hello.cut or served.name}'" if at else "the cut"
            return f"{which} has {cut.channels} channels here, the edge says {hello.channels}"
        if not 1 <= hello.budget <= cut.channels:
            return f"budget must be between 1 and {cut.channels} channels, got {hello.budget}"
        if budgets is not None:
            if hello.mode != "infer":
                return "this server serves a model set: inference only"
            if hello.budget not in budgets:
                return f"budget {hello.budget} is not in this model set{at}; it holds {served.held(hello.cut)}"
        if hello.resolution != served.resolution:
            return (f"this server restores resolution r={served.resolution}, the edge compresses with "
                    f"r={hello.resolution}")
        if hello.mode == "train" and not served.trains:
            return "this server serves inference only"
        if hello.codecs is not None and hello.mode != "infer":
            return "codecs is for inference sessions; a training session keeps one codec"
        extra = [(*codec_entry(entry), f" in codecs ('{entry}')") for entry in hello.codecs or ()]
        for codec, lz4, where in ((hello.codec, hello.lz4, ""), (hello.grad_codec, hello.grad_lz4, ""), *extra):
            if codec is None:
                continue
            if codec not in codec_names():
                return f"unknown codec '{codec}'{where}; this server knows {', '.join(codec_names())}"
            try:
                get_codec(codec, bool(hello.lz4 if lz4 is None else lz4))
            except ValueError as exc:  # e.g. lz4 around a codec of variable size
                return f"{exc}{where}"
        return None

    def session_for(self, owner: bytes, message: Activations) -> Session:
        """The message's session, checked against it (owner, mode, codec, cut, budget, shape, labels)."""
        session = self.sessions.get(message.session)
        if session is None or session.owner != owner:
            raise WireError(f"unknown session '{message.session}' (never opened, opened by another peer, or "
                            "expired after being idle); open one with a hello", "unknown_session")
        session.last_seen = self.clock()
        self._check(session, message)
        return session

    def _make_room(self, owner: bytes, request_id: int) -> None:
        """Caps, so that no peer (nor all of them) can grow the table without bound; idle sessions go first."""
        if len(self.sessions) >= self.max_sessions:
            self.expire()
        if len(self.sessions) >= self.max_sessions:
            raise WireError(f"the server holds its most sessions ({self.max_sessions}); try again later", "busy",
                            request_id)
        if sum(session.owner == owner for session in self.sessions.values()) >= self.max_per_owner:
            raise WireError(f"this peer holds its most sessions ({self.max_per_owner}); reuse one", "busy",
                            request_id)

    def expire(self, now: float | None = None) -> list[str]:
        """End the sessions idle for longer than ``idle_seconds``, their stored replies with them."""
        now = self.clock() if now is None else now
        idle = [sid for sid, session in self.sessions.items() if now - session.last_seen > self.idle_seconds]
        for sid in idle:
            del self.sessions[sid]
            self.stats.sessions_expired += 1
            self.stats.ended(sid)
        if idle:
            log.info("expired %d idle session(s); %d open", len(idle), len(self.sessions))
        return idle

    def _check(self, session: Session, message: Activations) -> None:
        served = self.served
        n, budget, height, width = message.values.shape
        if message.kind == "train" and session.mode != "train":
            raise WireError(f"session {session.id} was opened for inference only, got a training step",
                            "wrong_mode")
        encoding = (message.codec, message.lz4)
        if encoding != (session.codec, session.lz4) and encoding not in session.codecs:
            raise WireError(f"session {session.accepted()}, message has {message.codec} (lz4 {message.lz4})",
                            "bad_codec")
        name = request_cut(session, message)
        problem = served.cut_problem(message.cut)
        if problem:
            raise WireError(problem, "bad_cut")
        if message.kind == "train" and name != session.cut:  # a training session trains one tail, at one cut
            raise WireError(f"session {session.id} trains at cut '{session.cut}', this step is cut at '{name}'",
                            "bad_cut")
        cut, budgets = served.shape(name), served.budgets_at(name)
        if budgets is not None and budget not in budgets:
            raise WireError(f"budget {budget} is not in this model set{served.where(name)}; it holds "
                            f"{served.held(name)}", "bad_budget")
        if message.channels != cut.channels or (budgets is None and budget > session.budget):
            raise WireError(f"expected at most {session.budget} of {cut.channels} channels, got {budget} of "
                            f"{message.channels}", "bad_budget")
        if (height, width) != (cut.sent_height, cut.sent_width) or n == 0:
            raise WireError(f"expected channels of {cut.sent_height}x{cut.sent_width} for a non-empty "
                            f"batch, got shape {list(message.values.shape)}", "bad_shape")
        if message.labels is not None and message.labels.numel() and int(message.labels.max()) >= served.num_classes:
            raise WireError(f"labels must be below {served.num_classes}, got {int(message.labels.max())}",
                            "bad_labels")

    def replay(self, session: Session, message: Activations) -> Any:
        """The stored reply if this training step was applied already (a resend), else None; older steps refused."""
        if session.restored:  # the first step since the server came back from its checkpoint
            session.restored = False
            lost = max(0, message.step - session.last_step - 1)  # acknowledged to the edge, then lost in the crash
            if lost:
                self.stats.steps_rolled_back += lost
                log.warning("session %s: %d acknowledged step(s) after the checkpoint were lost with the server "
                            "(the edge is at step %d, the checkpoint at %d)", session.id, lost, message.step,
                            session.last_step)
        if message.step == session.last_step:
            if session.last_reply is None:  # applied and checkpointed, but its reply died with the old process
                raise WireError(f"step {message.step} was applied before the server restarted and its reply is "
                                "gone; go on with the next step", "reply_lost")
            log.info("session %s resent step %d: answering again, not applying twice", session.id, message.step)
            session.last_reply.id = message.id
            return session.last_reply
        if message.step < session.last_step:
            raise WireError(f"step {message.step} is older than the last applied step {session.last_step}",
                            "stale_step")
        return None

    def snapshot(self) -> list[dict[str, Any]]:
        """The open sessions as plain data, for the server's checkpoint (written with the tail it trained)."""
        return [{"id": s.id, "owner": s.owner.hex(), "mode": s.mode, "budget": s.budget, "codec": s.codec,
                 "lz4": s.lz4, "grad_codec": s.grad_codec, "grad_lz4": s.grad_lz4, "timing": s.timing,
                 "codecs": sorted(map(entry_name, s.codecs)), "cut": s.cut, "last_step": s.last_step,
                 "steps": self.stats.steps_per_session.get(s.id, 0)} for s in list(self.sessions.values())]

    def restore(self, sessions: list[dict[str, Any]]) -> None:
        """Sessions from a checkpoint: their edges go on where the checkpoint left them (replies are not kept).

        A session at a cut this server no longer serves (it restarted with
        another model set or cut) is dropped with a warning: every request of
        it would fail, and its edge opens a new session when told its own is
        unknown.
        """
        restored = 0
        for saved in sessions:
            # timing, codecs and cut are later than the rest: a checkpoint written before them has none of them
            cut = saved.get("cut") or self.served.name
            problem = self.served.cut_problem(cut)
            if problem:
                log.warning("dropped session %s from the checkpoint: %s", printable(saved["id"]),
                            printable(problem))
                continue
            session = Session(saved["id"], bytes.fromhex(saved["owner"]), saved["mode"], saved["budget"],
                              saved["codec"], saved["lz4"], saved["grad_codec"], saved["grad_lz4"],
                              timing=bool(saved.get("timing", False)),
                              codecs=frozenset(map(codec_entry, saved.get("codecs", ()))),
                              cut=cut, last_step=saved["last_step"], last_seen=self.clock(), restored=True)
            self.sessions[session.id] = session
            restored += 1
            if saved["steps"]:
                self.stats.steps_per_session[session.id] = saved["steps"]
        if restored:
            log.info("restored %d session(s) from the checkpoint", restored)

    def applied(self, session: Session, step: int, reply: Any) -> None:
        session.last_step, session.last_reply = step, reply
        self.stats.steps_applied += 1
        self.stats.steps_per_session[session.id] = self.stats.steps_per_session.get(session.id, 0) + 1
