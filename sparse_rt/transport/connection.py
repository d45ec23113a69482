"""ZeroMQ sockets that count what they move.

Bytes are counted at the socket, per direction: the sum of the lengths of the
frames of every message actually sent or received, headers included (ZMTP's
own few bytes of framing per frame are not visible to us and not counted; a
ROUTER's routing-id frame never crosses the wire and is not counted either).

Frames go out with ``copy=False``; pyzmq still copies frames below the
socket's ``copy_threshold`` (64 KiB by default), which is where zero-copy
stops paying off.

Cross-cutting concerns are layers around the plain socket, not code inside
it (as Flower's client mods wrap a call): :class:`Counted` counts bytes,
:class:`Shaped` puts messages on a modelled link of limited rate and delay
(see shaper.py), and socket options (:data:`SocketOption`, e.g. a message
size limit or CURVE keys) are applied to the socket before it binds or
connects. A layer of one's own subclasses :class:`Layer`. Each layer
passes on what it does not handle, so ``connection.socket`` still reaches
the socket.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

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


HEARTBEAT_SECONDS = 10.0  # ZMTP heartbeat interval on every socket of ours
# An edge retries a vanished server after this long, doubling up to the most (libzmq's own backoff): quick
# when the server is back at once, and a thousand edges do not hammer one that is down.
RECONNECT_FIRST_SECONDS, RECONNECT_MOST_SECONDS = 0.1, 2.0

# Configures a socket before it binds or connects (options such as CURVE keys must come first).
SocketOption = Callable[[zmq.Socket], None]


def sockopt(option: int, value: Any) -> SocketOption:
    """A plain ZeroMQ socket option, e.g. ``sockopt(zmq.SNDHWM, 100)``."""
    return lambda socket: socket.setsockopt(option, value)


def heartbeats(interval_s: float = HEARTBEAT_SECONDS) -> SocketOption:
    """ZMTP heartbeats: a peer silent for three intervals (a dead machine, a cut cable) is disconnected.

    Without them a TCP connection to a vanished peer can look alive for
    hours, holding ZeroMQ's buffers for it.
    """
    def apply(socket: zmq.Socket) -> None:
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(interval_s * 1000))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * interval_s * 1000))
        socket.setsockopt(zmq.HEARTBEAT_TTL, int(3 * interval_s * 1000))
    return apply


def reconnect_backoff(first_s: float = RECONNECT_FIRST_SECONDS, most_s: float = RECONNECT_MOST_SECONDS) -> SocketOption:
    """Reconnect after ``first_s``, then twice as long after each failure, up to ``most_s``."""
    def apply(socket: zmq.Socket) -> None:
        socket.setsockopt(zmq.RECONNECT_IVL, int(first_s * 1000))
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, int(most_s * 1000))
    return apply


def max_message_size(nbytes: int) -> SocketOption:
    """Per frame; bigger frames make ZeroMQ drop the connection instead of allocating."""
    return sockopt(zmq.MAXMSGSIZE, nbytes)


class Connection:
    """One socket: frames out and in. DEALER and ROUTER differ only in routing ids."""

    def __init__(self, socket: zmq.asyncio.Socket) -> None:
        self.socket = socket
        self.routed = socket.type == zmq.ROUTER

    async def send(self, frames: Sequence[Any], route: bytes | None = None) -> None:
        await self.socket.send_multipart([route, *frames] if self.routed else frames, copy=False)

    async def recv(self) -> tuple[bytes | None, list[zmq.Frame]]:
        """The next message: (routing id or None, its frames)."""
        frames = await self.socket.recv_multipart(copy=False)
        return (frames.pop(0).bytes if self.routed else None), frames

    def close(self, linger_ms: int = 0) -> None:
        """Close now; ``linger_ms`` gives messages already sent that long to leave (0: they are dropped)."""
        self.socket.close(linger=linger_ms)

    def peer_key(self, route: bytes | None, frames: list[zmq.Frame]) -> str:
        """The CURVE public key (z85) the message's sender authenticated with: ZeroMQ's User-Id."""
        return frames[0].get("User-Id")


class Layer:
    """Wraps a connection (or another layer); passes through whatever it does not override."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # socket, traffic, routed ... of the layers below
        return getattr(self.inner, name)

    async def send(self, frames: Sequence[Any], route: bytes | None = None) -> None:
        await self.inner.send(frames, route)

    async def recv(self) -> tuple[bytes | None, list[zmq.Frame]]:
        return await self.inner.recv()

    def close(self, linger_ms: int = 0) -> None:
        self.inner.close(linger_ms)


