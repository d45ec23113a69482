"""The server's chain and driver over real ZeroMQ sockets: stages of one's own (trained, answering), which
thread runs what, modes that a caller's .eval() cannot leave behind, and a worker whose death is seen."""
from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio
from torch import nn

from pipelines.digits_cnn import pipeline as digits
from sparse_rt.assembly import server_chain
from sparse_rt.errors import ConfigError
from sparse_rt.metrics import MetricsLog
from sparse_rt.model.sides import build_sides
from sparse_rt.server import server as server_module
from sparse_rt.server.server import SplitServer
from sparse_rt.stages.base import Cut, Stage, StepContext
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.transport.connection import bind_router
from sparse_rt.wire import codecs
from sparse_rt.wire.messages import Activations, ErrorReply, Gradients, Hello, Predictions, Welcome, decode_message, \
    encode_message

BUDGET = 4


@contextlib.asynccontextmanager
async def serving(tmp_path, stages=(), train=True, **server_options):
    """A digits_cnn server with ``stages`` before its decompressor, and a raw DEALER with an open session."""
    torch.manual_seed(0)
    _, server_model, cut = build_sides(digits.build_model(), digits.cut, digits.input_shape, budget=BUDGET)
    optimizer = build_optimizer(server_model.parameters(), "adam", 1e-3) if train else None
    chain = server_chain(server_model, optimizer, stages=stages)
    context = zmq.asyncio.Context()
    address = f"ipc://{tmp_path}/server-{uuid.uuid4().hex[:8]}.sock"
    server = SplitServer(digits.name, chain, cut, digits.num_classes, bind_router(context, address), **server_options)
    task = asyncio.create_task(server.serve())
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    try:
        yield server, raw, cut, task
    finally:
        raw.close(linger=0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.connection.close()
        context.term()


async def ask(raw, message, timeout=10.0):
    await raw.send_multipart(encode_message(message))
    return decode_message(await asyncio.wait_for(raw.recv_multipart(), timeout))


async def open_session(raw, mode="train") -> str:
    welcome = await ask(raw, Hello(1, digits.name, 32, BUDGET, "fp32", False, mode))
    assert isinstance(welcome, Welcome), welcome
    return welcome.session


def batch(cut, session, step=0, n=8, labels=True, request_id=5):
    values = torch.randn(n, BUDGET, cut.sent_height, cut.sent_width)
    y = torch.randint(0, 10, (n,)) if labels else None
    return Activations(request_id, session, "fp32", False, cut.channels, torch.arange(BUDGET), values, y, step)


class Gate(Stage, nn.Module):
    """A trainable per-channel gain on the received values, before the decompressor."""

    name = "gate"

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.gain = nn.Parameter(torch.ones(BUDGET))

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        return Cut(cut.values * self.gain.view(1, -1, 1, 1), cut.indices)


async def test_a_trainable_stage_before_the_decompressor_is_trained_and_passes_the_gradient_on(tmp_path):
    gate = Gate()
    async with serving(tmp_path, stages=[gate]) as (server, raw, cut, _):
        session = await open_session(raw)
        for step in range(3):
            reply = await ask(raw, batch(cut, session, step))
            assert isinstance(reply, Gradients) and reply.values.abs().sum() > 0
    assert not torch.equal(gate.gain.detach(), torch.ones(BUDGET))  # the optimizer stepped it
    assert "gate" in dict(server.chain.module.named_children())


class AnswerFirstRow(Stage):
    """Answers row 0 of every batch itself with fixed logits (e.g. a cache hit)."""

    name = "cache"

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        n = cut.values.shape[0]
        done = torch.zeros(n, dtype=torch.bool)
        done[0] = True
        ctx.answer(done, torch.full((1, 10), 7.0), n)
        return Cut(cut.values[~done], cut.indices)


async def test_a_server_stage_answers_rows_in_inference_and_is_refused_in_training(tmp_path):
    async with serving(tmp_path, stages=[AnswerFirstRow()]) as (server, raw, cut, _):
        session = await open_session(raw)
        reply = await ask(raw, batch(cut, session, labels=False))
        assert isinstance(reply, Predictions) and reply.logits.shape == (8, 10)
        assert torch.equal(reply.logits[0], torch.full((10,), 7.0))
        assert not torch.equal(reply.logits[1], torch.full((10,), 7.0))
        refused = await ask(raw, batch(cut, session, labels=True))
        assert isinstance(refused, ErrorReply) and "only in inference" in refused.message
        assert server.stats.steps_applied == 0


async def test_a_chain_without_an_optimizer_refuses_training_sessions(tmp_path):
    async with serving(tmp_path, train=False) as (server, raw, cut, _):
        refused = await ask(raw, Hello(1, digits.name, 32, BUDGET, "fp32", False, "train"))
        assert isinstance(refused, ErrorReply) and refused.code == "handshake_refused"
        assert "inference only" in refused.message
        session = await open_session(raw, mode="infer")
        assert isinstance(await ask(raw, batch(cut, session, labels=False)), Predictions)


class SlowPerSample(Stage):
    """Costs time in proportion to the batch and notes which thread ran it."""

    name = "slow"

    def __init__(self, ms_per_sample: float) -> None:
        self.ms_per_sample = ms_per_sample
        self.threads: list[tuple[int, str]] = []

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        self.threads.append((cut.values.shape[0], threading.current_thread().name))
        time.sleep(self.ms_per_sample * cut.values.shape[0] / 1e3)
        return cut


async def test_small_cheap_steps_do_not_teach_the_server_to_run_a_big_step_on_its_loop(tmp_path, monkeypatch):
    # A wide margin on both sides of the line, so a loaded machine cannot blur it: 1-sample steps take a few
    # ms against a 50 ms line; the 64-sample step takes over 128 ms.
    monkeypatch.setattr(server_module, "INLINE_STEP_MS", 50.0)
    slow = SlowPerSample(ms_per_sample=2.0)
    async with serving(tmp_path, stages=[slow]) as (server, raw, cut, _):
        session = await open_session(raw)
        for step in range(20):  # 1-sample steps, learned as cheap
            assert isinstance(await ask(raw, batch(cut, session, step, n=1)), Gradients)
        assert isinstance(await ask(raw, batch(cut, session, 20, n=64)), Gradients)  # over 128 ms
    small = {thread for n, thread in slow.threads if n == 1}
    assert any(thread == threading.main_thread().name for thread in small), small  # the cheap ones ran inline
    assert [thread for n, thread in slow.threads if n == 64] != [threading.main_thread().name]


async def test_the_after_step_hook_runs_off_the_loop_after_the_reply(tmp_path):
    calls: list[tuple[int, str]] = []
    hook = lambda applied: calls.append((applied, threading.current_thread().name))  # noqa: E731
    async with serving(tmp_path, after_step=hook) as (server, raw, cut, _):
        session = await open_session(raw)
        for step in range(6):
            assert isinstance(await ask(raw, batch(cut, session, step, n=2)), Gradients)
        assert isinstance(await ask(raw, batch(cut, session, 5, n=2)), Gradients)  # a resend: not applied again
        await asyncio.sleep(0.2)
    assert [applied for applied, _ in calls] == [1, 2, 3, 4, 5, 6]
    assert all(thread != threading.main_thread().name for _, thread in calls)


async def test_a_failing_after_step_hook_does_not_stop_serving(tmp_path):
    def hook(applied: int) -> None:
        raise OSError("disk full")

    async with serving(tmp_path, after_step=hook) as (server, raw, cut, _):
        session = await open_session(raw)
        for step in range(3):
            assert isinstance(await ask(raw, batch(cut, session, step)), Gradients)
        assert server.stats.steps_applied == 3


class TrainingMode(Stage):
    name = "mode"

    def __init__(self, tail: nn.Module) -> None:
        self.tail = tail
        self.seen: list[bool] = []

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        self.seen.append(self.tail.training)
        return cut


async def test_a_callers_eval_of_the_tail_does_not_outlive_the_next_training_step(tmp_path):
    async with serving(tmp_path) as (server, raw, cut, _):
        probe = TrainingMode(server.chain.module["tail"])
        server.chain.stages.insert(0, probe)
        session = await open_session(raw)
        assert isinstance(await ask(raw, batch(cut, session, 0)), Gradients)
        server.chain.module["tail"].eval()  # e.g. an evaluation between steps that forgot to switch back
        assert isinstance(await ask(raw, batch(cut, session, 1)), Gradients)
        assert isinstance(await ask(raw, batch(cut, session, labels=False)), Predictions)
    assert probe.seen == [True, True, False]


class BrokenLog(MetricsLog):
    def __init__(self) -> None:
        super().__init__(None)

    def record(self, timer=None, **fields) -> None:
        raise RuntimeError("a bug in the worker")


async def test_a_worker_that_dies_ends_serve_with_its_error_instead_of_hanging(tmp_path):
    async with serving(tmp_path, metrics=BrokenLog()) as (server, raw, cut, task):
        session = await open_session(raw)
        await raw.send_multipart(encode_message(batch(cut, session, 0)))
        with pytest.raises(RuntimeError, match="a bug in the worker"):
            await asyncio.wait_for(asyncio.shield(task), 10)


def test_a_training_answer_on_the_server_is_a_config_error_without_sockets():
    torch.manual_seed(0)
    _, server_model, cut = build_sides(digits.build_model(), digits.cut, digits.input_shape, budget=BUDGET)
    chain = server_chain(server_model, build_optimizer(server_model.parameters(), "adam", 1e-3),
                         stages=[AnswerFirstRow()])
    ctx = StepContext("train", torch.zeros(8, dtype=torch.long), 0, "s")
    with pytest.raises(ConfigError, match="stage 'cache' answered rows of a training step"):
        chain.forward(Cut(torch.randn(8, BUDGET, cut.sent_height, cut.sent_width), torch.arange(BUDGET)), ctx)


class Sparse(codecs.Codec):
    """A codec of variable size (not a RawCodec): lz4 cannot wrap it."""

    name = "sparse-test"

    def encode(self, x):
        return codecs.get_codec("fp32").encode(x)

    def decode(self, buf, shape):
        return codecs.get_codec("fp32").decode(buf, shape)

    def max_packed_size(self, shape):
        return codecs.get_codec("fp32").max_packed_size(shape)


@pytest.mark.parametrize("fields", [dict(codec="sparse-test", lz4=True),
                                    dict(grad_codec="sparse-test", lz4=True),
                                    dict(grad_codec="sparse-test", grad_lz4=True)])
async def test_a_codec_lz4_cannot_wrap_is_refused_at_the_handshake_and_on_the_wire(tmp_path, monkeypatch, fields):
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))
    codecs.register_codec(Sparse)
    async with serving(tmp_path) as (server, raw, cut, _):
        hello = {"codec": "fp32", "lz4": False, "grad_codec": None, "grad_lz4": None, **fields}
        refused = await ask(raw, Hello(1, digits.name, 32, BUDGET, hello["codec"], hello["lz4"], "train", 0,
                                       hello["grad_codec"], hello["grad_lz4"]))
        assert isinstance(refused, ErrorReply) and refused.code == "handshake_refused"
        assert "lz4 wraps a fixed-size codec" in refused.message
        session = await open_session(raw)
        message = batch(cut, session)
        frames = encode_message(message)
        header = json.loads(bytes(frames[0]))
        header.update(codec="sparse-test", lz4=True)
        frames[0] = json.dumps(header).encode()
        await raw.send_multipart(frames)
        reply = decode_message(await asyncio.wait_for(raw.recv_multipart(), 10))
        assert isinstance(reply, ErrorReply) and reply.code == "bad_codec", reply


class Wide(codecs.RawCodec):
    """A codec of one's own that packs 8 bytes per value (say, a value and its error bound)."""

    name = "wide-test"

    def packed_size(self, shape):
        return 8 * math.prod(shape)

    def _pack(self, x):
        return np.repeat(x.reshape(-1), 2).view(np.uint8).data

    def _unpack(self, data, shape):
        return torch.from_numpy(np.frombuffer(data, "<f4")[::2].copy().reshape(shape))


def test_the_servers_frame_limit_fits_the_largest_registered_codec(monkeypatch):
    from sparse_rt.assembly import largest_frame

    _, _, cut = build_sides(digits.build_model(), digits.cut, digits.input_shape, budget=BUDGET)
    before = largest_frame(cut, 64)
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))
    codecs.register_codec(Wide)
    shape = (64, cut.channels, cut.sent_height, cut.sent_width)
    assert before < 8 * math.prod(shape) <= largest_frame(cut, 64)
