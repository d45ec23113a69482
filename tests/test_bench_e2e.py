"""`sparse-rt bench e2e` through the real CLI at a tiny size: schema, sane numbers, the plot, option errors."""
from __future__ import annotations

import json
import math

import pytest

from tests.bench_helpers import bench_usage_error, run_bench


def test_e2e_reports_split_and_local_rates_with_stages(capsys, tmp_path):
    code, out, err = run_bench(capsys, "e2e", "--pipelines", "digits_cnn", "--batches", "3", "--repeats", "1",
                               "--warmup", "1", "--batch-size", "16", "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    assert report["suite"] == "e2e" and report["settings"]["pipelines"] == ["digits_cnn"]
    assert report["notes"] and report["machine"]["cpus"]
    rows = {row["mode"]: row for row in report["rows"]}
    assert set(rows) == {"train", "infer", "infer_pipelined"}
    for mode, row in rows.items():
        assert row["pipeline"] == "digits_cnn" and row["batches"] == 3 and row["batch_size"] == 16
        assert row["split_sps"] > 0 and row["local_sps"] > 0
        assert math.isfinite(row["ratio_vs_local"]) and row["ratio_vs_local"] > 0
        for stage in ("head_ms", "encode_ms", "wait_ms", "decode_ms", "srv_queue_ms", "srv_decode_ms",
                      "srv_tail_ms", "srv_encode_ms", "net_ms"):
            assert row[stage] is not None and row[stage] >= 0, (mode, stage, row)
        assert (row["backward_ms"] is not None) == (mode == "train")
    assert json.loads((tmp_path / "e2e.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "e2e.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, expected", [
    (("--pipelines", "nope"), "unknown pipeline 'nope'"),
    (("--pipelines", "digits_cnn,nope"), "unknown pipeline 'nope'"),
    (("--batch-size", "0"), "--batch-size"),
    (("--batches", "0"), "--batches"),
])
def test_bad_options_give_one_line_and_exit_code_2(capsys, argv, expected):
    assert expected in bench_usage_error(capsys, "e2e", *argv)
