"""An edge that moves the cut per request: one session to a real server that holds a model set cut at two layers.

The set (conftest's ``two_cut_set``) has digits_cnn cut after block1 (32
channels of 4x4, the set's default cut) and after block2 (64 channels of
2x2); the server is a real `sparse-rt node --role server --models` process.
"""
from __future__ import annotations

import pytest
import torch

from sparse_rt.data.datasets import load_digits
from sparse_rt.edge.client import EdgeClient
from sparse_rt.edge.controller import Choice, DeadlineController, Option, options_from_manifest
from sparse_rt.errors import ConfigError
from sparse_rt.pipeline import get_pipeline
from sparse_rt.store.modelset import load_model_sets, read_manifest

DIGITS = get_pipeline("digits_cnn")


def _local(folder, cut: str, budget: int, x: torch.Tensor) -> torch.Tensor:
    """The model at (cut, budget) run here, head and tail: what the server's answers must equal."""
    heads, tails = load_model_sets(folder, DIGITS, "head"), load_model_sets(folder, DIGITS, "tail")
    with torch.inference_mode():
        return tails.models[cut, budget](*heads.models[cut, budget](x))


async def test_the_cut_moves_between_requests_on_one_session(two_cut_set, served_two_cut_set):
    x = load_digits(seed=0).x_test[:16]
    async with EdgeClient("digits_cnn", served_two_cut_set, model_set=two_cut_set, budget=8) as edge:
        session = edge.session.session_id
        answers, sent = {}, {}
        for choice in (Choice(8), Choice(8, cut="block2"), Choice(64, cut="block2"), Choice(32)):
            edge.select(choice)
            before = edge.traffic.bytes_sent
            answers[choice] = await edge.infer(x)
            sent[choice] = edge.traffic.bytes_sent - before
        assert edge.session.session_id == session  # no new handshake for a new cut
    for choice, logits in answers.items():
        expected = _local(two_cut_set, choice.cut or "block1", choice.budget, x)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # 8 channels of 2x2 after block2 are a quarter of 8 channels of 4x4 after block1.
    assert sent[Choice(8, cut="block2")] < sent[Choice(8)] / 2


async def test_a_cut_the_set_does_not_hold_is_refused_here_and_leaves_the_client_as_it_was(two_cut_set):
    edge = EdgeClient("digits_cnn", "tcp://127.0.0.1:1", model_set=two_cut_set)
    before = (edge.choice, edge.chain, edge.edge_model, edge.budget)
    with pytest.raises(ConfigError, match="block1, block2"):
        edge.select(Choice(8, cut="classifier.0"))
    with pytest.raises(ConfigError, match="holds 8, 64"):
        edge.select(Choice(32, cut="block2"))
    with pytest.raises(ConfigError, match="no early exit"):  # the set has none: nothing half switched either
        edge.select(Choice(8, exit=0.5))
    assert (edge.choice, edge.chain, edge.edge_model, edge.budget) == before


def test_a_client_of_a_set_with_several_cuts_names_its_cut_so_no_server_default_decides(two_cut_set, model_set):
    """A server's default cut may be another than this set's: with several cuts every request says which."""
    several = EdgeClient("digits_cnn", "tcp://127.0.0.1:1", model_set=two_cut_set)
    assert several.settings.cut == "block1" and several.chain.codec.cut == "block1"  # the hello, the requests
    several.select(Choice(8))
    assert several.choice == Choice(8, cut="block1")
    one = EdgeClient("digits_cnn", "tcp://127.0.0.1:1", model_set=model_set)
    assert one.settings.cut is None and one.chain.codec.cut is None  # one cut: nothing to tell apart


def test_the_controller_chooses_among_the_cuts_of_the_manifest(two_cut_set):
    manifest = read_manifest(two_cut_set)
    options = options_from_manifest(manifest)
    assert {o.choice.cut for o in options} == {"block1", "block2"}  # with several cuts, each is named
    labels = {o.choice.label for o in options}
    assert "block2:64/fp32" in labels and "block1:32/fp32" in labels


class Alternate:
    """A policy of one's own: the next option each time."""

    def __init__(self, options: list[Option]) -> None:
        self.options, self.turn = options, 0

    def choose(self, estimate, samples):
        from sparse_rt.edge.controller import Decision

        option = self.options[self.turn % len(self.options)]
        self.turn += 1
        return Decision(option, None, True, 1e3)

    def observed(self, decision, total_ms, network_ms):
        pass


async def test_a_policy_moves_the_cut_and_the_codec_per_request(two_cut_set, served_two_cut_set):
    options = [Option(Choice(8, "fp32"), 0.9, 0.0), Option(Choice(64, "int8", cut="block2"), 0.9, 0.0),
               Option(Choice(8, "fp16", cut="block2"), 0.9, 0.0)]
    x = load_digits(seed=0).x_test[:16]
    async with EdgeClient("digits_cnn", served_two_cut_set, model_set=two_cut_set, policy=Alternate(options)) as edge:
        outputs = [await edge.infer(x) for _ in range(6)]
        assert [label for label in edge.adaptive["choices"]] == ["8/fp32", "block2:64/int8", "block2:8/fp16"]
    torch.testing.assert_close(outputs[0], outputs[3])
    expected = _local(two_cut_set, "block2", 64, x)
    assert torch.allclose(outputs[1].softmax(1), expected.softmax(1), atol=0.05)  # int8 is close, not equal


def test_a_deadline_controller_over_two_cuts_takes_the_one_that_fits(two_cut_set):
    """On a slow link the cut that sends fewer values per channel is the one that meets the deadline."""
    from tests.test_controller import MB, _link

    options = [o for o in options_from_manifest(read_manifest(two_cut_set), codecs=("fp32",))
               if o.choice.budget == 8]
    controller = DeadlineController(options, 50.0, classes=10)
    decision = controller.choose(_link(0.2 * MB, rtt_ms=10.0, server_ms=0.0), samples=16)
    # 16 x 8 channels of 4x4 (8 KiB) take 330 ms at 0.2 Mbit/s; of 2x2 (2 KiB), 92 ms: neither fits, the second
    # is the fastest. At 1 Mbit/s only the second fits.
    assert decision.choice.cut == "block2" and not decision.meets
    decision = controller.choose(_link(1 * MB, rtt_ms=10.0, server_ms=0.0), samples=16)
    assert decision.choice == Choice(8, cut="block2") and decision.meets
