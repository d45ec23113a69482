"""The `sparse-rt` command. Commands parse options, build the config and hand off.

Every error a user can fix (bad option, missing or unfit data file, unknown
pipeline) ends as one line on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from sparse_rt.cli_options import options
from sparse_rt.config import MODES, ROLES, TRANSPORTS, RunConfig
from sparse_rt.errors import SparseRtError


def _import_plugins(ctx: click.Context, param: click.Parameter, modules: tuple[str, ...]) -> tuple[str, ...]:
    """Import each module before the command runs, so what it registers (a codec of one's own) is known."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise click.BadParameter(f"cannot import '{module}': {exc}", ctx, param) from None
    return modules


class CodecName(click.ParamType):
    """A registered codec's name, checked when the option is read (after --import has run)."""

    name = "codec"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from sparse_rt.wire.codecs import codec_names

        if value not in codec_names():
            self.fail(f"unknown codec '{value}'; registered: {', '.join(codec_names())} (a codec of your own: "
                      f"sparse-rt --import MODULE ...)", param, ctx)
        return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparse-rt")
@click.option("--import", "imports", multiple=True, metavar="MODULE", callback=_import_plugins, is_eager=True,
              expose_value=False, help="Import MODULE first (repeatable), e.g. one that registers a codec of your own.")
def cli() -> None:
    """Split computing for PyTorch: the head of a model on an edge device, the
    tail on a server, and only the learned best channels on the network."""


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _print_summary(summary) -> None:
    s = summary
    samples = s.epochs * s.train_samples
    lines = [
        f"{s.pipeline}: cut after '{s.cut}', sending {s.budget} of {s.channels} channels "
        f"({s.sent_shape[1]}x{s.sent_shape[2]}) as {s.codec}{' + lz4' if s.lz4 else ''}",
        f"  test accuracy   {s.test_accuracy:.4f} on {s.test_samples} held-out samples (split inference)",
        f"  training        {s.epochs} epochs x {s.train_samples} samples, {s.steps} steps, "
        f"final loss {s.final_train_loss:.4f}",
        f"  bytes up        {_human_bytes(s.bytes_up)} ({_human_bytes(s.train_bytes_up / max(samples, 1))} "
        "per training sample)",
        f"  bytes down      {_human_bytes(s.bytes_down)} ({_human_bytes(s.train_bytes_down / max(samples, 1))} "
        "per training sample)",
        f"  time            {s.seconds:.1f} s",
    ]
    click.echo("\n".join(lines))


# What every split training command takes: `run`, `train ...` and `experiment ...`.
_training_options = options(
    click.option("--codec", type=CodecName(), default="fp32", show_default=True,
                 help="How sent values are packed: fp32, fp16, int8 with a scale per channel, or a registered one."),
    click.option("--lz4", is_flag=True, help="Compress the packed channels with lz4 (frame format)."),
    click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="Your own data: an .npz with x, y (or x_train, y_train, x_test, y_test)."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split, the model and the order."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Samples per step. Default: the pipeline's."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate. Default: the pipeline's."),
    click.option("--resolution", type=click.IntRange(0, 8),
                 help="Resolution compression r at the cut (0 = off). Default: the pipeline's."),
)


@cli.command()
@click.argument("pipeline")
@click.option("--budget", type=click.IntRange(min=1), help="Channels sent per sample (B). Default: all (B = C).")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs. Default: the pipeline's.")
@_training_options
@click.option("--transport", type=click.Choice(TRANSPORTS), default="inproc", show_default=True,
              help="ZeroMQ transport between the edge and the server.")
@click.option("--edges", type=click.IntRange(min=1),
              help="Run a server process and this many edge processes over tcp on loopback, each edge with its "
                   "own shard of the data, instead of both sides in one process.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results, nothing else.")
def run(pipeline: str, budget: int | None, epochs: int | None, codec: str, lz4: bool, data: Path | None, seed: int,
        batch_size: int | None, lr: float | None, resolution: int | None, transport: str, edges: int | None,
        as_json: bool) -> None:
    """Train PIPELINE split across a server and an edge on this machine, then
    evaluate split inference. Every sent channel crosses a real ZeroMQ socket.

    \b
    Examples:
      sparse-rt run digits_cnn --epochs 10
      sparse-rt run digits_cnn --budget 4 --codec int8 --json
      sparse-rt run digits_cnn --edges 4
    """
    config = RunConfig(pipeline=pipeline, budget=budget, epochs=epochs, codec=codec, lz4=lz4, data=data, seed=seed,
                       batch_size=batch_size, lr=lr, resolution=resolution, transport=transport)
    if edges is not None:
        from sparse_rt.nodes.multi import run_edges

        combined = run_edges(config, edges, echo=not as_json)
        click.echo(json.dumps(combined) if as_json else _edges_table(combined))
        return
    from sparse_rt.train.local import run_local  # torch loads here, not for --help

    summary = run_local(config)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        _print_summary(summary)


_shared_training_options = options(
    click.argument("pipeline"),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                 help="Directory for metrics.csv, summary.json (and the model set, for prune)."),
    _training_options,
)


