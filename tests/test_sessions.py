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


# ---- cuts: a session starts at one, a request may name another the server holds ----------------------------

BLOCK2 = CutShape(64, 2, 2, 2, 2)


def _two_cuts(**options) -> SessionTable:
    """A model set at block1 (budgets 8, 32) and block2 (budgets 8, 64), block1 its default."""
    return SessionTable(ServedCut("digits_cnn", CUT, 10, 0, frozenset({8, 32}), trains=False, name="block1",
                                  cuts={"block2": BLOCK2}, cut_budgets={"block2": frozenset({8, 64})}), **options)


def _at(session: str, cut: str | None, channels: int, budget: int, side: int, labels=None) -> Activations:
    return Activations(5, session, "fp32", False, channels, torch.arange(budget), torch.randn(2, budget, side, side),
                       labels, cut=cut)


def test_a_model_set_with_two_cuts_checks_each_request_against_its_own_cut():
    table = _two_cuts()
    session = table.open(b"peer", Hello(1, "digits_cnn", 32, 8, "fp32", False, "infer"))
    assert session.cut == "block1"  # no cut in the hello: the default
    for request in (_at(session.id, None, 32, 8, 4), _at(session.id, "block1", 32, 32, 4),
                    _at(session.id, "block2", 64, 8, 2), _at(session.id, "block2", 64, 64, 2)):
        assert table.session_for(b"peer", request) is session
    refusals = [
        (_at(session.id, "block3", 64, 8, 2), "bad_cut", "cut 'block3' is not served here; this server serves "
                                                         "block1, block2"),
        (_at(session.id, "block2", 64, 32, 2), "bad_budget", "budget 32 is not in this model set at cut 'block2'; "
                                                             "it holds 8, 64"),
        (_at(session.id, "block2", 32, 8, 2), "bad_budget", "of 64 channels, got 8 of 32"),
        (_at(session.id, "block2", 64, 8, 4), "bad_shape", "expected channels of 2x2"),
        (_at(session.id, None, 32, 64, 4), "bad_budget", "budget 64 is not in this model set at cut 'block1'"),
    ]
    for request, code, text in refusals:
        with pytest.raises(WireError) as refused:
            table.session_for(b"peer", request)
        assert refused.value.code == code and text in str(refused.value), str(refused.value)


def test_a_hello_opens_at_a_held_cut_only_and_resuming_compares_the_cut():
    table = _two_cuts()
    at_block2 = table.open(b"peer", Hello(1, "digits_cnn", 64, 8, "fp32", False, "infer", cut="block2"))
    assert at_block2.cut == "block2" and table.served.shape(at_block2.cut) == BLOCK2
    assert table.session_for(b"peer", _at(at_block2.id, None, 64, 8, 2)) is at_block2  # its requests: block2's
    with pytest.raises(WireError, match="this server serves block1, block2") as unknown:
        table.open(b"peer", Hello(2, "digits_cnn", 32, 8, "fp32", False, "infer", cut="block9"))
    assert unknown.value.code == "handshake_refused"
    with pytest.raises(WireError, match="budget 32 is not in this model set at cut 'block2'; it holds 8, 64"):
        table.open(b"peer", Hello(3, "digits_cnn", 64, 32, "fp32", False, "infer", cut="block2"))
    hidden = _two_cuts(reveal=False)  # a server open to strangers says nothing about its model
    with pytest.raises(WireError, match=r"^handshake refused \(the server's log says why\)$"):
        hidden.open(b"peer", Hello(4, "digits_cnn", 32, 8, "fp32", False, "infer", cut="block9"))

    default = table.open(b"peer", Hello(5, "digits_cnn", 32, 8, "fp32", False, "infer"))
    named = Hello(6, "digits_cnn", 32, 8, "fp32", False, "infer", resume=default.id, cut="block1")
    assert table.handshake(b"peer", named) == (default, True)  # the default cut, named or not
    elsewhere = Hello(7, "digits_cnn", 64, 8, "fp32", False, "infer", resume=default.id, cut="block2")
    fresh, resumed = table.handshake(b"peer", elsewhere)
    assert not resumed and fresh.cut == "block2" and default.id not in table.sessions


