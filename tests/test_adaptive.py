"""Adaptive inference against a real server process over a shaped link: the estimate and the controller's switches."""
from __future__ import annotations

import json
import threading

import pytest
import torch
import zmq

from sparse_rt.data.datasets import load_digits
from sparse_rt.edge.client import EdgeClient, SyncEdgeClient
from sparse_rt.edge.controller import Choice, Decision, Option
from sparse_rt.errors import ConfigError
from sparse_rt.transport.shaper import Shaper
from sparse_rt.wire.header import encode_header

BATCH = 16  # digits at the cut: 32 channels of 4x4, 2 KiB a sample in fp32 at full budget


def _images(count: int) -> list[torch.Tensor]:
    x = load_digits(seed=0).x_test
    return [x[(i * BATCH) % (len(x) - BATCH):][:BATCH] for i in range(count)]


async def test_the_estimate_follows_a_shaped_link_and_tells_the_server_apart(model_set, served_set):
    shaper = Shaper(2e6, 0.010)  # the edge's sends: 2 Mbit/s, 10 ms on the way; 32 KiB take 131 ms
    async with EdgeClient("digits_cnn", served_set, model_set=model_set, budget=32, shaper=shaper,
                          deadline_ms=10_000, adapt_codecs=("fp32",)) as edge:
        edge.policy.options = [o for o in edge.policy.options if o.choice == Choice(32)]  # always 32 KiB
        estimate = edge.session.estimate
        for x in _images(6):
            await edge.infer(x)
        assert 5 <= estimate.rtt_ms <= 100, estimate.snapshot()
        assert estimate.rate_bps == pytest.approx(2e6, rel=0.3), estimate.snapshot()
        assert estimate.server_ms is not None and 0 < estimate.server_ms < 500, estimate.snapshot()
        slow = estimate.rate_bps
        shaper.rate_bps = 8e6  # four times faster: followed within a few requests, not averaged in slowly
        for _ in range(3):
            await edge.infer(_images(1)[0])
        assert estimate.changes >= 1, estimate.snapshot()
        assert estimate.rate_bps > 2.5 * slow, estimate.snapshot()


async def test_a_drop_in_rate_changes_the_choice_within_five_requests_without_a_new_session(model_set, served_set):
    shaper = Shaper(50e6, 0.005)
    deadline = 60.0
    async with EdgeClient("digits_cnn", served_set, model_set=model_set, shaper=shaper, deadline_ms=deadline) as edge:
        session = edge.session.session_id
        fast = []
        for x in _images(8):
            await edge.infer(x)
            fast.append(edge.last_decision)
        assert fast[-1].choice == Choice(32, "fp32") and fast[-1].meets  # 32 KiB in 5 ms: the best model
        shaper.rate_bps = 1e6  # 32 KiB now takes 262 ms: only a few channels, or fewer bits, fit in 60 ms
        slow, latencies = [], []
        for x in _images(12):
            logits = await edge.infer(x)
            assert logits.shape == (BATCH, 10) and torch.isfinite(logits).all()
            slow.append(edge.last_decision)
            latencies.append(edge.last_latency_ms)
        changed = next(i for i, d in enumerate(slow) if d.choice != Choice(32, "fp32"))
        assert changed < 5, [d.choice.label for d in slow]
        settled = slow[-4:]
        assert all(d.meets and d.option.bytes_per_sample * BATCH * 8 / 1e6 * 1e3 < deadline for d in settled), \
            [d.choice.label for d in settled]
        assert sum(ms < deadline for ms in latencies[-4:]) >= 3, latencies
        assert all(d.choice != Choice(32, "fp32") for d in settled)
        assert edge.session.session_id == session  # every switch on the one session: no reconnect, no hello