# Where `sparse-rt train` cuts the model: any layer split_model accepts (a wrong one is refused with the list).
_cut_option = click.option(
    "--cut", metavar="LAYER",
    help="Cut after this layer instead of the pipeline's cut (an invalid one is refused with the valid cut points). "
         "prune into an --out that holds a model set adds this cut's models to it.")


# Train against a running server instead of one in this process (the edge node's code path).
_connect_option = options(
    click.option("--connect", help="A running server's address (sparse-rt node --role server), e.g. "
                                   "tcp://127.0.0.1:5555. Default: a server in this process."),
    click.option("--timeout", "request_timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
                 show_default=True, help="With --connect: seconds to wait for a reply before resending."),
    click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
                 help="With --connect: resends before giving up."),
)


def _run_schedule(method: str, plan_for, pipeline: str, out: Path, connect: str | None = None, retries: int = 2,
                  **options) -> None:
    import asyncio

    from sparse_rt.train.scheduled import run_schedule

    summary = asyncio.run(run_schedule(method, RunConfig(pipeline=pipeline, **options), plan_for, out, connect,
                                       retries))
    click.echo(json.dumps(summary))


@cli.group("train")
def train_group() -> None:
    """Train with a schedule: the paper's deprune and prune, or a fixed budget (baselines).

    Every run writes OUT/metrics.csv (per epoch: budget, lr, train loss, test
    accuracy, cumulative bytes up and down counted at the socket) and
    OUT/summary.json."""


