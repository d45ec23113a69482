"""EdgeClient: the head of a split model inside an app, the tail on a sparse-rt server.

    async with EdgeClient("digits_cnn", "tcp://127.0.0.1:5555", head_checkpoint="runs/head.pt") as edge:
        logits = await edge.infer(images)

:class:`SyncEdgeClient` offers the same for apps without an event loop; it
runs one loop in a background thread. The edge node (`sparse-rt node --role
edge`) is built on EdgeClient, so apps and nodes share one code path.
"""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Coroutine, Iterable, Sequence, TypeVar

import torch
import zmq.asyncio

from sparse_rt.errors import ConfigError
from sparse_rt.model.sides import EdgeModel
from sparse_rt.pipeline import Pipeline, TrainingSettings, get_pipeline
from sparse_rt.assembly import edge_chain, edge_side
from sparse_rt.store.checkpoint import read_checkpoint, save_checkpoint
from sparse_rt.edge.controller import (PRECISION, Choice, DeadlineController, Decision, Policy,
                                      options_from_manifest)
from sparse_rt.edge.session import EdgeSession, SessionSettings
from sparse_rt.metrics import MetricsLog
from sparse_rt.stages.exit import NEVER, ConfidenceExit
from sparse_rt.store.modelset import ModelSet, load_exits, load_model_sets, read_manifest
from sparse_rt.stages.base import StepContext
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.stages.source import Batch, batches
from sparse_rt.transport.connection import SocketOption, Traffic, connect_dealer, sockopt
from sparse_rt.transport.curve import curve_client, load_key_pair, load_public_key
from sparse_rt.transport.events import ConnectionEvents
from sparse_rt.transport.link import RequestLink
from sparse_rt.transport.shaper import Shaper
from sparse_rt.wire.header import MAX_EXTRA_CODECS, entry_name

T = TypeVar("T")


