"""`sparse-rt experiment`: a method against its baselines over seeds, with the paper's comparisons and plots.

deprune is compared with no compression (B = C throughout) and with fixed
high compression (its smallest budget throughout), all for the same epochs;
prune with from-scratch training at each of its smaller budgets. Every run is
a `sparse-rt train` run (same loop, same CSV). "Accuracy" of a run is its
test accuracy averaged over its last 3 epochs, to damp epoch-to-epoch noise.
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from sparse_rt.train import schedules
from sparse_rt.config import RunConfig
from sparse_rt.plotting import pyplot
from sparse_rt.train.scheduled import run_schedule
from sparse_rt.train.schedules import EpochPlan

Rows = list[dict[str, float]]


def final_accuracy(rows: Rows, last: int = 3) -> float:
    return statistics.mean(row["test_accuracy"] for row in rows[-last:])


def first_reaching(rows: Rows, target: float) -> dict[str, float] | None:
    """The first epoch's row whose test accuracy reaches ``target``, or None."""
    return next((row for row in rows if row["test_accuracy"] >= target), None)


def _read(path: Path) -> Rows:
    with open(path, newline="") as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


async def _run(name: str, method: str, config: RunConfig, plan_for: Callable[[int], list[EpochPlan]],
               out: Path) -> Rows:
    await run_schedule(method, config, plan_for, out / name)
    return _read(out / name / "metrics.csv")


async def deprune_experiment(config: RunConfig, phases: str, boost: float, boost_epochs: int, seeds: int,
                             out: Path) -> dict[str, Any]:
    per_seed = []
    for seed in range(config.seed, config.seed + seeds):
        run_config = replace(config, seed=seed)
        folder = out / f"seed-{seed}"
        plan_of = lambda c: schedules.deprune(schedules.parse_phases(phases, c), boost, boost_epochs)
        runs = {"deprune": await _run("deprune", "deprune", run_config, plan_of, folder)}
        epochs = len(runs["deprune"])
        smallest = int(runs["deprune"][0]["budget"])
        runs["no_compression"] = await _run("no_compression", "fixed", run_config,
                                            lambda c: schedules.fixed(c, epochs), folder)
        runs["high_compression"] = await _run("high_compression", "fixed", run_config,
                                              lambda c: schedules.fixed(smallest, epochs), folder)
        per_seed.append(runs)
    return _deprune_report(per_seed, out)


def _bytes(row: dict[str, float] | None) -> float | None:
    return None if row is None else row["bytes_up"] + row["bytes_down"]


