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
from sparse_rt.wire.header import decode_header

log = logging.getLogger(__name__)

Reply = tuple[dict[str, Any], list[zmq.Frame]]  # (validated header, frames)


class ServerUnreachable(ConnectionError):
    """No reply came from the server in time."""


class RequestLink:
    """Send frames with an id, await the frames of the reply with that id."""

    def __init__(self, connection: Transport, address: str, timeout: float = 60.0, retries: int = 0) -> None:
        self.connection = connection
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self._ids = itertools.count(1)  # 0 is reserved: "id unknown" in error replies
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, request_id: int, frames: Sequence[Any]) -> Reply:
        """Send, and resend up to ``retries`` times while no reply comes (the ZeroMQ guide's Lazy Pirate).

        Returns the reply's validated header (read here to match the id) and its frames.

        Resending is safe: the server answers a repeated training step again
        without applying it twice.
        """
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"reader {self.address}")
        reply = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            for attempt in range(self.retries + 1):
                await self.connection.send(frames)
                # wait() leaves the future alone on a timeout (no shield, no extra task per request),
                # so a reply to an earlier try still counts after a resend.
                done, _ = await asyncio.wait((reply,), timeout=self.timeout)
                if done:
                    return reply.result()
                if attempt < self.retries:
                    log.warning("no reply to request %d from %s within %g s; resending (%d of %d)",
                                request_id, self.address, self.timeout, attempt + 1, self.retries)
            raise ServerUnreachable(
                f"no reply from the server at {self.address} after {self.retries + 1} tries of "
                f"{self.timeout:g} s; is it running and reachable?"
            )
        finally:
            self._pending.pop(request_id, None)
            reply.cancel()

    async def _read(self) -> None:
        while True:
            _, frames = await self.connection.recv()
            try:
                header = decode_header(frames[0].bytes)
            except WireError as exc:
                log.warning("dropping an unreadable reply from %s: %s", self.address, printable(exc))
                continue
            request_id = header["id"]
            waiting = self._pending.get(request_id)
            if waiting is None and request_id == 0 and len(self._pending) == 1:
                waiting = next(iter(self._pending.values()))  # an error about a request the server could not read
            if waiting is None or waiting.done():  # e.g. the second answer to a resent request
                log.debug("dropping a reply to no waiting request (%d) from %s", request_id, self.address)
                continue
            waiting.set_result((header, frames))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self.connection.close()
