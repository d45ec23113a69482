"""`sparse-rt bench fuzz`, short: 3,000 hostile messages and 200 sessions against real server processes.

One run (a module fixture, about 35 s on 2 cores) serves every test here: the
server must survive the messages without a crash, a hang, a NaN or a wrong
reply, and the memory of expired sessions must not add up.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sparse_rt.bench.common import BenchReport
from sparse_rt.bench.fuzz import run_fuzz
from sparse_rt.bench.hostile import inspect_reply, mutate
from sparse_rt.wire.header import PROTOCOL_VERSION, encode_header

MESSAGES, SESSIONS = 3000, 200
REUSE_TOLERANCE_MIB = 30.0  # RSS with as many sessions again, over RSS with the first ones
FUZZ_GROWTH_MIB = 64.0  # RSS growth over the fuzzing after its warm-up


@pytest.fixture(scope="module")
def report() -> BenchReport:
    return run_fuzz(MESSAGES, SESSIONS, seed=1)


def _row(report: BenchReport, phase: str) -> dict:
    return next(row for row in report.rows if row["phase"] == phase)


def test_the_server_survives_hostile_messages(report):
    row = _row(report, "fuzz")
    assert row["crashes"] == 0, row["server"]
    assert row["hangs"] == 0 and row["stalls"] == 0 and row["unanswered"] == 0, row
    assert row["non_finite"] == 0, row["problems"]
    assert row["wrong_replies"] == 0, row["problems"]
    assert row["messages"] >= MESSAGES and row["replies"] == row["messages"], row
    assert "internal" not in row["codes"], row["codes"]
    assert row["serving_after"] is True


def test_the_messages_reach_the_checks_and_the_tail(report):
    """A fuzzer that only ever hits the header check tests little: valid work and deep refusals must show."""
    codes = _row(report, "fuzz")["codes"]
    for code in ("pred", "grad", "welcome", "bad_header", "bad_version", "bad_kind", "bad_frames", "bad_message",
                 "unknown_session", "wrong_mode", "bad_step"):
        assert codes.get(code, 0) > 0, (code, codes)
    assert sum(codes.values()) == _row(report, "fuzz")["replies"]


def test_fuzzing_does_not_grow_the_server(report):
    row = _row(report, "fuzz")
    assert row["rss_start_mib"] > 0 and row["rss_end_mib"] > 0
    assert row["rss_growth_mib"] < FUZZ_GROWTH_MIB, row["rss_samples"]
    assert len(row["rss_samples"]) >= 20


def test_sessions_expire_and_their_memory_is_not_lost(report):
    row = _row(report, "sessions")
    assert row["crashes"] == 0 and row["non_finite"] == 0 and row["wrong_replies"] == 0, row
    assert row["steps_ok"] == 2 * SESSIONS + 1  # both rounds, and the warm-up session
    assert row["sessions_alive_at_peak"] == SESSIONS and row["expiry_confirmed"] is True
    assert row["sessions_expired"] == SESSIONS + 1
    assert row["rss_with_sessions_mib"] > row["rss_baseline_mib"]
    assert row["rss_reopened_mib"] - row["rss_with_sessions_mib"] < REUSE_TOLERANCE_MIB, row


def test_expired_sessions_give_their_memory_back(report):
    """glibc keeps freed blocks of a stored reply's size in its heap; the server trims it after sessions end."""
    row = _row(report, "sessions")
    held = row["rss_with_sessions_mib"] - row["rss_baseline_mib"]
    assert row["rss_after_expiry_mib"] - row["rss_baseline_mib"] <= max(10.0, held / 2), row


def test_the_report_is_json_with_every_field(report):
    results = json.loads(json.dumps(report.to_dict()))
    fuzz, sessions = _row(report, "fuzz"), _row(report, "sessions")
    for key in ("codes", "crashes", "hangs", "non_finite", "wrong_replies", "rss_start_mib", "rss_end_mib",
                "rss_growth_mib", "messages_s"):
        assert key in fuzz, key
    for key in ("rss_baseline_mib", "rss_with_sessions_mib", "rss_after_expiry_mib", "sessions_expired"):
        assert key in sessions, key
    assert results["suite"] == "fuzz" and results["settings"]["messages"] == MESSAGES
    assert "fuzz" in report.table()


def test_mutate_changes_messages_and_keeps_them_frames():
    rng = random.Random(3)
    frames = [encode_header({"kind": "infer", "id": 5, "session": "s" * 16, "codec": "fp32", "lz4": False,
                             "channels": 32, "shape": [1, 1, 4, 4]}), b"\0\0", b"\0" * 64]
    variants = [mutate(rng, frames) for _ in range(500)]
    assert all(variant and all(isinstance(frame, bytes) for frame in variant) for variant in variants)
    assert sum(variant != frames for variant in variants) > 400
    assert any(len(variant) != 3 for variant in variants)
    assert any(f'"v":{PROTOCOL_VERSION}'.encode() not in variant[0] for variant in variants)


@pytest.mark.parametrize("fields, data, non_finite", [
    ({"kind": "pred", "shape": [1, 2]}, [np.array([0.5, np.nan], "<f4").tobytes()], True),
    ({"kind": "pred", "shape": [1, 2]}, [np.array([0.5, -1.0], "<f4").tobytes()], False),
    ({"kind": "grad", "codec": "fp32", "lz4": False, "shape": [1, 1, 1, 2], "step": 0, "loss": float("inf")},
     [b"\0\0", np.zeros(2, "<f4").tobytes()], True),
    ({"kind": "grad", "codec": "fp16", "lz4": False, "shape": [1, 1, 1, 2], "step": 0, "loss": 0.5},
     [b"\0\0", np.array([1, np.inf], "<f2").tobytes()], True),
])
def test_non_finite_replies_are_seen_not_hidden_by_the_decoder(fields, data, non_finite):
    header = json.dumps({"v": PROTOCOL_VERSION, "id": 7, "session": "s" * 16, **fields}).encode()  # NaN as JSON NaN
    reply = inspect_reply([header, *data])
    assert reply.non_finite is non_finite and reply.id == 7 and reply.label == fields["kind"]
    assert reply.problem is None


def test_a_reply_that_does_not_decode_is_a_problem():
    assert inspect_reply([b"not json"]).problem
    assert inspect_reply([encode_header({"kind": "pred", "id": 1, "session": "s", "shape": [1, 2]}), b"\0"]).problem