@train_group.command("deprune")
@_shared_training_options
@_cut_option
@click.option("--phases", required=True, help="Ascending BUDGET:EPOCHS list, C = all channels, e.g. 4:15,C:7.")
@click.option("--boost", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Learning-rate factor (gamma) for the first epochs after each budget raise.")
@click.option("--boost-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="How many epochs after each raise get the boost (l_k).")
@_connect_option
def train_deprune(phases: str, boost: float, boost_epochs: int, pipeline: str, out: Path, **options) -> None:
    """Train at a small budget, then raise it: most epochs send few channels."""
    from sparse_rt.train import schedules

    _run_schedule("deprune", lambda c: schedules.deprune(schedules.parse_phases(phases, c), boost, boost_epochs),
                  pipeline, out, **options)


@train_group.command("prune")
@_shared_training_options
@_cut_option
@click.option("--phases", required=True, help="Descending BUDGET:EPOCHS list, e.g. C:30,32:10,4:10.")
def train_prune(phases: str, pipeline: str, out: Path, **options) -> None:
    """Train at full budget, then transfer to each smaller budget: one model per budget (a model set).

    \b
    A second cut into the same set (the server then serves both, per request):
      sparse-rt train prune digits_cnn --phases C:10,8:3,2:3 --out runs/set
      sparse-rt train prune digits_cnn --phases C:10,8:3 --cut block2 --out runs/set
    """
    from sparse_rt.train import schedules

    _run_schedule("prune", lambda c: schedules.prune(schedules.parse_phases(phases, c)), pipeline, out, **options)


@train_group.command("exit")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True,
              help="Epochs of each exit classifier over the frozen head's features.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own .npz data instead of the pipeline's (the set's training data).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on stderr.")
def train_exit(folder: Path, epochs: int, data: Path | None, progress: bool) -> None:
    """Add an early exit to every model of a model set, its head frozen, with a calibration table per threshold.

    The table is measured on the even-indexed test images only, so that
    `sparse-rt bench adaptive` can measure the exits on the others.

    \b
    Example:
      sparse-rt train prune cifar_cnn --phases C:8,16:3,8:2,2:3 --out runs/set
      sparse-rt train exit runs/set
      sparse-rt node --role edge --mode infer --models runs/set --deadline-ms 50 --early-exit ...
    """
    from sparse_rt.train.exits import ExitTraining, train_exits

    manifest = train_exits(folder, data, ExitTraining(epochs=epochs), progress)
    calibrated = manifest["models"][0]["exit"]
    click.echo(f"{folder}: an early exit for each of {len(manifest['models'])} models, calibrated on "
               f"{calibrated['calibration_count']} test images ({calibrated['calibration_images']})")
    click.echo(f"  {'model':>12}  {'threshold':>9}  {'on device':>9}  {'exit acc':>8}  {'server acc':>10}  "
               f"{'together':>8}")
    for model in manifest["models"]:
        name = f"{model.get('cut', manifest['cut'])}:{model['budget']}"
        for row in model["exit"]["calibration"]:
            exit_accuracy, server_accuracy = row["exit_accuracy"], row["server_accuracy"]
            click.echo(f"  {name:>12}  {row['threshold']:>9g}  {row['share']:>9.1%}  "
                       f"{'-' if exit_accuracy is None else f'{exit_accuracy:.4f}':>8}  "
                       f"{'-' if server_accuracy is None else f'{server_accuracy:.4f}':>10}  {row['accuracy']:>8.4f}")


@train_group.command("fixed")
@_shared_training_options
@_cut_option
@click.option("--budget", required=True, help="Channels sent throughout (a number, or C for all).")
@click.option("--epochs", type=click.IntRange(min=1), required=True, help="Training epochs.")
@_connect_option
def train_fixed(budget: str, epochs: int, pipeline: str, out: Path, **options) -> None:
    """One budget throughout: the baselines (no compression at C, high compression, from scratch)."""
    from sparse_rt.train import schedules

    _run_schedule("fixed", lambda c: schedules.fixed(schedules.parse_phases(f"{budget}:{epochs}", c)[0].budget,
                                                     epochs), pipeline, out, **options)


@cli.group("experiment")
def experiment_group() -> None:
    """A method against its baselines over several seeds: CSVs, report.json and PNG plots in --out."""


@experiment_group.command("deprune")
@_shared_training_options
@click.option("--phases", default="2:8,16:6,C:6", show_default=True, help="deprune's ascending BUDGET:EPOCHS phases.")
@click.option("--boost", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True,
              help="Learning-rate factor after each raise.")
@click.option("--boost-epochs", type=click.IntRange(min=0), default=2, show_default=True,
              help="Epochs boosted after each raise.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many seeds: --seed, --seed + 1, ...")
def experiment_deprune(phases: str, boost: float, boost_epochs: int, seeds: int, pipeline: str, out: Path,
                       **options) -> None:
    """deprune vs no compression vs fixed high compression, same epochs: bytes to accuracy, accuracy."""
    import asyncio

    from sparse_rt.train.experiment import deprune_experiment

    report = asyncio.run(deprune_experiment(RunConfig(pipeline=pipeline, **options), phases, boost, boost_epochs,
                                            seeds, out))
    click.echo(json.dumps({key: report[key] for key in report if key != "seeds"}, indent=2))


@experiment_group.command("prune")
@_shared_training_options
@click.option("--phases", default="C:20,16:5,2:5", show_default=True, help="prune's descending BUDGET:EPOCHS phases.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many seeds: --seed, --seed + 1, ...")
def experiment_prune(phases: str, seeds: int, pipeline: str, out: Path, **options) -> None:
    """prune vs from-scratch training at each smaller budget: epochs to reach the same accuracy."""
    import asyncio

    from sparse_rt.train.experiment import prune_experiment

    report = asyncio.run(prune_experiment(RunConfig(pipeline=pipeline, **options), phases, seeds, out))
    click.echo(json.dumps(report, indent=2))


@cli.group("models")
def models_group() -> None:
    """Model sets: one trained model per cut and budget, made by `sparse-rt train prune`."""


@models_group.command("show")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def models_show(folder: Path) -> None:
    """Print a model set's manifest as a table, one row per model (its cut last)."""
    from sparse_rt.store.modelset import entry_cut, read_manifest

    manifest = read_manifest(folder)
    click.echo(f"{manifest['pipeline']}: cut after '{manifest['cut']}', {manifest['channels']} channels, "
               f"resolution {manifest['resolution']}, seed {manifest['seed']}")
    click.echo(f"  {'budget':>6}  {'accuracy':>8}  {'epochs':>6}  {'fp32 B/sample':>13}  {'fp16':>8}  {'int8':>8}  "
               f"{'channels':>8}  cut")
    for model in manifest["models"]:
        size = model["bytes_per_sample"]
        click.echo(f"  {model['budget']:>6}  {model['test_accuracy']:>8.4f}  {model['epochs']:>6}  "
                   f"{size['fp32']:>13.0f}  {size['fp16']:>8.0f}  {size['int8']:>8.1f}  "
                   f"{model.get('channels', manifest['channels']):>8}  {entry_cut(manifest, model)}")


def _edges_table(combined: dict) -> str:
    rows = [f"{combined['pipeline']}: {combined['edges']} edge processes and one server over tcp (loopback)",
            f"  {'edge':>4}  {'accuracy':>8}  {'steps':>5}  {'bytes up':>12}  {'bytes down':>12}"]
    for k, edge in enumerate(combined["per_edge"], 1):
        rows.append(f"  {k:>4}  {edge['test_accuracy']:>8.4f}  {edge['steps']:>5}  {_human_bytes(edge['bytes_up']):>12}"
                    f"  {_human_bytes(edge['bytes_down']):>12}")
    total, server = combined["total"], combined["server"]
    rows.append(f"  {'all':>4}  {total['mean_test_accuracy']:>8.4f}  {total['steps']:>5}  "
                f"{_human_bytes(total['bytes_up']):>12}  {_human_bytes(total['bytes_down']):>12}")
    rows.append(f"  server applied {server['steps_applied']} steps from {server['sessions_opened']} sessions, "
                f"{server['errors']} errors; {combined['seconds']:.1f} s in all")
    return "\n".join(rows)


@cli.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with the node's settings (see nodes/); options given here override it.")
@click.option("--role", type=click.Choice(ROLES), help="server: serve the tail. edge: run the head. broker: one "
              "address for edges in front of several servers (replicas).")
@click.option("--pipeline", help="Pipeline name (see `sparse-rt pipelines`) or module:attribute.")
@click.option("--bind", help="Server: address to bind, e.g. tcp://0.0.0.0:5555 (port * picks a free one).")
@click.option("--connect", help="Edge: the server's address, e.g. tcp://192.168.1.10:5555.")
@click.option("--join", help="Server: serve as a replica behind the broker whose backend is here, instead of --bind.")
@click.option("--backend", help="Broker: the address replicas join (--join), e.g. tcp://10.0.0.1:5556.")
@click.option("--threads", type=click.IntRange(min=1), help="Server or edge: torch's threads (one replica per "
              "core: 1).  [default: torch's, one per core]")
@click.option("--mode", type=click.Choice(MODES), help="Edge: train the head, or only infer.  [default: train]")
@click.option("--budget", type=click.IntRange(min=1), help="Edge: channels sent per sample (B). Default: all.")
@click.option("--epochs", type=click.IntRange(min=1), help="Edge: training epochs. Default: the pipeline's.")
@click.option("--codec", type=CodecName(), help="Edge: fp32, fp16, int8 or a registered codec.  [default: fp32]")
@click.option("--lz4/--no-lz4", default=None, help="Edge: lz4 on top of the codec.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Edge: your own .npz data instead of the pipeline's.")
@click.option("--shard", help="Edge: train on the K-th of N parts of the training data, as K/N.")
@click.option("--phases", help="Edge: train by deprune's ascending BUDGET:EPOCHS phases (e.g. 2:8,16:6,C:6) instead of "
                               "--budget and --epochs.")
@click.option("--boost", type=click.FloatRange(min=0, min_open=True),
              help="Edge, with --phases: learning-rate factor after each raise, for head and tail.  [default: 1]")
@click.option("--boost-epochs", type=click.IntRange(min=0), help="Edge, with --phases: epochs boosted.  [default: 0]")
@click.option("--seed", type=int, help="Seed of the model's initial weights and the data split.  [default: 0]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Edge: samples per message. Default: the pipeline's.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate. Default: the pipeline's.")
@click.option("--resolution", type=click.IntRange(0, 8), help="Resolution compression r; server and edges agree.")
@click.option("--models", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A model set (from `sparse-rt train prune`): the server serves every budget's tail, an edge "
                   "uses the heads (inference only; --budget picks one).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Where this node keeps its state: the server its tail, an edge its head.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Also save every N steps (0: only on stop).")
@click.option("--resume/--no-resume", default=None, help="Start from --checkpoint.")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path),
              help="Append one JSON line per message (kind, bytes, milliseconds per stage) to this file.")
