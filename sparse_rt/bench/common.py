"""What every bench suite shares: medians after a warm-up, one report shape, table / JSON / PNG output.

A suite measures, fills a :class:`BenchReport` (one row per measured
configuration, plus the settings and notes that make the numbers
reproducible) and hands it to :func:`emit`. Medians over repeated runs
after a warm-up keep one slow run (a page fault, a scheduler hiccup on a
2-core machine) from deciding a figure.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from sparse_rt.cli_options import options


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


def pyplot():
    """matplotlib's pyplot drawing to files only (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def emit(report: BenchReport, as_json: bool, out: Path | None,
         plot: Callable[[BenchReport, Path], None] | None = None) -> None:
    """Print the table (or one JSON object); with ``out``, also write SUITE.json and SUITE.png there."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{report.suite}.json").write_text(json.dumps(report.to_dict(), indent=2))
        if plot is not None:
            plot(report, out / f"{report.suite}.png")
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.table())
        if out is not None:
            click.echo(f"wrote {out / (report.suite + '.json')}" + (f" and {report.suite}.png" if plot else ""))


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
