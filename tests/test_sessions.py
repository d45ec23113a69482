"""Sessions with a lifetime: caps per peer and in total, idle expiry that frees stored replies, over real sockets."""
from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
import torch
import zmq

from sparse_rt.errors import WireError
from sparse_rt.model.sides import CutShape
from sparse_rt.server.sessions import ServedCut, SessionTable
from sparse_rt.wire.messages import ErrorReply, Gradients, Hello
from tests.test_server_chain import ask, batch, open_session, serving

CUT = CutShape(32, 4, 4, 4, 4)


def _hello(mode: str = "train") -> Hello:
    return Hello(1, "digits_cnn", 32, 4, "fp32", False, mode)


def test_no_peer_and_not_all_of_them_can_grow_the_table_without_bound():
    table = SessionTable(ServedCut("digits_cnn", CUT, 10, 0), max_sessions=8, max_per_owner=4)
    for _ in range(4):
        table.open(b"peer 1", _hello())
    with pytest.raises(WireError, match=r"this peer holds its most sessions \(4\)") as one:
        table.open(b"peer 1", _hello())
    for _ in range(4):
        table.open(b"peer 2", _hello())
    with pytest.raises(WireError, match=r"the server holds its most sessions \(8\)") as full:
        table.open(b"peer 3", _hello())
    assert one.value.code == full.value.code == "busy"
    idle = list(table.sessions)[:3]
    for sid in idle:
        table.sessions[sid].last_seen -= table.idle_seconds + 1
    table.open(b"peer 3", _hello())  # a full table makes room by ending idle sessions first
    assert len(table.sessions) == 6 and not set(idle) & set(table.sessions)
    assert table.stats.sessions_expired == 3


async def test_an_idle_session_expires_with_its_stored_reply_and_says_so(tmp_path):
    async with serving(tmp_path, session_idle=0.4) as (server, raw, cut, _):
        session = await open_session(raw)
        reply = await ask(raw, batch(cut, session, 0))
        assert isinstance(reply, Gradients)
        stored = weakref.ref(server.sessions[session].last_reply)
        await asyncio.sleep(1.0)  # expiry runs every idle/4 s
        assert session not in server.sessions and server.stats.sessions_expired == 1
        gc.collect()
        assert stored() is None  # the reply (the gradient tensor) is freed with the session
        late = await ask(raw, batch(cut, session, 1))
        assert isinstance(late, ErrorReply) and late.code == "unknown_session" and "expired" in late.message
        assert server.stats.steps_in_ended_sessions == 1 and session not in server.stats.steps_per_session


async def test_many_short_sessions_leave_nothing_behind_once_expired(tmp_path):
    async with serving(tmp_path, session_idle=0.5, max_sessions=4096) as (server, raw, cut, _):
        server.table.max_per_owner = 300  # one socket stands for 300 short-lived edges here
        replies = []
        for number in range(300):
            session = await open_session(raw)
            assert isinstance(await ask(raw, batch(cut, session, 0)), Gradients)
            replies.append(weakref.ref(server.sessions[session].last_reply.values))
        assert len(server.sessions) <= 300
        await asyncio.sleep(1.5)
        gc.collect()
        assert not server.sessions and not server.stats.steps_per_session
        assert sum(ref() is not None for ref in replies) == 0
        assert server.stats.sessions_expired == 300 and server.stats.steps_in_ended_sessions == 300


async def test_an_edge_whose_session_expired_opens_a_new_one_and_goes_on(tmp_path):
    from pipelines.digits_cnn import pipeline as digits
    from sparse_rt import EdgeClient

    async with serving(tmp_path, session_idle=0.3) as (server, raw, cut, _):
        address = server.connection.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        async with EdgeClient(digits, address, mode="train", budget=4, timeout=10, retries=0) as edge:
            x, y = torch.randn(16, *digits.input_shape), torch.randint(0, 10, (16,))
            await edge.train_step(x, y)
            first = edge.session.session_id
            await asyncio.sleep(1.0)  # idle: the server ends the session
            assert first not in server.sessions
            loss = await edge.train_step(x, y)  # refused as unknown, reopened, sent again: applied
            assert loss == loss and edge.session.session_id != first and edge.session.steps == 2
            assert server.stats.steps_per_session[edge.session.session_id] == 1
