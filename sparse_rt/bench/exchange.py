"""`sparse-rt bench exchange`: one split-training (and inference) exchange, against its two lower bounds.

One exchange is what a split step costs over what it must cost. A batch of
N x C x H x W float32 activations (16 x 128 x 8 x 8 = 512 KiB by default) is
exchanged three ways in one run, each a median over the same number of calls:

- raw: a plain pyzmq DEALER -> ROUTER round trip between two processes over
  tcp://127.0.0.1, carrying as many bytes up as sparse-rt's activations
  message and as many back as its gradient (training) or prediction
  (inference) message, each as one frame. The peer is bench transport's raw
  peer process (:class:`sparse_rt.bench.transport.Bench`), answering with a
  reply of that size instead of its ack; the sizes are those sparse-rt's
  socket counted on a first, untimed exchange.
- compute: the same model in this process with no messaging: an identity head,
  the compression module (budget B = C unless --budget), the decompressor and a
  tail of one nn.Linear(C*H*W, 10) after a flatten, built by ``build_sides``
  from the same seed as both sides of the split. Training: forward, cross-entropy
  plus the prune loss, one backward, both optimizers (head + compressor, and
  decompressor + tail) step; inference: the forward under ``inference_mode``.
- sparse-rt: ``EdgeClient.train_step`` / ``EdgeClient.infer`` against a real
  `sparse-rt node --role server` process over tcp://127.0.0.1, timed inside the
  event loop (so the bench's ``run_until_complete`` is not counted).

``overhead_ms = sparse_rt_ms - (compute_ms + raw_ms)`` is then what the
runtime adds: encode and decode, the event loop, thread hand-offs, checks.

The server must build this synthetic model, so it is a pipeline named
``sparse_rt.bench.exchange:synthetic_CxHxW`` (e.g. ``synthetic_128x8x8``): the
module's ``__getattr__`` builds it from its name. The shape travels in the one
thing a server is always given, its ``--pipeline``, so the server's command line
and log say which model it serves, nothing hides in the environment of later
children, and the same server can be started by hand. Its ``load_data`` makes
random tensors of that shape; the server never loads data.

The three ways alternate call by call (the order rotating), so load from
other jobs on a shared machine hits them alike.

With ``--peer sparse-framework --peer-path DIR`` (sparse-framework 1.1.0, the
paper authors' framework, installed with ``pip install --no-deps --target DIR
sparse-framework==1.1.0 python-dotenv``) a fourth way runs: its request path,
``TaskDeployerLatest.deploy_task`` against ``RXPipeLatest.receive_task`` in a
child process, one TCP connection per request, a pickled dict of the same
tensor (and labels) up, and back the same tensor as the gradient (an echo) or
a zero prediction; no compute, so it compares with raw_ms and with sparse-rt's
messaging (``sparse_rt_ms - compute_ms``).
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import multiprocessing
import pickle  # dumps only, to build the peer's own request format: nothing here ever unpickles
import re
import shutil
import statistics
import tempfile
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import click
import torch
from torch import nn
from torch.nn import functional as F

from sparse_rt import EdgeClient, Pipeline, build_sides
from sparse_rt.bench.common import (BenchReport, bench_options, check_applied, emit, pyplot, save_figure, start_server,
                                    stop_server, torch_threads)
from sparse_rt.bench.transport import Bench
from sparse_rt.data.datasets import TensorSplit
from sparse_rt.transport.curve import generate_keys

if TYPE_CHECKING:
    from sparse_rt.nodes.launch import NodeProcess

MODES = ("train", "infer")
CLASSES = 10
CUT = "cut"  # the identity layer the model is cut after
PEERS = ("sparse-framework",)
PEER_INSTALL = "pip install --no-deps --target DIR sparse-framework==1.1.0 python-dotenv"
PEER_FILES = ("sparse_framework/task_deployer/task_deployer_latest.py", "sparse_framework/rx_pipe/rx_pipe_latest.py")
PEER_TIMEOUT = 60.0  # seconds for the peer process to start
REQUEST_TIMEOUT = 120.0  # seconds per sparse-rt reply; no resends, so a dead server fails the run instead of hanging
TARGET_SHAPE, TARGET_CODEC = (16, 128, 8, 8), "fp32"
TARGET_OVERHEAD_MS = 0.6  # train overhead_ms wanted at TARGET_SHAPE, TARGET_CODEC
_SYNTHETIC = re.compile(r"synthetic_([1-9][0-9]*)x([1-9][0-9]*)x([1-9][0-9]*)")
COLUMNS = ("mode", "bytes_up", "bytes_down", "raw_ms", "compute_ms", "sparse_rt_ms", "overhead_ms", "ratio_vs_raw")
PEER_COLUMNS = ("peer_ms", "peer_vs_raw")
CURVE_COLUMNS = ("sparse_rt_curve_ms", "curve_cost_ms")


def build_model(channels: int, height: int, width: int) -> nn.Sequential:
    """An identity head (the cut) and a tail of one linear layer: all the compute is the compression and the tail."""
    return nn.Sequential(OrderedDict([
        (CUT, nn.Identity()),
        ("tail", nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, CLASSES))),
    ]))


def random_data(shape: tuple[int, int, int], seed: int, samples: int = 64) -> TensorSplit:
    """Random tensors of the cut's shape: the pipeline needs data, but nobody trains on it."""
    generator = torch.Generator().manual_seed(seed)

    def part(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(count, *shape, generator=generator), torch.randint(0, CLASSES, (count,), generator=generator)

    return TensorSplit(*part(samples), *part(samples // 4))


def synthetic_pipeline(channels: int, height: int, width: int) -> Pipeline:
    """The pipeline both processes build: its name carries the shape, so a server of another shape refuses the edge."""
    shape = (channels, height, width)
    return Pipeline(name=f"exchange_{channels}x{height}x{width}", build_model=functools.partial(build_model, *shape),
                    cut=CUT, input_shape=shape, num_classes=CLASSES, load_data=functools.partial(random_data, shape),
                    batch_size=TARGET_SHAPE[0], optimizer="adam")


def pipeline_reference(channels: int, height: int, width: int) -> str:
    """``module:attribute`` for `sparse-rt node --pipeline`: resolved by this module's ``__getattr__``."""
    return f"{__name__}:synthetic_{channels}x{height}x{width}"


def __getattr__(name: str) -> Pipeline:
    """``synthetic_CxHxW`` is :func:`synthetic_pipeline` of that shape, for a server process to load by name."""
    match = _SYNTHETIC.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return synthetic_pipeline(*map(int, match.groups()))


def _adam(parameters: Any, pipeline: Pipeline) -> torch.optim.Optimizer:
    """What each side builds for an "adam" pipeline (stages/optimizer.py), so compute steps what sparse-rt steps."""
    return torch.optim.Adam(parameters, lr=pipeline.lr, weight_decay=pipeline.weight_decay)


def compute_runs(pipeline: Pipeline, budget: int, seed: int, x: torch.Tensor,
                 y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Per mode, one call of the split model's compute in this process, no messaging.

    Built like both sides of the split (same seed, ``build_sides``), as one graph: the
    gradient sparse-rt sends down is the one this backward passes through the cut.
    """
    torch.manual_seed(seed)
    edge, server, _ = build_sides(pipeline.build_model(), pipeline.cut, pipeline.input_shape, budget,
                                  pipeline.resolution)
    head_optimizer, tail_optimizer = _adam(edge.parameters(), pipeline), _adam(server.parameters(), pipeline)

    def train() -> None:
        edge.train()
        server.train()
        values, indices = edge(x)
        loss = F.cross_entropy(server(values, indices), y) + edge.compressor.prune_loss()
        head_optimizer.zero_grad(set_to_none=True)
        tail_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        head_optimizer.step()
        tail_optimizer.step()

    def infer() -> None:
        edge.eval()
        server.eval()
        with torch.inference_mode():
            server(*edge(x))

    return {"train": train, "infer": infer}


async def _seconds_of(call: Awaitable[Any]) -> float:
    started = time.perf_counter()
    await call
    return time.perf_counter() - started


def sparse_rt_runs(client: EdgeClient, loop: asyncio.AbstractEventLoop, x: torch.Tensor,
                   y: torch.Tensor) -> dict[str, Callable[[], float]]:
    """Per mode, one EdgeClient call against the server process, timed inside the loop; each returns its seconds."""
    return {"train": lambda: loop.run_until_complete(_seconds_of(client.train_step(x, y))),
            "infer": lambda: loop.run_until_complete(_seconds_of(client.infer(x)))}


def message_bytes(client: EdgeClient, run: Callable[[], float]) -> tuple[int, int]:
    """Bytes up and down of one call of ``run``, as the client's socket counted them (every frame, headers included)."""
    sent, received = client.traffic.bytes_sent, client.traffic.bytes_received
    run()
    return client.traffic.bytes_sent - sent, client.traffic.bytes_received - received


def timed(run: Callable[[], Any]) -> Callable[[], float]:
    """``run`` as a call that returns its wall seconds."""
    def call() -> float:
        started = time.perf_counter()
        run()
        return time.perf_counter() - started
    return call


def interleaved(runs: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Each way's seconds per call, ``warmup`` + ``repeats`` rounds of one call per way, the order rotating.

    Round by round rather than way after way, so a burst of load from another job hits every way alike.
    """
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for number in range(warmup + repeats):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = runs[name]()
            if number >= warmup:
                samples[name].append(seconds)
    return samples


class FrameworkPeer:
    """sparse-framework 1.1.0's request path: TaskDeployerLatest here, RXPipeLatest in a child process.

    The child serves ``RXPipe.receive_task`` (read to EOF, ``execute_task``, write the
    result, close) with an echo TaskExecutor; ``RXPipeLatest.serve`` binds a fixed port,
    so the child starts the same callback with ``asyncio.start_server`` on a free one. No
    Node is built: a Node reads .env files and reports to a monitor socket, neither part
    of a request; ``node.monitor_client = None`` is the framework's own "not benchmarking".
    """

    def __init__(self, path: Path, batch: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.pipe, child = spawn.Pipe()
        self.process = spawn.Process(target=_framework_worker, args=(child, str(path), batch), daemon=True,
                                     name="bench-exchange-sparse-framework")
        self.process.start()
        child.close()
        try:
            if not self.pipe.poll(PEER_TIMEOUT):
                raise EOFError
            ports = self.pipe.recv()
        except EOFError:
            self.close()
            raise click.ClickException(f"the sparse-framework peer did not start within {PEER_TIMEOUT:.0f} s "
                                       f"(exit code {self.process.exitcode})") from None
        deployer_class = _framework_module(path, "task_deployer.task_deployer_latest").TaskDeployerLatest
        self.deployers = {mode: deployer_class(upstream_host="127.0.0.1", upstream_port=port)
                          for mode, port in ports.items()}
        for deployer in self.deployers.values():
            deployer.set_logger(_framework_logger())
            deployer.set_node(SimpleNamespace(monitor_client=None))
        self.last_bytes = (0, 0)  # bytes up and down of the last request, pickles only (TCP carries no framing)

    async def exchange(self, mode: str, request: dict[str, Any]) -> bytes:
        """One request as an app on the framework makes it: pickle, one connection, the reply's bytes.

        The reply is not unpickled (sparse-rt never loads a pickle), so the
        peer's time leaves out that cost: the comparison flatters the peer.
        """
        data = pickle.dumps(request)
        reply = await self.deployers[mode].deploy_task(data)
        if reply is None:  # the deployer's answer to a reset connection
            raise click.ClickException("the sparse-framework peer reset the connection")
        self.last_bytes = (len(data), len(reply))
        return reply

    def runs(self, loop: asyncio.AbstractEventLoop, values: torch.Tensor,
             y: torch.Tensor) -> dict[str, Callable[[], float]]:
        """Per mode, one request of the sent tensor (with the labels when training); each returns its seconds."""
        def request(mode: str, payload: dict[str, Any]) -> Callable[[], float]:
            return lambda: loop.run_until_complete(_seconds_of(self.exchange(mode, payload)))

        return {"train": request("train", {"activation": values, "labels": y}),
                "infer": request("infer", {"activation": values})}

    def close(self) -> None:
        if self.process.is_alive():
            self.pipe.send(None)
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.pipe.close()


def _framework_module(path: Path, name: str) -> Any:
    """``sparse_framework.NAME`` from ``path`` (a pip --target folder), not from wherever else it may be installed."""
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module(f"sparse_framework.{name}")
    finally:
        sys.path.remove(str(path))


def _framework_logger() -> logging.Logger:
    logger = logging.getLogger("sparse")
    logger.setLevel(logging.WARNING)  # its per-request info lines would be timed too
    return logger


def _framework_worker(pipe: Any, path: str, batch: int) -> None:
    """The peer process: sparse-framework's RX pipes with echo executors, until the bench says stop."""
    asyncio.run(_framework_serve(pipe, Path(path), batch))


async def _framework_serve(pipe: Any, path: Path, batch: int) -> None:
    rx_pipe_class = _framework_module(path, "rx_pipe.rx_pipe_latest").RXPipeLatest
    executor_class = _framework_module(path, "task_executor").TaskExecutor

    prediction = pickle.dumps({"prediction": torch.zeros(batch, CLASSES)})

    class Echo(executor_class):  # type: ignore[misc, valid-type]
        """No compute and no unpickling: the training request's bytes back as its gradient (the same
        tensor, so the same size), or one pickled zero prediction for an inference request."""

        def __init__(self, training: bool) -> None:
            super().__init__()
            self.training = training

        async def execute_task(self, input_data: bytes) -> bytes:
            return input_data if self.training else prediction

    node, logger = SimpleNamespace(monitor_client=None), _framework_logger()
    servers = {}
    for mode in ("train", "infer"):
        executor = Echo(mode == "train")
        executor.set_logger(logger)
        executor.set_node(node)
        rx_pipe = rx_pipe_class(executor, "127.0.0.1", 0)
        rx_pipe.set_logger(logger)
        rx_pipe.set_node(node)
        servers[mode] = await asyncio.start_server(rx_pipe.receive_task, "127.0.0.1", 0)
    pipe.send({mode: server.sockets[0].getsockname()[1] for mode, server in servers.items()})
    try:
        await asyncio.get_running_loop().run_in_executor(None, _until_stop, pipe)
    finally:
        for server in servers.values():
            server.close()


def _until_stop(pipe: Any) -> None:
    try:
        pipe.recv()
    except EOFError:  # the bench process went away
        pass


def check_peer_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A folder holding sparse-framework's request path, or a one-line error that says how to install it."""
    if value is not None:
        missing = [name for name in PEER_FILES if not (value / name).is_file()]
        if missing:
            raise click.BadParameter(f"{value} has no {missing[0]}; install sparse-framework there with "
                                     f"'{PEER_INSTALL}'", ctx, param)
    return value


def measure_mode(mode: str, raw: Bench, runs: dict[str, dict[str, Callable[[], float]]], bytes_up: int,
                 bytes_down: int, repeats: int, warmup: int) -> dict[str, Any]:
    """One row: every way's median ms for ``mode``, interleaved, the raw trips carrying sparse-rt's byte counts."""
    with raw.raw_trips(bytes(bytes_up), bytes_down, warmup + repeats) as trip:
        calls = {"raw": timed(trip), **{way: way_runs[mode] for way, way_runs in runs.items()}}
        samples = interleaved(calls, repeats, warmup)
    ms = {way: statistics.median(seconds) * 1e3 for way, seconds in samples.items()}
    row = {"mode": mode, "bytes_up": bytes_up, "bytes_down": bytes_down, "raw_ms": ms["raw"],
           "compute_ms": ms["compute"], "sparse_rt_ms": ms["sparse_rt"],
           "overhead_ms": ms["sparse_rt"] - (ms["compute"] + ms["raw"]), "ratio_vs_raw": ms["sparse_rt"] / ms["raw"],
           "messaging_ms": ms["sparse_rt"] - ms["compute"],
           **{f"{way}_min_ms": min(seconds) * 1e3 for way, seconds in samples.items()}}
    if "peer" in ms:
        row.update(peer_ms=ms["peer"], peer_vs_raw=ms["peer"] / ms["raw"])
    if "sparse_rt_curve" in ms:
        row.update(sparse_rt_curve_ms=ms["sparse_rt_curve"], curve_cost_ms=ms["sparse_rt_curve"] - ms["sparse_rt"])
    return row


def run_exchange(shape: tuple[int, int, int, int], budget: int | None, codec: str, repeats: int, warmup: int,
                 threads: int, seed: int, peer_path: Path | None = None, offload: bool = True,
                 curve: bool = False) -> BenchReport:
    """Measure train and infer exchanges raw, compute and sparse-rt (and the peer framework); returns the report."""
    batch, channels, height, width = shape
    budget = channels if budget is None else budget
    if budget > channels:
        raise click.BadParameter(f"budget {budget} is more than the {channels} channels; a budget must be between "
                                 f"1 and {channels}", param_hint="'--budget'")
    pipeline = synthetic_pipeline(channels, height, width)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)
    report = BenchReport("exchange", COLUMNS + (PEER_COLUMNS if peer_path else ()) + (CURVE_COLUMNS if curve else ()))
    with torch_threads(threads):
        used_threads = torch.get_num_threads()
        report.rows = _measure(pipeline, x, y, budget, codec, repeats, warmup, seed, peer_path, offload, curve)
    report.settings = {"batch": batch, "channels": channels, "height": height, "width": width, "budget": budget,
                       "codec": codec, "lz4": False, "edge_torch_work": "worker thread" if offload else "event loop",
                       "repeats": repeats, "warmup": warmup, "seed": seed,
                       "torch_threads": used_threads, "server_pipeline": pipeline_reference(channels, height, width),
                       "transport": "tcp://127.0.0.1", "peer": "sparse-framework 1.1.0" if peer_path else None,
                       "peer_path": str(peer_path) if peer_path else None, "curve": curve,
                       "targets": {"train_overhead_ms": TARGET_OVERHEAD_MS, "at": _target_settings()}}
    report.notes = _notes(report, peer_path is not None)
    return report


def start_processes(reference: str, seed: int, batch: int) -> tuple[Bench, NodeProcess, str]:
    """The raw peer and the server, started side by side (each spends seconds importing torch); the server's address."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        starting = pool.submit(start_server, {"pipeline": reference, "seed": seed, "max_batch": max(1024, batch)})
        try:
            raw = Bench()
        except BaseException:
            if starting.exception() is None:
                stop_server(starting.result()[0], failed=True)
            raise
        try:
            server, address = starting.result()
        except BaseException:
            raw.close()
            raise
    return raw, server, address


def _measure(pipeline: Pipeline, x: torch.Tensor, y: torch.Tensor, budget: int, codec: str, repeats: int,
             warmup: int, seed: int, peer_path: Path | None, offload: bool = True,
             curve: bool = False) -> list[dict[str, Any]]:
    """Start the raw peer, the server (and the framework peer), measure both modes, stop them all."""
    channels, height, width = pipeline.input_shape
    reference = pipeline_reference(channels, height, width)
    runs = {"compute": {mode: timed(run) for mode, run in compute_runs(pipeline, budget, seed, x, y).items()}}
    raw, server, address = start_processes(reference, seed, len(x))
    keys = tempfile.TemporaryDirectory(prefix="sparse-rt-bench-keys-") if curve else None
    secure: tuple[NodeProcess, str] | None = None
    loop = asyncio.new_event_loop()
    client: EdgeClient | None = None
    secure_client: EdgeClient | None = None
    peer: FrameworkPeer | None = None
    failed = True
    rows = []

    def connect(at: str, **keys_given: Any) -> EdgeClient:
        made = EdgeClient(pipeline, at, mode="train", budget=budget, codec=codec, seed=seed, timeout=REQUEST_TIMEOUT,
                          retries=0, offload=offload, **keys_given)
        loop.run_until_complete(made.connect())
        return made

    try:
        client = connect(address)
        runs["sparse_rt"] = sparse_rt_runs(client, loop, x, y)
        if keys is not None:
            folder = Path(keys.name)
            generate_keys(folder, "server")
            generate_keys(folder, "edge")
            (folder / "allowed").mkdir()
            shutil.copy(folder / "edge.key", folder / "allowed")
            secure = start_server({"pipeline": reference, "seed": seed, "max_batch": max(1024, len(x)),
                                   "curve_key": folder / "server.key_secret", "allow_keys": folder / "allowed"})
            secure_client = connect(secure[1], curve_key=folder / "edge.key_secret", server_key=folder / "server.key")
            runs["sparse_rt_curve"] = sparse_rt_runs(secure_client, loop, x, y)
        if peer_path is not None:
            peer = FrameworkPeer(peer_path, len(x))
            runs["peer"] = peer.runs(loop, x[:, :budget].contiguous(), y)  # the sent tensor's size: only that counts
        for mode in MODES:
            bytes_up, bytes_down = message_bytes(client, runs["sparse_rt"][mode])  # also a first, untimed call
            rows.append(measure_mode(mode, raw, runs, bytes_up, bytes_down, repeats, warmup))
            if peer is not None:
                rows[-1]["peer_bytes_up"], rows[-1]["peer_bytes_down"] = peer.last_bytes
        assert client.session is not None  # connect() made it
        steps_sent = client.session.steps
        secure_steps = secure_client.session.steps if secure_client is not None and secure_client.session else 0
        failed = False
    finally:
        if peer is not None:
            peer.close()
        for made in (client, secure_client):
            if made is not None:
                loop.run_until_complete(made.close())
        loop.close()
        raw.close()
        summary = stop_server(server, failed)
        secure_summary = stop_server(secure[0], failed) if secure is not None else None
        if keys is not None:
            keys.cleanup()
    check_applied(summary, steps_sent)
    if secure_summary is not None:
        check_applied(secure_summary, secure_steps, "the CURVE server")
    return rows


def _target_settings() -> str:
    return f"{'x'.join(map(str, TARGET_SHAPE))} {TARGET_CODEC}, full budget"


def _notes(report: BenchReport, peer: bool) -> list[str]:
    """What each column is, and the target's verdict (only at the target's settings)."""
    s = report.settings
    notes = [
        "raw = plain pyzmq DEALER -> ROUTER round trip between two processes, one frame of bytes_up up and one of "
        "bytes_down back (the sizes sparse-rt's socket counted for the same exchange, headers included)",
        "compute = identity head, compressor, decompressor, Linear(C*H*W, 10) in this process, no messaging; train: "
        "forward, cross-entropy + prune loss, backward, both optimizers step; infer: forward under inference_mode",
        "sparse_rt = EdgeClient.train_step / EdgeClient.infer against a `sparse-rt node --role server` process over "
        "tcp loopback, timed inside the event loop; overhead_ms = sparse_rt_ms - (compute_ms + raw_ms); "
        "ratio_vs_raw = sparse_rt_ms / raw_ms; JSON rows also hold messaging_ms = sparse_rt_ms - compute_ms",
        f"medians of {s['repeats']} calls per way after {s['warmup']} warm-up, the ways interleaved call by call "
        f"(order rotating); {s['torch_threads']} torch thread(s) in this process and in the server",
    ]
    if peer:
        notes.append("peer = sparse-framework 1.1.0, TaskDeployerLatest -> RXPipeLatest.receive_task in a child "
                     "process: a pickled dict of the sent tensor (+ labels) up on a new TCP connection per request, "
                     "the tensor back (echo; a zero prediction for infer), no compute: compare with raw_ms and "
                     "messaging_ms; peer_vs_raw = peer_ms / raw_ms; JSON rows also hold the pickles' sizes "
                     "(peer_bytes_up, peer_bytes_down)")
    train = next((row for row in report.rows if row["mode"] == "train"), None)
    at_target = ((s["batch"], s["channels"], s["height"], s["width"]) == TARGET_SHAPE and s["codec"] == TARGET_CODEC
                 and s["budget"] == s["channels"])
    target = f"target train overhead_ms <= {TARGET_OVERHEAD_MS} at {_target_settings()}"
    if train is None or not at_target:
        notes.append(f"{target}: not checked at these settings")
    else:
        met = "met" if train["overhead_ms"] <= TARGET_OVERHEAD_MS else "MISSED"
        notes.append(f"{target}: {met} ({train['overhead_ms']:.3f} ms)")
    return notes


def plot(report: BenchReport, path: Path) -> None:
    """Per mode: compute + raw stacked (the lower bound) next to sparse-rt (and the peer), in ms."""
    plt = pyplot()
    rows = report.rows
    peer = "peer_ms" in report.columns
    figure, axes = plt.subplots(figsize=(6, 4))
    positions = range(len(rows))
    width = 0.25 if peer else 0.35
    axes.bar([p - width for p in positions], [row["compute_ms"] for row in rows], width, label="compute")
    axes.bar([p - width for p in positions], [row["raw_ms"] for row in rows], width,
             bottom=[row["compute_ms"] for row in rows], label="raw pyzmq round trip")
    axes.bar(list(positions), [row["sparse_rt_ms"] for row in rows], width, label="sparse-rt")
    if peer:
        axes.bar([p + width for p in positions], [row["peer_ms"] for row in rows], width,
                 label="sparse-framework (echo, no compute)")
    for p, row in zip(positions, rows):
        axes.annotate(f"+{row['overhead_ms']:.2f} ms", (p, row["sparse_rt_ms"]), ha="center", va="bottom", fontsize=8)
    axes.set_xticks(list(positions), [row["mode"] for row in rows])
    axes.set_ylabel("ms per exchange (median)")
    s = report.settings
    axes.set_title(f"{s['batch']}x{s['channels']}x{s['height']}x{s['width']}, B={s['budget']}, {s['codec']} "
                   "(label: overhead)")
    axes.legend(fontsize=8)
    save_figure(figure, path, dpi=120)


@click.command("exchange")
@bench_options
@click.option("--batch", type=click.IntRange(min=1), default=TARGET_SHAPE[0], show_default=True,
              help="Samples per exchange (N).")
@click.option("--channels", type=click.IntRange(min=1), default=TARGET_SHAPE[1], show_default=True,
              help="Channels at the cut (C).")
@click.option("--height", type=click.IntRange(min=1), default=TARGET_SHAPE[2], show_default=True,
              help="Height of each feature map (H).")
@click.option("--width", type=click.IntRange(min=1), default=TARGET_SHAPE[3], show_default=True,
              help="Width of each feature map (W).")
@click.option("--budget", type=click.IntRange(min=1), help="Channels sent (B), at most C.  [default: C]")
@click.option("--codec", type=click.Choice(("fp32", "fp16", "int8")), default=TARGET_CODEC, show_default=True,
              help="How sparse-rt packs the sent values (raw sends as many bytes).")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="Torch threads in this process and in the server (0: torch's default).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model and the random batch.")
@click.option("--edge-loop", "edge_loop", is_flag=True,
              help="Run the edge's torch work on its event loop (EdgeClient(offload=False)) instead of a worker thread.")
@click.option("--curve", is_flag=True, help="Also time sparse-rt with CURVE (encrypted, authenticated) against a "
              "second server: sparse_rt_curve_ms and curve_cost_ms.")
@click.option("--peer", type=click.Choice(PEERS), help="Also time this framework's request path (needs --peer-path).")
@click.option("--peer-path", type=click.Path(file_okay=False, path_type=Path), callback=check_peer_path,
              help=f"Folder the peer framework is installed in ({PEER_INSTALL}).")
def command(as_json: bool, out: Path | None, repeats: int, warmup: int, batch: int, channels: int, height: int,
            width: int, budget: int | None, codec: str, threads: int, seed: int, edge_loop: bool, curve: bool,
            peer: str | None, peer_path: Path | None) -> None:
    """One split exchange of N x C x H x W activations: raw pyzmq, compute alone, and sparse-rt.

    Per mode (train, infer): the median ms of each, overhead_ms = sparse-rt -
    (compute + raw), and the bytes each way. Target: train overhead_ms <= 0.6
    at 16x128x8x8 fp32.

    \b
    Example:
      sparse-rt bench exchange --repeats 200
      sparse-rt bench exchange --peer sparse-framework --peer-path /tmp/sparse-framework
    """
    if (peer is None) != (peer_path is None):
        raise click.UsageError("--peer and --peer-path go together: --peer sparse-framework --peer-path DIR "
                               f"(install with '{PEER_INSTALL}')")
    emit(run_exchange((batch, channels, height, width), budget, codec, repeats, warmup, threads, seed, peer_path,
                      offload=not edge_loop, curve=curve), as_json, out, plot)
