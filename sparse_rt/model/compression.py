"""The learned compression at the cut (Mudvari et al., 2023, section 3.1).

The edge's :class:`Compressor` optionally lowers the resolution of the cut
activation, multiplies every channel by a learned filter value
``f = sigmoid(f_hat)`` and keeps exactly the ``budget`` channels with the
largest ``f``. Only those channels leave the edge. The server's
:class:`Decompressor` scatters them back into ``channels`` maps (the others
are zero) and restores the exact input resolution.

Two flaws of the published code are avoided here:

* The budget never leaks through ties: selection is an exact top-B with a
  deterministic tie-break (lower channel index wins), never more than B.
* The filter really learns which channels matter. A channel that is never
  sent gets no task gradient, so a deterministic top-B keeps whatever its
  initialisation picked. While training, the selection is therefore drawn
  by Gumbel-top-B on the filter logits (sampling B channels without
  replacement from ``softmax(f_hat)``): every channel is tried now and then,
  the ones that help the task get their ``f`` raised, and as the logits
  separate the draw settles on them. The draw's temperature is annealed to 0
  (:class:`Exploration`, owned by the compressor so that every way of
  training explores alike), so head and tail then specialise on one fixed
  choice. A schedule anneals over the first quarter of each phase; a loop
  that says nothing anneals over the steps in which each channel is drawn
  about :data:`DEFAULT_TRIES` times. Measured (20 epochs of
  cifar_cnn at 2 of 64 channels, test accuracy): annealed over the first
  quarter 0.437 / 0.463 / 0.424 (seeds 0-2), over the first half 0.331 /
  0.265, no exploration 0.337; on digits_cnn at 4 of 32 a constant
  temperature ends at 0.65-0.89, the quarter anneal at 0.98-0.99.
  Evaluation uses the exact top-B. Either way exactly B channels' bytes
  are sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Beyond this exponent the prune loss continues linearly instead of
# exponentially, so a budget far from sum(f) (e.g. right after a deprune
# budget raise) gives a large but finite gradient instead of inf.
_EXP_CAP = 20.0


@dataclass(frozen=True)
class PruneLossWeights:
    """Weights of pruneLoss = exp(delta*(sum f - B)) + lam*exp(-delta*(sum f - B)).

    The total edge loss is ``task loss + epsilon * pruneLoss``. With
    ``lam = 1`` the minimum is at ``sum f = B``: the filter spends its mass on
    as many channels as it may send. ``delta`` sets how sharply a surplus or
    deficit of one channel is felt; 0.5 keeps the gradient of a few
    channels' surplus comparable to the task gradient at ``epsilon = 0.05``.
    These defaults learn the informative channels in tests/test_compression.py.
    """

    delta: float = 0.5
    lam: float = 1.0
    epsilon: float = 0.05


def _exp_then_linear(z: torch.Tensor) -> torch.Tensor:
    capped = torch.clamp(z, max=_EXP_CAP)
    return torch.where(z <= _EXP_CAP, torch.exp(capped), math.exp(_EXP_CAP) * (1.0 + z - _EXP_CAP))


def prune_loss(f: torch.Tensor, budget: int, weights: PruneLossWeights = PruneLossWeights()) -> torch.Tensor:
    """The paper's budget penalty on the filter values ``f`` (already weighted by epsilon)."""
    surplus = weights.delta * (f.sum() - budget)
    return weights.epsilon * (_exp_then_linear(surplus) + weights.lam * _exp_then_linear(-surplus))


def top_budget(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the ``budget`` largest scores, ascending; ties go to the lower index.

    ``torch.topk`` gives no guarantee on ties; a stable descending sort does.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:budget]).values


# A schedule anneals the draw over this share of each phase (measured on cifar_cnn, see the module doc).
ANNEAL_UNTIL = 0.25


def annealed_exploration(progress: float, start: float = 1.0, until: float = ANNEAL_UNTIL) -> float:
    """Gumbel temperature at ``progress`` (0 = start of training, 1 = end): linear from ``start`` to 0 at ``until``."""
    return start * max(0.0, 1.0 - progress / until)


