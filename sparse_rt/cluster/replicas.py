"""The broker's state, with no sockets in it: which replicas are alive, which edge each serves, what is in flight.

Replicas of one model set serve edges behind one broker (cluster/broker.py).
A session lives on the replica that opened it, so an edge stays with one
replica (affinity) while that replica lives; a new edge goes to the live
replica that serves the fewest. A replica is alive while it is heard from:
every replica sends a heartbeat at a fixed interval, and one silent for
``liveness_s`` is gone. The requests it had not answered are handed back
to be sent again to the replica its edges move to; that replica does not
know their sessions and says ``unknown_session``, and the edge opens a new
session and resends (edge/session.py), so no request is lost on the edge's
side. The same pattern is ZeroMQ's "Paranoid Pirate" queue (zguide ch. 4),
with session affinity added.

After an outage (requests are held because no replica lives) the
replicas coming back are given edges only once the first of them has been
back ``rejoin_s``: a training group that torchrun restarts comes back
together, and without the wait the first to say so would take every edge.

Everything here is bounded: the edges remembered (least recently seen go
first), the requests tracked in flight per replica, and the requests held
while no replica is alive.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from sparse_rt.wire.header import MAX_HEADER_BYTES

HEARTBEAT_SECONDS = 0.5  # a replica's heartbeat interval
LIVENESS_SECONDS = 2.0  # a replica not heard from for this long is gone (four heartbeats missed)
MAX_EDGES = 100_000  # edges whose replica is remembered
MAX_IN_FLIGHT = 4096  # requests tracked per replica; beyond, they are forwarded untracked
MAX_PENDING = 1024  # requests held while no replica is alive
PENDING_SECONDS = 10.0  # how long such a request is held; the edge resends after its own timeout
REJOIN_SECONDS = 1.0  # after an outage, replicas take held requests only once they have been back this long

Frames = list[Any]  # zmq.Frame or bytes, forwarded as they came


@dataclass
class Replica:
    id: bytes
    last_seen: float
    ready_at: float = 0.0  # from then on it is given edges (later than its joining after an outage)
    edges: set[bytes] = field(default_factory=set)
    in_flight: OrderedDict[tuple[bytes, int], Frames] = field(default_factory=OrderedDict)
    requests: int = 0  # requests sent to it
    answered: int = 0


@dataclass
class BrokerStats:
    requests: int = 0
    replies: int = 0
    resent: int = 0  # requests of a replica that went away, sent again to another
    dropped: int = 0  # held with no replica alive for too long, or beyond MAX_PENDING (the edge resends)
    untracked: int = 0  # forwarded without a request id to track (a malformed header: the replica refuses it)
    joined: int = 0
    lost: int = 0  # replicas that went silent
    per_replica: dict[str, int] = field(default_factory=dict)  # requests answered, by replica id (hex)


def request_id(frames: Frames) -> int | None:
    """The ``id`` of a message's header frame, or None when the header does not say one (it is not parsed further)."""
    if not frames:
        return None
    first = frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]
    if len(first) > MAX_HEADER_BYTES:  # not a header this protocol allows: the replica refuses the message
        return None
    try:
        header = json.loads(bytes(first))
    except (ValueError, RecursionError, TypeError):
        return None
    value = header.get("id") if isinstance(header, dict) else None
    return value if type(value) is int else None


