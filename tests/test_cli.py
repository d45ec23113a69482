"""`sparse-rt run` through its real entry point: accuracy, bytes per budget and codec, one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_rt.cli import main

SPARSE_RT = shutil.which("sparse-rt") or str(Path(sys.executable).with_name("sparse-rt"))


def _run_json(*args: str) -> dict:
    done = subprocess.run([SPARSE_RT, "run", "digits_cnn", "--json", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # exactly one JSON object on stdout


@pytest.fixture(scope="module")
def full_budget() -> dict:
    return _run_json("--epochs", "10")


@pytest.fixture(scope="module")
def eighth_budget(full_budget) -> dict:
    return _run_json("--epochs", "10", "--budget", str(full_budget["channels"] // 8))


def test_full_budget_reaches_95_percent(full_budget):
    summary = full_budget
    for key in ("pipeline", "budget", "channels", "codec", "lz4", "epochs", "seed", "test_accuracy", "bytes_up",
                "bytes_down", "train_samples", "seconds"):
        assert key in summary
    assert summary["budget"] == summary["channels"] == 32
    assert summary["test_accuracy"] >= 0.95


def test_an_eighth_of_the_channels_sends_an_eighth_of_the_bytes(full_budget, eighth_budget):
    assert eighth_budget["budget"] == 4
    for direction in ("bytes_up", "bytes_down"):
        ratio = eighth_budget[direction] / full_budget[direction]
        assert abs(ratio - 1 / 8) <= 0.1 / 8, f"{direction}: {ratio:.4f} of the full budget's"
    assert eighth_budget["test_accuracy"] >= 0.90


def test_int8_sends_about_four_times_fewer_bytes(eighth_budget):
    int8 = _run_json("--epochs", "10", "--budget", "4", "--codec", "int8")
    assert 3.3 <= eighth_budget["bytes_up"] / int8["bytes_up"] <= 4.0
    assert int8["test_accuracy"] >= 0.90


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_options_and_files_give_one_line_and_exit_code_2(capsys, tmp_path):
    assert "--budget" in _error(capsys, "run", "digits_cnn", "--budget", "0")
    assert "between 1 and 32" in _error(capsys, "run", "digits_cnn", "--budget", "33", "--epochs", "1")
    assert "'bf16'" in _error(capsys, "run", "digits_cnn", "--codec", "bf16")
    assert "does not exist" in _error(capsys, "run", "digits_cnn", "--data", str(tmp_path / "missing.npz"))
    assert "unknown pipeline 'nope'" in _error(capsys, "run", "nope")
    assert "No such option" in _error(capsys, "run", "digits_cnn", "--bogus")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((20, 3, 32, 32), np.uint8), y=np.zeros(20, np.int64))
    message = _error(capsys, "run", "digits_cnn", "--data", str(wrong))
    assert "wrong.npz" in message and "(1, 8, 8)" in message


def test_users_own_data_file_trains(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = tmp_path / "mine.npz"
    np.savez(data, x=(digits.images * 15).astype(np.uint8), y=digits.target)
    summary = _run_json("--epochs", "3", "--data", str(data), "--budget", "8", "--codec", "fp16", "--lz4",
                        "--transport", "ipc")
    assert summary["codec"] == "fp16" and summary["lz4"] is True
    assert summary["train_samples"] + summary["test_samples"] == len(digits.target)
    assert summary["test_accuracy"] >= 0.8


def test_help_lists_every_option():
    done = subprocess.run([SPARSE_RT, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--budget", "--epochs", "--codec", "--lz4", "--data", "--seed", "--json"):
        assert option in done.stdout


def test_import_makes_a_codec_of_ones_own_usable_from_the_command_line(tmp_path, monkeypatch, capsys):
    from sparse_rt.wire import codecs

    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))  # this test's registrations stay in it
    (tmp_path / "cli_codec_plugin.py").write_text(
        "from sparse_rt.wire.codecs import Fp32, register_codec\n\n"
        "@register_codec\nclass Plain(Fp32):\n    name = 'plaintest'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as refused:
        main(["run", "digits_cnn", "--codec", "plaintest", "--epochs", "1"])
    assert refused.value.code == 2 and "unknown codec 'plaintest'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ran:
        main(["--import", "cli_codec_plugin", "run", "digits_cnn", "--codec", "plaintest", "--epochs", "1", "--json"])
    assert ran.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["codec"] == "plaintest" and summary["test_accuracy"] > 0.5


def test_an_unimportable_plugin_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--import", "no_such_plugin_module", "pipelines"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot import 'no_such_plugin_module'" in err and "Traceback" not in err
