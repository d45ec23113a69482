"""`sparse-rt bench transport` through the real entry point, at tiny sizes, so the suite cannot rot."""
from __future__ import annotations

import json
import math

import pytest

from tests.bench_helpers import bench_usage_error, run_bench


def test_transport_reports_both_variants_per_size(capsys, tmp_path):
    code, out, err = run_bench(capsys, "transport", "--sizes", "4K,64K", "--repeats", "2", "--warmup", "1",
                               "--max-messages", "200", "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["suite"] == "transport"
    assert report["settings"]["sizes"] == [4096, 65536]
    assert [row["bytes"] for row in report["rows"]] == [4096, 65536]
    for row in report["rows"]:
        for key in ("sparse_rt_MB_s", "raw_MB_s", "sparse_rt_msg_s", "raw_msg_s", "rtt_sparse_rt_us", "rtt_raw_us"):
            assert row[key] > 0, (key, row)
        assert math.isfinite(row["ratio_vs_raw"]) and row["ratio_vs_raw"] > 0
        assert math.isfinite(row["overhead_us"]) and math.isfinite(row["rtt_overhead_us"])
        assert row["wire_bytes"] > row["bytes"]  # header and indices on top of the values
        # Both variants move the same bytes, so MB/s and messages/s must tell the same story.
        assert row["sparse_rt_MB_s"] / row["raw_MB_s"] == pytest.approx(row["ratio_vs_raw"])
    assert any(note.startswith("target overhead") for note in report["notes"])
    assert json.loads((tmp_path / "transport.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "transport.png").stat().st_size > 0


def test_transport_with_curve_measures_the_encrypted_variant_too(capsys):
    code, out, err = run_bench(capsys, "transport", "--sizes", "64K", "--repeats", "1", "--warmup", "0",
                               "--max-messages", "40", "--curve", "--json")
    assert code == 0, err
    row = json.loads(out)["rows"][0]
    assert row["curve_MB_s"] > 0 and row["rtt_curve_us"] > 0
    assert row["curve_vs_plain"] == pytest.approx(row["curve_MB_s"] / row["sparse_rt_MB_s"])


@pytest.mark.parametrize("sizes, says", [("0", "multiple of 4 bytes"), ("4Q", "not a size"), ("4K,,1M", "not a size"),
                                         ("6", "multiple of 4 bytes")])
def test_bad_sizes_give_one_line_and_exit_code_2(capsys, sizes, says):
    err = bench_usage_error(capsys, "transport", "--sizes", sizes)
    assert "--sizes" in err and says in err, err
