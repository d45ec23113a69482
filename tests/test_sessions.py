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
from sparse_rt.wire.messages import Activations, ErrorReply, Gradients, Hello
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


def _infer(codec: str, lz4: bool, session: str, labels: torch.Tensor | None = None) -> Activations:
    return Activations(5, session, codec, lz4, 32, torch.tensor([0, 3]), torch.randn(2, 2, 4, 4), labels)


def test_an_inference_session_accepts_its_codec_and_its_hellos_codecs_and_nothing_else():
    table = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    hello = Hello(1, "digits_cnn", 32, 4, "fp32", False, "infer", codecs=("fp16", "int8+lz4"))
    session = table.open(b"peer", hello)
    assert session.codecs == {("fp16", False), ("int8", True)} and (session.codec, session.lz4) == ("fp32", False)
    for codec, lz4 in (("fp32", False), ("fp16", False), ("int8", True)):
        assert table.session_for(b"peer", _infer(codec, lz4, session.id)) is session
    for codec, lz4 in (("int8", False), ("fp16", True), ("fp32", True)):
        with pytest.raises(WireError) as refused:
            table.session_for(b"peer", _infer(codec, lz4, session.id))
        assert refused.value.code == "bad_codec"
        assert "accepts fp32, fp16, int8+lz4" in str(refused.value), str(refused.value)
    plain = table.open(b"peer", _hello("infer"))  # no codecs: exactly the old check and text
    with pytest.raises(WireError, match=r"session uses codec fp32 \(lz4 False\), message has fp16") as old:
        table.session_for(b"peer", _infer("fp16", False, plain.id))
    assert old.value.code == "bad_codec"


@pytest.mark.parametrize("codecs, mode, reason", [
    (("fp16",), "train", "codecs is for inference sessions; a training session keeps one codec"),
    (("fp16", "bf16"), "infer", "unknown codec 'bf16' in codecs ('bf16')"),
    (("fp16+lz4+lz4",), "infer", "unknown codec 'fp16+lz4' in codecs ('fp16+lz4+lz4')"),
    (("+lz4",), "infer", "unknown codec '' in codecs"),
])
def test_a_hello_with_bad_codecs_is_refused_with_the_reason(codecs, mode, reason):
    table = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    with pytest.raises(WireError) as refused:
        table.open(b"peer", Hello(1, "digits_cnn", 32, 4, "fp32", False, mode, codecs=codecs))
    assert refused.value.code == "handshake_refused" and reason in str(refused.value), str(refused.value)
    assert not table.sessions


def test_timing_and_codecs_are_settings_a_resumed_session_must_match():
    table = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    hello = Hello(1, "digits_cnn", 32, 4, "fp32", False, "infer", timing=True, codecs=("fp16", "int8+lz4"))
    session = table.open(b"peer", hello)
    assert session.timing and not table.open(b"peer", _hello("infer")).timing
    same = Hello(2, "digits_cnn", 32, 4, "fp32", False, "infer", resume=session.id, timing=True,
                 codecs=("int8+lz4", "fp16"))  # the same set in another order
    assert table.handshake(b"peer", same) == (session, True)
    untimed = Hello(3, "digits_cnn", 32, 4, "fp32", False, "infer", resume=session.id, codecs=("fp16", "int8+lz4"))
    fresh, resumed = table.handshake(b"peer", untimed)
    assert not resumed and fresh.id != session.id and session.id not in table.sessions  # other settings: it ends
    other = Hello(4, "digits_cnn", 32, 4, "fp32", False, "infer", resume=fresh.id, codecs=("fp16",))
    assert table.handshake(b"peer", other)[1] is False


def test_timing_and_codecs_survive_a_checkpoint_and_old_checkpoints_load():
    table = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    timed = table.open(b"peer", Hello(1, "digits_cnn", 32, 4, "fp32", False, "train", timing=True))
    switching = table.open(b"peer", Hello(2, "digits_cnn", 32, 4, "int8", True, "infer",
                                          codecs=("fp32", "fp16+lz4")))
    saved = table.snapshot()
    restored = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    restored.restore(saved)
    again = restored.sessions
    assert again[timed.id].timing and not again[timed.id].codecs
    assert again[switching.id].codecs == {("fp32", False), ("fp16", True)} and not again[switching.id].timing
    assert restored.session_for(b"peer", _infer("fp16", True, switching.id)) is again[switching.id]
    old = [{k: v for k, v in entry.items() if k not in ("timing", "codecs")} for entry in saved]
    legacy = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    legacy.restore(old)  # a checkpoint written before timing and codecs
    assert all(not s.timing and s.codecs == frozenset() for s in legacy.sessions.values())
