"""`sparse-rt bench exchange` through the real entry point, at tiny sizes, so the suite cannot rot.

The sparse-framework peer is never a dependency: its test runs only where a folder
holding it is named by SPARSE_RT_PEER_PATH (pip install --no-deps --target DIR
sparse-framework==1.1.0 python-dotenv), and is skipped elsewhere.
"""
from __future__ import annotations

import json
import math
import os

import pytest

from tests.bench_helpers import bench_usage_error, run_bench

TINY = ("--batch", "2", "--channels", "4", "--height", "2", "--width", "2", "--repeats", "3", "--warmup", "1")
PEER_PATH = os.environ.get("SPARSE_RT_PEER_PATH")


def _check_rows(report: dict, columns: tuple[str, ...]) -> None:
    assert [row["mode"] for row in report["rows"]] == ["train", "infer"]
    for row in report["rows"]:
        for key in columns:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["overhead_ms"] == pytest.approx(row["sparse_rt_ms"] - row["compute_ms"] - row["raw_ms"])
        assert row["ratio_vs_raw"] == pytest.approx(row["sparse_rt_ms"] / row["raw_ms"])


def test_exchange_reports_raw_compute_and_sparse_rt_per_mode(capsys, tmp_path):
    code, out, err = run_bench(capsys, "exchange", *TINY, "--codec", "fp16", "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["suite"] == "exchange"
    assert report["settings"]["budget"] == 4 and report["settings"]["codec"] == "fp16"
    _check_rows(report, ("raw_ms", "compute_ms", "sparse_rt_ms"))
    train, infer = report["rows"]
    values = 2 * 4 * 2 * 2 * 2  # N x B x h x w fp16 values, in bytes
    assert train["bytes_up"] > values and train["bytes_down"] > values  # header and indices on top
    assert infer["bytes_down"] < infer["bytes_up"]  # predictions back, not activations
    assert any("not checked at these settings" in note for note in report["notes"])
    assert json.loads((tmp_path / "exchange.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "exchange.png").stat().st_size > 0


@pytest.mark.skipif(PEER_PATH is None, reason="set SPARSE_RT_PEER_PATH to a folder holding sparse-framework 1.1.0")
def test_exchange_times_the_sparse_framework_peer(capsys):
    code, out, err = run_bench(capsys, "exchange", *TINY, "--peer", "sparse-framework", "--peer-path", PEER_PATH,
                               "--json")
    assert code == 0, err
    report = json.loads(out)
    _check_rows(report, ("raw_ms", "compute_ms", "sparse_rt_ms", "peer_ms", "peer_bytes_up", "peer_bytes_down"))


@pytest.mark.parametrize("argv, says", [
    (("--channels", "8", "--budget", "9"), "--budget"),
    (("--peer", "sparse-framework"), "--peer-path"),
    (("--peer", "sparse-framework", "--peer-path", "no-such-folder"), "pip install"),
])
def test_bad_options_give_one_line_and_exit_code_2(capsys, argv, says):
    err = bench_usage_error(capsys, "exchange", *argv)
    assert says in err, err
