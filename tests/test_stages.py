"""The stage engine without sockets: protocol state, chain rules, early answers, and training on the edge alone."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparse_rt
from pipelines.digits_cnn import pipeline as digits
from sparse_rt.assembly import edge_chain
from sparse_rt.edge.protocol import EdgeProtocol, SessionSettings
from sparse_rt.errors import ConfigError, WireError
from sparse_rt.model.sides import CutShape, build_sides
from sparse_rt.server.sessions import ServedCut, SessionTable
from sparse_rt.stages.base import Stage, StepContext
from sparse_rt.stages.chain import EdgeChain
from sparse_rt.stages.codec import CodecStage
from sparse_rt.stages.compressor import CompressorStage
from sparse_rt.wire.messages import Activations, Bye, Hello, Welcome

CUT = CutShape(32, 4, 4, 4, 4)


def _table() -> SessionTable:
    return SessionTable(ServedCut("digits_cnn", CUT, 10, 0))


def _step(session: str, step: int, budget: int = 4, labels: bool = True) -> Activations:
    y = torch.randint(0, 10, (8,)) if labels else None
    return Activations(7, session, "fp32", False, 32, torch.arange(budget), torch.randn(8, budget, 4, 4), y, step)


def test_the_session_table_applies_each_step_once_without_any_socket():
    table = _table()
    session = table.open(b"edge-a", Hello(1, "digits_cnn", 32, 4, "fp32", False, "train"))
    assert table.session_for(b"edge-a", _step(session.id, 0)) is session
    assert table.replay(session, _step(session.id, 0)) is None  # new: to be applied
    table.applied(session, 0, reply := Bye(0, session.id))  # any reply with an id stands in for a grad
    assert table.replay(session, _step(session.id, 0)) is reply and reply.id == 7  # resent: answered again, its id
    table.applied(session, 3, Bye(0, session.id))  # steps need not be consecutive
    with pytest.raises(WireError) as stale:
        table.replay(session, _step(session.id, 1))
    assert stale.value.code == "stale_step"
    with pytest.raises(WireError) as other:
        table.session_for(b"edge-b", _step(session.id, 4))  # another connection may not use it
    assert other.value.code == "unknown_session"
    with pytest.raises(WireError) as wide:
        table.session_for(b"edge-a", _step(session.id, 4, budget=5))
    assert wide.value.code == "bad_budget"
    assert table.stats.steps_applied == 2 and table.stats.sessions_opened == 1


def test_the_edge_protocol_numbers_steps_only_when_applied():
    protocol = EdgeProtocol(SessionSettings("digits_cnn", 32, 4, grad_codec="fp16"))
    hello = protocol.hello(1)
    assert (hello.grad_codec, hello.grad_lz4) == ("fp16", None)  # left out: the server's default applies
    session = _table().open(b"edge", hello)
    assert (session.grad_codec, session.grad_lz4) == ("fp16", False)  # lz4 as the activations: off
    with pytest.raises(RuntimeError, match="handshake"):
        protocol.context("train", 2)
    protocol.opened(Welcome(1, "abc", 32, 4, 4, 10, {}))
    assert protocol.context("train", 2).step == 0
    protocol.applied()
    ctx = protocol.context("train", 3)
    assert (ctx.step, ctx.session, ctx.meta["request_id"]) == (1, "abc", 3)
    assert protocol.context("infer", 4).step == 0


def test_a_chain_is_refused_without_exactly_one_compressor():
    edge, _, _ = build_sides(digits.build_model(), digits.cut, digits.input_shape, budget=4)
    with pytest.raises(ConfigError, match="exactly one CompressorStage"):
        EdgeChain([edge.head, CodecStage()])
    with pytest.raises(ConfigError, match="after the compressor"):
        EdgeChain([CompressorStage(edge.compressor), edge.head])
    with pytest.raises(ConfigError, match="unknown codec 'no-such'"):
        CodecStage("no-such")
    chain = edge_chain(edge, torch.optim.Adam)
    assert set(chain.module.state_dict()) == set(edge.state_dict())  # checkpoints keep their keys


class AnswerAll(Stage, nn.Module):
    """Answers every row itself; in training it also trains its own classifier."""

    name = "all"

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x, ctx: StepContext):
        logits = self.classifier(x)
        if ctx.training:
            ctx.add_loss(F.cross_entropy(logits, ctx.labels))
        ctx.answer(torch.ones(len(x), dtype=torch.bool), logits, len(x))
        return x[:0]


async def test_a_batch_answered_whole_on_the_edge_sends_nothing_but_still_trains_there():
    torch.manual_seed(0)
    stage = AnswerAll()
    async with sparse_rt.SplitPair.for_pipeline(digits, budget=4, edge_stages=[stage]) as pair:
        before = [p.detach().clone() for p in stage.parameters()]
        sent = pair.traffic.bytes_sent
        x, y = torch.randn(8, *digits.input_shape), torch.randint(0, 10, (8,))
        assert math.isnan(await pair.train_step(x, y))  # no server loss: the server never saw it
        logits = await pair.infer(x)
        assert pair.traffic.bytes_sent == sent and pair.session.steps == 0
        assert any(not torch.equal(a, b) for a, b in zip(before, stage.parameters()))
        with torch.no_grad():
            assert torch.allclose(logits, stage.classifier(pair.edge_model.head(x)), atol=1e-6)


class AnswerSome(Stage):
    """Answers every row of odd batches and the first half of even ones itself (constant logits)."""

    name = "some"

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, x, ctx: StepContext):
        self.calls += 1
        done = torch.arange(len(x)) < (len(x) if self.calls % 2 == 0 else len(x) // 2)
        ctx.answer(done, torch.zeros(int(done.sum()), 10), len(x))
        return x[~done]


async def test_the_epoch_loss_is_over_the_rows_the_server_trained_on():
    from sparse_rt.train.loop import train
    from sparse_rt.train.schedules import fixed

    torch.manual_seed(0)
    x, y = torch.randn(32, *digits.input_shape), torch.randint(0, 10, (32,))
    loader = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    losses = []
    async with sparse_rt.SplitPair.for_pipeline(digits, budget=4, edge_stages=[AnswerSome()]) as pair:
        original = pair.session.train_step

        async def step(x, y, data_ms=None):
            losses.append((await original(x, y, data_ms), pair.session.rows_sent))
            return losses[-1][0]

        pair.session.train_step = step
        result = await train(pair.session, loader, fixed(4, 1), samples_per_epoch=32, progress=False)
    assert [rows for _, rows in losses] == [4, 0, 4, 0]
    assert math.isnan(losses[1][0]) and math.isnan(losses[3][0])  # nothing sent: no server loss
    assert result.loss == pytest.approx((losses[0][0] + losses[2][0]) / 2)  # over the rows the server got


def test_a_wrapped_head_has_the_checkpoint_keys_of_a_plain_one():
    from sparse_rt.assembly import edge_side
    from sparse_rt.stages.head import HeadStage

    model, _ = edge_side(digits, 0, 4, 0)
    plain = EdgeChain([model.head, CompressorStage(model.compressor)])
    wrapped = EdgeChain([HeadStage(model.head), CompressorStage(model.compressor)])
    assert list(wrapped.module.state_dict()) == list(plain.module.state_dict()) == list(model.state_dict())
