"""The compression module: exact top-B, exact resolution restore, the prune loss, and a filter that learns."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparse_rt.model.compression import (Compressor, Decompressor, PruneLossWeights, annealed_exploration,
                                         prune_loss, top_budget)


def test_top_budget_breaks_ties_by_lower_index_and_never_exceeds_budget():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9, 0.1])
    assert top_budget(scores, 3).tolist() == [0, 1, 4]
    assert top_budget(torch.zeros(10), 4).tolist() == [0, 1, 2, 3]
    for budget in range(1, 7):
        assert len(top_budget(scores, budget)) == budget


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("budget", [1, 3, 16])
def test_compressor_sends_exactly_budget_channels_scaled_by_the_filter(training, budget):
    torch.manual_seed(0)
    compressor = Compressor(16, budget).train(training)
    x = torch.randn(5, 16, 6, 6)
    values, indices = compressor(x)
    assert values.shape == (5, budget, 6, 6)
    assert indices.shape == (budget,) and len(set(indices.tolist())) == budget
    assert torch.all(indices[1:] > indices[:-1])
    f = compressor.filter_values()
    torch.testing.assert_close(values, x[:, indices] * f[indices].view(1, -1, 1, 1))


def test_evaluation_selection_is_the_exact_top_budget_of_the_filter():
    compressor = Compressor(8, 3).eval()
    with torch.no_grad():
        compressor.filter_logits.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0, 2.0, -5.0, 1.0, 2.0]))
    assert compressor.select().tolist() == [1, 3, 4]
    assert compressor.select().tolist() == [1, 3, 4]  # deterministic


def test_filter_starts_even_with_sum_equal_to_budget():
    compressor = Compressor(32, 4)
    f = compressor.filter_values()
    assert torch.allclose(f, f[0].expand_as(f))
    assert math.isclose(float(f.sum().detach()), 4.0, rel_tol=1e-5)


def test_prune_loss_matches_the_paper_formula_and_stays_finite_far_from_budget():
    w = PruneLossWeights(delta=0.5, lam=2.0, epsilon=0.1)
    f = torch.tensor([0.2, 0.9, 0.7])
    s = float(f.sum().detach())
    expected = 0.1 * (math.exp(0.5 * (s - 1)) + 2.0 * math.exp(-0.5 * (s - 1)))
    assert math.isclose(float(prune_loss(f, 1, w)), expected, rel_tol=1e-6)
    far = torch.ones(4096, requires_grad=True)
    loss = prune_loss(far, 1, w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(far.grad).all() and far.grad[0] > 0


def test_budget_out_of_range_is_refused_with_the_range():
    with pytest.raises(ValueError, match="between 1 and 8"):
        Compressor(8, 9)


@pytest.mark.parametrize("resolution", [1, 2, 3])
@pytest.mark.parametrize("size", [(8, 8), (32, 32), (7, 9), (14, 14)])
def test_decompressor_restores_the_exact_resolution(resolution, size):
    height, width = size
    compressor = Compressor(6, 2, resolution=resolution)
    decompressor = Decompressor(6, height, width, resolution=resolution)
    values, indices = compressor(torch.randn(2, 6, height, width))
    assert values.shape[2:] == compressor.output_size(height, width)
    assert values.shape[2] < height or resolution == 1
    assert decompressor(values, indices).shape == (2, 6, height, width)


def test_decompressor_scatters_sent_channels_and_zeros_the_rest():
    decompressor = Decompressor(5, 2, 2)
    values = torch.arange(8.0).view(1, 2, 2, 2)
    full = decompressor(values, torch.tensor([1, 3]))
    assert full.shape == (1, 5, 2, 2)
    torch.testing.assert_close(full[:, [1, 3]], values)
    assert full[:, [0, 2, 4]].abs().sum() == 0


def _learn_filter(seed: int, channels: int = 32, budget: int = 4, steps: int = 300) -> tuple[set[int], set[int], float]:
    """Train on data whose label lives only in ``budget`` known channels at the cut; the rest is noise.

    The noise is harmless (small), so nothing but the task can tell the
    channels apart: a filter frozen by its start would keep its first pick.
    """
    generator = torch.Generator().manual_seed(seed)
    informative = torch.randperm(channels, generator=generator)[:budget]
    classes, size = 4, 4
    templates = torch.randn(classes, budget, size, size, generator=generator)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=generator)
        x = 0.3 * torch.randn(n, channels, size, size, generator=generator)
        x[:, informative] = templates[y] + 1.5 * torch.randn(n, budget, size, size, generator=generator)
        return x, y

    torch.manual_seed(seed)
    compressor = Compressor(channels, budget)
    decompressor = Decompressor(channels, size, size)
    tail = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, 32), nn.ReLU(), nn.Linear(32, classes))
    params = [*compressor.parameters(), *decompressor.parameters(), *tail.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for step in range(steps):
        compressor.exploration = annealed_exploration(step / steps)
        x, y = batch(64)
        loss = nn.functional.cross_entropy(tail(decompressor(*compressor(x))), y) + compressor.prune_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    compressor.eval()
    x, y = batch(512)
    with torch.no_grad():
        accuracy = float((tail(decompressor(*compressor(x))).argmax(1) == y).float().mean())
    return set(compressor.select().tolist()), set(informative.tolist()), accuracy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filter_learns_which_channels_carry_the_label(seed):
    # By chance, 4 channels drawn from 32 hit all 4 informative ones with
    # probability 1 / C(32, 4) = 1 / 35960; the expected overlap is 0.5.
    chosen, informative, accuracy = _learn_filter(seed)
    assert chosen == informative
    assert accuracy > 0.95


def test_a_constant_exploration_set_by_the_user_survives_a_budget_change():
    compressor = Compressor(32, 4)
    assert not compressor.schedule.is_constant  # the default anneal
    compressor.exploration = 0.5
    compressor.budget = 8
    assert compressor.exploration == 0.5 and compressor.schedule.is_constant
    compressor.exploration = 0.0
    compressor.budget = 2
    assert compressor.exploration == 0.0
