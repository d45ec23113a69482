"""`sparse-rt bench scale` through the real CLI on digits, short windows: schema, no lost request, a kill, plot."""
from __future__ import annotations

import json

from sparse_rt.bench.scale import COLUMNS, TRAINING_COLUMNS
from tests.bench_helpers import bench_usage_error, run_bench


def test_one_and_two_replicas_and_a_kill_lose_no_request(capsys, tmp_path):
    code, out, err = run_bench(capsys, "scale", "--pipeline", "digits_cnn", "--edges", "2", "--seconds", "4",
                               "--warmup", "1", "--no-training", "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    assert report["suite"] == "scale" and report["training"] == []
    rows = report["inference"]
    assert [(row["scenario"], row["replicas"]) for row in rows] == [("steady", 1), ("steady", 2), ("kill", 2)]
    for row in rows:
        assert set(COLUMNS) <= set(row) and "timeline" not in row
        assert row["samples_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["lost_requests"] == 0 and row["broker"]["dropped"] == 0, row
        if row["scenario"] == "steady":
            assert row["broker"]["replies"] == row["broker"]["requests"]  # every request answered once
    steady_two, kill = rows[1], rows[2]
    assert len(steady_two["broker"]["per_replica"]) == 2  # both replicas served
    assert kill["broker"]["lost"] == 1 and kill["recovery_s"] is not None and kill["recovery_s"] < 5
    assert (tmp_path / "scale.json").exists() and (tmp_path / "scale.png").stat().st_size > 1000


def test_training_on_one_process_and_on_a_group_of_two_and_with_a_replica_killed(capsys):
    code, out, err = run_bench(capsys, "scale", "--no-inference", "--training-pipeline", "digits_cnn",
                               "--training-edges", "2", "--epochs", "5", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["inference"] == []
    rows = report["training"]
    assert [(row["scenario"], row["replicas"]) for row in rows] == [("steady", 1), ("steady", 2), ("kill", 2)]
    for row in rows:
        assert set(TRAINING_COLUMNS) <= set(row)
        assert row["samples_per_s"] > 0 and row["lost_requests"] == 0 and row["accuracy"] >= 0.9, row
    single, group, kill = rows
    assert single["max_param_diff"] is None and single["restarts"] == 0
    for row in (group, kill):  # both replicas trained, and ended with the same bits
        assert len(row["steps_applied"]) == 2 and min(row["steps_applied"]) > 0, row
        assert row["max_param_diff"] <= 1e-6 and row["digests_equal"], row
    assert group["steps_rolled_back"] == 0 and group["restarts"] == 0
    assert kill["restarts"] == 1 and kill["recovery_s"] is not None and kill["steps_rolled_back"] >= 0


def test_bad_options_are_usage_errors(capsys):
    assert "--edges" in bench_usage_error(capsys, "scale", "--edges", "0")
    assert "--merge" in bench_usage_error(capsys, "scale", "--merge", "median")
