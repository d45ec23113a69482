"""One model set cut at several layers: trained into one folder, loaded per cut, served per request on one session."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import zmq
import zmq.asyncio

from pipelines.digits_cnn import pipeline as digits
from sparse_rt.assembly import edge_chain
from sparse_rt.cli import main
from sparse_rt.edge.client import EdgeClient
from sparse_rt.edge.protocol import SessionSettings
from sparse_rt.errors import ConfigError, RemoteError
from sparse_rt.model.sides import CutShape
from sparse_rt.stages.codec import CodecStage
from sparse_rt.stages.optimizer import build_optimizer
from sparse_rt.store.modelset import MANIFEST, ModelSet, load_model_set, load_model_sets, read_manifest
from sparse_rt.wire.messages import ErrorReply, Hello, Welcome, decode_message, encode_message

SHAPES = {"block1": CutShape(32, 4, 4, 4, 4), "block2": CutShape(64, 2, 2, 2, 2)}


def _main(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


@pytest.fixture(scope="module")
def heads(two_cut_set) -> ModelSet:
    return load_model_sets(two_cut_set, digits, "head")


@pytest.fixture(scope="module")
def tails(two_cut_set) -> ModelSet:
    return load_model_sets(two_cut_set, digits, "tail")


def _chain(heads: ModelSet, cut: str | None, budget: int, states: str | None = None):
    """The edge chain of the set's model at (cut, budget) (``None``: the default cut), stating ``states`` as its cut
    in every request (default: ``cut``; ``None`` is left out, the session's cut)."""
    head = heads.models[cut or heads.default_cut, budget]
    return edge_chain(head, lambda params: build_optimizer(params, "adam", 1e-3), cut=states or cut)


def _local(heads: ModelSet, tails: ModelSet, cut: str, budget: int, x: torch.Tensor) -> torch.Tensor:
    """That model's logits computed here, head and tail in one process."""
    with torch.inference_mode():
        return tails.models[cut, budget](*heads.models[cut, budget](x))


# ---- training and the folder -------------------------------------------------------------------------

def test_two_cuts_trained_into_one_folder_make_one_manifest_and_both_load(two_cut_set, heads, capsys):
    manifest = read_manifest(two_cut_set)
    assert (manifest["cut"], manifest["channels"]) == ("block1", 32)  # the first cut trained stays the default
    entries = {(m["cut"], m["budget"]): m for m in manifest["models"]}
    assert set(entries) == {("block1", 32), ("block1", 8), ("block2", 64), ("block2", 8)}
    for (cut, budget), entry in entries.items():
        shape = SHAPES[cut]
        assert (entry["channels"], entry["sent_height"], entry["sent_width"]) == (shape.channels, shape.sent_height,
                                                                                  shape.sent_width)
        folder = f"budget-{budget}" if cut == "block1" else f"block2/budget-{budget}"
        assert (entry["head"], entry["tail"]) == (f"{folder}/head.pt", f"{folder}/tail.pt")
        assert (two_cut_set / entry["head"]).is_file() and (two_cut_set / entry["tail"]).is_file()
        assert entry["bytes_per_sample"]["fp32"] == budget * shape.sent_height * shape.sent_width * 4

    assert set(heads.models) == set(entries) and heads.default_cut == "block1" and heads.resolution == 0
    assert heads.cuts == SHAPES
    assert heads.budgets("block2") == [8, 64] and heads.budgets() == [8, 32] and set(heads.at("block2")) == {8, 64}
    assert all(not model.training for model in heads.models.values())
    tails, cut, resolution = load_model_set(two_cut_set, digits, "tail")  # as before: the default cut only
    assert set(tails) == {32, 8} and cut == SHAPES["block1"] and resolution == 0

    assert _main("models", "show", str(two_cut_set)) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[-2:] == ["channels", "cut"]
    assert [(row.split()[0], row.split()[-1]) for row in rows[2:]] == [("32", "block1"), ("8", "block1"),
                                                                       ("64", "block2"), ("8", "block2")]


def test_retraining_a_cut_replaces_only_its_entries(two_cut_set, tmp_path, capsys):
    folder = tmp_path / "set"
    shutil.copytree(two_cut_set, folder)
    before = {(m["cut"], m["budget"]): m for m in read_manifest(folder)["models"]}
    assert _main("train", "prune", "digits_cnn", "--phases", "C:1", "--cut", "block2", "--out", str(folder)) == 0
    manifest = read_manifest(folder)
    after = {(m["cut"], m["budget"]): m for m in manifest["models"]}
    assert set(after) == set(before) and (manifest["cut"], manifest["channels"]) == ("block1", 32)
    assert (before["block2", 64]["epochs"], after["block2", 64]["epochs"]) == (2, 1)  # replaced
    assert all(after[key] == before[key] for key in before if key != ("block2", 64))  # kept as they were
    assert not list(folder.glob(f".{MANIFEST}.*"))  # written through a temporary file, renamed
    assert set(load_model_sets(folder, digits, "tail").models) == set(before)


def test_a_set_of_another_seed_or_resolution_is_refused_before_training(two_cut_set, tmp_path, capsys):
    folder = tmp_path / "set"
    shutil.copytree(two_cut_set, folder)
    (folder / "metrics.csv").unlink()
    manifest = (folder / MANIFEST).read_text()
    for option, value, why in (("--seed", "1", "holds a model set of seed 0, this run's is 1"),
                               ("--resolution", "1", "holds a model set of resolution 0, this run's is 1")):
        assert _main("train", "prune", "digits_cnn", "--phases", "C:1", "--cut", "block2", option, value,
                     "--out", str(folder)) == 2
        error = capsys.readouterr().err
        assert why in error and "share pipeline, seed and resolution" in error, error
    assert (folder / MANIFEST).read_text() == manifest and not (folder / "metrics.csv").exists()  # nothing trained


def test_a_manifest_written_before_cuts_still_loads_at_its_cut(two_cut_set, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(two_cut_set, folder)
    manifest = read_manifest(folder)
    manifest["models"] = [{k: v for k, v in m.items() if k not in ("cut", "channels", "sent_height", "sent_width")}
                          for m in manifest["models"] if m["cut"] == "block1"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert set(load_model_sets(folder, digits, "head").models) == {("block1", 32), ("block1", 8)}
    assert set(load_model_set(folder, digits, "tail")[0]) == {32, 8}


@pytest.mark.parametrize("cut, reason", [("block9", "'block9' is not a layer of Sequential"),
                                         ("classifier.0", "the cut must produce feature maps")])
def test_a_cut_that_is_no_cut_point_is_a_clean_error_listing_the_valid_ones(tmp_path, capsys, cut, reason):
    assert _main("train", "fixed", "digits_cnn", "--budget", "4", "--epochs", "1", "--cut", cut,
                 "--out", str(tmp_path / "run")) == 2
    error = capsys.readouterr().err
    assert error.startswith("Error: ") and reason in error and "block1, block1.6, block2.0" in error, error
    assert "Traceback" not in error and not (tmp_path / "run").exists()


def test_another_cut_against_a_running_server_is_refused(tmp_path, capsys):
    assert _main("train", "fixed", "digits_cnn", "--budget", "4", "--epochs", "1", "--cut", "block2",
                 "--connect", "tcp://127.0.0.1:9", "--out", str(tmp_path / "run")) == 2
    assert "--cut block2 with --connect" in capsys.readouterr().err


def test_fixed_trains_at_the_cut_it_is_given(tmp_path, capsys):
    assert _main("train", "fixed", "digits_cnn", "--budget", "8", "--epochs", "1", "--cut", "block2",
                 "--out", str(tmp_path / "run")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["cut"], summary["channels"]) == ("block2", 64)


# ---- the edge's sending side -----------------------------------------------------------------------------

def test_the_codec_stage_states_its_cut_and_the_handshake_reads_it_from_the_chain(heads):
    settings = SessionSettings.of_chain(_chain(heads, "block2", 8), "digits_cnn", mode="infer")
    assert (settings.cut, settings.channels, settings.budget) == ("block2", 64, 8)
    assert SessionSettings.of_chain(_chain(heads, None, 8), "digits_cnn").cut is None
    for bad in ("", "x" * 65):
        with pytest.raises(ConfigError, match="cut must be a layer name"):
            CodecStage(cut=bad)


# ---- a real server process -------------------------------------------------------------------------------

async def test_one_session_is_answered_at_both_cuts_by_each_cuts_own_tail(two_cut_set, served_two_cut_set, heads,
                                                                         tails):
    x = digits.load_data(0).x_test[:50]
    async with EdgeClient("digits_cnn", served_two_cut_set, model_set=two_cut_set, budget=8) as edge:
        session, welcome = edge.session.session_id, edge.session.protocol.welcome
        assert (welcome.channels, welcome.sent_height, welcome.sent_width) == (32, 4, 4)  # the default cut's
        for cut, budget in (("block1", 8), ("block2", 8), ("block2", 64), (None, 32), ("block1", 32), ("block2", 8)):
            edge.session.chain = _chain(heads, cut, budget)
            logits = await edge.infer(x)
            torch.testing.assert_close(logits, _local(heads, tails, cut or "block1", budget, x), atol=1e-4, rtol=1e-4)
            assert edge.session.session_id == session and edge.session.protocol.welcome is welcome  # no new hello
    assert not torch.allclose(_local(heads, tails, "block1", 8, x), _local(heads, tails, "block2", 8, x), atol=1e-2)


async def test_an_unknown_cut_is_refused_with_the_held_ones_and_the_server_goes_on(two_cut_set, served_two_cut_set,
                                                                                  heads, tails):
    x = digits.load_data(0).x_test[:8]
    async with EdgeClient("digits_cnn", served_two_cut_set, model_set=two_cut_set, budget=8) as edge:
        session = edge.session.session_id
        edge.session.chain = _chain(heads, "block1", 8, states="block3")
        with pytest.raises(RemoteError) as refused:
            await edge.infer(x)
        assert refused.value.code == "bad_cut" and "serves block1, block2" in refused.value.reason, refused.value
        edge.session.chain = _chain(heads, "block2", 8)
        edge.session.chain.compressor.module.budget = 4  # a budget the set lacks at block2 (it has 8 at block1)
        try:
            with pytest.raises(RemoteError) as budget:
                await edge.infer(x)
        finally:
            edge.session.chain.compressor.module.budget = 8
        assert budget.value.code == "bad_budget" and "at cut 'block2'; it holds 8, 64" in budget.value.reason
        torch.testing.assert_close(await edge.infer(x), _local(heads, tails, "block2", 8, x), atol=1e-4, rtol=1e-4)
        assert edge.session.session_id == session


async def _ask(address: str, hello: Hello):
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    try:
        await socket.send_multipart(encode_message(hello))
        return decode_message(await socket.recv_multipart())
    finally:
        socket.close(linger=0)
        context.term()


async def test_a_hello_starts_at_a_held_cut_and_one_at_any_other_is_refused(served_two_cut_set):
    welcome = await _ask(served_two_cut_set, Hello(1, "digits_cnn", 64, 8, "fp32", False, "infer", cut="block2"))
    assert isinstance(welcome, Welcome) and (welcome.channels, welcome.sent_height, welcome.sent_width) == (64, 2, 2)
    for hello, reason in (
            (Hello(2, "digits_cnn", 32, 8, "fp32", False, "infer", cut="block3"),
             "cut 'block3' is not served here; this server serves block1, block2"),
            (Hello(3, "digits_cnn", 32, 8, "fp32", False, "infer", cut="block2"),
             "cut 'block2' has 64 channels here, the edge says 32"),
            (Hello(4, "digits_cnn", 64, 32, "fp32", False, "infer", cut="block2"),
             "budget 32 is not in this model set at cut 'block2'; it holds 8, 64")):
        refused = await _ask(served_two_cut_set, hello)
        assert isinstance(refused, ErrorReply) and refused.code == "handshake_refused", refused
        assert reason in refused.message, refused.message
