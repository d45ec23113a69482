"""What happens to an edge's connection, from ZeroMQ's socket monitor: handshakes that work, fail, or come back.

ZeroMQ hides its connections: a DEALER reconnects by itself, and a request
sent while the server was away is silently gone. An edge needs two facts
from below that curtain, and the socket monitor gives both:

- a failed handshake (a refused key, a wrong server key, CURVE on one side
  only) is an error to tell at once, not a silence that ends in a timeout;
- a handshake that succeeds after a disconnect means the server is back (a
  restart, a network blip): requests still waiting were lost with the old
  connection and are resent now, not after their timeout.
"""
from __future__ import annotations

import asyncio
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sparse_rt.errors import ConfigError

EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
          | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_DISCONNECTED)


class AuthenticationFailed(ConfigError, ConnectionError):
    """The handshake with the server failed: this key is refused, or a key is wrong or missing.

    A ConfigError (something the operator fixes; the CLI's exit code 2), not an outage.
    """


class ConnectionEvents:
    """A socket option that watches the socket's connections for as long as it lives.

    Applied before the socket connects (no event can be missed). ``start()``
    reads the monitor in a task; :meth:`verdict` waits for the first
    handshake; ``on_reconnect`` is called for each handshake that follows a
    disconnect (the request link resends what was in flight).
    """

    def __init__(self, address: str, curve: bool) -> None:
        self.address, self.curve = address, curve
        self.handshakes = 0
        self.disconnects = 0
        self.failure: AuthenticationFailed | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.on_reconnect: Callable[[], None] | None = None  # called on a handshake that follows a disconnect

    def __call__(self, socket: zmq.Socket) -> None:
        self._socket = socket  # type: ignore[assignment]
        self._monitor = socket.get_monitor_socket(EVENTS)  # type: ignore[assignment]

    def start(self) -> None:
        assert self._monitor is not None, "apply the events to a socket first"
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(), name=f"connection events {self.address}")

    async def _read(self) -> None:
        assert self._monitor is not None and self._changed is not None
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
                if self.disconnects and self.on_reconnect is not None:
                    self.on_reconnect()
            elif event == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
            else:
                self.failure = AuthenticationFailed(self._cause(event))
            self._changed.set()
            self._changed = asyncio.Event()

    async def _next_change(self, timeout: float) -> bool:
        assert self._changed is not None, "start() first"
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def verdict(self, timeout: float) -> None:
        """Raise AuthenticationFailed as soon as a handshake fails; return once one worked, or after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.failure is None and not self.handshakes:
            left = deadline - loop.time()
            if left <= 0 or not await self._next_change(left):
                return  # no verdict yet (no server there): the request's own timeout and resends go on
        if self.failure is not None:
            raise self.failure

    def _cause(self, event: int) -> str:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the server at {self.address} refused this key: its operator must put this node's .key file "
                    "in the server's --allow-keys folder")
        if not self.curve:
            return (f"the handshake with {self.address} failed: that server requires CURVE; give --curve-key "
                    "(this node's .key_secret) and --server-key (the server's .key)")
        return (f"the CURVE handshake with {self.address} failed: --server-key is not that server's public key, "
                "or the server does not use CURVE")

    async def close(self) -> None:
        """Before the socket's context ends (it cannot end while the monitor socket is open)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._monitor is not None and self._socket is not None:
            if not self._socket.closed:
                self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
