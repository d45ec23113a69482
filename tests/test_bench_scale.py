"""`sparse-rt bench scale` through the real CLI on digits, short windows: schema, no lost request, a kill, plot."""
from __future__ import annotations

import json

from sparse_rt.bench.scale import COLUMNS
from tests.bench_helpers import bench_usage_error, run_bench


def test_one_and_two_replicas_and_a_kill_lose_no_request(capsys, tmp_path):
    code, out, err = run_bench(capsys, "scale", "--pipeline", "digits_cnn", "--edges", "2", "--seconds", "4",
                               "--warmup", "1", "--json", "--out", str(tmp_path))
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


def test_bad_options_are_usage_errors(capsys):
    assert "--edges" in bench_usage_error(capsys, "scale", "--edges", "0")