def _deprune_report(per_seed: list[dict[str, Rows]], out: Path) -> dict[str, Any]:
    seeds = []
    for runs in per_seed:
        target = final_accuracy(runs["no_compression"]) - 0.02
        seeds.append({
            "accuracy": {name: final_accuracy(rows) for name, rows in runs.items()},
            "target_accuracy": target,
            "bytes_to_target": {name: _bytes(first_reaching(rows, target)) for name, rows in runs.items()},
        })
    reached = [s for s in seeds if s["bytes_to_target"]["deprune"] and s["bytes_to_target"]["no_compression"]]
    report = {
        "method": "deprune", "seeds": seeds,
        "mean_accuracy": {name: statistics.mean(s["accuracy"][name] for s in seeds) for name in per_seed[0]},
        "seeds_deprune_reached_target": len(reached),
        "bytes_ratio_no_compression_over_deprune": (
            statistics.mean(s["bytes_to_target"]["no_compression"] for s in reached)
            / statistics.mean(s["bytes_to_target"]["deprune"] for s in reached)) if reached else None,
    }
    report["accuracy_gain_over_high_compression"] = (report["mean_accuracy"]["deprune"]
                                                     - report["mean_accuracy"]["high_compression"])
    _plot_deprune(per_seed, out / "deprune.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


async def prune_experiment(config: RunConfig, phases: str, seeds: int, out: Path) -> dict[str, Any]:
    per_seed = []
    for seed in range(config.seed, config.seed + seeds):
        run_config = replace(config, seed=seed)
        folder = out / f"seed-{seed}"
        runs = {"prune": await _run("prune", "prune", run_config,
                                    lambda c: schedules.prune(schedules.parse_phases(phases, c)), folder)}
        first_phase = sum(1 for row in runs["prune"] if row["phase"] == 0)
        for budget in sorted({int(row["budget"]) for row in runs["prune"] if row["phase"] > 0}, reverse=True):
            runs[f"scratch_{budget}"] = await _run(f"scratch_{budget}", "fixed", run_config,
                                                   lambda c, b=budget: schedules.fixed(b, first_phase), folder)
        per_seed.append(runs)
    return _prune_report(per_seed, out)


def _prune_report(per_seed: list[dict[str, Rows]], out: Path) -> dict[str, Any]:
    budgets = [int(name.removeprefix("scratch_")) for name in per_seed[0] if name.startswith("scratch_")]
    table = []
    for budget in budgets:
        transferred, scratch, accuracy = [], [], []
        for runs in per_seed:
            phase_rows = [row for row in runs["prune"] if int(row["budget"]) == budget]
            target = final_accuracy(runs[f"scratch_{budget}"])
            hit = first_reaching(phase_rows, target)
            transferred.append(None if hit is None else phase_rows.index(hit) + 1)
            scratch.append(runs[f"scratch_{budget}"].index(first_reaching(runs[f"scratch_{budget}"], target)) + 1)
            accuracy.append({"transferred": final_accuracy(phase_rows), "scratch": target})
        reached = [t for t in transferred if t is not None]
        table.append({"budget": budget, "epochs_after_switch": transferred, "epochs_from_scratch": scratch,
                      "mean_speedup": (statistics.mean(scratch) / statistics.mean(reached)) if reached else None,
                      "seeds_reached": len(reached),
                      "mean_accuracy_transferred": statistics.mean(a["transferred"] for a in accuracy),
                      "mean_accuracy_scratch": statistics.mean(a["scratch"] for a in accuracy)})
    report = {"method": "prune", "budgets": table}
    _plot_prune(per_seed, budgets, out / "prune.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _mean_curve(per_seed: list[dict[str, Rows]], name: str, key: str) -> list[float]:
    return [statistics.mean(values) for values in zip(*[[row[key] for row in runs[name]] for runs in per_seed])]


def _plot_deprune(per_seed: list[dict[str, Rows]], path: Path) -> None:
    plt = pyplot()
    figure, (by_epoch, by_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label in (("deprune", "deprune"), ("no_compression", "no compression (B = C)"),
                        ("high_compression", "high compression (smallest B)")):
        accuracy = _mean_curve(per_seed, name, "test_accuracy")
        megabytes = [(up + down) / 2**20 for up, down in zip(_mean_curve(per_seed, name, "bytes_up"),
                                                             _mean_curve(per_seed, name, "bytes_down"))]
        by_epoch.plot(range(1, len(accuracy) + 1), accuracy, marker=".", label=label)
        by_bytes.plot(megabytes, accuracy, marker=".", label=label)
    by_epoch.set(xlabel="epoch", ylabel="test accuracy", title="accuracy per epoch")
    by_bytes.set(xlabel="cumulative training bytes, up + down (MiB)", ylabel="test accuracy", xscale="log",
                 title="accuracy per byte sent")
    by_epoch.legend()
    figure.suptitle(f"deprune vs baselines, mean over {len(per_seed)} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_prune(per_seed: list[dict[str, Rows]], budgets: list[int], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.2), squeeze=False)
    prune_rows = per_seed[0]["prune"]
    accuracy = _mean_curve(per_seed, "prune", "test_accuracy")
    for axis, budget in zip(axes[0], budgets):
        epochs = [i + 1 for i, row in enumerate(prune_rows) if int(row["budget"]) == budget]
        switch = epochs[0] - 1
        scratch = _mean_curve(per_seed, f"scratch_{budget}", "test_accuracy")
        axis.plot(epochs, [accuracy[e - 1] for e in epochs], marker=".", label="transferred (prune)")
        axis.plot(range(switch + 1, switch + len(scratch) + 1), scratch, marker=".",
                  label="from scratch, offset to the switch")
        axis.axvline(switch + 0.5, color="grey", linewidth=0.8)
        axis.set(xlabel="epoch", ylabel="test accuracy", title=f"budget {budget}")
        axis.legend()
    figure.suptitle(f"prune: transfer vs from-scratch training, mean over {len(per_seed)} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