class EdgeClient:
    """Runs a pipeline's head (and compressor) here and asks the server at ``address`` for the rest.

    ``head_checkpoint`` loads a trained head; its saved budget and resolution
    are used unless given. ``model_set`` (a folder from `sparse-rt train
    prune`) loads one head per budget instead; :meth:`set_budget` switches
    between them without reconnecting. ``mode="train"`` also lets
    :meth:`train_step` train the head with the server's gradients.
    ``stages`` are your own stages between the head and the compressor (an
    early exit, say: stages/base.py); their parameters train and are
    checkpointed with the head's. ``grad_codec`` asks for the gradients in
    another codec than the activations. ``socket_options`` configure the
    socket before it connects (transport/connection.py). ``curve_key`` (this
    edge's ``.key_secret``) with ``server_key`` (the server's ``.key``)
    encrypts the connection and authenticates both ends (transport/curve.py).

    ``deadline_ms`` has a controller choose each request's budget and codec
    from the model set (edge/controller.py); ``early_exit=True`` lets it
    answer samples on the device too, with the exits `sparse-rt train exit`
    added to the set, at the threshold it chooses per request.
    """

    def __init__(self, pipeline: str | Pipeline, address: str, *, mode: str = "infer", budget: int | None = None,
                 codec: str = "fp32", lz4: bool = False, resolution: int | None = None, seed: int = 0,
                 head_checkpoint: str | Path | None = None, model_set: str | Path | None = None,
                 lr: float | None = None, timeout: float = 30.0, retries: int = 2,
                 metrics: Path | None = None, stages: Sequence[Any] = (), grad_codec: str | None = None,
                 offload: bool = True, socket_options: Sequence[SocketOption] = (),
                 curve_key: str | Path | None = None, server_key: str | Path | None = None,
                 deadline_ms: float | None = None, max_bytes_per_s: float | None = None,
                 policy: Policy | None = None, adapt_codecs: Sequence[str] = PRECISION,
                 early_exit: bool = False, shaper: Shaper | None = None) -> None:
        self.pipeline = pipeline if isinstance(pipeline, Pipeline) else get_pipeline(pipeline)
        self.address = address
        self.mode = mode
        training = TrainingSettings.resolve(self.pipeline, lr=lr)  # a resolution saved with the head comes first
        checkpoint = read_checkpoint(head_checkpoint) if head_checkpoint is not None else None
        meta = checkpoint.meta if checkpoint is not None else {}
        if budget is None:
            budget = meta.get("budget")
        self.heads: ModelSet | None = None  # a model set's heads, by (cut, budget)
        self._exits: dict[tuple[str, int], ConfidenceExit] | None = None  # its early exits, read when first asked
        self._manifest: dict[str, Any] | None = None
        if model_set is not None:
            if mode != "infer":
                raise ConfigError("a model set serves inference only: use mode='infer'")
            self._model_set, self._manifest = Path(model_set), read_manifest(Path(model_set))
            self.heads = load_model_sets(Path(model_set), self.pipeline, "head")
            self.cut, resolution = self.heads.cuts[self.heads.default_cut], self.heads.resolution
            budget = max(self.heads.budgets()) if budget is None else budget
            self.edge_model = self._head_for(Choice(budget))
        else:
            if resolution is None:
                resolution = int(meta.get("resolution", training.resolution))
            self.edge_model, self.cut = edge_side(self.pipeline, seed, budget, resolution)
        self._stages, self._codecs = tuple(stages), dict(codec=codec, lz4=lz4, grad_codec=grad_codec)
        self._optimizer = lambda params: build_optimizer(params, training.optimizer, training.lr,
                                                         training.weight_decay)
        self.choice = self._named(Choice(self.budget, codec, lz4))
        self.chain = edge_chain(self.edge_model, self._optimizer, stages=self._stages, cut=self.choice.cut,
                                **self._codecs)
        self._chains = {self.choice: self.chain}  # one per model, codec and exit, built once
        self.optimizer = self.chain.optimizer.optimizer
        self.resumed = checkpoint.restore(self.chain.module, self.optimizer) if checkpoint is not None else {}
        self.settings = SessionSettings.of_chain(self.chain, self.pipeline.name, mode, resolution)
        self.policy = self._policy(policy, deadline_ms, max_bytes_per_s, adapt_codecs, lz4, early_exit)
        if self.policy is not None:  # every encoding the policy may pick is agreed at the handshake
            others = {entry_name((o.choice.codec, o.choice.lz4)) for o in self.policy.options}
            others.discard(entry_name((codec, lz4)))
            if len(others) > MAX_EXTRA_CODECS:
                raise ConfigError(f"a session agrees on at most {MAX_EXTRA_CODECS + 1} encodings; the policy's "
                                  f"options use {len(others) + 1}")
            self.settings = dataclasses.replace(self.settings, timing=True, codecs=tuple(sorted(others)) or None)
        self._timeout, self._retries, self._metrics_path, self._offload = timeout, retries, metrics, offload
        self._socket_options = tuple(socket_options)  # applied before connecting
        if (curve_key is None) != (server_key is None):
            raise ConfigError("CURVE needs both curve_key (this edge's .key_secret) and server_key (the server's .key)")
        if curve_key is not None and server_key is not None:
            self._socket_options += (curve_client(load_key_pair(Path(curve_key)), load_public_key(Path(server_key))),)
        self.curve = curve_key is not None
        self.shaper = shaper
        # Who this edge is to the server without CURVE (with CURVE, its key): kept across reconnects and, through
        # the head's checkpoint, across restarts. Random and never sent to other peers, so it cannot be guessed.
        resuming = mode == "train" and "routing_id" in meta  # a training edge going on (an app may share a head)
        self.routing_id = bytes.fromhex(meta["routing_id"]) if resuming else b"e" + secrets.token_bytes(15)
        self._resume_steps = int(meta.get("steps", 0)) if mode == "train" else 0  # step numbers go on from there
        self._resume_session = str(meta["session"]) if resuming and meta.get("session") else None
        self._context: zmq.asyncio.Context | None = None
        self.session: EdgeSession | None = None
        # Whether close() ends the session on the server (bye); False keeps it for a restart that resumes it.
        self.end_session = True
        self.last_decision: Decision | None = None  # the policy's choice for the last request, and its latency
        self.last_latency_ms: float | None = None
        self.last_on_device: torch.Tensor | None = None  # the last request's rows answered by the early exit
        # What the policy did: requests, how many answered within their deadline, each choice's count, and the
        # samples answered on the device by an early exit.
        self.adaptive: dict[str, Any] = {"requests": 0, "deadline_met": 0, "choices": {}, "samples": 0,
                                         "on_device": 0}

    @property
    def budget(self) -> int:
        return self.edge_model.compressor.budget

    @property
    def traffic(self) -> Traffic:
        """Bytes this client's socket sent (up) and received (down)."""
        return self._session.link.connection.traffic

    @property
    def _session(self) -> EdgeSession:
        if self.session is None:
            raise RuntimeError("EdgeClient is not connected: use 'async with EdgeClient(...)' or await connect()")
        return self.session

    async def connect(self) -> "EdgeClient":
        """Open the socket and the session (handshake); a refusal raises RemoteError with the server's reason."""
        self._context = zmq.asyncio.Context()
        # A refused key or a wrong server key is an error, not a timeout; a server that comes back gets the
        # requests in flight at once. The routing id stays across reconnects, so the server knows the edge again.
        events = ConnectionEvents(self.address, self.curve)
        socket = connect_dealer(self._context, self.address, shaper=self.shaper,
                                options=(sockopt(zmq.ROUTING_ID, self.routing_id), *self._socket_options, events))
        events.start()
        link = RequestLink(socket, self.address, self._timeout, self._retries, events)
        self.session = EdgeSession(self.chain, link, self.settings, MetricsLog(self._metrics_path), self._offload,
                                   self._resume_session)
        if self._resume_steps:
            self.session.protocol.steps = self._resume_steps
        verdict = asyncio.create_task(events.verdict(self._timeout * (self._retries + 1)))
        opening = asyncio.create_task(self.session.open())
        try:
            try:
                done, _ = await asyncio.wait({verdict, opening}, return_when=asyncio.FIRST_COMPLETED)
                if verdict in done:
                    verdict.result()  # raises AuthenticationFailed; else the handshake worked (or no verdict yet)
                await opening
            finally:
                for task in (verdict, opening):
                    task.cancel()
                await asyncio.gather(verdict, opening, return_exceptions=True)
        except BaseException:
            await self.close()
            raise
        return self

    def _policy(self, policy: Policy | None, deadline_ms: float | None, max_bytes_per_s: float | None,
                codecs: Sequence[str], lz4: bool, early_exit: bool) -> Policy | None:
        """The policy that chooses each request's budget and codec: yours, or a deadline controller."""
        if policy is None and deadline_ms is None:
            if max_bytes_per_s is not None:
                raise ConfigError("max_bytes_per_s caps what a deadline controller chooses: give deadline_ms too")
            if early_exit:
                raise ConfigError("early_exit lets a deadline controller answer on the device: give deadline_ms too")
            return None
        if self._manifest is None:
            raise ConfigError("choosing a budget per request needs a model set: EdgeClient(..., model_set=FOLDER) "
                              "from `sparse-rt train prune`")
        if policy is not None:
            return policy
        assert deadline_ms is not None
        try:
            options = options_from_manifest(self._manifest, codecs, lz4, exits=early_exit)
        except ValueError as exc:
            raise ConfigError(f"{self._model_set}: {exc}") from None
        return DeadlineController(options, deadline_ms, max_bytes_per_s=max_bytes_per_s,
                                  classes=self.pipeline.num_classes)

    @property
    def exits(self) -> dict[tuple[str, int], ConfidenceExit]:
        """The model set's early exits by (cut, budget), read on first use (a client that never exits never reads
        them, so a broken exit file cannot stop it)."""
        if self._exits is None:
            classifiers = ({} if self.heads is None or self._manifest is None else
                           load_exits(self._model_set, self._manifest, self.heads.cuts, self.pipeline.num_classes))
            self._exits = {key: ConfidenceExit(self.heads.cuts[key[0]].channels, self.pipeline.num_classes, NEVER,
                                               classifier=classifier)  # type: ignore[union-attr]
                           for key, classifier in classifiers.items()}
        return self._exits

    def _named(self, choice: Choice) -> Choice:
        """``choice`` as requests state it: the cut named when the set holds several (so the server cannot take
        another default than this set's), left out when it holds one."""
        if self.heads is None:
            return choice
        several = len(self.heads.cuts) > 1
        if several and choice.cut is None:
            return dataclasses.replace(choice, cut=self.heads.default_cut)
        if not several and choice.cut == self.heads.default_cut:
            return dataclasses.replace(choice, cut=None)
        return choice

    def _model_key(self, choice: Choice) -> tuple[str, int]:
        """(cut, budget) of the model that serves ``choice``."""
        assert self.heads is not None
        return (self.heads.default_cut if choice.cut is None else choice.cut), choice.budget

    def _head_for(self, choice: Choice) -> EdgeModel:
        if self.heads is None:
            raise ConfigError("set_budget needs a model set: EdgeClient(..., model_set=FOLDER)")
        key = self._model_key(choice)
        if key not in self.heads.models:
            if key[0] not in self.heads.cuts:
                raise ConfigError(f"the model set holds no models cut at '{key[0]}'; its cuts: "
                                  f"{', '.join(sorted(self.heads.cuts))}")
            held = ", ".join(str(b) for b in self.heads.budgets(key[0]))
            raise ConfigError(f"budget {choice.budget} is not in the model set at cut '{key[0]}'; it holds {held}")
        return self.heads.models[key]  # type: ignore[return-value]

    def set_budget(self, budget: int) -> None:
        """Send ``budget`` channels from now on, with the model set's head for that budget."""
        if self.policy is not None:
            raise ConfigError("this client's policy chooses the budget of every request; set_budget would be "
                              "overridden by the next one (leave out deadline_ms/policy to choose by hand)")
        self.select(Choice(budget, self.choice.codec, self.choice.lz4))

    def select(self, choice: Choice) -> None:
        """Send with ``choice`` (cut, budget, codec, exit) from now on; no new session, no reconnect.

        A codec other than the handshake's must be one the session agreed
        to (a policy's are); the server refuses others with ``bad_codec``.
        Another cut needs a server that holds it (one serving the same set).
        """
        choice = self._named(choice)
        if choice == self.choice:
            return
        head = self._head_for(choice)  # every check before anything changes: a refused choice leaves all as it was
        stages = self._stages
        exit_stage = None
        if choice.exit is not None:
            exit_stage = self.exits.get(self._model_key(choice))
            if exit_stage is None:
                raise ConfigError(f"the model set has no early exit for {choice.label}: add exits with "
                                  "`sparse-rt train exit DIR`")
            stages = (*stages, exit_stage)
        key = dataclasses.replace(choice, exit=None if choice.exit is None else NEVER)  # one chain for every threshold
        chain = self._chains.get(key)
        if chain is None:
            codecs = dict(self._codecs, codec=choice.codec, lz4=choice.lz4)
            chain = self._chains[key] = edge_chain(head, self._optimizer, stages=stages, cut=choice.cut, **codecs)
        if exit_stage is not None:
            exit_stage.threshold = choice.exit  # type: ignore[assignment]
        self.edge_model, self.chain, self.choice = head, chain, choice
        self.optimizer = self.chain.optimizer.optimizer
        if choice.cut == self.settings.cut:  # what a new handshake proposes (it opens at the session's cut)
            self.settings = dataclasses.replace(self.settings, budget=choice.budget)
        if self.session is not None:
            self.session.chain = self.chain
            self.session.protocol.settings = self.settings

    async def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output (logits) for ``x``: head here, tail on the server.

        With a policy (``deadline_ms``), the budget and codec are chosen for
        this request first, and what it cost teaches the policy.
        """
        if self.policy is None:
            logits, ctx = await self._session.infer_traced(x)
            self.last_on_device = on_device(ctx, len(x))
            return logits
        session = self._session
        decision = self.policy.choose(session.estimate, len(x))
        self.select(decision.choice)
        started = time.perf_counter()
        logits, ctx = await session.infer_traced(x, choice=decision.choice.label, predicted_ms=decision.predicted_ms,
                                                 predicted_to_meet=decision.meets, probe=decision.probe,
                                                 **session.estimate.snapshot())
        total_ms = (time.perf_counter() - started) * 1e3
        wait, server = ctx.timer.ms.get("wait"), ctx.meta.get("server_ms")
        network = 0.0 if ctx.finished else None if wait is None else wait - (server or 0.0)
        self.policy.observed(decision, total_ms, network)
        self.last_decision, self.last_latency_ms = decision, total_ms
        self.last_on_device = on_device(ctx, len(x))
        choices = self.adaptive["choices"]
        choices[decision.choice.label] = choices.get(decision.choice.label, 0) + 1
        self.adaptive["requests"] += 1
        self.adaptive["deadline_met"] += total_ms <= decision.deadline_ms
        self.adaptive["samples"] += len(x)
        self.adaptive["on_device"] += int(self.last_on_device.sum())
        return logits

    async def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One split training step (needs ``mode="train"``); returns the batch's loss."""
        return await self._session.train_step(x, y)

    def infer_many(self, inputs: Iterable[torch.Tensor] | AsyncIterable[torch.Tensor],
                   inflight: int = 4) -> AsyncIterator[torch.Tensor]:
        """Logits for each batch, in order, with up to ``inflight`` requests in flight (``async for``).

        Faster than awaiting :meth:`infer` per batch: the head computes the
        next batch while the server runs the tail of the previous ones. With
        a policy, requests go one at a time, each chosen for its deadline.
        """
        if self.policy is not None:
            if inflight < 1:
                raise ValueError(f"inflight must be at least 1, got {inflight}")
            return self._infer_each(inputs)
        return self._session.infer_many(inputs, inflight)

    async def _infer_each(self, inputs: Iterable[torch.Tensor] | AsyncIterable[torch.Tensor]
                          ) -> AsyncIterator[torch.Tensor]:
        if isinstance(inputs, AsyncIterable):
            async for x in inputs:
                yield await self.infer(x)
        else:
            for x in inputs:
                yield await self.infer(x)

    async def evaluate(self, loader: Iterable[Batch], inflight: int = 4) -> float:
        """Accuracy over ``loader``; with a policy, each batch is one request it chooses for."""
        if self.policy is None:
            return await self._session.evaluate(loader, inflight)
        right, count = 0, 0
        async for x, y in batches(loader):  # prefetched, as the session's own evaluation is
            logits = await self.infer(x)
            right, count = right + int(logits.argmax(dim=1).eq(y).sum()), count + len(y)
        return right / max(count, 1)

    def save(self, path: str | Path, **meta: Any) -> None:
        """Checkpoint the head, the compressor and the optimizer, with the settings needed to reload them."""
        if self.session is not None and self.session.session_id is not None:
            meta.setdefault("session", self.session.session_id)  # resumed by a restarted edge (protocol v2)
        save_checkpoint(path, self.chain.module, self.optimizer, pipeline=self.pipeline.name, budget=self.budget,
                        resolution=self.settings.resolution, routing_id=self.routing_id.hex(), **meta)

    async def close(self) -> None:
        if self.session is not None:
            if self.end_session:
                await self.session.end()
            await self.session.link.close()
            self.session.close()
            self.session.metrics.close()
        if self._context is not None:
            self._context.term()
            self._context = None

    async def __aenter__(self) -> "EdgeClient":
        return await self.connect()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()