class Counted(Layer):
    """Counts every frame's bytes and every message, per direction, as they pass."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.traffic = Traffic()

    async def send(self, frames: Sequence[Any], route: bytes | None = None) -> None:
        await self.inner.send(frames, route)
        self.traffic.bytes_sent += frame_bytes(frames)
        self.traffic.messages_sent += 1

    async def recv(self) -> tuple[bytes | None, list[zmq.Frame]]:
        route, frames = await self.inner.recv()
        self.traffic.bytes_received += frame_bytes(frames)
        self.traffic.messages_received += 1
        return route, frames


class Shaped(Layer):
    """Messages cross a modelled link (shaper.py) before they reach the socket; receiving is untouched."""

    def __init__(self, inner: Any, shaper: Shaper) -> None:
        super().__init__(inner)
        self._sender = ShapedSender(shaper, lambda message: inner.send(*message))

    async def send(self, frames: Sequence[Any], route: bytes | None = None) -> None:
        await self._sender.send((frames, route), frame_bytes(frames))

    def close(self, linger_ms: int = 0) -> None:
        self._sender.close()
        self.inner.close(linger_ms)


# What sessions are given: a socket, with or without layers around it.
Transport = Connection | Layer


def is_local(address: str) -> bool:
    """Whether only this machine can reach ``address``: ipc://, inproc://, or tcp on a loopback interface."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def open_socket(context: zmq.asyncio.Context, kind: int, attach: str, address: str,
                options: Iterable[SocketOption] = ()) -> Connection:
    """A socket with ``options`` applied, then bound or connected; a failure names the address."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        for option in options:
            option(socket)
        getattr(socket, attach)(address)
    except zmq.ZMQError as exc:
        socket.close(linger=0)
        raise OSError(f"cannot {attach} {address}: {exc}") from None
    return Connection(socket)


def _layered(connection: Connection, shaper: Shaper | None) -> Counted:
    """The layers every connection of ours gets: bytes counted at the socket, the shaper below the count."""
    return Counted(connection if shaper is None else Shaped(connection, shaper))


def _options(max_message_bytes: int | None, options: Iterable[SocketOption]) -> list[SocketOption]:
    return [heartbeats(), *([] if max_message_bytes is None else [max_message_size(max_message_bytes)]), *options]


def bind_router(context: zmq.asyncio.Context, address: str, max_message_bytes: int | None = None,
                shaper: Shaper | None = None, options: Iterable[SocketOption] = ()) -> Counted:
    """The server's socket (its sends are the downlink). A bind failure names the address.

    With ROUTER_HANDOVER, an edge that reconnects under its routing id (its
    old connection not yet seen dead) takes the id over instead of being ignored.
    """
    options = [sockopt(zmq.ROUTER_HANDOVER, 1), *_options(max_message_bytes, options)]
    return _layered(open_socket(context, zmq.ROUTER, "bind", address, options), shaper)


class Enveloped(Layer):
    """A replica's socket to a broker: a DEALER whose messages start with the edge's routing id and key.

    The server reads and answers them as it does a ROUTER's, so one server
    runs bound (alone) or joined to a broker (a replica) unchanged. A send
    without a route (the replica's heartbeat) goes to the broker itself.
    With CURVE the edge authenticated to the broker, not to the replica:
    the broker, itself authenticated to the replica, states the edge's key
    in each request's envelope. The route the server sees holds both, so
    :meth:`peer_key` answers for that very message (as a ROUTER's User-Id
    does), not for whoever last used the edge's routing id.
    """

    routed = True

    async def send(self, frames: Sequence[Any], route: bytes | None = None) -> None:
        await self.inner.send(list(frames) if route is None else [route[1:1 + route[0]], *frames])

    async def recv(self) -> tuple[bytes | None, list[zmq.Frame]]:
        while True:
            _, frames = await self.inner.recv()
            edge = frames[0].bytes if frames else b""
            if len(frames) >= 3 and 0 < len(edge) < 256:  # the edge's id, its key ('' without CURVE), its message
                return bytes([len(edge)]) + edge + frames[1].bytes, frames[2:]

    def peer_key(self, route: bytes | None, frames: list[zmq.Frame]) -> str:
        return route[1 + route[0]:].decode("ascii", "replace") if route else ""


def join_broker(context: zmq.asyncio.Context, address: str, max_message_bytes: int | None = None,
                options: Iterable[SocketOption] = ()) -> Counted:
    """A replica's socket: connected to a broker's backend (cluster/broker.py), which it reconnects to if lost."""
    connection = open_socket(context, zmq.DEALER, "connect", address,
                             [reconnect_backoff(), *_options(max_message_bytes, options)])
    return Counted(Enveloped(connection))


def connect_dealer(context: zmq.asyncio.Context, address: str, max_message_bytes: int | None = None,
                   shaper: Shaper | None = None, options: Iterable[SocketOption] = ()) -> Counted:
    """An edge's socket (its sends are the uplink).

    Connecting is lazy in ZeroMQ: a missing server shows up as a timeout.
    """
    return _layered(open_socket(context, zmq.DEALER, "connect", address,
                                [reconnect_backoff(), *_options(max_message_bytes, options)]), shaper)
