"""`sparse-rt bench codec` through the real entry point on real digits activations, at one small budget."""
from __future__ import annotations

import json
import math

import pytest

from tests.bench_helpers import bench_usage_error, run_bench


def test_codec_reports_every_codec_with_and_without_lz4(capsys, tmp_path):
    code, out, err = run_bench(capsys, "codec", "--pipeline", "digits_cnn", "--budgets", "C/4", "--samples", "128",
                               "--train-steps", "2", "--repeats", "2", "--warmup", "0", "--json",
                               "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)
    settings = report["settings"]
    assert report["suite"] == "codec" and settings["pipeline"] == "digits_cnn"
    assert settings["channels"] == 32 and settings["budgets"] == [8]
    rows = {(row["codec"], row["lz4"]): row for row in report["rows"]}
    assert set(rows) == {(codec, lz4) for codec in ("fp32", "fp16", "int8") for lz4 in (False, True)}
    for row in rows.values():
        assert row["budget"] == 8 and row["MB_s"] > 0 and row["bytes_per_sample"] > 0
        assert row["message_bytes_per_sample"] > row["bytes_per_sample"]  # header, indices, labels on top
    fp32 = rows["fp32", False]
    assert fp32["bytes_per_sample"] == 4 * 8 * 4 * 4  # B x h x w fp32 values
    batches = math.ceil(settings["samples"] / settings["batch_size"])
    for (codec, lz4), row in rows.items():
        if codec == "fp32":
            assert row["max_abs_err"] == 0 and row["rel_rms_err"] == 0  # lossless, lz4 or not
        else:
            assert 0 < row["rel_rms_err"] < (0.002 if codec == "fp16" else 0.05)
        if lz4:  # lz4 never costs more than its frame's few bytes per batch
            plain = rows[codec, False]
            assert row["bytes_per_sample"] <= plain["bytes_per_sample"] + 64 * batches / settings["samples"]
            assert row["rel_rms_err"] == plain["rel_rms_err"]
    assert rows["int8", False]["bytes_per_sample"] < rows["fp16", False]["bytes_per_sample"] < fp32["bytes_per_sample"]
    assert (tmp_path / "codec.png").stat().st_size > 0
    assert json.loads((tmp_path / "codec.json").read_text())["rows"] == report["rows"]


@pytest.mark.parametrize("argv, says", [
    (("--budgets", "0"), ("--budgets", "not a budget")),
    (("--budgets", "C/0"), ("--budgets", "not a budget")),
    (("--budgets", "half"), ("--budgets", "not a budget")),
    (("--budgets", "33"), ("--budgets", "between 1 and 32")),
    (("--pipeline", "nope"), ("--pipeline", "unknown pipeline 'nope'")),
])
def test_bad_options_give_one_line_and_exit_code_2(capsys, argv, says):
    err = bench_usage_error(capsys, "codec", "--pipeline", "digits_cnn", "--train-steps", "0", "--samples", "8",
                            "--repeats", "1", "--warmup", "0", *argv)
    assert all(words in err for words in says), err
