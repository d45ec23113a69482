"""No message can make the shared tail non-finite: a step is applied whole or not at all, over real sockets."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.digits_cnn import pipeline as digits
from sparse_rt.stages.base import Cut, Stage, StepContext
from sparse_rt.wire.messages import Activations, ErrorReply, Hello
from tests.test_server_chain import ask, batch, open_session, serving

HUGE = 3e38  # finite float32, so decoding lets it through


def _state(server) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in server.chain.module.state_dict().items()}


def _same(before: dict[str, torch.Tensor], server) -> bool:
    after = server.chain.module.state_dict()
    return all(torch.equal(before[name], after[name]) for name in before)


def _huge(cut, session, step=0, labels=True):
    message = batch(cut, session, step, labels=labels)
    message.values = torch.full_like(message.values, HUGE)
    return message


class Norm(Stage, nn.Module):
    """A trainable batch norm on the received values: its running statistics change in the forward."""

    name = "norm"

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        return Cut(self.norm(cut.values), cut.indices)


async def test_a_finite_but_huge_step_is_refused_and_changes_nothing_not_even_batch_norm(tmp_path):
    async with serving(tmp_path, stages=[Norm()]) as (server, raw, cut, _):
        session = await open_session(raw)
        before = _state(server)
        refused = await ask(raw, _huge(cut, session, 0))
        assert refused.code == "bad_step" and "nothing applied" in refused.message, refused
        assert _same(before, server) and not server.chain.optimizer.optimizer.state  # no Adam moments either
        assert server.stats.steps_applied == 0 and server.chain.optimizer.guard.refused == 1
        applied = await ask(raw, batch(cut, session, 0))  # the same step number, now with sane values
        assert applied.values.isfinite().all() and server.stats.steps_applied == 1
        after_one = _state(server)
        assert (await ask(raw, _huge(cut, session, 1))).code == "bad_step"
        assert _same(after_one, server)  # the optimizer's existing state is put back too
        logits = (await ask(raw, batch(cut, session, labels=False))).logits
        assert logits.isfinite().all()


async def test_an_inference_whose_output_is_not_finite_is_refused_not_sent(tmp_path):
    async with serving(tmp_path) as (server, raw, cut, _):
        welcome = await ask(raw, Hello(1, digits.name, 32, 32, "fp32", False, "infer"))
        values = torch.full((8, 32, cut.sent_height, cut.sent_width), HUGE)  # all 32 channels: the tail overflows
        message = Activations(5, welcome.session, "fp32", False, 32, torch.arange(32), values)
        reply = await ask(raw, message)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_output", reply


async def test_a_gradient_norm_above_the_servers_bound_is_refused(tmp_path):
    async with serving(tmp_path) as (server, raw, cut, _):
        server.chain.optimizer.guard.max_grad_norm = 1e-6
        session = await open_session(raw)
        before = _state(server)
        reply = await ask(raw, batch(cut, session, 0))
        assert reply.code == "bad_step" and "above this server's bound" in reply.message
        assert _same(before, server)


async def test_a_peers_learning_rate_factor_is_capped_by_the_server(tmp_path):
    async with serving(tmp_path) as (server, raw, cut, _):
        optimizer = server.chain.optimizer
        base = optimizer.lr_scale.base[0]
        session = await open_session(raw)
        message = batch(cut, session, 0)
        message.lr_scale = 100.0  # the protocol's largest
        await ask(raw, message)
        assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(base * optimizer.max_lr_scale)
        assert optimizer.max_lr_scale == 10.0 and math.isfinite(base)
