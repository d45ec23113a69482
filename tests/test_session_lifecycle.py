"""The session lifecycle as a hypothesis state machine: every order of connect, step, resend, drop,
reconnect, resume, bye, expiry, checkpoint and server restart keeps the exactly-once rule.

The machine drives the server's real protocol state (SessionTable: no sockets, a clock of its own) the
way edges and restarts do, and keeps a model of what must be true: which steps the tail holds since
the last restore, which session each edge thinks it has, what a checkpoint saved. After every rule:
no (session, step) is in the tail twice, the caps hold, the table's counts match the model's, and
every stored reply is the reply of its session's last applied step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sparse_rt.errors import WireError
from sparse_rt.model.sides import CutShape
from sparse_rt.server.sessions import ServedCut, SessionTable
from sparse_rt.wire.messages import Activations, Bye, Hello

CUT = CutShape(32, 4, 4, 4, 4)
IDLE, MAX_SESSIONS, PER_OWNER = 10.0, 6, 3
OWNERS = (b"edge-a", b"edge-b", b"edge-c")


@dataclass
class Edge:
    """What one edge believes: its session, the next step it will send, the steps it saw applied."""

    session: str | None = None
    step: int = 0
    acknowledged: list[int] = field(default_factory=list)


class SessionLifecycle(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.now = 0.0
        self.table = self._new_table()
        self.edges = {owner: Edge() for owner in OWNERS}
        self.tail: dict[str, list[int]] = {}  # session -> steps the tail holds, since the last restore
        self.saved: tuple[list, dict[str, list[int]]] | None = None  # the last checkpoint: table and tail

    def _new_table(self) -> SessionTable:
        return SessionTable(ServedCut("digits_cnn", CUT, 10, 0), max_sessions=MAX_SESSIONS, idle_seconds=IDLE,
                            max_per_owner=PER_OWNER, clock=lambda: self.now)

    def _step(self, edge: Edge, step: int) -> Activations:
        return Activations(7, edge.session or "none", "fp32", False, 32, torch.arange(4), torch.zeros(1, 4, 4, 4),
                           torch.tensor([3]), step)

    def _hello(self, owner: bytes) -> tuple[str, bool, int] | None:
        """Open (or resume) the edge's session; None if the server is full."""
        try:
            session, resumed = self.table.handshake(owner, Hello(1, "digits_cnn", 32, 4, "fp32", False, "train",
                                                                 resume=self.edges[owner].session))
        except WireError as exc:
            assert exc.code == "busy", exc
            return None
        return session.id, resumed, session.last_step + 1

    # -- rules -------------------------------------------------------------------------------------------

    @rule(owner=st.sampled_from(OWNERS))
    def connect(self, owner: bytes) -> None:
        """A hello: resumes the edge's session when the server still has it, else a new one."""
        edge = self.edges[owner]
        known = edge.session in self.table.sessions
        opened = self._hello(owner)
        if opened is None:
            return
        session, resumed, next_step = opened
        assert resumed == known, (edge.session, known)
        if resumed:
            assert session == edge.session
            edge.step = max(edge.step, next_step)  # the edge skips what the tail already has
        else:
            assert next_step == 0
            self.tail.setdefault(session, [])
        edge.session = session

    @precondition(lambda self: any(edge.session for edge in self.edges.values()))
    @rule(owner=st.sampled_from(OWNERS), resend=st.booleans())
    def train(self, owner: bytes, resend: bool) -> None:
        """One step (or, with ``resend``, the last acknowledged one again: its reply was lost)."""
        edge = self.edges[owner]
        if edge.session is None:
            return
        step = edge.acknowledged[-1] if resend and edge.acknowledged else edge.step
        message = self._step(edge, step)
        try:
            session = self.table.session_for(owner, message)
            stored = self.table.replay(session, message)
        except WireError as exc:
            if exc.code == "unknown_session":  # expired, ended or lost with a restart: the edge opens anew
                assert edge.session not in self.table.sessions or self.table.sessions[edge.session].owner != owner
                edge.session = None
                return
            if exc.code == "reply_lost":  # applied before a restart: counts as applied, its reply is gone
                assert step in self.tail[session.id]
                edge.step = max(edge.step, step + 1)
                return
            assert exc.code == "stale_step" and resend, exc
            return
        if stored is not None:
            assert step in self.tail[session.id] and stored.step == step  # answered again, never applied twice
            return
        assert step not in self.tail.setdefault(session.id, []), f"step {step} of {session.id} applied twice"
        self.tail[session.id].append(step)
        self.table.applied(session, step, Bye(7, session.id))
        self.table.sessions[session.id].last_reply.step = step  # the stand-in reply names its step
        if not resend:
            edge.acknowledged.append(step)
            edge.step = step + 1

    @rule(owner=st.sampled_from(OWNERS))
    def drop_and_reconnect(self, owner: bytes) -> None:
        """The connection drops and comes back under the same identity (a key, or a fixed routing id):
        nothing changes on the server; the edge's next request goes on."""

    @rule(owner=st.sampled_from(OWNERS))
    def bye(self, owner: bytes) -> None:
        edge = self.edges[owner]
        if edge.session is None:
            return
        try:
            self.table.close(owner, edge.session)
        except WireError as exc:
            assert exc.code == "unknown_session"
        edge.session = None

    @rule(seconds=st.sampled_from([1.0, IDLE / 2, IDLE + 1]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for session in self.table.expire():  # the server's periodic expiry
            assert session not in self.table.sessions

    @rule()
    def checkpoint(self) -> None:
        """The server writes its tail and session table together."""
        self.saved = (self.table.snapshot(), {sid: list(steps) for sid, steps in self.tail.items()})

    @rule(clean=st.booleans())
    def server_restarts(self, clean: bool) -> None:
        """kill -9 (back to the last checkpoint) or SIGTERM (a final checkpoint first), then --resume."""
        if clean:
            self.checkpoint()
        table, tail = self.saved if self.saved is not None else ([], {})
        self.table = self._new_table()
        self.table.restore(table)
        self.tail = {sid: list(steps) for sid, steps in tail.items()}

    # -- invariants --------------------------------------------------------------------------------------

    @invariant()
    def exactly_once(self) -> None:
        for sid, steps in self.tail.items():
            assert len(steps) == len(set(steps)), (sid, steps)

    @invariant()
    def caps_hold(self) -> None:
        assert len(self.table.sessions) <= MAX_SESSIONS
        for owner in OWNERS:
            assert sum(s.owner == owner for s in self.table.sessions.values()) <= PER_OWNER

    @invariant()
    def stored_replies_belong_to_the_last_step(self) -> None:
        for session in self.table.sessions.values():
            if session.last_reply is not None:
                assert session.last_reply.step == session.last_step
            if session.last_step >= 0:
                assert session.last_step == max(self.tail[session.id])

    @invariant()
    def nothing_idle_outlives_its_time(self) -> None:
        self.table.expire()
        assert all(self.now - s.last_seen <= IDLE for s in self.table.sessions.values())


SessionLifecycle.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_session_lifecycle = SessionLifecycle.TestCase
