"""A link of limited rate and fixed delay, modelled inside the transport (when the kernel's netem is not at hand).

The model is a half-duplex link, such as Wi-Fi: one medium that carries one
message at a time, whichever way it goes. A message of ``n`` bytes (all its
frames) occupies the link for ``8 n / rate`` seconds, starting when the link is
free (FIFO after every message already reserved on it), and reaches the other
side ``delay`` seconds after its last bit left (the one-way delay, rtt / 2).
That is a token bucket one message deep: no burst ever goes faster than the rate.

One :class:`Shaper` is the link. Give the same one to both ends (the edge's
DEALER and the server's ROUTER, so both live in one process) and the two
directions share it; give each end its own to model a full-duplex link.

Each :class:`~sparse_rt.transport.connection.Shaped` layer gets a
:class:`ShapedSender`: ``send`` reserves the link and queues the frames, and
one task per connection hands them to ZeroMQ at their delivery time, in order.
The caller is not held up, as with a real socket's send buffer, unless
``queue_size`` messages are waiting (ZeroMQ's default high-water mark), the
point where a real socket would block too.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)


class Shaper:
    """One link: ``rate_bps`` bits per second, ``delay_s`` one way. Thread-safe; clock: ``time.monotonic``."""

    def __init__(self, rate_bps: float, delay_s: float = 0.0) -> None:
        if not (rate_bps > 0 and math.isfinite(rate_bps)):
            raise ValueError(f"a link's rate must be a positive number of bit/s, got {rate_bps}")
        if not (delay_s >= 0 and math.isfinite(delay_s)):
            raise ValueError(f"a link's one-way delay must be >= 0 s, got {delay_s}")
        self.rate_bps = float(rate_bps)
        self.delay_s = float(delay_s)
        self._free_at = 0.0  # monotonic time the last reserved message finishes serializing
        self._lock = threading.Lock()  # ends of one link may live in different threads' loops

    def reserve(self, nbytes: int, now: float | None = None) -> float:
        """Put ``nbytes`` on the link after what is already on it; returns when they arrive (monotonic s)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._free_at = max(now, self._free_at) + 8 * nbytes / self.rate_bps
            return self._free_at + self.delay_s

    def __repr__(self) -> str:
        return f"Shaper({self.rate_bps / 1e6:g} Mbit/s, {self.delay_s * 1e3:g} ms one way)"


class ShapedSender:
    """One connection's side of a link: frames wait here until the link has delivered them, then go to ZeroMQ."""

    def __init__(self, shaper: Shaper, send: Callable[[Any], Awaitable[Any]], queue_size: int = 1000) -> None:
        self.shaper = shaper
        self._send = send
        self._queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue(queue_size)  # binds its loop on first use
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def send(self, message: Any, nbytes: int) -> None:
        """Reserve the link for ``nbytes`` and queue ``message`` (the frames ZeroMQ gets, envelope included)."""
        if self._failure is not None:  # lost data is never silent: the next send reports it
            raise ConnectionError(f"a shaped send failed earlier: {self._failure!r}") from self._failure
        if self._task is None:  # created here, in the loop that sends
            self._task = asyncio.create_task(self._deliver(), name=f"shaped sender {self.shaper!r}")
        await self._queue.put((self.shaper.reserve(nbytes), message))

    async def _deliver(self) -> None:
        while True:
            arrives, message = await self._queue.get()
            wait = arrives - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self._send(message)
            except Exception as exc:
                log.error("a shaped message could not be handed to ZeroMQ: %r", exc)
                self._failure = exc
                return

    def close(self) -> None:
        """Stop delivering; messages still on the link are dropped, as ZeroMQ's linger=0 would drop them."""
        if self._task is not None:
            self._task.cancel()

