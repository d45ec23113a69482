"""`sparse-rt bench edges` through the real CLI with 1 and 2 edge processes: counts agree, sane numbers, plot."""
from __future__ import annotations

import json

import pytest

from tests.bench_helpers import bench_usage_error, run_bench


def test_edges_train_in_one_window_and_lose_no_step(capsys, tmp_path):
    code, out, err = run_bench(capsys, "edges", "--edges", "1,2", "--seconds", "1", "--repeats", "2", "--warmup", "1",
                               "--batch-size", "16", "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    assert report["suite"] == "edges" and report["settings"]["pipeline"] == "digits_cnn"
    assert report["settings"]["server_errors"] == 0 and report["settings"]["server_steps_for_unknown_sessions"] == 0
    assert [row["edges"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["lost"] == 0 and row["duplicated"] == 0 and row["errors"] == 0, row
        assert row["agg_sps"] > 0 and len(row["per_edge_sps"]) == row["edges"]
        assert 0 < row["edge_sps_min"] <= row["edge_sps_max"]
        assert 0 < row["fairness"] <= 1
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert report["settings"]["server_steps_applied"] == sum(row["steps"] for row in report["rows"])
    assert (tmp_path / "edges.json").exists() and (tmp_path / "edges.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, expected", [
    (("--edges", "0"), "at least 1"),
    (("--edges", "1,two"), "comma-separated integers"),
    (("--pipeline", "nope"), "unknown pipeline 'nope'"),
    (("--seconds", "0"), "--seconds"),
])
def test_bad_options_give_one_line_and_exit_code_2(capsys, argv, expected):
    assert expected in bench_usage_error(capsys, "edges", *argv)
