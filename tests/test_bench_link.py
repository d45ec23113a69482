"""`sparse-rt bench link` through the real entry point, at tiny sizes: schema, sanity, plot, option errors."""
from __future__ import annotations

import json
import math

import click
import pytest

from sparse_rt.bench.common import BudgetList, resolve_budget, resolve_budgets
from sparse_rt.bench.link import COLUMNS, choose_shaper
from sparse_rt.bench.netns import netem_problem
from tests.bench_helpers import bench_usage_error, run_bench


def test_link_suite_reports_rows_against_the_bound(capsys, tmp_path):
    code, out, err = run_bench(capsys, "link", "--pipeline", "digits_cnn", "--mbps", "20", "--rtt-ms", "4",
                               "--budgets", "C,C/8", "--codecs", "fp32,int8", "--steps", "2", "--repeats", "1",
                               "--warmup", "1", "--shaper", "token-bucket", "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["suite"] == "link"
    assert report["settings"]["shaper"] == "token-bucket" and report["settings"]["duplex"] == "half"
    assert report["settings"]["budgets"] == [32, 4]
    assert any("token-bucket" in note for note in report["notes"])
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        assert set(COLUMNS) <= set(row)
        assert row["mbps"] == 20 and row["shaper"] == "token-bucket" and row["limited_by"] in ("link", "compute")
        assert row["bound"] > 0 and math.isfinite(row["bound"])
        assert 0 < row["ratio_vs_bound"] and math.isfinite(row["ratio_vs_bound"])
        assert row["samples_per_s"] <= row["unshaped_samples_per_s"] * 1.5
        # The link never runs faster than its rate (a little slack for timer rounding).
        assert row["samples_per_s"] <= row["link_samples_per_s"] * 1.05
    full, eighth = (next(r for r in report["rows"] if r["budget"] == b and r["codec"] == "fp32") for b in (32, 4))
    assert eighth["bytes_per_sample"] < full["bytes_per_sample"] / 4
    assert (tmp_path / "link.json").is_file()
    assert (tmp_path / "link.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, words", [(["--mbps", "0"], "positive"), (["--mbps", "ten"], "numbers"),
                                          (["--budgets", "C/0"], "budget"), (["--codecs", "fp8"], "unknown codec"),
                                          (["--pipeline", "nope"], "unknown pipeline 'nope'")])
def test_bad_options_fail_with_exit_code_2(capsys, argv, words):
    assert words in bench_usage_error(capsys, "link", "--pipeline", "digits_cnn", *argv)


def test_budgets_resolve_against_the_cut():
    assert BudgetList().convert("C, C / 4,C/32,C/128,5", None, None) == ["C", "C/4", "C/32", "C/128", "5"]
    assert [resolve_budget(item, 64) for item in ("C", "C/4", "C/32", "C/128", "5")] == [64, 16, 2, 1, 5]
    assert resolve_budgets(["C", "64", "C/4", "16"], 64) == [64, 16]  # in order, each once
    with pytest.raises(click.BadParameter, match="between 1 and 64"):
        resolve_budget("65", 64)


def test_auto_uses_netem_when_the_kernel_has_it_and_says_why_not_otherwise(capsys):
    problem = netem_problem()
    used, why = choose_shaper("auto")
    assert used == ("netem" if problem is None else "token-bucket")
    if problem is not None:
        assert problem in why
        err = bench_usage_error(capsys, "link", "--pipeline", "digits_cnn", "--shaper", "netem")
        assert "kernel shaper cannot run here" in err
