"""Serving a model set: one tail per budget on the server, heads switched on the edge without reconnecting."""
from __future__ import annotations

import json

import pytest
import torch

from sparse_rt.data.datasets import load_digits
from sparse_rt.errors import ConfigError, RemoteError
from sparse_rt.edge.client import EdgeClient


async def _accuracy(edge: EdgeClient) -> float:
    data = load_digits(seed=0)
    _, test_loader = data.loaders(64, 0)
    return await edge.evaluate(test_loader)


async def test_each_budget_is_served_by_its_own_model_without_reconnecting(model_set, served_set):
    manifest = json.loads((model_set / "manifest.json").read_text())
    recorded = {model["budget"]: model["test_accuracy"] for model in manifest["models"]}
    async with EdgeClient("digits_cnn", served_set, model_set=model_set) as edge:
        session = edge.session.session_id
        for budget in (32, 8, 2):
            edge.set_budget(budget)
            assert await _accuracy(edge) == pytest.approx(recorded[budget], abs=1e-9)
            assert edge.session.session_id == session
            assert edge.settings.budget == edge.session.settings.budget == budget  # what a reconnect proposes
            assert edge.optimizer is edge.chain.optimizer.optimizer
        with pytest.raises(ConfigError, match="holds 2, 8, 32"):
            edge.set_budget(16)


async def test_a_budget_the_set_does_not_hold_is_refused_with_the_held_ones(model_set, served_set):
    with pytest.raises(RemoteError, match="budget 4 is not in this model set; it holds 2, 8, 32"):
        async with EdgeClient("digits_cnn", served_set, budget=4) as edge:
            await edge.infer(torch.zeros(2, 1, 8, 8))
    async with EdgeClient("digits_cnn", served_set, model_set=model_set, budget=8) as edge:
        edge.edge_model.compressor.budget = 4  # an edge that sends a budget the set lacks
        with pytest.raises(RemoteError, match="bad_budget.*holds 2, 8, 32"):
            await edge.infer(torch.zeros(2, 1, 8, 8))


def test_a_model_set_server_refuses_training(model_set, served_set):
    import asyncio

    async def train_session() -> None:
        async with EdgeClient("digits_cnn", served_set, mode="train", budget=8):
            pass

    with pytest.raises(RemoteError, match="inference only"):
        asyncio.run(train_session())


async def test_pipelined_predictions_match_one_request_at_a_time_in_order(model_set, served_set):
    x = load_digits(seed=0).x_test[:320]
    chunks = list(x.split(64))
    async with EdgeClient("digits_cnn", served_set, model_set=model_set, budget=8) as edge:
        one_by_one = [await edge.infer(chunk) for chunk in chunks]
        for inflight in (1, 3, 8):
            pipelined = [logits async for logits in edge.infer_many(chunks, inflight=inflight)]
            assert len(pipelined) == len(chunks)
            for a, b in zip(pipelined, one_by_one):
                assert torch.allclose(a, b, atol=1e-6)
        with pytest.raises(ValueError, match="inflight"):
            [logits async for logits in edge.infer_many(chunks, inflight=0)]


def test_the_blocking_client_pipelines_predictions_too(model_set, served_set):
    from sparse_rt.edge.client import SyncEdgeClient

    chunks = list(load_digits(seed=0).x_test[:192].split(64))
    with SyncEdgeClient("digits_cnn", served_set, model_set=model_set, budget=2) as edge:
        expected = [edge.infer(chunk) for chunk in chunks]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(edge.infer_many(chunks), expected))
