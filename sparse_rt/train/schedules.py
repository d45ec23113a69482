"""Training schedules: the paper's methods and their baselines as data, for the one training loop.

A schedule is a list of :class:`EpochPlan`, one per epoch: the budget to
train at, the learning-rate factor, and whether the filter is reset before
the epoch. deprune, prune and the baselines differ only in the list.

- **deprune** (training that saves network): ascending budgets, e.g.
  ``4:15,C:7``. For the first ``boost_epochs`` epochs after each raise the
  learning rate is multiplied by ``boost`` (the paper's gamma and l_k). At
  each raise the filter entries that were off get a fresh start (see
  :data:`Reset`), so newly allowed channels can be chosen.
- **prune** (fast model sets): descending budgets, e.g. ``C:30,32:10,4:10``.
  The first phase trains from scratch; each later one continues from the one
  before after resetting the saturated filter entries (the paper's
  resetprune) and trains a few epochs. Each phase's end is one model. A
  transfer phase does not explore: the filter it inherits already ranks the
  channels, and drawing others would throw the transfer away (measured on
  cifar_cnn, docs/REPRODUCTION.md).
- **fixed**: one budget throughout (no compression at C, high compression at
  the smallest budget, or from-scratch training at any budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparse_rt.errors import ConfigError

Reset = Literal["none", "raise", "prune"]
# "raise": entries outside the last top-B restart at the new budget's even start value;
# "prune": entries whose f saturated (below 0.01 or above 0.99) restart there.


@dataclass(frozen=True)
class Phase:
    budget: int
    epochs: int


@dataclass(frozen=True)
class EpochPlan:
    epoch: int  # 0-based over the whole schedule
    phase: int  # index into the phases
    budget: int
    lr_factor: float
    reset: Reset  # reset applied before this epoch
    phase_epoch: int  # 0-based within the phase
    phase_epochs: int
    explore: bool = True  # draw the sent channels with annealed exploration (below full budget)


def parse_phases(text: str, channels: int) -> list[Phase]:
    """'4:15,C:7' -> [Phase(4, 15), Phase(channels, 7)]; 'C' stands for all channels at the cut."""
    phases = []
    for item in text.split(","):
        budget_text, sep, epochs_text = item.strip().partition(":")
        try:
            budget = channels if budget_text.strip().upper() == "C" else int(budget_text)
            epochs = int(epochs_text)
        except ValueError:
            raise ConfigError(f"phases must look like BUDGET:EPOCHS,... (e.g. 4:15,C:7), got '{text}'") from None
        if not sep or not 1 <= budget <= channels or epochs < 1:
            raise ConfigError(f"phase '{item.strip()}': budget must be 1..{channels} (or C) and epochs >= 1")
        phases.append(Phase(budget, epochs))
    return phases


def _plan(phases: list[Phase], boost: float = 1.0, boost_epochs: int = 0, reset: Reset = "none") -> list[EpochPlan]:
    plan, epoch = [], 0
    for index, phase in enumerate(phases):
        for phase_epoch in range(phase.epochs):
            boosted = index > 0 and phase_epoch < boost_epochs
            plan.append(EpochPlan(epoch, index, phase.budget, boost if boosted else 1.0,
                                  reset if index > 0 and phase_epoch == 0 else "none", phase_epoch, phase.epochs,
                                  explore=index == 0 or reset != "prune"))
            epoch += 1
    return plan


def deprune(phases: list[Phase], boost: float = 1.0, boost_epochs: int = 0) -> list[EpochPlan]:
    if any(later.budget <= earlier.budget for earlier, later in zip(phases, phases[1:])):
        raise ConfigError("deprune raises the budget: phases must have ascending budgets, e.g. 4:15,C:7")
    if boost <= 0 or boost_epochs < 0:
        raise ConfigError("boost must be positive and boost epochs 0 or more")
    return _plan(phases, boost, boost_epochs, reset="raise")


def prune(phases: list[Phase]) -> list[EpochPlan]:
    if any(later.budget >= earlier.budget for earlier, later in zip(phases, phases[1:])):
        raise ConfigError("prune lowers the budget: phases must have descending budgets, e.g. C:30,32:10,4:10")
    return _plan(phases, reset="prune")


def fixed(budget: int, epochs: int) -> list[EpochPlan]:
    return _plan([Phase(budget, epochs)])