def on_device(ctx: StepContext, samples: int) -> torch.Tensor:
    """A bool mask of the rows a stage answered on this side (an early exit) in the request ``ctx`` belongs to."""
    answered = torch.zeros(samples, dtype=torch.bool)
    if ctx.answers is not None:
        answered[:] = True
        if ctx.rows is not None:
            answered[ctx.rows.cpu()] = False
    return answered


class SyncEdgeClient:
    """EdgeClient for code without an event loop: same arguments, plain blocking methods.

        with SyncEdgeClient("digits_cnn", "tcp://127.0.0.1:5555", head_checkpoint="runs/head.pt") as edge:
            logits = edge.infer(images)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sparse-rt edge loop", daemon=True)
        self._thread.start()
        try:
            self.client = EdgeClient(*args, **kwargs)
            self._call(self.client.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(self.client.infer(x))

    def infer_many(self, inputs: Iterable[torch.Tensor], inflight: int = 4) -> list[torch.Tensor]:
        """Logits for each batch, in order, pipelined as :meth:`EdgeClient.infer_many`."""
        async def collect() -> list[torch.Tensor]:
            return [logits async for logits in self.client.infer_many(inputs, inflight)]

        return self._call(collect())

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self._call(self.client.train_step(x, y))

    def set_budget(self, budget: int) -> None:
        self.client.set_budget(budget)

    def select(self, choice: Choice) -> None:
        self.client.select(choice)

    @property
    def last_decision(self) -> Decision | None:
        """The policy's choice for the last request (with ``deadline_ms`` or ``policy``)."""
        return self.client.last_decision

    @property
    def last_latency_ms(self) -> float | None:
        return self.client.last_latency_ms

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._call(self.client.close())
            self._stop_loop()

    def __enter__(self) -> "SyncEdgeClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
