"""Training replicas: K server processes that train one logical tail, kept identical by torch.distributed.

``torchrun`` starts the K processes (each a plain ``sparse-rt node --role
server``) and restarts them all when one dies; this module is what each
process does with the group: start equal (rank 0's parameters are
broadcast), train its own edges' steps at once, and every round combine.

The combination is the sum of the replicas' changes since the previous
round, added to the parameters all of them had then (the parameter server's
rule, as in Downpour SGD): the tail moves as far as one server applying every
edge's step would move it, with the other replicas' steps arriving up to one
round late. A replica whose edges sent nothing adds nothing, so edges that
arrive at different rates need no lock-step. Rounds are wall-clock paced and
collective: a round waits for every replica, which is why it runs between
two steps, in the server's worker, and never inside one. Averaging instead
of summing (``merge="mean"``, FedAvg's rule as SplitFed uses it) divides each
round's progress by K; docs/SCALING.md has both measured.

After a round every replica holds the same bits (the same additions on the
same operands), and a quiet round, one in which no replica trained, checks
that by collectives: the largest element-wise difference between replicas
is reported. Rank 0 alone writes the group's checkpoint, with the session
tables of all replicas, so a restarted group knows every session wherever
its edge lands; the steps applied after that checkpoint are counted as
rolled back when their edges next send (server/sessions.py).

The sessions travel as JSON bytes in tensors, not as pickled objects
(``all_gather_object`` would unpickle what a peer sent).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from sparse_rt.errors import ConfigError

log = logging.getLogger("sparse_rt.group")

ROUND_SECONDS = 0.1  # how often the replicas combine their steps (docs/SCALING.md: staleness against cost)
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a peer silent this long inside a collective fails the round
MERGES = ("sum", "mean")


@dataclass(frozen=True)
class GroupPlace:
    """Where this process stands in a group torchrun started: its rank, the group's size, its restarts so far."""

    rank: int
    world_size: int
    restarts: int
    local_world_size: int = 1  # replicas on this machine

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> GroupPlace | None:
        """torchrun's variables (RANK, WORLD_SIZE, TORCHELASTIC_RESTART_COUNT); None outside a group of 2 or more."""
        world_size = int(environ.get("WORLD_SIZE", "1"))
        if world_size < 2:
            return None
        return cls(int(environ["RANK"]), world_size, int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
                   int(environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class RoundOutcome:
    """What one round did: the steps all replicas trained since the previous one, and whether it saved."""

    steps: int
    sessions_opened: int
    merged: bool
    saved: bool = False


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a state_dict: equal digests on two replicas (or a replica and a checkpoint) mean the same bits."""
    hasher = hashlib.sha256()
    for name, tensor in state.items():
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


class ReplicaGroup:
    """One replica's part in the group: the collectives on its tail's state, and the round that uses them."""

    def __init__(self, place: GroupPlace, model: nn.Module, merge: str = "sum") -> None:
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
        self.place, self.model, self.merge = place, model, merge
        self.rounds = 0  # rounds that merged something
        self.refused = 0  # rounds whose combined state was not finite, dropped
        self.max_param_diff: float | None = None  # from the last quiet round's check
        self._checked = False  # the last merge has been checked
        self._steps_seen = 0  # this replica's steps applied at the last round
        self._opened = 0  # training sessions opened here since the last round
        self._since_save = 0  # the group's steps since its last checkpoint
        self.steps = 0  # the group's steps, all replicas together, since this process started
        self.sessions: list[dict[str, Any]] = []  # every replica's sessions, as of the last save
        self.saving = False  # the group keeps a checkpoint (every rank must know: the sessions' gather is collective)
        self._synced: dict[torch.dtype, torch.Tensor] = {}

    def start(self) -> None:
        """Join the group (gloo for a tail on CPU) and take rank 0's state, so every replica starts from the same."""
        # The group's own small tensors (counts, sessions) are on the CPU: gloo for them, NCCL for a tail on CUDA.
        backend = "cpu:gloo,cuda:nccl" if next(self.model.parameters()).is_cuda else "gloo"
        store, rank, world_size = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        if self.place.local_world_size == self.place.world_size:
            # One torchrun for the whole group: its store outlives a restart, and a replica that comes back first
            # could read the address of a peer from the attempt before. All ranks share its restart count.
            store = dist.PrefixStore(f"sparse-rt/attempt-{self.place.restarts}", store)
        elif os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
            # Across machines each torchrun counts its own restarts, so no prefix all ranks share is at hand;
            # torchrun's own setting gives every rendezvous round a fresh store (nodes/k8s/training/ sets it).
            log.warning("set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun: without it a group restarted "
                        "across machines can read its peers' addresses from the attempt before")
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
        self._agree()
        for tensors in self._by_dtype().values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.broadcast(flat, src=0)
            self._scatter(tensors, flat)
        self._synced = {dtype: self._flat(tensors) for dtype, tensors in self._by_dtype().items()}
        log.info("replica %d of %d in step with rank 0 (restart %d), combining by %s every %g s",
                 self.place.rank, self.place.world_size, self.place.restarts, self.merge, ROUND_SECONDS)

    def _agree(self) -> None:
        """Every replica must make the same collective calls: refuse to start with settings that differ."""
        mine = torch.tensor([int(self.saving), MERGES.index(self.merge)], dtype=torch.int64)
        high, low = mine.clone(), mine.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        if not torch.equal(high, low):
            raise ConfigError("the group's replicas were started with different settings (--checkpoint given to "
                              "some and not others, or another --merge): start every replica alike")

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def opened(self) -> None:
        """A training session opened here: the next round saves, so a restarted group knows it."""
        self._opened += 1

    def round(self, steps_applied: int, sessions: Callable[[], list[dict[str, Any]]],
              save: Callable[[], None] | None, save_every: int) -> RoundOutcome:
        """Combine every replica's steps since the last round; save the group's checkpoint when due.

        Runs in the server's worker between two messages, on every replica at
        about the same time (each waits for the others in the first
        collective). Every decision is taken on numbers all replicas share,
        so all of them make the same collective calls. ``save`` (rank 0's;
        None elsewhere) is due when a session opened, every ``save_every``
        steps of the group, and when the group goes quiet (its edges are done
        or paused: the state is the same everywhere, checked just before).
        """
        counts = torch.tensor([steps_applied - self._steps_seen, self._opened], dtype=torch.int64)
        self._steps_seen, self._opened = steps_applied, 0
        dist.all_reduce(counts)
        steps, opened = int(counts[0]), int(counts[1])
        self.steps += steps
        quiet = steps == 0 and not self._checked
        if steps:
            self._combine()
            self.rounds += 1
            self._checked = False
        elif quiet:  # the group is quiet: its replicas must hold the same state now
            self.max_param_diff = self.difference()
            self._checked = True
            log.info("replicas agree after %d rounds: largest difference %.3g", self.rounds, self.max_param_diff)
        outcome = RoundOutcome(steps, opened, merged=steps > 0)
        if self.saving and (opened or quiet or save_every and self._due(steps, save_every)):
            self.sessions = self._gather_sessions(sessions())
            if save is not None:
                save()
            outcome.saved = True
        return outcome

    def summary(self) -> dict[str, Any]:
        """This replica's part of its node's summary (the digest shows, without collectives, that it matches)."""
        return {"rank": self.place.rank, "world_size": self.place.world_size, "restarts": self.place.restarts,
                "merge": self.merge, "rounds": self.rounds, "rounds_refused": self.refused, "group_steps": self.steps,
                "max_param_diff": self.max_param_diff, "digest": self.digest()}

    def _due(self, steps: int, every: int) -> bool:
        self._since_save += steps
        if self._since_save >= every:
            self._since_save = 0
            return True
        return False

    def _combine(self) -> None:
        """Every replica's change since the last round, summed (or averaged), onto the state they all had then.

        Each replica's steps were finite (the server's guard refuses others),
        but their sum can still overflow: a combined state that is not finite
        is refused whole, on every replica alike (they all see the same sum),
        and the round's steps are lost rather than the tail.
        """
        groups = self._by_dtype()
        combined = {}
        for dtype, tensors in groups.items():
            synced = self._synced[dtype]
            change = self._flat(tensors) - synced
            if self.merge == "mean" and dtype.is_floating_point:
                change /= self.place.world_size
            dist.all_reduce(change)
            if self.merge == "mean" and not dtype.is_floating_point:  # counters (batch norm's) stay whole
                change = torch.div(change, self.place.world_size, rounding_mode="floor")
            combined[dtype] = synced + change
        if not all(bool(torch.isfinite(flat).all()) for dtype, flat in combined.items() if dtype.is_floating_point):
            self.refused += 1
            log.error("the replicas' combined steps are not finite: this round's steps are dropped on every replica "
                      "(%d rounds refused so far)", self.refused)
            combined = self._synced
        for dtype, tensors in groups.items():
            self._scatter(tensors, combined[dtype])
        self._synced = combined

    def difference(self) -> float:
        """The largest element-wise difference between any two replicas' states (collective: every rank calls it)."""
        largest = 0.0
        for tensors in self._by_dtype().values():
            flat = self._flat(tensors)
            high, low = flat.clone(), flat.clone()
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            if flat.numel():
                largest = max(largest, float((high - low).abs().max()))
        return largest

    def digest(self) -> str:
        return state_digest(self.model.state_dict())

    def _gather_sessions(self, mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every replica's open sessions (JSON bytes in a tensor, padded to the longest), for rank 0's checkpoint."""
        data = torch.frombuffer(bytearray(json.dumps(mine).encode()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.place.world_size)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.place.world_size)]
        dist.all_gather(gathered, padded)
        # After a restart every replica holds every session, most of them untouched: keep the furthest copy of each.
        sessions: dict[str, dict[str, Any]] = {}
        for tensor, length in zip(gathered, sizes):
            for session in json.loads(tensor[: int(length)].numpy().tobytes()):
                known = sessions.get(session["id"])
                if known is None or session["last_step"] > known["last_step"]:
                    sessions[session["id"]] = session
        return list(sessions.values())

    def _by_dtype(self) -> dict[torch.dtype, list[torch.Tensor]]:
        """The state's tensors (parameters and buffers, sharing the model's storage) by dtype, in a fixed order."""
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in self.model.state_dict().values():
            if tensor.dtype.is_floating_point or tensor.dtype in (torch.int64, torch.int32):
                groups.setdefault(tensor.dtype, []).append(tensor)
        return groups

    @staticmethod
    def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    @staticmethod
    @torch.no_grad()
    def _scatter(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset: offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
