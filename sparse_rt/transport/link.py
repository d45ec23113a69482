"""An edge's request/reply link to the server over one DEALER socket.

Every request carries an id; one reader task hands each reply to the request
waiting for that id, so several requests may be in flight on one socket.
A request without a reply within ``timeout`` is resent ``retries`` times,
then fails with a clear error instead of hanging (ZeroMQ connects lazily, so
a missing server looks the same as a silent one).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Sequence

import zmq

from sparse_rt.errors import WireError, printable
from sparse_rt.transport.connection import Transport
from sparse_rt.transport.events import ConnectionEvents
from sparse_rt.wire.header import decode_header

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], list[zmq.Frame]]  # (validated header, frames)


class ServerUnreachable(ConnectionError):
    """No reply came from the server in time."""


class RequestLink:
    """Send frames with an id, await the frames of the reply with that id."""

    def __init__(self, connection: Transport, address: str, timeout: float = 60.0, retries: int = 0,
                 events: ConnectionEvents | None = None) -> None:
        self.connection = connection
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.events = events  # the socket's handshakes: a server that is back gets the waiting requests at once
        self._ids = itertools.count(1)  # 0 is reserved: "id unknown" in error replies
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._frames: dict[int, Sequence[Any]] = {}  # what each waiting request sent, to send again
        self._reader: asyncio.Task[None] | None = None
        self.answering = True  # False once a request ran out of tries, until a reply comes again
        self._resender: asyncio.Task[None] | None = None
        if events is not None:
            events.on_reconnect = self._server_back

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, request_id: int, frames: Sequence[Any], timeout: float | None = None,
                      retries: int | None = None) -> Reply:
        """Send, and resend up to ``retries`` times while no reply comes (the ZeroMQ guide's Lazy Pirate).

        Returns the reply's validated header (read here to match the id) and
        its frames. ``timeout`` and ``retries`` default to the link's.

        Resending is safe: the server answers a repeated training step again
        without applying it twice.
        """
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"reader {self.address}")
        reply = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        self._frames[request_id] = frames
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        try:
            for attempt in range(retries + 1):
                await self.connection.send(frames)
                # wait() leaves the future alone on a timeout (no shield, no extra task per request),
                # so a reply to an earlier try still counts after a resend.
                done, _ = await asyncio.wait((reply,), timeout=timeout)
                if done:
                    return reply.result()
                if attempt < retries:
                    log.warning("no reply to request %d from %s within %g s; resending (%d of %d)",
                                request_id, self.address, timeout, attempt + 1, retries)
            self.answering = False
            raise ServerUnreachable(
                f"no reply from the server at {self.address} after {retries + 1} tries of "
                f"{timeout:g} s; is it running and reachable?"
            )
        finally:
            self._pending.pop(request_id, None)
            self._frames.pop(request_id, None)
            reply.cancel()

    def _server_back(self) -> None:
        """A handshake after a disconnect: what was in flight died with the old connection, so send it again now.

        Safe for the same reason as any resend: a step is never applied twice.
        """
        if self._frames and (self._resender is None or self._resender.done()):
            self._resender = asyncio.create_task(self._resend_all(), name=f"resend {self.address}")

    async def _resend_all(self) -> None:
        waiting = [(rid, frames) for rid, frames in self._frames.items() if not self._pending[rid].done()]
        if waiting:
            log.info("the server at %s is back: resending %d request(s) in flight", self.address, len(waiting))
        for _, frames in waiting:
            await self.connection.send(frames)

    async def _read(self) -> None:
        while True:
            _, frames = await self.connection.recv()
            try:
                header = decode_header(frames[0].bytes)
            except WireError as exc:
                log.warning("dropping an unreadable reply from %s: %s", self.address, printable(exc))
                continue
            self.answering = True
            request_id = header["id"]
            waiting = self._pending.get(request_id)
            if waiting is None and request_id == 0 and len(self._pending) == 1:
                waiting = next(iter(self._pending.values()))  # an error about a request the server could not read
            if waiting is None or waiting.done():  # e.g. the second answer to a resent request
                log.debug("dropping a reply to no waiting request (%d) from %s", request_id, self.address)
                continue
            waiting.set_result((header, frames))

    async def close(self) -> None:
        for task in (self._reader, self._resender):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.events is not None:
            await self.events.close()
        self.connection.close()
