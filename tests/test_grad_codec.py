"""Per-direction codecs with the built-ins: activations up in one codec, gradients down in another."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
import torch

from pipelines.digits_cnn import pipeline as digits
from sparse_rt import SplitPair

EPOCHS = 4


@dataclass
class Run:
    accuracy: float
    up_per_step: float  # bytes the edge's socket sent per training step, headers included
    down_per_step: float


async def _train(codec: str, grad_codec: str | None) -> Run:
    torch.manual_seed(0)
    train, test = digits.load_data(0).loaders(digits.batch_size, 0)
    async with SplitPair.for_pipeline(digits, budget=8, codec=codec, grad_codec=grad_codec) as pair:
        sent, received = pair.traffic.bytes_sent, pair.traffic.bytes_received  # the handshake
        steps = 0
        for _ in range(EPOCHS):
            for x, y in train:
                await pair.train_step(x, y)
                steps += 1
        up, down = pair.traffic.bytes_sent - sent, pair.traffic.bytes_received - received
        return Run(await pair.evaluate(test), up / steps, down / steps)


@pytest.fixture(scope="module")
def fp32() -> Run:
    return asyncio.run(_train("fp32", None))


async def test_int8_up_and_fp16_down_train_at_a_quarter_and_half_the_bytes(fp32):
    mixed = await _train("int8", "fp16")
    assert mixed.accuracy >= 0.9 and fp32.accuracy >= 0.9
    # 64 samples x 8 channels x 4x4 per step: 32 KiB of fp32 data; int8 is 8 KiB + 8 scales, fp16 16 KiB.
    # Headers, indices and labels put a few hundred bytes on top of each: measured 0.256 up, 0.502 down.
    assert 0.25 < mixed.up_per_step / fp32.up_per_step < 0.28
    assert 0.49 < mixed.down_per_step / fp32.down_per_step < 0.52


async def test_without_grad_codec_the_gradients_come_in_the_activations_codec(fp32):
    same = await _train("fp16", None)
    assert 0.49 < same.up_per_step / fp32.up_per_step < 0.52
    assert 0.49 < same.down_per_step / fp32.down_per_step < 0.52
