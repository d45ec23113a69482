"""Schedules (budgets and learning rates per epoch), filter resets, and `sparse-rt train` with its model set."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from sparse_rt.cli import main
from sparse_rt.errors import ConfigError
from sparse_rt.model.compression import Compressor
from sparse_rt.train.schedules import Phase, deprune, fixed, parse_phases, prune


def test_phases_parse_with_c_for_all_channels():
    assert parse_phases("4:15,C:7", 64) == [Phase(4, 15), Phase(64, 7)]
    for bad in ("4-15", "0:3", "65:2", "4:0", "x:1", "4:15,"):
        with pytest.raises(ConfigError):
            parse_phases(bad, 64)


def test_deprune_boosts_the_learning_rate_after_each_raise():
    plan = deprune(parse_phases("2:3,8:3,C:2", 32), boost=2.0, boost_epochs=2)
    assert [e.budget for e in plan] == [2, 2, 2, 8, 8, 8, 32, 32]
    assert [e.lr_factor for e in plan] == [1, 1, 1, 2, 2, 1, 2, 2]
    assert [e.reset for e in plan] == ["none"] * 3 + ["raise", "none", "none", "raise", "none"]
    assert [e.phase_epoch for e in plan] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert all(e.explore for e in plan)  # newly allowed channels must get a chance to be drawn
    with pytest.raises(ConfigError, match="ascending"):
        deprune(parse_phases("8:2,4:2", 32))


def test_prune_resets_saturated_entries_at_each_smaller_budget():
    plan = prune(parse_phases("C:3,8:2,2:2", 32))
    assert [e.budget for e in plan] == [32, 32, 32, 8, 8, 2, 2]
    assert [e.lr_factor for e in plan] == [1.0] * 7
    assert [e.reset for e in plan] == ["none"] * 3 + ["prune", "none", "prune", "none"]
    # Transfer phases keep the channels the inherited filter ranks first instead of drawing others.
    assert [e.explore for e in plan] == [True] * 3 + [False] * 4
    with pytest.raises(ConfigError, match="descending"):
        prune(parse_phases("4:2,8:2", 32))
    assert [(e.budget, e.reset) for e in fixed(4, 2)] == [(4, "none"), (4, "none")]


def test_raising_the_budget_restarts_the_entries_that_were_off():
    compressor = Compressor(8, 2)
    with torch.no_grad():
        compressor.filter_logits.copy_(torch.tensor([5.0, -6, -6, 4, -6, -6, -6, -6]))
    compressor.change_budget(4, "raise")
    f = compressor.filter_values().detach()
    assert compressor.budget == 4
    assert f[[0, 3]].tolist() == pytest.approx([torch.sigmoid(torch.tensor(5.0)).item(),
                                                torch.sigmoid(torch.tensor(4.0)).item()])
    assert torch.allclose(f[[1, 2, 4, 5, 6, 7]], torch.tensor(0.5))  # 4 / 8: the even start at the new budget


def test_pruning_restarts_only_saturated_entries():
    compressor = Compressor(4, 4)
    with torch.no_grad():
        compressor.filter_logits.copy_(torch.tensor([8.0, 0.3, -8.0, -0.2]))
    compressor.change_budget(2, "prune")
    f = compressor.filter_values().detach()
    assert f[[0, 2]].tolist() == pytest.approx([0.5, 0.5])  # saturated: restarted at 2 / 4
    assert f[[1, 3]].tolist() == pytest.approx(torch.sigmoid(torch.tensor([0.3, -0.2])).tolist())


def test_train_prune_writes_the_csv_and_a_model_set(tmp_path, capsys):
    out = tmp_path / "prune"
    with pytest.raises(SystemExit) as info:
        main(["train", "prune", "digits_cnn", "--phases", "C:3,8:2,2:2", "--out", str(out)])
    assert info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["models"] == [32, 8, 2]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["budget"]) for r in rows] == [32, 32, 32, 8, 8, 2, 2]
    up = [int(r["bytes_up"]) for r in rows]
    assert all(later > earlier for earlier, later in zip(up, up[1:]))
    per_epoch = [b - a for a, b in zip([0] + up, up)]
    assert per_epoch[5] / per_epoch[0] == pytest.approx(2 / 32, rel=0.1)  # bytes follow the budget
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["budget"] for m in manifest["models"]] == [32, 8, 2]
    for model in manifest["models"]:
        assert (out / model["head"]).is_file() and (out / model["tail"]).is_file()
        assert model["bytes_per_sample"]["fp32"] == model["budget"] * 4 * 4 * 4
    assert manifest["models"][0]["test_accuracy"] >= 0.9
    with pytest.raises(SystemExit):
        main(["models", "show", str(out)])
    table = capsys.readouterr().out
    assert "budget" in table and "\n       2" in table


def test_train_deprune_sends_fewer_bytes_while_the_budget_is_small(tmp_path, capsys):
    out = tmp_path / "deprune"
    with pytest.raises(SystemExit) as info:
        main(["train", "deprune", "digits_cnn", "--phases", "2:2,C:1", "--boost", "2", "--boost-epochs", "1",
              "--out", str(out)])
    assert info.value.code == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == [0.003, 0.003, 0.006]
    up = [int(r["bytes_up"]) for r in rows]
    assert (up[2] - up[1]) / up[0] == pytest.approx(32 / 2, rel=0.1)
    with pytest.raises(SystemExit) as info:
        main(["models", "show", str(out)])
    assert info.value.code == 2 and "not a model set" in capsys.readouterr().err


def test_experiments_write_reports_and_plots(tmp_path, capsys):
    from sparse_rt.train.experiment import final_accuracy, first_reaching

    rows = [{"test_accuracy": a, "bytes_up": 10.0 * i, "bytes_down": 1.0} for i, a in enumerate([0.2, 0.6, 0.5, 0.7])]
    assert final_accuracy(rows) == pytest.approx(0.6)
    assert first_reaching(rows, 0.55)["bytes_up"] == 10.0 and first_reaching(rows, 0.9) is None

    with pytest.raises(SystemExit) as info:
        main(["experiment", "deprune", "digits_cnn", "--phases", "2:2,C:1", "--seeds", "1", "--out",
              str(tmp_path / "d")])
    assert info.value.code == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert set(report["mean_accuracy"]) == {"deprune", "no_compression", "high_compression"}
    assert (tmp_path / "d" / "deprune.png").stat().st_size > 10_000
    for run in ("deprune", "no_compression", "high_compression"):
        assert len(list(csv.DictReader(open(tmp_path / "d" / "seed-0" / run / "metrics.csv")))) == 3

    with pytest.raises(SystemExit) as info:
        main(["experiment", "prune", "digits_cnn", "--phases", "C:2,8:1", "--seeds", "1", "--out",
              str(tmp_path / "p")])
    assert info.value.code == 0
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert [row["budget"] for row in report["budgets"]] == [8]
    assert (tmp_path / "p" / "prune.png").stat().st_size > 10_000
    capsys.readouterr()
