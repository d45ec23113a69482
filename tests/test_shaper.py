"""The token-bucket link shaper over real sockets: rate, delay, order, half-duplex sharing, unshaped unaffected."""
from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from sparse_rt.transport.connection import Connection, Shaped, bind_router, connect_dealer
from sparse_rt.transport.shaper import Shaper


def test_reserve_is_fifo_serialization_plus_delay():
    link = Shaper(8e6, delay_s=0.005)  # 1 byte per microsecond
    assert link.reserve(1000, now=10.0) == pytest.approx(10.0 + 0.001 + 0.005)
    # Queued behind the first message, not overlapping it.
    assert link.reserve(2000, now=10.0) == pytest.approx(10.0 + 0.003 + 0.005)
    # An idle link starts at once.
    assert link.reserve(1000, now=20.0) == pytest.approx(20.0 + 0.001 + 0.005)


@pytest.mark.parametrize("rate, delay", [(0, 0.0), (-1, 0.0), (float("inf"), 0.0), (1e6, -0.001)])
def test_bad_link_settings_are_refused(rate, delay):
    with pytest.raises(ValueError, match="rate|delay"):
        Shaper(rate, delay)


async def _pair(shaper_up: Shaper | None, shaper_down: Shaper | None) -> tuple[zmq.asyncio.Context, Connection,
                                                                               Connection]:
    context = zmq.asyncio.Context()
    server = bind_router(context, "tcp://127.0.0.1:*", shaper=shaper_down)
    address = server.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    edge = connect_dealer(context, address, shaper=shaper_up)
    await edge.send([b"hi"])  # connect and learn the edge's routing id, outside the timed part
    return context, edge, server


def _close(context: zmq.asyncio.Context, *connections: Connection) -> None:
    for connection in connections:
        connection.close()
    context.term()


async def _edge_route(server: Connection) -> bytes:
    route, _ = await server.recv()
    assert route is not None
    return route


def test_big_messages_flow_at_the_link_rate():
    async def main() -> float:
        link = Shaper(40e6, delay_s=0.002)
        context, edge, server = await _pair(link, None)
        try:
            await _edge_route(server)
            payload = bytes(256 * 1024)
            count = 12
            started = time.monotonic()
            for _ in range(count):
                await edge.send([b"h", payload])
            for _ in range(count):
                await server.recv()
            elapsed = time.monotonic() - started
            expected = count * (len(payload) + 1) * 8 / link.rate_bps + link.delay_s
            return elapsed / expected
        finally:
            _close(context, edge, server)

    assert 0.95 <= asyncio.run(main()) <= 1.10


def test_a_small_message_takes_the_one_way_delay():
    async def main() -> list[float]:
        link = Shaper(1e9, delay_s=0.020)  # rtt 40 ms
        context, edge, server = await _pair(link, link)
        try:
            await _edge_route(server)
            times = []
            for _ in range(3):
                started = time.monotonic()
                await edge.send([b"x" * 100])
                await server.recv()
                times.append(time.monotonic() - started)
            return times
        finally:
            _close(context, edge, server)

    times = asyncio.run(main())
    assert min(times) >= 0.019, times
    assert sorted(times)[1] <= 0.035, times  # the median: a busy machine may delay one wake-up


def test_order_is_kept_and_sends_do_not_wait_for_the_link():
    async def main() -> tuple[list[int], float, float]:
        link = Shaper(8e6, delay_s=0.001)  # 1 MB/s
        context, edge, server = await _pair(link, None)
        try:
            await _edge_route(server)
            started = time.monotonic()
            for i in range(40):  # sizes vary, so a later small message would overtake if order broke
                await edge.send([i.to_bytes(2, "little"), bytes(20_000 if i % 2 == 0 else 10)])
            queued = time.monotonic() - started
            seen = []
            for _ in range(40):
                _, frames = await server.recv()
                seen.append(int.from_bytes(frames[0].bytes, "little"))
            return seen, queued, time.monotonic() - started
        finally:
            _close(context, edge, server)

    seen, queued, total = asyncio.run(main())
    assert seen == list(range(40))
    assert queued < 0.1  # 0.4 s of link time was reserved, but the caller was not held up
    assert total >= 0.39


def test_one_shaper_on_both_ends_is_half_duplex():
    """Up and down share the link: two messages crossing at once take the sum of their times, not the max."""
    async def main() -> float:
        link = Shaper(16e6, delay_s=0.0)  # 2 MB/s
        context, edge, server = await _pair(link, link)
        try:
            route = await _edge_route(server)
            payload = bytes(200_000)  # 0.1 s each way
            started = time.monotonic()
            await edge.send([payload])
            await server.send([payload], route)
            await asyncio.gather(server.recv(), edge.recv())
            return time.monotonic() - started
        finally:
            _close(context, edge, server)

    assert 0.19 <= asyncio.run(main()) <= 0.25


def test_an_unshaped_connection_is_untouched():
    async def main() -> tuple[float, bool]:
        busy = Shaper(1e6, delay_s=0.05)  # a slow shaped pair, busy while the plain one runs
        context, slow_edge, slow_server = await _pair(busy, busy)
        context2, edge, server = await _pair(None, None)
        try:
            await _edge_route(slow_server)
            route = await _edge_route(server)
            await slow_edge.send([bytes(100_000)])  # 0.8 s on the slow link
            started = time.monotonic()
            for _ in range(20):
                await edge.send([b"ping"])
                await server.recv()
                await server.send([b"pong"], route)
                await edge.recv()
            return (time.monotonic() - started) / 20, not isinstance(edge.inner, Shaped) and not isinstance(server.inner, Shaped)
        finally:
            _close(context, slow_edge, slow_server)
            _close(context2, edge, server)

    round_trip, plain = asyncio.run(main())
    assert plain
    assert round_trip < 0.01
