"""`sparse-rt node`: one server process or one edge process.

A server binds a ROUTER and trains one shared tail for every edge that
connects; an edge trains its own head with it, or asks it for predictions.
SIGINT or SIGTERM stops either cleanly: the current step finishes, the
checkpoint is written (atomically), the summary is printed.
"""
from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import zmq
import zmq.asyncio

from sparse_rt.config import NodeConfig, shard_index
from sparse_rt.errors import ConfigError, DataError
from sparse_rt.pipeline import get_pipeline
from sparse_rt.assembly import largest_frame, server_chain, server_side
from sparse_rt.store.checkpoint import Checkpointer, check_writable, read_checkpoint, save_checkpoint
from sparse_rt.edge.client import EdgeClient
from sparse_rt.train.local import load_data
from sparse_rt.metrics import MetricsLog
from sparse_rt.store.modelset import load_model_sets
from sparse_rt.server.server import SplitServer
from sparse_rt.train.summary import RunSummary, summarize
from sparse_rt.train.loop import TrainingResult, train
from sparse_rt.train.schedules import deprune, fixed, parse_phases
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.server.trust import AllowList, start_authenticator
from sparse_rt.cluster.broker import Broker, send_heartbeats
from sparse_rt.cluster.group import GroupPlace, ReplicaGroup
from sparse_rt.transport.connection import bind_router, is_local, join_broker, sockopt
from sparse_rt.transport.link import ServerUnreachable
from sparse_rt.transport.curve import curve_client, curve_server, load_key_pair, load_public_key
from sparse_rt.wire.header import MAX_HEADER_BYTES

log = logging.getLogger("sparse_rt.node")