class Alternate:
    """A policy of one's own: budget 8, switching codec every request."""

    def __init__(self, options: list[Option]) -> None:
        self.options, self.calls, self.seen = options, 0, []

    def choose(self, estimate, samples: int) -> Decision:
        self.calls += 1
        return Decision(self.options[self.calls % len(self.options)], None, True, 100.0)

    def observed(self, decision: Decision, total_ms: float, network_ms: float | None) -> None:
        self.seen.append((decision.choice, total_ms, network_ms))


async def test_a_policy_of_ones_own_is_asked_per_request_and_every_codec_it_picks_is_served(model_set, served_set):
    options = [Option(Choice(8, codec), 0.9, 0.0) for codec in ("fp32", "fp16", "int8")]
    policy = Alternate(options)
    async with EdgeClient("digits_cnn", served_set, model_set=model_set, policy=policy) as edge:
        assert set(edge.settings.codecs) == {"fp16", "int8"} and edge.settings.timing
        x = _images(1)[0]
        outputs = [await edge.infer(x) for _ in range(6)]
    assert [choice.codec for choice, _, _ in policy.seen] == ["fp16", "int8", "fp32"] * 2
    assert all(network is not None and 0 <= network <= total for _, total, network in policy.seen)
    reference = outputs[2]  # fp32; the same images in fp16 and int8 give nearly the same answers
    assert all(torch.allclose(out.softmax(1), reference.softmax(1), atol=0.05) for out in outputs)
    assert torch.equal(outputs[5], reference)


def test_a_deadline_needs_a_model_set_and_a_byte_cap_needs_a_deadline():
    with pytest.raises(ConfigError, match="model set"):
        EdgeClient("digits_cnn", "tcp://127.0.0.1:1", deadline_ms=50)
    with pytest.raises(ConfigError, match="deadline_ms"):
        EdgeClient("digits_cnn", "tcp://127.0.0.1:1", max_bytes_per_s=1e6)


def test_an_edge_node_serves_with_a_deadline_from_the_command_line(start, model_set, served_set, tmp_path):
    metrics = tmp_path / "edge.jsonl"
    edge = start("edge", connect=served_set, mode="infer", models=model_set, deadline_ms=200, metrics=metrics,
                 json=True)
    summary = edge.result(timeout=120)
    assert summary["test_accuracy"] >= 0.85  # the model set's budgets are 0.88-0.97 accurate on digits
    log = "".join(edge.log)
    assert "deadline 200 ms met by" in log, log
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    chosen = [r for r in records if r["kind"] == "infer"]
    assert chosen and all("choice" in r and "rtt_ms" in r and "predicted_ms" in r for r in chosen)
    assert {r["choice"] for r in chosen} <= {f"{b}/{c}" for b in (32, 8, 2) for c in ("fp32", "fp16", "int8")}


def test_the_blocking_client_chooses_per_request_too(model_set, served_set):
    with SyncEdgeClient("digits_cnn", served_set, model_set=model_set, deadline_ms=200) as edge:
        for x in _images(3):
            assert edge.infer(x).shape == (BATCH, 10)
        assert edge.last_decision is not None and edge.last_latency_ms > 0


def test_a_server_that_predates_timing_and_codecs_gets_a_clear_error(model_set):
    """An older v2 server (here a plain ROUTER answering as one would) refuses the new hello fields."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer_like_an_old_server() -> None:
        route, header = router.recv_multipart()
        request_id = json.loads(header)["id"]
        router.send_multipart([route, encode_header({"kind": "error", "id": request_id, "code": "bad_header",
                                                     "message": "'hello' header has unknown field(s) timing, codecs"})])

    old_server = threading.Thread(target=answer_like_an_old_server)
    old_server.start()
    try:
        with pytest.raises(ConfigError, match="predates the handshake's timing and codecs"):
            SyncEdgeClient("digits_cnn", f"tcp://127.0.0.1:{port}", model_set=model_set, deadline_ms=50, retries=0)
    finally:
        old_server.join(timeout=10)
        router.close(linger=0)
        context.term()