def test_a_server_with_one_cut_accepts_its_own_name_only_and_a_training_step_its_sessions_cut():
    named = SessionTable(ServedCut("digits_cnn", CUT, 10, 0, name="block1"))
    session = named.open(b"peer", Hello(1, "digits_cnn", 32, 4, "fp32", False, "train", cut="block1"))
    labels = torch.tensor([1, 2])
    assert named.session_for(b"peer", _at(session.id, "block1", 32, 4, 4, labels)) is session
    with pytest.raises(WireError, match="this server serves block1$") as other:
        named.session_for(b"peer", _at(session.id, "block2", 64, 4, 2))
    assert other.value.code == "bad_cut"
    with pytest.raises(WireError, match="cut 'block2' is not served here; this server serves block1$") as hello:
        named.open(b"peer", Hello(2, "digits_cnn", 64, 4, "fp32", False, "train", cut="block2"))
    assert hello.value.code == "handshake_refused"

    unnamed = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))
    plain = unnamed.open(b"peer", _hello())
    with pytest.raises(WireError, match="this server does not name its cut: leave cut out") as any_cut:
        unnamed.session_for(b"peer", _at(plain.id, "block1", 32, 4, 4))
    assert any_cut.value.code == "bad_cut"
    with pytest.raises(WireError, match="does not name its cut"):
        unnamed.open(b"peer", Hello(2, "digits_cnn", 32, 4, "fp32", False, "train", cut="block1"))

    # a server that trains at two cuts (none in sparse-rt does; the rule holds anyway): a step keeps its session's
    both = SessionTable(ServedCut("digits_cnn", CUT, 10, 0, name="block1", cuts={"block2": BLOCK2}))
    training = both.open(b"peer", _hello())
    with pytest.raises(WireError, match="trains at cut 'block1', this step is cut at 'block2'") as moved:
        both.session_for(b"peer", _at(training.id, "block2", 64, 4, 2, labels))
    assert moved.value.code == "bad_cut"
    assert both.session_for(b"peer", _at(training.id, "block2", 64, 4, 2)) is training  # inference may


def test_the_cut_survives_a_checkpoint_and_old_checkpoints_load_at_the_default_cut():
    table = _two_cuts()
    session = table.open(b"peer", Hello(1, "digits_cnn", 64, 8, "fp32", False, "infer", cut="block2"))
    saved = table.snapshot()
    restored = _two_cuts()
    restored.restore(saved)
    assert restored.sessions[session.id].cut == "block2"
    legacy = _two_cuts()
    legacy.restore([{k: v for k, v in entry.items() if k != "cut"} for entry in saved])
    assert legacy.sessions[session.id].cut == "block1"


def test_a_restored_session_at_a_cut_no_longer_served_is_dropped_with_a_warning(caplog):
    table = _two_cuts()
    kept = table.open(b"peer", Hello(1, "digits_cnn", 32, 8, "fp32", False, "infer"))
    gone = table.open(b"peer", Hello(2, "digits_cnn", 64, 8, "fp32", False, "infer", cut="block2"))
    saved = table.snapshot()
    # The server came back with a set that holds block1 only: block2's session could not answer a single request.
    one_cut = SessionTable(ServedCut("digits_cnn", CUT, 10, 0, frozenset({8, 32}), trains=False, name="block1"))
    with caplog.at_level("INFO", logger="sparse_rt.server"):
        one_cut.restore(saved)
    assert set(one_cut.sessions) == {kept.id}
    assert one_cut.session_for(b"peer", _at(kept.id, None, 32, 8, 4)) is one_cut.sessions[kept.id]
    lines = [record.getMessage() for record in caplog.records if record.name == "sparse_rt.server"]
    assert any(f"dropped session {gone.id}" in line and "cut 'block2' is not served here" in line
               for line in lines), lines
    assert "restored 1 session(s) from the checkpoint" in lines
    warnings = [record for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and gone.id in warnings[0].getMessage()
    with pytest.raises(WireError) as unknown:  # its edge is told so, and opens a new session
        one_cut.session_for(b"peer", _at(gone.id, None, 64, 8, 2))
    assert unknown.value.code == "unknown_session"

    unnamed = SessionTable(ServedCut("digits_cnn", CUT, 10, 0))  # a server that names no cut drops a named one
    unnamed.restore([entry for entry in saved if entry["id"] == kept.id])
    assert unnamed.sessions == {}
