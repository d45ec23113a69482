"""What every bench suite shares: medians after a warm-up, one report shape, table / JSON / PNG output.

A suite measures, fills a :class:`BenchReport` (one row per measured
configuration, plus the settings and notes that make the numbers
reproducible) and hands it to :func:`emit`. Medians over repeated runs
after a warm-up keep one slow run (a page fault, a scheduler hiccup on a
2-core machine) from deciding a figure.

Also here, as more than one suite uses them: the option types for
pipelines (:class:`PipelineList`), budgets (:class:`BudgetList`,
:func:`resolve_budgets`) and number lists (:class:`NumberList`),
:func:`torch_threads`, :func:`synthetic_batches`, and :func:`start_server` /
:func:`stop_server` for the suites that run a `sparse-rt node --role server` process.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import click

from sparse_rt.cli_options import options
from sparse_rt.errors import ConfigError
from sparse_rt.pipeline import available_pipelines, get_pipeline
from sparse_rt.plotting import pyplot  # the suites draw with it

if TYPE_CHECKING:
    import torch

    from sparse_rt.pipeline import Pipeline
    from sparse_rt.nodes.launch import NodeProcess

Batches = list[tuple["torch.Tensor", "torch.Tensor"]]

DEFAULT_BUDGETS = "C,C/4,C/32"
SERVER_TIMEOUT = 120.0  # seconds for a server process to start, or to stop and print its summary


@dataclass
class BenchReport:
    """One suite's results: rows with the columns to show, and the settings behind them."""

    suite: str
    columns: Sequence[str]  # the row keys the table shows, in order
    rows: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # what was run: sizes, repeats, pipeline ...
    notes: list[str] = field(default_factory=list)  # e.g. which link shaper was used, and why

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "machine": machine(), "settings": self.settings, "rows": self.rows,
                "notes": self.notes}

    def table(self) -> str:
        """The rows as an aligned text table (numbers to 3 significant digits or as integers)."""
        cells = [[str(column) for column in self.columns]]
        cells += [[_cell(row.get(column)) for column in self.columns] for row in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(self.columns))]
        lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join([f"{self.suite}", *lines, *(f"note: {note}" for note in self.notes)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)


def machine() -> dict[str, Any]:
    """Enough about this machine to compare runs honestly."""
    import torch
    import zmq

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def median_time(run: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of ``run()`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), samples


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def save_figure(figure: Any, path: Path, dpi: int) -> None:
    """Lay out ``figure``, write it to ``path`` and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)


def emit(report: BenchReport, as_json: bool, out: Path | None,
         plot: Callable[[BenchReport, Path], None] | None = None) -> None:
    """Print the table (or one JSON object); with ``out``, also write SUITE.json and SUITE.png there."""
    results = report.to_dict()
    if out is not None:
        path = out / f"{report.suite}.json"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        if plot is not None:
            plot(report, out / f"{report.suite}.png")
    if as_json:
        click.echo(json.dumps(results))
    else:
        click.echo(report.table())
        if out is not None:
            click.echo(f"wrote {path}" + (f" and {report.suite}.png" if plot else ""))


# Every suite takes these; suite-specific options come after them.
bench_options = options(
    click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the results, nothing else."),
    click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                 help="Also write SUITE.json and a PNG plot into this directory."),
    click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
                 help="Timed runs per measurement; the median is reported."),
    click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
                 help="Untimed runs before the timed ones."),
)


class PipelineList(click.ParamType):
    """A pipeline (or, with ``several``, comma-separated pipelines): registered names or ``module:attribute``.

    An unknown name fails at parse time, naming the option (exit code 2),
    instead of once the suite has started.
    """

    def __init__(self, several: bool = False) -> None:
        self.several = several
        self.name = "PIPELINES" if several else "PIPELINE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | list[str]:
        if isinstance(value, list):
            return value
        names = [name.strip() for name in str(value).split(",")] if self.several else [str(value).strip()]
        names = [name for name in names if name]
        if not names:
            self.fail("give at least one pipeline", param, ctx)
        registered = available_pipelines()
        for name in names:
            if name not in registered:
                try:
                    get_pipeline(name)  # module:attribute loads; anything else says what is available
                except ConfigError as exc:
                    self.fail(str(exc), param, ctx)
        return names if self.several else names[0]


class NumberList(click.ParamType):
    """Comma-separated numbers of one type: ``int`` (each at least 1) or ``float`` (each positive and finite).

    ``example`` shows the expected form; ``invalid`` says what is wrong with a number out of range
    ("edge counts must be at least 1").
    """

    name = "LIST"

    def __init__(self, kind: type[int] | type[float], example: str, invalid: str) -> None:
        self.kind, self.example, self.invalid = kind, example, invalid

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[Any]:
        if isinstance(value, list):
            return value
        try:
            numbers = [self.kind(item) for item in str(value).split(",") if item.strip()]
        except ValueError:
            noun = "integers" if self.kind is int else "numbers"
            self.fail(f"expected comma-separated {noun} such as {self.example}, got '{value}'", param, ctx)
        if not numbers:
            self.fail(f"{self.invalid}, got '{value}'", param, ctx)
        bad = [n for n in numbers if not (n >= 1 if self.kind is int else n > 0 and math.isfinite(n))]
        if bad:
            self.fail(f"{self.invalid}, got {bad[0]:g}", param, ctx)
        return numbers


class BudgetList(click.ParamType):
    """Comma-separated budgets: C (every channel), C/k (a k-th of them) or a number of channels.

    Each becomes ``"C"``, ``"C/k"`` or ``"n"``; :func:`resolve_budgets` turns
    them into channel counts once the cut's channel count C is known.
    """

    name = "BUDGETS"
    _ITEM = re.compile(r"C(?:\s*/\s*0*([1-9][0-9]*))?|0*([1-9][0-9]*)")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        items = []
        for item in str(value).split(","):
            match = self._ITEM.fullmatch(item.strip())
            if match is None:
                self.fail(f"{item.strip()!r} is not a budget; expected C, C/k or a channel count >= 1 "
                          f"(e.g. {DEFAULT_BUDGETS})", param, ctx)
            divisor, count = match.groups()
            items.append(count or (f"C/{divisor}" if divisor else "C"))
        return items


def resolve_budget(item: str, channels: int) -> int:
    """'C' -> C, 'C/4' -> C // 4 (at least 1), '8' -> 8; a count above C is refused, naming --budgets."""
    if item == "C":
        return channels
    if item.startswith("C/"):
        return max(1, channels // int(item[2:]))
    if not 1 <= int(item) <= channels:
        raise click.BadParameter(f"budget {item} is more than the cut's {channels} channels; a budget must be "
                                 f"between 1 and {channels}", param_hint="'--budgets'")
    return int(item)


def resolve_budgets(items: Sequence[str], channels: int) -> list[int]:
    """The budgets in channels, in the order given, each once."""
    return list(dict.fromkeys(resolve_budget(item, channels) for item in items))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process and the processes started inside use ``threads`` torch threads (0: torch's default).

    Children learn it from OMP_NUM_THREADS, which torch reads at start. On a
    shared 2-core machine, 2-thread OpenMP pools in two busy processes spin
    against each other and make step times swing several-fold.
    """
    import torch

    saved_env, saved_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_env


def start_server(options: dict[str, Any]) -> tuple[NodeProcess, str]:
    """A `sparse-rt node --role server` process on a free loopback port, and its address; a failed start is one error."""
    from sparse_rt.nodes.launch import NodeProcess

    server = NodeProcess("server", {"bind": "tcp://127.0.0.1:*", "json": True, **options})
    try:
        return server, server.wait_ready(SERVER_TIMEOUT)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None


def stop_server(server: NodeProcess, failed: bool = False) -> dict[str, Any]:
    """Stop a server from :func:`start_server`, killed if it does not stop within SERVER_TIMEOUT.

    Returns the JSON summary it printed; with ``failed`` (the run it served went wrong, call this from a
    ``finally``), returns {} instead of reading one, so the run's own error is the one raised.
    """
    server.stop()
    if failed:
        server.finish(SERVER_TIMEOUT)
        return {}
    return server.result(SERVER_TIMEOUT)


def check_applied(summary: dict[str, Any], steps_sent: int, what: str = "") -> None:
    """The server applied every step the edge saw acknowledged, with no error; else the run's figures are void."""
    if summary["steps_applied"] != steps_sent or summary["errors"]:
        raise click.ClickException(f"{what + ': ' if what else ''}the server applied {summary['steps_applied']} "
                                   f"steps with {summary['errors']} errors; the edge had {steps_sent} acknowledged")


def synthetic_batches(pipeline: Pipeline, batch_size: int, count: int, seed: int) -> Batches:
    """Random inputs of the pipeline's shape and random labels: throughput does not depend on the pixels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, *pipeline.input_shape, generator=generator),
             torch.randint(0, pipeline.num_classes, (batch_size,), generator=generator)) for _ in range(count)]