EXIT_STOPPED = 130  # an edge stopped by a signal before finishing its epochs
EXIT_SAVE_FAILED = 3  # the node finished, but its final checkpoint could not be written (the log says why)
# A stopping server answers what it has read for up to this long, and gives its last replies this long to leave.
DRAIN_SECONDS = 10.0
REPLY_LINGER_MS = 1000
EXIT_SERVER_LOST = 1  # an edge whose server stayed away longer than its timeout and resends (an outage, not a mistake)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, so the node can finish its step and save before it exits."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signum: int) -> None:
        log.info("received %s: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, request_stop, signum)
    return stop


async def run_server_node(config: NodeConfig) -> dict[str, Any]:
    """Serve until SIGINT/SIGTERM; returns the server's summary."""
    started = time.perf_counter()
    _use_threads(config)
    pipeline = get_pipeline(config.pipeline)
    training = config.resolved(pipeline)
    model_set, cut_name, cuts = None, pipeline.cut, {}
    if config.models is not None:
        tails = load_model_sets(config.models, pipeline, "tail")
        model_set = {key: server_chain(tail, None) for key, tail in tails.models.items()}
        cut_name, cuts, resolution = tails.default_cut, tails.cuts, tails.resolution
        for name in sorted(cuts, key=lambda name: name != cut_name):  # the default cut first
            log.info("loaded the model set %s: cut '%s'%s, budgets %s", config.models, name,
                     " (default)" if name == cut_name and len(cuts) > 1 else "",
                     ", ".join(map(str, tails.budgets(name))))
        model, cut = tails.at()[max(tails.budgets())], cuts[cut_name]
    else:
        resolution = training.resolution
        model, cut = server_side(pipeline, config.seed, resolution)
    optimizer = build_optimizer(model.parameters(), training.optimizer, training.lr, training.weight_decay)
    place = GroupPlace.from_environment() if config.models is None else None
    group = ReplicaGroup(place, model, config.merge) if place is not None else None
    if group is not None and config.bind is not None and place.local_world_size > 1:
        raise ConfigError(f"{place.local_world_size} replicas on this machine cannot all bind {config.bind}: "
                          "let them join a broker (--join), or start one replica per machine")
    steps_before, sessions = 0, []
    if _resumes(config, place):
        meta = read_checkpoint(config.checkpoint).restore(model, optimizer)
        steps_before, sessions = int(meta.get("steps", 0)), list(meta.get("sessions", []))
        log.info("resumed the tail from %s after %d steps", config.checkpoint, steps_before)
    if config.checkpoint is not None:
        check_writable(config.checkpoint)
    if group is not None:
        group.saving = config.checkpoint is not None
        group.start()  # every replica from rank 0's state, before any edge is served

    def write_checkpoint(path: Path) -> None:
        """The tail, its optimizer and the sessions: a group's are every replica's, gathered by its last round."""
        steps, table = ((group.steps, group.sessions) if group is not None
                        else (server.stats.steps_applied, server.table.snapshot()))
        save_checkpoint(path, model, optimizer, pipeline=pipeline.name, resolution=resolution,
                        steps=steps_before + steps, sessions=table)

    checkpoints = Checkpointer(config.checkpoint, config.checkpoint_every, write_checkpoint, "tail")

    context = zmq.asyncio.Context()
    allow, authenticator, options = None, None, []
    if config.curve_key is not None:
        keys = load_key_pair(config.curve_key)
        allow = AllowList(config.allow_keys, config.allow_infer_keys)  # a replica's too: it checks each key's role
        if config.join is None:  # a replica's edges authenticate to its broker; the broker, to it
            authenticator = start_authenticator(context, allow)
            options.append(curve_server(keys))
    elif config.bind is not None and not is_local(config.bind):
        log.warning("serving %s without CURVE: anyone who reaches it can train the shared tail and read its "
                    "traffic; see docs/SECURITY.md (--curve-key, --allow-keys)", config.bind)
    frame_limit = max(largest_frame([cut, *cuts.values()], config.max_batch), MAX_HEADER_BYTES)
    heartbeats: asyncio.Task[None] | None = None
    if config.join is not None:  # a replica: its requests come through the broker (cluster/broker.py)
        broker_key = [] if config.server_key is None else [curve_client(keys, load_public_key(config.server_key))]
        connection = join_broker(context, config.join, frame_limit, options=broker_key)
        heartbeats = asyncio.create_task(send_heartbeats(connection), name="heartbeats")
        endpoint = config.join
    else:
        connection = bind_router(context, config.bind, frame_limit, options=options)
        endpoint = connection.socket.getsockopt_string(zmq.LAST_ENDPOINT)
    metrics = MetricsLog(config.metrics)
    chain = server_chain(model, optimizer, max_grad_norm=config.max_grad_norm or math.inf,
                         max_lr_scale=config.max_lr_scale)
    server = SplitServer(pipeline.name, chain, cut, pipeline.num_classes, connection,
                         metrics=metrics, after_step=checkpoints.after_step if group is None else None,
                         after_open=_after_open(config, checkpoints, group),
                         model_set=model_set, allow=allow, cut_name=cut_name, cuts=cuts,
                         reveal=allow is not None or is_local(config.bind or config.join),
                         max_sessions=config.max_sessions,
                         session_idle=config.session_idle, max_batch=config.max_batch)
    try:
        server.table.restore(sessions)  # with the tail they trained: their edges go on where the checkpoint was
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{config.checkpoint}: its session table is unreadable ({exc!r})") from None
    stop = stop_on_signals()
    log.info("serving %s on %s: cut after '%s', %d channels of %dx%d (sent at %dx%d)%s", pipeline.name, endpoint,
             cut_name, cut.channels, cut.height, cut.width, cut.sent_height, cut.sent_width,
             ", a replica behind the broker there" if config.join else "")
    serving = asyncio.create_task(server.serve(), name="server")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    rounds = (asyncio.create_task(keep_in_step(server, group, checkpoints, config), name="rounds")
              if group is not None else None)
    try:
        await asyncio.wait({serving, stopping, *([rounds] if rounds else [])}, return_when=asyncio.FIRST_COMPLETED)
        if rounds is not None and rounds.done():  # out of its group (a peer died): torchrun restarts all of them
            serving.cancel()
        if not serving.done():  # a signal: answer every message already read, so no applied step loses its reply
            if rounds is not None:
                rounds.cancel()
            server.drain()
            await asyncio.wait({serving}, timeout=DRAIN_SECONDS)
    finally:
        stopping.cancel()
        serving.cancel()
        if heartbeats is not None:
            heartbeats.cancel()
        outcome = (await asyncio.gather(serving, return_exceptions=True))[0]
        if rounds is not None:
            rounds.cancel()
            failed = (await asyncio.gather(rounds, return_exceptions=True))[0]
            if isinstance(failed, Exception):
                outcome = failed
        # A group's checkpoint is its last round's: a save now would hold steps the other replicas never had.
        saved = checkpoints.final() if group is None else None
        if config.checkpoint is not None and saved:
            log.info("saved the tail to %s", config.checkpoint)
        connection.close(linger_ms=REPLY_LINGER_MS)
        if authenticator is not None:
            authenticator.stop()
        context.term()
        metrics.close()
    if isinstance(outcome, Exception):
        raise outcome
    summary_of_group = {} if group is None else {"group": group.summary()}
    if group is not None:
        group.stop()
    stats = server.stats
    log.info("stopped: %d steps applied, %d inferences, %d errors, %d sessions", stats.steps_applied,
             stats.inferences, stats.errors, stats.sessions_opened)
    return {"role": "server", "pipeline": pipeline.name, "address": endpoint, "steps_applied": stats.steps_applied,
            "inferences": stats.inferences, "errors": stats.errors, "sessions_opened": stats.sessions_opened,
            "sessions_expired": stats.sessions_expired, "sessions_closed": stats.sessions_closed,
            "steps_in_ended_sessions": stats.steps_in_ended_sessions,
            "steps_total": steps_before + stats.steps_applied, "steps_rolled_back": stats.steps_rolled_back,
            "keys_refused": allow.refused if allow is not None else 0,
            "steps_refused": chain.optimizer.guard.refused if chain.optimizer and chain.optimizer.guard else 0,
            "checkpoint_saved": saved if config.checkpoint is not None else None, **summary_of_group,
            "checkpoint_failures": checkpoints.failures,
            "steps_per_session": stats.all_steps(), "bytes_in": connection.traffic.bytes_received,
            "bytes_out": connection.traffic.bytes_sent, "seconds": round(time.perf_counter() - started, 3)}


def _resumes(config: NodeConfig, place: GroupPlace | None) -> bool:
    """--resume, or any replica of a group whose checkpoint exists: it goes on from the group's last checkpoint.

    A group's processes are restarted by others (torchrun after a failure,
    Kubernetes when it recreates a pod, whose torchrun counts from 0 again):
    a replica that started afresh next to an existing checkpoint would
    overwrite it with a new tail. To start a group's tail anew, remove the
    checkpoint.
    """
    if config.resume:
        return True
    if place is None or config.checkpoint is None:
        return False
    if config.checkpoint.exists():
        return True
    if place.restarts > 0:
        log.warning("restarted by torchrun (restart %d) with no checkpoint at %s yet: starting the tail afresh",
                    place.restarts, config.checkpoint)
    return False


def _after_open(config: NodeConfig, checkpoints: Checkpointer, group: ReplicaGroup | None) -> Callable[[], None] | None:
    """What a new training session triggers: a save, so a restart knows it (a group's, at its next round)."""
    if group is not None:
        return group.opened if config.checkpoint is not None else None
    return (lambda: checkpoints.now("with a new session")) if config.checkpoint_every else None


async def keep_in_step(server: SplitServer, group: ReplicaGroup, checkpoints: Checkpointer,
                       config: NodeConfig) -> None:
    """The group's rounds, every ``round_seconds``, each between two of the server's steps; returns only by failing."""
    save = (lambda: checkpoints.save("after a round")) if group.place.rank == 0 else None
    every = config.checkpoint_every
    while True:
        await asyncio.sleep(config.round_seconds)
        await server.between_steps(lambda: group.round(server.stats.steps_applied, server.table.snapshot, save,
                                                       every))


def _use_threads(config: NodeConfig) -> None:
    """Replicas on one machine each take their share of the cores instead of all competing for all of them."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)


async def run_broker_node(config: NodeConfig) -> dict[str, Any]:
    """Broker until SIGINT/SIGTERM: edges at ``bind``, replicas at ``backend``; returns its summary."""
    assert config.bind is not None and config.backend is not None
    started = time.perf_counter()
    context = zmq.asyncio.Context()
    edges, replicas, authenticator = [], [], None
    if config.curve_key is not None:  # edges and replicas authenticated, each side by its own allow-list
        keys = load_key_pair(config.curve_key)
        authenticator = start_authenticator(context, {
            "edges": AllowList(config.allow_keys, config.allow_infer_keys),
            "replicas": AllowList(config.allow_replica_keys)})
        edges = [sockopt(zmq.ZAP_DOMAIN, b"edges"), curve_server(keys)]
        replicas = [sockopt(zmq.ZAP_DOMAIN, b"replicas"), curve_server(keys)]
    elif not is_local(config.bind):
        log.warning("brokering %s without CURVE: the replicas behind it are as open as a server without it; see "
                    "docs/SECURITY.md (--curve-key, --allow-keys, --allow-replica-keys)", config.bind)
    frontend = bind_router(context, config.bind, options=edges)
    backend = bind_router(context, config.backend, options=replicas)
    addresses = [c.socket.getsockopt_string(zmq.LAST_ENDPOINT) for c in (frontend, backend)]
    broker = Broker(frontend, backend, curve=config.curve_key is not None)
    stop = stop_on_signals()
    log.info("serving edges on %s: replicas join at %s", *addresses)
    serving = asyncio.create_task(broker.serve(), name="broker")
    stopping = asyncio.create_task(stop.wait(), name="stop")
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        serving.cancel()
        outcome = (await asyncio.gather(serving, return_exceptions=True))[0]
        for connection in (frontend, backend):
            connection.close(linger_ms=REPLY_LINGER_MS)
        if authenticator is not None:
            authenticator.stop()
        context.term()
    if isinstance(outcome, Exception) and not isinstance(outcome, asyncio.CancelledError):
        raise outcome
    summary = broker.table.summary()
    log.info("stopped: %d requests, %d replies, %d resent after a replica went silent, %d replicas joined, %d lost",
             summary["requests"], summary["replies"], summary["resent"], summary["joined"], summary["lost"])
    return {"role": "broker", "address": addresses[0], "backend": addresses[1], **summary,
            "seconds": round(time.perf_counter() - started, 3)}


async def run_edge_node(config: NodeConfig) -> tuple[RunSummary, int]:
    """Train with (or ask predictions of) the server, evaluate; returns the summary and the exit code."""
    _use_threads(config)
    started = time.perf_counter()
    pipeline = get_pipeline(config.pipeline)
    data = load_data(pipeline, config.run_config())
    if config.shard is not None:
        data = data.shard(*shard_index(config.shard))
    training = config.resolved(pipeline)
    epochs = training.epochs
    train_loader, test_loader = data.loaders(training.batch_size, config.seed)
    client = EdgeClient(pipeline, config.connect, mode=config.mode, budget=config.budget, codec=config.codec,
                        lz4=config.lz4, resolution=config.resolution, seed=config.seed,
                        head_checkpoint=config.checkpoint if config.resume else None, model_set=config.models,
                        lr=config.lr, timeout=config.request_timeout, retries=config.retries, metrics=config.metrics,
                        curve_key=config.curve_key, server_key=config.server_key, deadline_ms=config.deadline_ms,
                        max_bytes_per_s=config.max_bytes_per_s, early_exit=config.early_exit)
    stop = stop_on_signals()
    result = TrainingResult(math.nan, 0, False)
    if config.checkpoint is not None and config.mode == "train":
        check_writable(config.checkpoint)
    position = {"epoch": 0}  # the epoch the next save records as done
    checkpoints = Checkpointer(config.checkpoint if config.mode == "train" else None, config.checkpoint_every,
                               lambda path: client.save(path, epochs_done=position["epoch"],
                                                        steps=client.session.steps), "head")
    saved, lost = True, False
    async with client:
        log.info("connected to %s: %s session, %d of %d channels as %s%s", config.connect, config.mode,
                 client.budget, client.cut.channels, config.codec, " + lz4" if config.lz4 else "")
        if config.mode == "train":
            def checkpoint(step: int, epoch: int) -> None:
                position["epoch"] = epoch
                checkpoints.after_step(step)

            # Where the head's checkpoint left off, or further on if the resumed session says the tail got further.
            first_epoch = int(client.resumed.get("epochs_done", 0))
            done_in_epoch = client.session.steps - first_epoch * len(train_loader)
            if done_in_epoch >= len(train_loader):
                first_epoch, done_in_epoch = first_epoch + done_in_epoch // len(train_loader), done_in_epoch % len(
                    train_loader)
            plan = (deprune(parse_phases(config.phases, client.cut.channels), config.boost, config.boost_epochs)
                    if config.phases else fixed(client.budget, epochs))
            position["epoch"] = first_epoch
            try:
                result = await train(client.session, train_loader, plan, samples_per_epoch=len(data.y_train),
                                     first_epoch=first_epoch, skip_steps=max(done_in_epoch, 0),
                                     progress=False, stop=stop, after_step=checkpoint)
            except ServerUnreachable as exc:  # an outage: keep what was trained, say so, exit with its own code
                log.error("%s; stopping, with the head saved", exc)
                lost = True
                result = TrainingResult(math.nan, position["epoch"], True)
            position["epoch"] = result.epochs_done
            client.end_session = not result.stopped  # a stopped edge may be resumed: its session stays
            saved = checkpoints.final()
            if config.checkpoint is not None and saved:
                log.info("saved the head to %s", config.checkpoint)
        trained = replace(client.traffic)
        accuracy = math.nan if result.stopped else await client.evaluate(test_loader, config.inflight)
        summary = summarize(pipeline=pipeline.name, cut_name=pipeline.cut, cut=client.cut, budget=client.budget,
                            codec=config.codec, lz4=config.lz4, resolution=client.settings.resolution,
                            epochs=result.epochs_done, seed=config.seed, accuracy=accuracy, loss=result.loss,
                            traffic=client.traffic, trained=trained, train_samples=len(data.y_train),
                            test_samples=len(data.y_test), steps=client.session.steps, started=started)
    log.info("done: test accuracy %.4f after %d steps", accuracy, summary.steps)
    if client.policy is not None:
        adaptive = client.adaptive
        log.info("deadline %g ms met by %d of %d requests; choices: %s", config.deadline_ms, adaptive["deadline_met"],
                 adaptive["requests"], ", ".join(f"{label} x{n}" for label, n in adaptive["choices"].items()))
        if config.early_exit:
            log.info("early exit answered %d of %d samples on the device", adaptive["on_device"], adaptive["samples"])
    code = EXIT_SERVER_LOST if lost else EXIT_STOPPED if result.stopped else 0 if saved else EXIT_SAVE_FAILED
    return summary, code
