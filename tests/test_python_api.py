"""The Python API trains like the CLI: a user's own loop over SplitPair explores and anneals the same way."""
from __future__ import annotations

import pytest
import torch

import sparse_rt
from pipelines.digits_cnn import pipeline as digits
from sparse_rt.model.compression import DEFAULT_TRIES, Compressor, Exploration, annealed_exploration


async def _readme_loop(seed: int) -> float:
    """The README's loop, as a user writes it: no schedule, no exploration settings."""
    torch.manual_seed(seed)
    train, test = digits.load_data(seed).loaders(64, seed)
    async with sparse_rt.SplitPair.for_pipeline(digits, budget=4) as pair:
        for _ in range(10):
            for images, labels in train:
                await pair.train_step(images, labels)
        return await pair.evaluate(test)


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_a_plain_loop_at_budget_4_of_32_trains_like_the_cli(seed):
    # Before the compressor owned its exploration this loop reached 0.79 / 0.50 / 0.90 (constant
    # temperature); `sparse-rt run digits_cnn --budget 4` reaches 0.98-0.99.
    assert await _readme_loop(seed) >= 0.97


def test_without_a_schedule_the_draw_anneals_over_its_tries():
    compressor = Compressor(32, 4)
    steps = DEFAULT_TRIES * 32 // 4
    temperatures = []
    for _ in range(steps + 2):
        temperatures.append(compressor.exploration)
        compressor.select()  # a training draw advances the anneal
    assert temperatures[0] == 1.0 and temperatures[steps // 2] == pytest.approx(0.5)
    assert temperatures[steps:] == [0.0, 0.0]
    assert all(a >= b for a, b in zip(temperatures, temperatures[1:]))
    compressor.eval()
    compressor.select()  # evaluation draws nothing and does not advance
    compressor.budget = 8  # a new budget anneals anew
    assert compressor.exploration == 1.0


def test_a_schedule_holds_each_epochs_temperature_as_the_cli_always_did():
    compressor = Compressor(32, 4)
    steps_per_epoch, epochs = 23, 10
    for epoch in range(epochs):
        compressor.schedule_phase(4, "none", True, epochs * steps_per_epoch, hold=steps_per_epoch,
                                  position=epoch * steps_per_epoch)
        seen = set()
        for _ in range(steps_per_epoch):
            seen.add(compressor.exploration)
            compressor.select()
        assert len(seen) == 1 and seen.pop() == pytest.approx(annealed_exploration(epoch / epochs))
    compressor.schedule_phase(32, "none", True, 100)  # full budget: nothing to choose, no noise
    assert compressor.exploration == 0.0


def test_a_constant_temperature_can_still_be_set():
    compressor = Compressor(32, 4)
    compressor.exploration = 0.3
    for _ in range(500):
        compressor.select()
    assert compressor.exploration == 0.3
    assert Exploration.default(32, 32).temperature() == 0.0
