"""The `sparse-rt` command. Commands parse options, build the config and hand off.

Every error a user can fix (bad option, missing or unfit data file, unknown
pipeline) ends as one line on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sparse_rt.config import TRANSPORTS, RunConfig
from sparse_rt.errors import SparseRtError
from sparse_rt.wire.codecs import CODEC_NAMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sparse-rt")
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


@cli.command()
@click.argument("pipeline")
@click.option("--budget", type=click.IntRange(min=1), help="Channels sent per sample (B). Default: all (B = C).")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs. Default: the pipeline's.")
@click.option("--codec", type=click.Choice(CODEC_NAMES), default="fp32", show_default=True,
              help="How sent values are packed: fp32, fp16, or int8 with a scale per channel.")
@click.option("--lz4", is_flag=True, help="Compress the packed channels with lz4 (frame format).")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Your own data: an .npz with x, y (or x_train, y_train, x_test, y_test).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split, the model and the order.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Samples per step. Default: the pipeline's.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Learning rate. Default: the pipeline's.")
@click.option("--resolution", type=click.IntRange(0, 8),
              help="Resolution compression r at the cut (0 = off). Default: the pipeline's.")
@click.option("--transport", type=click.Choice(TRANSPORTS), default="inproc", show_default=True,
              help="ZeroMQ transport between the edge and the server.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results, nothing else.")
def run(pipeline: str, budget: int | None, epochs: int | None, codec: str, lz4: bool, data: Path | None, seed: int,
        batch_size: int | None, lr: float | None, resolution: int | None, transport: str, as_json: bool) -> None:
    """Train PIPELINE split across a server and an edge on this machine, then
    evaluate split inference. Every sent channel crosses a real ZeroMQ socket.

    \b
    Examples:
      sparse-rt run digits_cnn --epochs 10
      sparse-rt run digits_cnn --budget 4 --codec int8 --json
    """
    from sparse_rt.runtime.local import run_local  # torch loads here, not for --help

    config = RunConfig(pipeline=pipeline, budget=budget, epochs=epochs, codec=codec, lz4=lz4, data=data, seed=seed,
                       batch_size=batch_size, lr=lr, resolution=resolution, transport=transport)
    summary = run_local(config)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        _print_summary(summary)


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
