"""The broker: one address for edges, any number of tail replicas behind it (`sparse-rt node --role broker`).

Edges connect to the broker's frontend exactly as to a server; replicas
(`sparse-rt node --role server --join BACKEND`) connect to its backend, so a
new replica joins by starting, with nothing else restarted. Each request
goes to its edge's replica (cluster/replicas.py keeps the sessions'
affinity, the heartbeats and what is in flight); a replica that goes silent
has its unanswered requests sent to the replica its edges move to.

Why not ZeroMQ's own ``zmq.proxy`` (ROUTER to DEALER): a DEALER deals
messages round-robin, so consecutive requests of one session would reach
replicas that never opened it, and a request sent to a replica that dies is
simply gone. Why not only a Kubernetes Service: it spreads connections, not
requests, and does not resend what a dead pod had; it fits in front of
several brokers (nodes/k8s).

The broker reads no more of a message than its header's ``id``: decoding,
checks and sessions stay the replicas' job. With CURVE on both sides, an
edge authenticates to the broker and the broker to the replicas (each
knows the other's key); the broker states the edge's key in every
request's envelope, and the replica binds sessions to it and checks its
role, as a server bound alone does with ZeroMQ's User-Id.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from sparse_rt.cluster.replicas import HEARTBEAT_SECONDS, ReplicaTable
from sparse_rt.transport.connection import Transport

log = logging.getLogger("sparse_rt.broker")

HEARTBEAT = b"\x01"  # a replica's heartbeat: one frame of one byte (a protocol message has a header frame and more)


class Keyed(list):
    """A request's frames, with the key its edge authenticated with at the broker (b"" without CURVE)."""

    __slots__ = ("key",)


class Broker:
    """Moves requests from ``frontend`` (edges) to ``backend`` (replicas) and replies back."""

    def __init__(self, frontend: Transport, backend: Transport, table: ReplicaTable | None = None,
                 curve: bool = False) -> None:
        self.frontend, self.backend = frontend, backend
        self.table = table or ReplicaTable()
        self.curve = curve  # the frontend authenticates edges: their keys go to the replicas

    async def serve(self) -> None:
        """Until cancelled."""
        await asyncio.gather(self._from_edges(), self._from_replicas(), self._watch())

    async def _send(self, edge: bytes, frames: list[Any]) -> None:
        replica = self.table.route(edge, frames)
        if replica is not None:
            await self.backend.send([edge, getattr(frames, "key", b""), *frames], replica)

    async def _from_edges(self) -> None:
        while True:
            edge, frames = await self.frontend.recv()
            assert edge is not None
            if frames:
                # The key travels with this request, held or resent too: never looked up by the edge's routing
                # id, which another connection may take over (ROUTER_HANDOVER) while the request waits.
                request = Keyed(frames)
                request.key = self.frontend.peer_key(edge, frames).encode("ascii") if self.curve else b""
                await self._send(edge, request)

    async def _from_replicas(self) -> None:
        while True:
            replica, frames = await self.backend.recv()
            assert replica is not None
            if len(frames) == 1 and frames[0].bytes == HEARTBEAT:
                if self.table.heard(replica):
                    log.info("replica %s joined (%d live)", replica.hex(), len(self.table.replicas))
                    await self._send_pending()
                continue
            if len(frames) < 2:
                continue  # not a reply to anyone: a replica does not send these
            edge, reply = frames[0].bytes, frames[1:]
            self.table.answered(replica, edge, reply)
            await self.frontend.send(reply, edge)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS / 2)
            before = set(self.table.replicas)
            again = self.table.expire()
            for gone in before - set(self.table.replicas):
                log.warning("replica %s went silent; %d of its requests go to another (%d live)", gone.hex(),
                            len(again), len(self.table.replicas))
            for edge, frames in again:
                await self._send(edge, frames)
            await self._send_pending()  # replicas back from an outage that waited for their peers

    async def _send_pending(self) -> None:
        if self.table.can_take_pending():
            for edge, held in self.table.take_pending():
                await self._send(edge, held)


async def send_heartbeats(connection: Transport, interval_s: float = HEARTBEAT_SECONDS) -> None:
    """A replica's side: tell the broker this replica lives, until cancelled (the first one is its joining)."""
    while True:
        await connection.send([HEARTBEAT])
        await asyncio.sleep(interval_s)
