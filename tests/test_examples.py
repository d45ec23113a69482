"""Every example in examples/ runs and shows what it says: real sockets, real training, a real server process."""
from __future__ import annotations

import functools
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from sparse_rt import SplitPair, get_pipeline
from sparse_rt.data.datasets import TensorSplit
from sparse_rt.errors import ConfigError, RemoteError, WireError
from sparse_rt.stages.base import Cut, Stage, StepContext
from sparse_rt.wire import codecs
from sparse_rt.wire.codecs import codec_names, get_codec
from sparse_rt.wire.messages import ErrorReply

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIGITS = get_pipeline("digits_cnn")


@functools.cache
def digits_data() -> TensorSplit:
    return DIGITS.load_data(0)  # the examples' split (seed 0)


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """examples/NAME.py imported afresh under its own name (examples/ is not a package), for this test only."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


# -- early_exit.py: an edge stage that answers confident rows itself ---------------------------------


def test_early_exit_answers_most_digits_on_the_device_and_sends_fewer_bytes(monkeypatch):
    example = load_example("early_exit", monkeypatch)
    result = example.main([])  # 8 epochs, threshold 0.9, 8 of 32 channels
    # Measured on seeds 0-3: accuracy 0.953-0.992, 80-86% answered on the device, about 100 B against 514 B.
    assert result.accuracy >= 0.9
    assert abs(result.accuracy - result.accuracy_without_exit) <= 0.03  # the server's rows land in their places
    assert result.on_device > 0.3
    assert result.bytes_up_per_sample < 0.8 * result.bytes_up_per_sample_without_exit
    assert result.confident_batch > 0 and result.confident_batch_bytes == 0  # it never reached the network


async def test_an_early_exit_that_answers_everything_sends_nothing_and_returns_its_own_logits(monkeypatch):
    example = load_example("early_exit", monkeypatch)
    torch.manual_seed(0)
    early_exit = example.ConfidenceExit(32, 10, threshold=0.0)  # every row is confident enough
    x = digits_data().x_test[:16]
    async with SplitPair.for_pipeline(DIGITS, budget=4, edge_stages=[early_exit]) as pair:
        hello = pair.traffic.bytes_sent, pair.traffic.messages_sent
        logits = await pair.infer(x)
        assert (pair.traffic.bytes_sent, pair.traffic.messages_sent) == hello  # only the handshake ever left
        with torch.inference_mode():
            expected = early_exit.classifier(pair.edge_model.head(x))
        torch.testing.assert_close(logits, expected)
        early_exit.threshold = math.inf  # now every row goes to the server
        sent = pair.traffic.bytes_sent
        assert (await pair.infer(x)).shape == (16, 10) and pair.traffic.bytes_sent > sent


# -- audit_stage.py: a server stage that records and refuses ------------------------------------------


async def test_audit_counts_every_step_and_refuses_a_hostile_one_without_touching_the_tail(monkeypatch):
    example = load_example("audit_stage", monkeypatch)
    async with example.trained_pair(epochs=3) as trained:
        pair, audit = trained.pair, trained.audit
        assert trained.accuracy >= 0.9  # 0.964 / 0.972 / 0.958 measured on seeds 0-2
        own = audit.sessions[pair.session.session_id]
        train_samples, test_samples = len(digits_data().y_train), len(digits_data().y_test)
        assert own.steps == pair.session.steps == pair.server.stats.steps_applied
        assert own.samples == 3 * train_samples + test_samples and own.refused == 0
        assert 0 < own.abs_max < audit.bound

        tail_before = {name: value.clone() for name, value in pair.server_model.state_dict().items()}
        reply = await example.raw_step(pair, scale=1e6)
        assert isinstance(reply, ErrorReply) and reply.code == example.REFUSED, reply
        assert "beyond this server's bound" in reply.message
        tail_after = pair.server_model.state_dict()
        assert all(torch.equal(tail_before[name], tail_after[name]) for name in tail_before)
        assert pair.server.stats.steps_applied == own.steps
        (hostile,) = [record for session, record in audit.sessions.items() if session != pair.session.session_id]
        assert (hostile.refused, hostile.steps, hostile.samples) == (1, 0, 0)

        x, y = next(iter(trained.test))  # and the server keeps serving: training and inference
        await pair.train_step(x, y)
        assert own.steps == pair.server.stats.steps_applied == pair.session.steps
        assert await pair.evaluate(trained.test) >= 0.9


async def test_a_step_within_the_bound_from_a_raw_socket_is_applied(monkeypatch):
    example = load_example("audit_stage", monkeypatch)
    async with example.trained_pair(epochs=1) as trained:
        reply = await example.raw_step(trained.pair, scale=0.5)  # within the bound: an ordinary step
        assert type(reply).__name__ == "Gradients"
        assert trained.pair.server.stats.steps_applied == trained.pair.session.steps + 1


# -- custom_compressor.py: a compressor of one's own ------------------------------------------------


def test_a_fixed_random_choice_of_8_of_32_channels_trains_digits(monkeypatch):
    example = load_example("custom_compressor", monkeypatch)
    result = example.main(["--epochs", "10", "--budget", "8"])
    assert result.accuracy >= 0.95  # 0.983 / 0.992 / 0.986 measured on seeds 0-2
    assert len(result.channels) == 8


class Received(Stage):
    """Server stage: the shape and channel indices of every batch that reached the server."""

    name = "received"

    def __init__(self) -> None:
        self.batches: list[tuple[tuple[int, ...], list[int]]] = []

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        self.batches.append((tuple(cut.values.shape), cut.indices.tolist()))
        return cut


async def test_exactly_the_compressors_channels_cross_the_socket(monkeypatch):
    example = load_example("custom_compressor", monkeypatch)
    compressor, received = example.RandomChannels(32, 8, seed=3), Received()
    x, y = digits_data().x_train, digits_data().y_train
    async with SplitPair.for_pipeline(DIGITS, compressor=compressor, server_stages=[received]) as pair:
        assert pair.budget == 8
        await pair.train_step(x[:16], y[:16])
        sizes = []
        for n in (10, 20):  # headers of the same length; the values frames differ by 10 samples' channels
            sent = pair.traffic.bytes_sent
            await pair.infer(x[:n])
            sizes.append(pair.traffic.bytes_sent - sent)
    assert sizes[1] - sizes[0] == 10 * 8 * 4 * 4 * 4  # 8 channels of 4x4 float32 per sample, nothing more
    chosen = compressor.chosen.tolist()
    assert received.batches == [((16, 8, 4, 4), chosen), ((10, 8, 4, 4), chosen), ((20, 8, 4, 4), chosen)]


def test_a_compressor_that_does_not_fit_the_cut_is_refused_at_construction(monkeypatch):
    example = load_example("custom_compressor", monkeypatch)
    with pytest.raises(ConfigError, match="channels"):
        SplitPair.for_pipeline(DIGITS, compressor=example.RandomChannels(64, 8))
    with pytest.raises(ConfigError, match="resolution"):
        SplitPair.for_pipeline(DIGITS, compressor=example.RandomChannels(32, 8), resolution=2)


# -- custom_codec.py: a codec of one's own, end to end ---------------------------------------------


@pytest.fixture
def custom_codec(monkeypatch):
    """The example imported afresh: its codec registers into a copy of the registry, gone after the test."""
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))
    return load_example("custom_codec", monkeypatch)


def test_bf16_is_registered_by_importing_the_example(custom_codec):
    assert codec_names()[-1] == "bf16" and codec_names()[:3] == ("fp32", "fp16", "int8")
    assert get_codec("bf16").max_packed_size((64, 8, 4, 4)) == 2 * 64 * 8 * 16


@pytest.mark.parametrize("lz4", [False, True])
@pytest.mark.parametrize("shape", [(0,), (0, 8, 4, 4), (), (3,), (64, 8, 4, 4)])
def test_bf16_round_trip_within_its_precision(custom_codec, shape, lz4):
    codec = get_codec("bf16", lz4)
    x = torch.randn(shape) * 10
    buf = codec.encode(x)
    assert lz4 or memoryview(buf).nbytes == 2 * x.numel()
    y = codec.decode(buf, shape)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=2.0 ** -8, atol=0.0)  # round to nearest: half an 8-bit mantissa's ulp


def test_bf16_zeros_are_exact_and_float32_range_stays_finite(custom_codec):
    codec = get_codec("bf16")
    zeros = torch.zeros(4, 8, 4, 4)
    assert torch.equal(codec.decode(codec.encode(zeros), zeros.shape), zeros)
    extremes = torch.tensor([3.4028235e38, -3.4028235e38, 1e-38, 65504.0 * 1000])
    out = codec.decode(codec.encode(extremes), (4,))
    assert torch.isfinite(out).all()  # fp16 would clamp 6.5e7; bf16 keeps it within 0.4%
    torch.testing.assert_close(out[2:], extremes[2:], rtol=2.0 ** -8, atol=0.0)


def test_bf16_refuses_bad_bytes(custom_codec):
    codec = get_codec("bf16")
    with pytest.raises(WireError, match=r"bf16 data for shape \(2, 3\) must be 12 bytes, got 10"):
        codec.decode(bytes(10), (2, 3))
    nan = np.array([0x7FC0, 0x3F80], "<u2").tobytes()  # bfloat16 NaN, then 1.0
    with pytest.raises(WireError, match="NaN/inf"):
        codec.decode(nan, (2,))


def test_a_server_that_loads_the_examples_pipeline_trains_with_bf16_up_and_fp32_down(custom_codec):
    result, server = custom_codec.main(["--epochs", "3"])  # starts a server node process and stops it
    assert result.accuracy >= 0.9  # 0.961 measured
    assert server["steps_applied"] == result.steps > 0 and server["errors"] == 0
    # 8 channels of 4x4 per sample: 256 B of bf16 up, 512 B of fp32 down (plus headers and labels)
    assert 256 < result.bytes_up_per_sample < 256 * 1.1
    assert 512 < result.bytes_down_per_sample < 512 * 1.05


async def test_a_server_that_never_imported_the_codec_refuses_the_handshake(custom_codec):
    server = custom_codec.server_node("digits_cnn")  # the registered pipeline: bf16 is unknown there
    try:
        address = server.wait_ready()
        edge = custom_codec.EdgeClient(custom_codec.pipeline, address, mode="train", codec="bf16",
                                       grad_codec="fp32")
        with pytest.raises(RemoteError) as refused:
            await edge.connect()
        assert refused.value.code == "handshake_refused"
        assert "unknown codec 'bf16'; this server knows fp32, fp16, int8" in refused.value.reason
    finally:
        server.stop()
        summary = server.result(timeout=60)
    assert summary["sessions_opened"] == 0 and summary["errors"] == 1