@click.option("--max-batch", type=click.IntRange(min=1), help="Server: largest batch per message.  [default: 1024]")
@click.option("--timeout", "request_timeout", type=click.FloatRange(min=0, min_open=True),
              help="Edge: seconds to wait for a reply before resending.  [default: 30]")
@click.option("--retries", type=click.IntRange(min=0), help="Edge: resends before giving up.  [default: 2]")
@click.option("--inflight", type=click.IntRange(min=1), help="Edge: inference requests in flight.  [default: 4]")
@click.option("--deadline-ms", type=click.FloatRange(min=0, min_open=True),
              help="Edge, --mode infer with --models: pick each request's budget and codec to answer within this, "
                   "from the link it measures.")
@click.option("--max-bytes-per-s", type=click.FloatRange(min=0, min_open=True),
              help="Edge, with --deadline-ms: leave out choices that would send more than this.")
@click.option("--early-exit/--no-early-exit", default=None,
              help="Edge, with --deadline-ms: the controller may also answer samples on the device with the model "
                   "set's early exits (`sparse-rt train exit`).  [default: no]")
@click.option("--json/--no-json", "json", default=None, help="Print one JSON summary object on stdout at the end.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[default: info]")
@click.option("--curve-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="This node's NAME.key_secret (sparse-rt keys generate): encrypt and authenticate with CURVE.")
@click.option("--allow-keys", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Server, with --curve-key: folder of client .key files allowed to train and infer.")
@click.option("--allow-infer-keys", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Server, with --curve-key: folder of client .key files allowed to infer only.")
@click.option("--server-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Edge, with --curve-key: the server's (or broker's) public NAME.key. Replica (--join): the "
                   "broker's.")
@click.option("--allow-replica-keys", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Broker, with --curve-key: folder of the .key files of replicas allowed to join.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True),
              help="Server: refuse training steps whose gradient norm is above this.  [default: no bound]")
@click.option("--max-lr-scale", type=click.FloatRange(min=0, min_open=True),
              help="Server: the largest learning-rate factor applied for a peer's step.  [default: 10]")
@click.option("--max-sessions", type=click.IntRange(min=1),
              help="Server: open sessions at once, all peers together.  [default: 1024]")
@click.option("--session-idle", type=click.FloatRange(min=0, min_open=True),
              help="Server: seconds without a message after which a session ends.  [default: 600]")
@click.option("--merge", type=click.Choice(["sum", "mean"]),
              help="Server under torchrun: combine the replicas' changes each round by their sum (as one server "
                   "applying every step) or their mean (FedAvg).  [default: sum]")
@click.option("--round-seconds", type=click.FloatRange(min=0, min_open=True),
              help="Server under torchrun: seconds between the replicas' rounds.  [default: 0.1]")
def node(config_file: Path | None, **options) -> None:
    """Run one node: a server that trains and serves the tail, or an edge that
    runs the head. Stop either with Ctrl-C or SIGTERM: it finishes its step,
    saves its checkpoint and prints its summary.

    \b
    Examples:
      sparse-rt node --role server --pipeline digits_cnn --bind tcp://127.0.0.1:5555
      sparse-rt node --role edge --pipeline digits_cnn --connect tcp://127.0.0.1:5555 --budget 4
      sparse-rt node --role edge --pipeline digits_cnn --connect tcp://127.0.0.1:5555 --mode infer \
          --models runs/set --deadline-ms 50
      sparse-rt node --config nodes/edge.toml --epochs 3
      sparse-rt node --role broker --bind tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556
      torchrun --standalone --nproc-per-node 2 -m sparse_rt node --role server --pipeline digits_cnn \
          --join tcp://127.0.0.1:5556 --checkpoint runs/tail.pt --checkpoint-every 100

    Under torchrun a training server is one replica of a group that trains one
    tail (docs/SCALING.md).
    """
    import asyncio
    import logging

    from sparse_rt.cluster.group import GroupPlace
    from sparse_rt.config import load_node_config
    from sparse_rt.nodes.node import EXIT_SAVE_FAILED, run_edge_node, run_server_node

    config = load_node_config(config_file, options)
    place = GroupPlace.from_environment()  # a replica under torchrun: its lines say which
    label = config.role if place is None else f"{config.role} {place.rank}"
    logging.basicConfig(level=config.log_level.upper(), format=f"%(asctime)s {label} %(levelname)s %(message)s")
    if config.role == "broker":
        from sparse_rt.nodes.node import run_broker_node

        summary = asyncio.run(run_broker_node(config))
        if config.json:
            click.echo(json.dumps(summary))
        return
    if config.role == "server":
        summary = asyncio.run(run_server_node(config))
        if config.json:
            click.echo(json.dumps(summary))
        if summary["checkpoint_saved"] is False:
            raise SystemExit(EXIT_SAVE_FAILED)
        return
    result, code = asyncio.run(run_edge_node(config))
    if config.json:
        click.echo(json.dumps(result.to_dict()))
    else:
        _print_summary(result)
    raise SystemExit(code)


class _SuiteGroup(click.Group):
    """`sparse-rt bench SUITE`: each suite's module is imported only when that suite runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from sparse_rt.bench import SUITES

        return list(SUITES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from sparse_rt.bench import SUITES

        if name not in SUITES:
            return None
        return importlib.import_module(f"sparse_rt.bench.{name}").command


@cli.group("bench", cls=_SuiteGroup)
def bench_group() -> None:
    """Measure bytes, throughput, latency and scaling, each against a baseline in the same run.

    Every suite prints a table of medians after a warm-up; --json prints one
    JSON object instead, --out DIR also writes SUITE.json and a PNG plot.
    """


@cli.group("keys")
def keys_group() -> None:
    """CURVE key pairs for nodes (zmq.auth's certificate files)."""


@keys_group.command("generate")
@click.option("--out", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write NAME.key (public) and NAME.key_secret (keep it private) into.")
@click.argument("name")
def generate_keys_command(directory: Path, name: str) -> None:
    """Write a new key pair: give NAME.key_secret to the node itself and NAME.key to its peers.

    \b
    Example:
      sparse-rt keys generate --out keys server
      sparse-rt keys generate --out keys edge-1 && cp keys/edge-1.key allowed/
    """
    from sparse_rt.transport.curve import generate_keys

    public, secret = generate_keys(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret} (readable by you only)")


@cli.command("pipelines")
def list_pipelines() -> None:
    """List the installed pipelines and where each one is defined."""
    from sparse_rt.pipeline import available_pipelines

    for name, target in sorted(available_pipelines().items()):
        click.echo(f"{name:20s} {target}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit code 2 for anything the user can fix."""
    try:
        result = cli.main(args=argv, prog_name="sparse-rt", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(2)
    except SparseRtError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except ConnectionError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