# Without a schedule, the draw anneals over the steps in which every channel is drawn about this
# many times (a channel is drawn once per C / B steps). That gives about the exploration (the sum
# of the temperatures) of the schedule's per-epoch anneal: digits_cnn at 4 of 32, 80 steps against
# a 10-epoch run's 83; cifar_cnn at 2 of 64, 320 against 20 epochs' 354. The README's own loop
# (SplitPair, digits_cnn at 4 of 32, 10 epochs) then reaches 0.972-0.989 on seeds 0-5.
DEFAULT_TRIES = 10


class Exploration:
    """The Gumbel temperature of the compressor's training draw, annealed linearly to 0 over training steps.

    The compressor advances it once per training draw, so a user's own loop
    explores like the CLI's. ``hold`` keeps each value for that many steps: a
    schedule holds it for an epoch and sets ``position`` at each epoch's start.
    """

    def __init__(self, start: float = 1.0, steps: float = 0.0, hold: int = 1, position: int = 0) -> None:
        self.start, self.steps, self.hold, self.position = float(start), float(steps), max(1, int(hold)), int(position)

    @classmethod
    def constant(cls, temperature: float) -> "Exploration":
        return cls(temperature, math.inf)

    @classmethod
    def default(cls, channels: int, budget: int, start: float = 1.0) -> "Exploration":
        """The anneal a loop without a schedule gets: over DEFAULT_TRIES draws of each channel."""
        return cls(start, DEFAULT_TRIES * channels / budget if budget < channels else 0.0)

    @property
    def is_constant(self) -> bool:
        return math.isinf(self.steps)

    def temperature(self) -> float:
        if self.steps <= 0:
            return 0.0
        held = (self.position // self.hold) * self.hold
        return self.start * max(0.0, 1.0 - held / self.steps)

    def advance(self) -> None:
        self.position += 1


def resolution_output_size(size: int, resolution: int) -> int:
    """Side length after the resolution conv (kernel 2+r, stride r, padding r)."""
    if resolution == 0:
        return size
    return (size + 2 * resolution - (2 + resolution)) // resolution + 1


class Compressor(nn.Module):
    """Edge side of the cut: resolution conv, learned filter, top-B selection.

    ``forward`` returns the sent channels ``(N, B, h, w)`` and their indices.
    """

    def __init__(
        self,
        channels: int,
        budget: int,
        resolution: int = 0,
        exploration: float = 1.0,  # Gumbel temperature the training draw anneals from; 0 = exact top-B
        weights: PruneLossWeights = PruneLossWeights(),
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if resolution < 0:
            raise ValueError(f"resolution must be >= 0 (0 = keep the resolution), got {resolution}")
        self.channels = channels
        self.resolution = resolution
        self.start_temperature = exploration
        self.weights = weights
        self.reduce: nn.Module = (
            nn.Sequential(
                nn.Conv2d(channels, channels, 2 + resolution, stride=resolution, padding=resolution),
                nn.BatchNorm2d(channels),
            )
            if resolution
            else nn.Identity()
        )
        self.filter_logits = nn.Parameter(torch.zeros(channels))
        self.budget = budget  # also starts the default exploration schedule
        self.reset_filter()

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        if not 1 <= value <= self.channels:
            raise ValueError(f"budget must be between 1 and {self.channels} channels, got {value}")
        self._budget = int(value)
        if getattr(self, "schedule", None) is None or not self.schedule.is_constant:  # a user's constant stays
            self.schedule = Exploration.default(self.channels, self._budget, self.start_temperature)

    @property
    def exploration(self) -> float:
        """The Gumbel temperature of the next training draw (0: exact top-B)."""
        return self.schedule.temperature()

    @exploration.setter
    def exploration(self, temperature: float) -> None:
        self.schedule = Exploration.constant(temperature)

    def schedule_phase(self, budget: int, reset: str, explore: bool, phase_steps: float, hold: int = 1,
                       position: int = 0) -> None:
        """A schedule's phase: move to ``budget`` (see :meth:`change_budget`) and anneal over its first quarter.

        ``position`` is the step within the phase (an epoch's start, or where a
        resumed run left off); each temperature is held for ``hold`` steps.
        """
        if budget != self._budget or reset != "none":
            self.change_budget(budget, reset)
        explore = explore and self._budget < self.channels
        until = ANNEAL_UNTIL * phase_steps if explore else 0.0
        self.schedule = Exploration(self.start_temperature, until, hold, position)

    def reset_filter(self, mask: torch.Tensor | None = None) -> None:
        """Start filter entries at sum(f) = budget, so the prune loss starts at its minimum.

        All entries are equal: no channel is favoured by chance before training.
        ``mask`` (bool, one per channel) limits the reset to some entries.
        """
        start = min(self._budget / self.channels, 0.99)
        with torch.no_grad():
            value = torch.full_like(self.filter_logits, math.log(start / (1 - start)))
            if mask is None:
                self.filter_logits.copy_(value)
            else:
                self.filter_logits[mask] = value[mask]

    def change_budget(self, budget: int, reset: str = "none") -> None:
        """Move to a new budget, restarting some filter entries so they can still be chosen.

        ``reset="raise"`` (deprune): the entries outside the current top-B, which
        learned only to stay off, restart at the new budget's even start value.
        ``reset="prune"`` (the paper's resetprune): the saturated entries
        (f < 0.01 or f > 0.99, where sigmoid's gradient vanishes) restart there.
        """
        if reset == "raise":
            mask = torch.ones(self.channels, dtype=torch.bool)
            mask[top_budget(self.filter_logits.detach(), self._budget)] = False
        elif reset == "prune":
            f = self.filter_values().detach()
            mask = (f < 0.01) | (f > 0.99)
        elif reset != "none":
            raise ValueError(f"reset must be 'none', 'raise' or 'prune', got '{reset}'")
        self.budget = budget
        if reset != "none":
            self.reset_filter(mask)

    def filter_values(self) -> torch.Tensor:
        """f = sigmoid(f_hat), one value per channel."""
        return torch.sigmoid(self.filter_logits)

    def select(self) -> torch.Tensor:
        """The channels to send for the next batch (ascending indices, exactly ``budget``)."""
        if self._budget == self.channels:
            return torch.arange(self.channels)
        scores = self.filter_logits.detach()
        if self.training:
            temperature = self.schedule.temperature()
            self.schedule.advance()
            if temperature > 0:
                uniform = torch.rand_like(scores).clamp_(1e-9, 1 - 1e-9)
                scores = scores - temperature * torch.log(-torch.log(uniform))
        return top_budget(scores, self._budget)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reduced = self.reduce(x)
        indices = self.select().to(reduced.device)
        f = self.filter_values()[indices]
        if len(indices) < self.channels:  # at full budget the indices are every channel in order: no gather
            reduced = reduced.index_select(1, indices)
        return reduced * f.view(1, -1, 1, 1), indices

    def prune_loss(self) -> torch.Tensor:
        return prune_loss(self.filter_values(), self._budget, self.weights)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return resolution_output_size(height, self.resolution), resolution_output_size(width, self.resolution)


class Decompressor(nn.Module):
    """Server side of the cut: scatter B channels into C and restore the resolution.

    Restoring uses a transposed conv with the compressor's kernel, stride and
    padding, told the cut's exact (height, width): for kernel 2+r, stride r,
    padding r its natural output is H - ((H + r - 2) mod r), always within
    r - 1 of H, so ``output_size`` reaches every size; no pooling hides a mismatch.
    """

    def __init__(self, channels: int, height: int, width: int, resolution: int = 0) -> None:
        super().__init__()
        self.channels = channels
        self.size = (height, width)
        self.resolution = resolution
        self.restore: nn.ConvTranspose2d | None = None
        self.norm: nn.Module = nn.Identity()
        if resolution:
            self.restore = nn.ConvTranspose2d(
                channels, channels, 2 + resolution, stride=resolution, padding=resolution
            )
            self.norm = nn.BatchNorm2d(channels)

    def forward(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if values.shape[1] == self.channels:  # every channel, in order (indices are strictly ascending): no scatter
            full = values
        else:
            full = values.new_zeros(values.shape[0], self.channels, *values.shape[2:])
            full.index_copy_(1, indices.to(values.device), values)
        if self.restore is not None:
            full = self.norm(self.restore(full, output_size=list(self.size)))
        return full