class ReplicaTable:
    """Replicas by id, each edge's replica, and the requests each replica has not answered yet."""

    def __init__(self, liveness_s: float = LIVENESS_SECONDS, max_edges: int = MAX_EDGES,
                 max_in_flight: int = MAX_IN_FLIGHT, max_pending: int = MAX_PENDING,
                 pending_s: float = PENDING_SECONDS, rejoin_s: float = REJOIN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.liveness_s, self.max_edges, self.max_in_flight = liveness_s, max_edges, max_in_flight
        self.rejoin_s = rejoin_s
        self.max_pending, self.pending_s, self.clock = max_pending, pending_s, clock
        self.replicas: dict[bytes, Replica] = {}
        self.edges: OrderedDict[bytes, bytes] = OrderedDict()  # edge -> its replica, least recently seen first
        self.pending: deque[tuple[float, bytes, Frames]] = deque()
        self.stats = BrokerStats()

    def heard(self, replica_id: bytes) -> bool:
        """A replica's heartbeat or reply; True if it is new."""
        now = self.clock()
        replica = self.replicas.get(replica_id)
        if replica is not None:
            replica.last_seen = now
            return False
        waiting = [r.ready_at for r in self.replicas.values() if r.ready_at > now]
        if self._ready(now):
            ready_at = now
        elif waiting:  # others are coming back from the same outage: together with them
            ready_at = min(waiting)
        else:
            ready_at = now + self.rejoin_s if self.pending else now
        self.replicas[replica_id] = Replica(replica_id, now, ready_at)
        self.stats.joined += 1
        return True

    def _ready(self, now: float) -> list[Replica]:
        return [replica for replica in self.replicas.values() if replica.ready_at <= now]

    def can_take_pending(self) -> bool:
        """Requests are held and a replica may take them now."""
        return bool(self.pending) and bool(self._ready(self.clock()))

    def replica_for(self, edge: bytes) -> bytes | None:
        """The edge's replica: the one it had while that lives, else the live one that serves the fewest edges."""
        current = self.edges.get(edge)
        if current is not None and current in self.replicas:
            self.edges.move_to_end(edge)
            return current
        ready = self._ready(self.clock())
        if not ready:
            return None
        chosen = min(ready, key=lambda r: (len(r.edges), r.requests))
        chosen.edges.add(edge)
        self.edges[edge] = chosen.id
        self.edges.move_to_end(edge)
        while len(self.edges) > self.max_edges:  # forget the least recently seen edge
            old_edge, old_replica = self.edges.popitem(last=False)
            if old_replica in self.replicas:
                self.replicas[old_replica].edges.discard(old_edge)
        return chosen.id

    def route(self, edge: bytes, frames: Frames) -> bytes | None:
        """Where this request from ``edge`` goes (tracked until answered); None: no replica, it is held."""
        replica_id = self.replica_for(edge)
        if replica_id is None:
            self._hold(edge, frames)
            return None
        replica = self.replicas[replica_id]
        replica.requests += 1
        self.stats.requests += 1
        key = request_id(frames)
        if key is None:
            self.stats.untracked += 1
        elif (edge, key) in replica.in_flight or len(replica.in_flight) < self.max_in_flight:
            replica.in_flight[edge, key] = frames
        return replica_id

    def answered(self, replica_id: bytes, edge: bytes, frames: Frames) -> None:
        """A reply from ``replica_id`` to ``edge``: its request is done."""
        self.heard(replica_id)
        replica = self.replicas[replica_id]
        replica.answered += 1
        self.stats.replies += 1
        key = request_id(frames)
        if key is not None:
            replica.in_flight.pop((edge, key), None)
        name = replica_id.hex()
        self.stats.per_replica[name] = self.stats.per_replica.get(name, 0) + 1

    def _hold(self, edge: bytes, frames: Frames) -> None:
        if len(self.pending) >= self.max_pending:
            self.pending.popleft()
            self.stats.dropped += 1
        self.pending.append((self.clock(), edge, frames))

    def take_pending(self) -> list[tuple[bytes, Frames]]:
        """The requests held for lack of a replica and still fresh, to route now."""
        now = self.clock()
        fresh = [(edge, frames) for since, edge, frames in self.pending if now - since <= self.pending_s]
        self.stats.dropped += len(self.pending) - len(fresh)
        self.pending.clear()
        return fresh

    def expire(self) -> list[tuple[bytes, Frames]]:
        """Remove the replicas gone silent; their unanswered requests, to route again (to the edges' new replicas)."""
        now = self.clock()
        lost = [replica for replica in self.replicas.values() if now - replica.last_seen > self.liveness_s]
        again: list[tuple[bytes, Frames]] = []
        for replica in lost:
            del self.replicas[replica.id]
            self.stats.lost += 1
            again += [(edge, frames) for (edge, _), frames in replica.in_flight.items()]
        self.stats.resent += len(again)
        # Held requests past their time are dropped here too, so a broker with no replica does not keep them.
        while self.pending and now - self.pending[0][0] > self.pending_s:
            self.pending.popleft()
            self.stats.dropped += 1
        return again

    def summary(self) -> dict[str, Any]:
        return {**vars(self.stats), "replicas": len(self.replicas), "edges": len(self.edges),
                "in_flight": sum(len(r.in_flight) for r in self.replicas.values()), "pending": len(self.pending)}
