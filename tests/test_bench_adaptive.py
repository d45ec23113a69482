"""`sparse-rt bench adaptive` through the real entry point, on digits over a short trace: schema, sanity, plot."""
from __future__ import annotations

import json

import click
import pytest

from sparse_rt.bench.adaptive import COLUMNS, Segment, Trace, parse_trace
from tests.bench_helpers import bench_usage_error, run_bench


def test_the_policies_side_by_side_over_a_rate_drop(capsys, tmp_path, model_set):
    code, out, err = run_bench(capsys, "adaptive", "--pipeline", "digits_cnn", "--models", str(model_set),
                               "--trace", "100:2,1:2", "--rtt-ms", "10", "--deadline-ms", "40", "--batch", "8",
                               "--json", "--out", str(tmp_path))
    assert code == 0, err
    report = json.loads(out)  # one JSON object on stdout
    policies = {p["name"]: p for p in report["policies"]}
    assert list(policies) == ["fixed-32", "fixed-8", "fixed-2", "controller", "controller+exit", "oracle"]
    for policy in policies.values():
        assert set(COLUMNS) <= set(policy) and "timeline" not in policy
        assert policy["requests"] > 10
        assert 0 <= policy["deadline_hit_rate"] <= 1 and 0.5 <= policy["accuracy"] <= 1
        assert policy["p50_ms"] <= policy["p99_ms"]
    # Fewer channels, fewer bytes: the fixed budgets order themselves, and the adaptive ones lie between.
    sizes = [policies[name]["mean_bytes_per_sample"] for name in ("fixed-32", "fixed-8", "fixed-2")]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[2] < policies["controller"]["mean_bytes_per_sample"] < sizes[0]
    # Only the policies with exits answer on the device; at 1 Mbit/s controller+exit does (the set's exits are
    # 0.96 accurate on digits), and the answers of each path are counted apart.
    assert all(policies[name]["exit_share"] == 0 for name in ("fixed-32", "fixed-8", "fixed-2", "controller"))
    assert policies["controller+exit"]["exit_share"] > 0.05 and policies["controller+exit"]["exit_accuracy"] > 0.8
    switches = [n for n in policies["controller"]["switch_requests"] if n is not None]
    assert switches and all(n <= 5 for n in switches), policies["controller"]["switch_requests"]
    saved = {row["policy"]: row["timeline"] for row in json.loads((tmp_path / "adaptive.json").read_text())["rows"]}
    assert all(saved.values())

    def slow_hits(name: str) -> float:
        slow = [r for r in saved[name] if r["segment"] == 1]
        return sum(r["latency_ms"] <= 40 for r in slow) / len(slow)

    # At 1 Mbit/s, 8 images of 32 channels (16 KiB) take 130 ms: the full budget misses, the controller adapts.
    assert slow_hits("fixed-32") < 0.2
    assert slow_hits("controller") > 0.6 and slow_hits("oracle") > 0.6 and slow_hits("controller+exit") > 0.6
    assert (tmp_path / "adaptive.png").stat().st_size > 10_000


def test_a_trace_is_rates_and_durations():
    assert parse_trace("100:20,5:1.5") == [Segment(100.0, 20.0), Segment(5.0, 1.5)]
    trace = Trace(parse_trace("100:2,1:3"))
    assert trace.seconds == 5 and trace.rate_bps(0.5) == 100e6 and trace.rate_bps(2.5) == 1e6
    assert trace.rate_bps(99) == 1e6  # past the end: the last rate
    for bad in ("100", "100:0", "-1:5", "fast:5"):
        with pytest.raises(click.BadParameter):
            parse_trace(bad)


def test_a_bad_trace_is_a_usage_error(capsys):
    assert "MBPS:SECONDS" in bench_usage_error(capsys, "adaptive", "--trace", "100")


def test_a_set_with_two_cuts_gives_a_fixed_policy_per_model_each_named_by_its_cut(two_cut_set):
    from sparse_rt.bench.adaptive import _model_order, fixed_choice, fixed_name, values_per_sample
    from sparse_rt.edge.controller import Choice
    from sparse_rt.store.modelset import read_manifest

    values = values_per_sample(read_manifest(two_cut_set))  # budget x h x w: 4x4 after block1, 2x2 after block2
    assert values == {(None, 32): 512, (None, 8): 128, ("block2", 64): 256, ("block2", 8): 32}
    names = [fixed_name(model) for model in sorted(values, key=_model_order)]
    assert names == ["fixed-32", "fixed-8", "fixed-block2:64", "fixed-block2:8"]
    assert fixed_choice("fixed-block2:8") == Choice(8, cut="block2") and fixed_choice("fixed-32") == Choice(32)
