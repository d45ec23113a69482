"""ZeroMQ sockets that count what they move.

Bytes are counted at the socket, per direction: the sum of the lengths of the
frames of every message actually sent or received, headers included (ZMTP's
own few bytes of framing per frame are not visible to us and not counted; a
ROUTER's routing-id frame never crosses the wire and is not counted either).

Frames go out with ``copy=False``; pyzmq still copies frames below the
socket's ``copy_threshold`` (64 KiB by default), which is where zero-copy
stops paying off.

A connection may be given a :class:`~sparse_rt.transport.shaper.Shaper`: its
messages then cross a modelled link of limited rate and delay before they
reach ZeroMQ (see shaper.py). Without one, ``send`` is exactly the plain path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import zmq
import zmq.asyncio

from sparse_rt.transport.shaper import ShapedSender, Shaper


@dataclass
class Traffic:
    """Bytes and messages one socket moved, per direction."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


def frame_bytes(frames: Sequence[Any]) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


class Connection:
    """One socket, one byte counter. DEALER and ROUTER differ only in routing ids."""

    def __init__(self, socket: zmq.asyncio.Socket, shaper: Shaper | None = None) -> None:
        self.socket = socket
        self.routed = socket.type == zmq.ROUTER
        self.traffic = Traffic()
        self._shaped = None if shaper is None else ShapedSender(shaper, self._send_now)

    async def _send_now(self, message: list[Any]) -> None:
        await self.socket.send_multipart(message, copy=False)

    async def send(self, frames: Sequence[Any], route: bytes | None = None) -> None:
        message = [route, *frames] if self.routed else list(frames)
        nbytes = frame_bytes(frames)
        if self._shaped is None:
            await self.socket.send_multipart(message, copy=False)
        else:
            await self._shaped.send(message, nbytes)
        self.traffic.bytes_sent += nbytes
        self.traffic.messages_sent += 1

    async def recv(self) -> tuple[bytes | None, list[zmq.Frame]]:
        """The next message: (routing id or None, its frames)."""
        frames = await self.socket.recv_multipart(copy=False)
        route = frames.pop(0).bytes if self.routed else None
        self.traffic.bytes_received += sum(len(frame) for frame in frames)
        self.traffic.messages_received += 1
        return route, frames

    def close(self) -> None:
        if self._shaped is not None:
            self._shaped.close()
        self.socket.close(linger=0)


def _open(context: zmq.asyncio.Context, kind: int, attach: str, address: str,
          max_message_bytes: int | None, shaper: Shaper | None) -> Connection:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if max_message_bytes is not None:
        # Per frame; bigger frames make ZeroMQ drop the connection instead of allocating.
        socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    try:
        getattr(socket, attach)(address)
    except zmq.ZMQError as exc:
        socket.close(linger=0)
        raise OSError(f"cannot {attach} {address}: {exc}") from None
    return Connection(socket, shaper)


def bind_router(context: zmq.asyncio.Context, address: str, max_message_bytes: int | None = None,
                shaper: Shaper | None = None) -> Connection:
    """The server's socket (its sends are the downlink). A bind failure names the address."""
    return _open(context, zmq.ROUTER, "bind", address, max_message_bytes, shaper)


def connect_dealer(context: zmq.asyncio.Context, address: str, max_message_bytes: int | None = None,
                   shaper: Shaper | None = None) -> Connection:
    """An edge's socket (its sends are the uplink).

    Connecting is lazy in ZeroMQ: a missing server shows up as a timeout.
    """
    return _open(context, zmq.DEALER, "connect", address, max_message_bytes, shaper)
