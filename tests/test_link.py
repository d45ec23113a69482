"""RequestLink over real sockets: resends without a reply, and a late reply to an earlier try still counts."""
from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from sparse_rt.transport.connection import bind_router, connect_dealer
from sparse_rt.transport.link import RequestLink, ServerUnreachable
from sparse_rt.wire.header import encode_header


@pytest.fixture
async def sockets():
    context = zmq.asyncio.Context()
    server = bind_router(context, "tcp://127.0.0.1:*")
    address = server.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    link = RequestLink(connect_dealer(context, address), address, timeout=0.3, retries=2)
    yield server, link
    await link.close()
    server.close()
    context.term()


def _reply(request_id: int) -> list[bytes]:
    return [encode_header({"kind": "bye", "id": request_id, "session": "s"})]  # any valid reply


async def test_a_late_reply_to_the_first_try_answers_the_request(sockets):
    server, link = sockets

    async def slow_server() -> int:
        route, _ = await server.recv()
        await asyncio.sleep(0.45)  # past the first try's timeout: the edge resends meanwhile
        await server.send(_reply(1), route)
        _, again = await server.recv()  # the resend arrived; it is not answered
        return len(again)

    serving = asyncio.create_task(slow_server())
    header, _ = await link.request(1, [b"request"])
    assert header["id"] == 1 and header["session"] == "s"
    assert await serving == 1
    assert link.connection.traffic.messages_sent == 2


async def test_no_reply_after_every_try_is_a_clear_error(sockets):
    _, link = sockets
    with pytest.raises(ServerUnreachable, match="after 3 tries of 0.3 s"):
        await link.request(1, [b"request"])
    assert link.connection.traffic.messages_sent == 3
