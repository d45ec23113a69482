"""The server over real ZeroMQ sockets: handshakes, error replies, exactly-once steps, byte counts."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import torch
import zmq
import zmq.asyncio

from pipelines.digits_cnn import pipeline as digits
from sparse_rt.errors import RemoteError
from sparse_rt.model.sides import build_sides
from sparse_rt.edge.session import EdgeSession, SessionSettings
from sparse_rt.server.server import SplitServer
from sparse_rt.assembly import edge_chain, server_chain
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.transport.connection import bind_router, connect_dealer, frame_bytes
from sparse_rt.transport.link import RequestLink, ServerUnreachable
from sparse_rt.wire.header import PROTOCOL_VERSION
from sparse_rt.wire.messages import (Activations, Bye, ErrorReply, Gradients, Hello, Predictions, Welcome,
                                     decode_message, encode_message)


@pytest.fixture
async def served(tmp_path):
    """A digits_cnn server on an ipc:// socket, and a raw DEALER to poke it with."""
    torch.manual_seed(0)
    edge_model, server_model, cut = build_sides(digits.build_model(), digits.cut, digits.input_shape, budget=4)
    tail = server_chain(server_model, build_optimizer(server_model.parameters(), "adam", 1e-3))
    context = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/server-{uuid.uuid4().hex[:8]}.sock"
    server = SplitServer(digits.name, tail, cut, digits.num_classes, bind_router(context, address))
    task = asyncio.create_task(server.serve())
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    yield server, raw, edge_model, cut, context, address
    raw.close(linger=0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    server.connection.close()
    context.term()


async def _ask(raw, frames, timeout=10.0):
    await raw.send_multipart(frames)
    return decode_message(await asyncio.wait_for(raw.recv_multipart(), timeout))


async def _open(raw, budget=4, codec="fp32", mode="train", pipeline="digits_cnn", channels=32, resolution=0,
                grad_codec=None, grad_lz4=None, resume=None):
    return await _ask(raw, encode_message(Hello(1, pipeline, channels, budget, codec, False, mode, resolution,
                                                grad_codec, grad_lz4, resume)))


def _batch(cut, budget=4, n=8, step=0, session="", labels=True, request_id=5):
    values = torch.randn(n, budget, cut.sent_height, cut.sent_width)
    y = torch.randint(0, 10, (n,)) if labels else None
    return Activations(request_id, session, "fp32", False, cut.channels, torch.arange(budget), values, y, step)


@pytest.mark.parametrize("hello, reason", [
    (dict(pipeline="vgg11_cifar10"), "runs pipeline 'digits_cnn'"),
    (dict(channels=64), "has 32 channels"),
    (dict(budget=33, channels=32), "between 1 and 32"),
    (dict(codec="no-such-codec"), "unknown codec"),
    (dict(grad_codec="no-such-codec"), "unknown codec 'no-such-codec'"),
    (dict(resolution=2), "restores resolution r=0"),
])
async def test_mismatched_handshake_is_refused_with_the_reason(served, hello, reason):
    server, raw, *_ = served
    reply = await _open(raw, **hello)
    assert isinstance(reply, ErrorReply) and reply.code == "handshake_refused"
    assert reason in reply.message
    assert isinstance(await _open(raw), Welcome)  # still serving


async def test_training_step_and_inference_over_the_socket(served):
    server, raw, edge_model, cut, *_ = served
    session = (await _open(raw)).session
    request = _batch(cut, session=session)
    grad = await _ask(raw, encode_message(request))
    assert isinstance(grad, Gradients) and grad.id == request.id
    assert torch.equal(grad.indices, request.indices) and grad.values.shape == request.values.shape
    assert grad.values.abs().sum() > 0 and grad.loss > 0
    pred = await _ask(raw, encode_message(_batch(cut, session=session, labels=False)))
    assert isinstance(pred, Predictions) and pred.logits.shape == (8, 10)
    assert server.stats.steps_applied == 1 and server.stats.inferences == 1


async def test_gradients_travel_in_the_codec_the_handshake_chose_for_them(served):
    _, raw, _, cut, *_ = served
    session = (await _open(raw, grad_codec="fp16", grad_lz4=True)).session
    request = _batch(cut, session=session)  # activations in fp32, no lz4
    frames = encode_message(request)
    await raw.send_multipart(frames)
    reply = await asyncio.wait_for(raw.recv_multipart(), 10)
    grad = decode_message(reply)
    assert isinstance(grad, Gradients) and (grad.codec, grad.lz4) == ("fp16", True)
    assert json.loads(reply[0])["codec"] == "fp16"
    plain = (await _open(raw)).session  # without grad_codec the gradient comes as the activations do
    grad = await _ask(raw, encode_message(_batch(cut, session=plain)))
    assert (grad.codec, grad.lz4) == ("fp32", False)


async def test_a_resent_step_is_answered_again_but_applied_once(served):
    server, raw, _, cut, *_ = served
    session = (await _open(raw)).session
    request = _batch(cut, session=session, step=0)
    first = await _ask(raw, encode_message(request))
    weights = [p.detach().clone() for p in server.chain.module.parameters()]
    again = await _ask(raw, encode_message(request))
    assert server.stats.steps_applied == 1
    assert torch.equal(first.values, again.values)
    assert all(torch.equal(a, b) for a, b in zip(weights, server.chain.module.parameters()))
    following = await _ask(raw, encode_message(_batch(cut, session=session, step=1)))
    assert isinstance(following, Gradients) and server.stats.steps_applied == 2
    older = await _ask(raw, encode_message(_batch(cut, session=session, step=0)))
    assert isinstance(older, ErrorReply) and older.code == "stale_step"


async def test_bad_messages_get_error_replies_and_the_server_keeps_serving(served):
    server, raw, _, cut, *_ = served
    session = (await _open(raw)).session
    header = json.loads(bytes(encode_message(_batch(cut, session=session))[0]))
    cases = [
        ([b"not json"], "bad_header"),
        ([json.dumps({**header, "v": 99}).encode()], "bad_version"),
        (encode_message(_batch(cut, session="nobody")), "unknown_session"),
        (encode_message(_batch(cut, budget=5, session=session)), "bad_budget"),
        ([json.dumps({**header, "shape": [8, 4, 3, 3]}).encode(), *encode_message(_batch(cut, session=session))[1:]],
         "bad_message"),
        (encode_message(Activations(5, session, "fp32", False, 32, torch.arange(4), torch.randn(8, 4, 2, 2),
                                    torch.zeros(8, dtype=torch.long))), "bad_shape"),
        (encode_message(Activations(5, session, "fp32", False, 32, torch.arange(4), torch.randn(2, 4, 4, 4),
                                    torch.tensor([3, 12]))), "bad_labels"),
        (encode_message(Activations(5, session, "int8", False, 32, torch.arange(4), torch.randn(2, 4, 4, 4),
                                    torch.tensor([3, 1]))), "bad_codec"),
        (encode_message(Welcome(5, session, 32, 4, 4, 10, server.limits)), "bad_kind"),
    ]
    for frames, code in cases:
        reply = await _ask(raw, frames)
        assert isinstance(reply, ErrorReply), code
        assert reply.code == code, reply.message
    assert server.stats.errors == len(cases)
    assert isinstance(await _ask(raw, encode_message(_batch(cut, session=session))), Gradients)


async def test_an_error_echoing_long_escaped_text_still_fits_the_header_limit(served):
    _, raw, *_ = served
    hello = {"v": PROTOCOL_VERSION, "kind": "hello", "id": 3, "pipeline": "digits_cnn", "channels": 32, "budget": 4,
             "codec": "fp32", "lz4": False, "mode": "é" * 1500, "resolution": 0}  # 3 KB as UTF-8, 9 KB once \u-escaped
    reply = await _ask(raw, [json.dumps(hello, ensure_ascii=False).encode()])
    assert isinstance(reply, ErrorReply) and reply.code == "bad_header" and reply.id == 0
    assert isinstance(await _open(raw), Welcome)


async def test_the_welcome_states_the_cut_and_the_limits_a_client_must_keep(served):
    server, raw, _, cut, *_ = served
    welcome = await _open(raw)
    assert (welcome.channels, welcome.sent_height, welcome.sent_width, welcome.classes) == (
        cut.channels, cut.sent_height, cut.sent_width, digits.num_classes)
    assert (welcome.resumed, welcome.next_step) == (False, 0)
    assert welcome.limits["session_idle_s"] == server.table.idle_seconds
    assert welcome.limits["sessions_per_peer"] == server.table.max_per_owner


async def test_a_version_1_peer_is_refused_in_its_own_format(served):
    _, raw, *_ = served
    hello = {"v": 1, "kind": "hello", "id": 9, "pipeline": "digits_cnn", "channels": 32, "budget": 4,
             "codec": "fp32", "lz4": False, "mode": "train", "resolution": 0}
    await raw.send_multipart([json.dumps(hello).encode()])
    reply = json.loads((await asyncio.wait_for(raw.recv_multipart(), 10))[0])
    # A v1 client parses this as a plain v1 error on its own request, and reads why.
    assert reply == {"v": 1, "kind": "error", "id": 9, "code": "bad_version", "message": reply["message"]}
    assert f"speaks version {PROTOCOL_VERSION}" in reply["message"]


async def test_a_hello_resumes_its_own_session_at_the_next_step_and_nobody_elses(served):
    server, raw, _, cut, context, address = served
    session = (await _open(raw)).session
    for step in (0, 1, 2):
        assert isinstance(await _ask(raw, encode_message(_batch(cut, step=step, session=session))), Gradients)
    again = await _open(raw, resume=session)
    assert (again.session, again.resumed, again.next_step) == (session, True, 3)
    other = context.socket(zmq.DEALER)
    other.connect(address)
    try:
        stranger = await _open(other, resume=session)  # another connection: a new session, nothing said of it
        assert stranger.session != session and (stranger.resumed, stranger.next_step) == (False, 0)
    finally:
        other.close(linger=0)
    changed = await _open(raw, budget=8, resume=session)  # other settings: a new session, the old one ends
    assert changed.session != session and not changed.resumed and session not in server.sessions
    assert server.stats.steps_in_ended_sessions == 3


async def test_a_bye_ends_the_session_and_frees_its_stored_reply_at_once(served):
    server, raw, _, cut, *_ = served
    session = (await _open(raw)).session
    assert isinstance(await _ask(raw, encode_message(_batch(cut, session=session))), Gradients)
    assert server.sessions[session].last_reply is not None
    assert await _ask(raw, encode_message(Bye(6, session))) == Bye(6, session)
    assert session not in server.sessions and server.stats.sessions_closed == 1
    late = await _ask(raw, encode_message(_batch(cut, step=1, session=session)))
    assert isinstance(late, ErrorReply) and late.code == "unknown_session"
    twice = await _ask(raw, encode_message(Bye(7, session)))
    assert isinstance(twice, ErrorReply) and twice.code == "unknown_session"


async def test_an_inference_session_may_not_train(served):
    _, raw, _, cut, *_ = served
    session = (await _open(raw, mode="infer")).session
    reply = await _ask(raw, encode_message(_batch(cut, session=session)))
    assert isinstance(reply, ErrorReply) and reply.code == "wrong_mode"


def _edge(served, pipeline: str = "digits_cnn") -> tuple[EdgeSession, RequestLink]:
    _, _, edge_model, cut, context, address = served
    link = RequestLink(connect_dealer(context, address), address, timeout=10)
    chain = edge_chain(edge_model, build_optimizer(edge_model.parameters(), "adam", 1e-3))
    return EdgeSession(chain, link, SessionSettings(pipeline, cut.channels, 4)), link


async def test_bytes_are_counted_at_the_socket_per_direction(served):
    server = served[0]
    edge, link = _edge(served)
    try:
        await edge.open()
        await edge.train_step(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
        traffic = link.connection.traffic
        assert traffic.messages_sent == traffic.messages_received == 2
        assert traffic.bytes_sent == server.connection.traffic.bytes_received
        assert traffic.bytes_received == server.connection.traffic.bytes_sent
        hello = encode_message(Hello(1, "digits_cnn", 32, 4, "fp32", False, "train"))
        step_payload = 16 * 4 * 4 * 4 * 4  # N x B x h x w float32
        assert traffic.bytes_sent > frame_bytes(hello) + step_payload
        assert traffic.bytes_sent < frame_bytes(hello) + step_payload + 400  # headers, indices, labels
    finally:
        await link.close()
        edge.close()


async def test_a_refused_request_raises_remote_error_on_the_edge(served):
    edge, link = _edge(served, pipeline="other_pipeline")
    try:
        with pytest.raises(RemoteError, match="handshake_refused"):
            await edge.open()
    finally:
        await link.close()
        edge.close()


async def test_an_edge_without_a_server_fails_after_its_timeout(tmp_path):
    context = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/nobody.sock"
    link = RequestLink(connect_dealer(context, address), address, timeout=0.3)
    try:
        with pytest.raises(ServerUnreachable, match="no reply from the server"):
            await link.request(1, encode_message(Hello(1, "digits_cnn", 32, 4, "fp32", False, "train")))
    finally:
        await link.close()
        context.term()
