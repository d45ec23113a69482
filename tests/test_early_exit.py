"""Early exits on a model set: trained with the head frozen, calibrated, and answering on the device.

The edge's requests go to a real `sparse-rt node --role server --models`
process (conftest's ``served_set``); the exits live only on the edge, in a
copy of the same set.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparse_rt.cli import main
from sparse_rt.edge.client import EdgeClient
from sparse_rt.edge.controller import Choice, options_from_manifest
from sparse_rt.pipeline import get_pipeline
from sparse_rt.train.exits import calibrate

DIGITS = get_pipeline("digits_cnn")


@pytest.fixture(scope="module")
def exit_set(model_set, tmp_path_factory):
    """A copy of the digits model set with `sparse-rt train exit` run on it."""
    folder = tmp_path_factory.mktemp("exits") / "digits"
    shutil.copytree(model_set, folder)
    with pytest.raises(SystemExit) as info:
        main(["train", "exit", str(folder), "--no-progress"])
    assert info.value.code == 0
    return folder


def test_training_exits_leaves_the_models_as_they_were_and_calibrates_every_threshold(model_set, exit_set):
    manifest = json.loads((exit_set / "manifest.json").read_text())
    for entry in manifest["models"]:
        for side in ("head", "tail"):  # the head is frozen: the set's own predictions do not change
            assert (exit_set / entry[side]).read_bytes() == (model_set / entry[side]).read_bytes()
        assert (exit_set / entry["exit"]["classifier"]).is_file()
        table = entry["exit"]["calibration"]
        shares = [row["share"] for row in table]
        assert shares == sorted(shares, reverse=True) and shares[0] == 1.0  # threshold 0: everything exits
        assert table[0]["accuracy"] == table[0]["exit_accuracy"] > 0.8  # digits are easy even at the cut
        assert entry["exit"]["calibration_images"] == "test[0::2]"  # the other half is bench adaptive's
        for row in table:
            if row["share"] == 0:  # nothing exits: the server's answers alone
                assert row["accuracy"] == row["server_accuracy"]


def test_calibration_counts_each_path_apart():
    labels = torch.tensor([0, 1, 0, 1])
    exit_logits = torch.tensor([[9.0, 0.0], [0.0, 9.0], [0.1, 0.0], [0.1, 0.0]])  # sure, sure, unsure, unsure
    server_logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    low, high = calibrate(exit_logits, server_logits, labels, thresholds=(0.0, 0.9))
    assert low == {"threshold": 0.0, "share": 1.0, "exit_accuracy": 0.75, "server_accuracy": None, "accuracy": 0.75}
    # Two sure rows, both right on the device; the server gets the others right once in two.
    assert high == {"threshold": 0.9, "share": 0.5, "exit_accuracy": 1.0, "server_accuracy": 0.5, "accuracy": 0.75}


async def test_an_exit_answers_sure_samples_on_the_device_and_sends_only_the_rest(exit_set, served_set):
    x = DIGITS.load_data(0).x_test[:64]
    async with EdgeClient("digits_cnn", served_set, model_set=exit_set, budget=8) as edge:
        plain = await edge.infer(x)
        exit_stage = edge.exits["block1", 8]
        with torch.inference_mode():
            exit_logits, confidence = exit_stage.confidence(edge.heads.at()[8].head(x))

        edge.select(Choice(8, exit=0.0))  # everything exits: nothing crosses the network
        sent = edge.traffic.bytes_sent
        logits = await edge._session.infer(x)
        assert edge.traffic.bytes_sent == sent
        torch.testing.assert_close(logits, exit_logits)

        threshold = float(confidence.median())  # about half the rows are sure enough
        edge.select(Choice(8, exit=threshold))
        sure = confidence >= threshold
        assert 0 < int(sure.sum()) < len(x)
        sent = edge.traffic.bytes_sent
        logits = await edge._session.infer(x)
        torch.testing.assert_close(logits[sure], exit_logits[sure])
        torch.testing.assert_close(logits[~sure], plain[~sure], atol=1e-4, rtol=1e-4)  # the server's answers
        partial = edge.traffic.bytes_sent - sent
        sent = edge.traffic.bytes_sent
        edge.select(Choice(8))
        await edge._session.infer(x)
        assert partial < edge.traffic.bytes_sent - sent  # fewer rows, fewer bytes
        session = edge.session.session_id
    assert session is not None  # one session throughout: switching exits is not a new handshake


async def test_the_controller_answers_on_the_device_when_the_link_cannot_meet_the_deadline(exit_set, served_set):
    from sparse_rt.transport.shaper import Shaper

    x = DIGITS.load_data(0).x_test[:8]
    shaper = Shaper(0.05e6, 0.05)  # 50 kbit/s and 50 ms each way: no request can come back within 60 ms
    async with EdgeClient("digits_cnn", served_set, model_set=exit_set, shaper=shaper, deadline_ms=60,
                          early_exit=True) as edge:
        decisions, on_device = [], []
        for _ in range(12):
            await edge.infer(x)
            decisions.append(edge.last_decision)
            on_device.append(edge.last_on_device)
        settled = decisions[-4:]
        assert all(d.option.exit_share == 1 and d.meets for d in settled), [d.choice.label for d in settled]
        assert all(local is not None and bool(local.all()) for local in on_device[-4:]), on_device[-4:]
        assert edge.last_latency_ms < 60
        assert edge.adaptive["on_device"] >= 4 * len(x)


def test_exit_options_come_from_the_calibration(exit_set):
    manifest = json.loads((exit_set / "manifest.json").read_text())
    plain = options_from_manifest(manifest, codecs=("fp32",))
    with_exits = options_from_manifest(manifest, codecs=("fp32",), exits=True)
    assert all(o.choice.exit is None for o in plain) and len(with_exits) > len(plain)
    entry = manifest["models"][0]
    row = next(r for r in entry["exit"]["calibration"] if 0 < r["share"] < 1)
    option = next(o for o in with_exits if o.choice == Choice(entry["budget"], exit=row["threshold"]))
    assert option.accuracy == row["accuracy"] and option.exit_share == row["share"]
    assert option.bytes_per_sample == pytest.approx(entry["bytes_per_sample"]["fp32"] * (1 - row["share"]))
    with pytest.raises(ValueError, match="sparse-rt train exit"):
        options_from_manifest(json.loads(json.dumps({**manifest, "models": [
            {k: v for k, v in e.items() if k != "exit"} for e in manifest["models"]]})), exits=True)


def test_an_edge_node_with_early_exit_reports_what_it_answered_on_the_device(start, exit_set, served_set):
    edge = start("edge", connect=served_set, mode="infer", models=exit_set, deadline_ms=200, early_exit=True,
                 json=True)
    summary = edge.result(timeout=120)
    assert summary["test_accuracy"] >= 0.85
    log = "".join(edge.log)
    assert "early exit answered" in log and "on the device" in log, log
