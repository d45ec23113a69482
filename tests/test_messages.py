"""Messages as frames: round trips, and every malformed variant refused with a WireError."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_rt.errors import WireError
from sparse_rt.wire.header import MAX_HEADER_BYTES, PROTOCOL_VERSION
from sparse_rt.wire.messages import (Activations, Bye, ErrorReply, Gradients, Hello, Predictions, Welcome,
                                     decode_message, encode_message)

LIMITS = {"max_batch": 1024, "max_frame_bytes": 2**21, "max_lr_scale": 10.0, "session_idle_s": 600.0,
          "sessions_per_peer": 64}


def _activations(labels: torch.Tensor | None = None, codec: str = "fp32", lz4: bool = False) -> Activations:
    torch.manual_seed(0)
    return Activations(7, "abcd", codec, lz4, 32, torch.tensor([1, 5, 30]), torch.randn(4, 3, 2, 2), labels, step=3)


def _frames(message) -> list[bytes]:
    return [bytes(memoryview(frame)) for frame in encode_message(message)]


def _header(frames: list[bytes]) -> dict:
    return json.loads(frames[0])


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 9, 3, 255]), torch.tensor([0, 1, 70000, 2])])
def test_activations_round_trip(labels):
    message = _activations(labels)
    decoded = decode_message(_frames(message))
    assert isinstance(decoded, Activations)
    assert decoded.kind == ("infer" if labels is None else "train")
    assert (decoded.id, decoded.session, decoded.channels, decoded.step) == (7, "abcd", 32, 3 if labels is not None else 0)
    torch.testing.assert_close(decoded.values, message.values)
    assert torch.equal(decoded.indices, message.indices)
    if labels is not None:
        assert torch.equal(decoded.labels, labels)


def test_labels_use_the_smallest_type_that_holds_them():
    assert _header(_frames(_activations(torch.tensor([0, 9, 3, 255]))))["label_dtype"] == "uint8"
    assert _header(_frames(_activations(torch.tensor([0, 9, 3, 256]))))["label_dtype"] == "uint16"
    assert len(_frames(_activations(torch.tensor([0, 9, 3, 255])))[3]) == 4


def test_other_kinds_round_trip():
    grad = Gradients(2, "s", 4, "int8", True, torch.tensor([0, 2]), torch.randn(3, 2, 4, 4), 0.25)
    decoded = decode_message(_frames(grad))
    assert decoded.loss == 0.25 and torch.equal(decoded.indices, grad.indices)
    assert (decoded.values - grad.values).abs().max() < 0.05
    logits = torch.randn(5, 10)
    assert torch.equal(decode_message(_frames(Predictions(1, "s", logits))).logits, logits)
    for message in (Hello(1, "digits_cnn", 32, 4, "fp16", False, "train", 2),
                    Hello(1, "digits_cnn", 32, 4, "fp16", False, "train", 2, resume="0123abcd"),
                    Welcome(1, "s", 32, 4, 4, 10, LIMITS), Welcome(1, "s", 32, 4, 4, 10, LIMITS, True, 17),
                    Bye(4, "s"), ErrorReply(3, "bad_shape", "no")):
        assert decode_message(_frames(message)) == message


def _replace_header(frames: list[bytes], **changes) -> list[bytes]:
    header = {**_header(frames), **changes}
    return [json.dumps(header).encode(), *frames[1:]]


TRAIN = _frames(_activations(torch.tensor([1, 2, 3, 4])))


@pytest.mark.parametrize("frames, code", [
    ([], "bad_frames"),
    ([b"\xff\xfe"], "bad_header"),
    ([b"[1, 2]"], "bad_header"),
    ([b"{" * 3000], "bad_header"),
    ([b" " * (MAX_HEADER_BYTES + 1)], "bad_header"),
    (_replace_header(TRAIN, v=PROTOCOL_VERSION + 1), "bad_version"),
    (_replace_header(TRAIN, v=True), "bad_version"),
    (_replace_header(TRAIN, kind="explode"), "bad_kind"),
    (_replace_header(TRAIN, kind=[1, 2]), "bad_kind"),
    (_replace_header(TRAIN, kind={"a": 1}), "bad_kind"),
    ([json.dumps(_header(TRAIN)).encode("utf-16")], "bad_header"),
    ([b"\xef\xbb\xbf" + TRAIN[0]], "bad_header"),
    ([TRAIN[0][:-1] + b',"id":9}', *TRAIN[1:]], "bad_header"),
    (_replace_header(TRAIN, extra=1), "bad_header"),
    (_replace_header(TRAIN, step=-1), "bad_header"),
    (_replace_header(TRAIN, id=2**64), "bad_header"),
    (_replace_header(TRAIN, shape=[4, 3, 2]), "bad_header"),
    (_replace_header(TRAIN, lz4=1), "bad_header"),
    (_replace_header(TRAIN, codec="pickle"), "bad_codec"),
    (_replace_header(TRAIN, channels=2), "bad_budget"),
    (_replace_header(TRAIN, channels=30), "bad_indices"),
    (_replace_header(TRAIN, shape=[4, 3, 2, 3]), "bad_message"),
    (_replace_header(TRAIN, shape=[2**30, 3, 2, 2]), "too_large"),
    (_replace_header(TRAIN, shape=[4, 0, 2, 2]), "bad_shape"),
    (TRAIN[:3], "bad_frames"),
    (TRAIN + [b""], "bad_frames"),
    ([TRAIN[0], np.array([5, 1, 30], "<u2").tobytes(), *TRAIN[2:]], "bad_indices"),
    ([TRAIN[0], np.array([1, 1, 30], "<u2").tobytes(), *TRAIN[2:]], "bad_indices"),
    ([TRAIN[0], b"\x01\x00", *TRAIN[2:]], "bad_frame"),
    ([*TRAIN[:3], b"\x01\x02\x03"], "bad_frame"),
    ([*TRAIN[:2], np.full(48, np.nan, "<f4").tobytes(), TRAIN[3]], "bad_message"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, code):
    with pytest.raises(WireError) as info:
        decode_message(frames)
    assert info.value.code == code, str(info.value)
    assert str(info.value)


def test_error_after_the_header_carries_the_request_id():
    with pytest.raises(WireError) as info:
        decode_message(TRAIN[:3])
    assert info.value.request_id == 7


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_arbitrary_frames_decode_or_raise_wire_error(frames):
    try:
        decode_message(frames)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_messages_decode_or_raise_wire_error(data):
    frames = list(TRAIN)
    index = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[index])
    if frame:
        for _ in range(data.draw(st.integers(1, 4))):
            frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    frames[index] = bytes(frame[: data.draw(st.integers(0, len(frame)))])
    try:
        decode_message(frames)
    except WireError:
        pass


# ---- optional additions within v2: timing / server_ms, codecs -------------------------------------------

def test_timing_codecs_and_server_ms_round_trip_and_are_sent_only_when_used():
    hello = Hello(1, "digits_cnn", 32, 4, "fp32", False, "infer", timing=True, codecs=("fp16", "int8+lz4"))
    header = _header(_frames(hello))
    assert header["timing"] is True and header["codecs"] == ["fp16", "int8+lz4"]
    assert decode_message(_frames(hello)) == hello
    plain = _header(_frames(Hello(1, "digits_cnn", 32, 4, "fp32", False, "infer", timing=False)))
    assert "timing" not in plain and "codecs" not in plain  # an older v2 server sees the hello it always saw
    assert decode_message(_frames(Hello(1, "digits_cnn", 32, 4, "fp32", False, "infer"))).timing is None

    grad = Gradients(2, "s", 4, "fp32", False, torch.tensor([0, 2]), torch.randn(3, 2, 4, 4), 0.25, server_ms=1.5)
    assert _header(_frames(grad))["server_ms"] == 1.5 and decode_message(_frames(grad)).server_ms == 1.5
    pred = Predictions(1, "s", torch.randn(5, 10), server_ms=0)
    assert _header(_frames(pred))["server_ms"] == 0.0 and decode_message(_frames(pred)).server_ms == 0.0
    for untimed in (Predictions(1, "s", torch.randn(5, 10)),
                    Gradients(2, "s", 4, "fp32", False, torch.tensor([0]), torch.randn(1, 1, 4, 4), 0.5)):
        assert "server_ms" not in _header(_frames(untimed)) and decode_message(_frames(untimed)).server_ms is None


HELLO = _frames(Hello(1, "digits_cnn", 32, 4, "fp32", False, "infer"))
GRAD = _frames(Gradients(2, "s", 4, "fp32", False, torch.tensor([0, 2]), torch.randn(3, 2, 4, 4), 0.25))
PRED = _frames(Predictions(3, "s", torch.randn(2, 10)))


@pytest.mark.parametrize("frames", [
    _replace_header(GRAD, server_ms=-1), _replace_header(GRAD, server_ms="NaN"), _replace_header(GRAD, server_ms=True),
    _replace_header(PRED, server_ms=-0.5), _replace_header(PRED, server_ms="1"), _replace_header(PRED, server_ms=None),
    [PRED[0][:-1] + b',"server_ms":NaN}', PRED[1]], [PRED[0][:-1] + b',"server_ms":Infinity}', PRED[1]],
    [PRED[0][:-1] + b',"server_ms":1' + b"0" * 400 + b"}", PRED[1]],  # an int that float() cannot hold
    [GRAD[0].replace(b'"loss":0.25', b'"loss":-1' + b"0" * 400), *GRAD[1:]],
    _replace_header(HELLO, timing=1), _replace_header(HELLO, timing="true"),
    _replace_header(HELLO, codecs=[]), _replace_header(HELLO, codecs="fp16"),
    _replace_header(HELLO, codecs=["fp16", "fp16"]),
    _replace_header(HELLO, codecs=[""]), _replace_header(HELLO, codecs=["x" * 21]), _replace_header(HELLO, codecs=[16]),
    _replace_header(HELLO, codecs=[["fp16"]]), _replace_header(HELLO, codecs=[f"c{i}" for i in range(9)]),
    _replace_header(_frames(_activations()), server_ms=1.0),  # a request never carries it
])
def test_bad_timing_codecs_and_server_ms_are_refused(frames):
    with pytest.raises(WireError) as info:
        decode_message(frames)
    assert info.value.code == "bad_header", str(info.value)


def test_the_longest_codecs_list_is_accepted():
    entries = ["fp32", "fp16", "int8", "fp32+lz4", "fp16+lz4", "int8+lz4", "x" * 16 + "+lz4", "y" * 20]
    assert decode_message(_replace_header(HELLO, codecs=entries)).codecs == tuple(entries)
    assert decode_message(_replace_header(GRAD, server_ms=12)).server_ms == 12.0


# ---- optional addition within v2: cut ------------------------------------------------------------------------

def test_cut_round_trips_in_hello_train_and_infer_and_is_sent_only_when_given():
    hello = Hello(1, "digits_cnn", 64, 8, "fp32", False, "infer", cut="block2")
    assert _header(_frames(hello))["cut"] == "block2" and decode_message(_frames(hello)) == hello
    assert "cut" not in _header(HELLO) and decode_message(HELLO).cut is None
    for labels in (None, torch.tensor([1, 2, 3, 4])):
        message = _activations(labels)
        assert "cut" not in _header(_frames(message)) and decode_message(_frames(message)).cut is None
        message.cut = "features.3"
        header = _header(_frames(message))
        assert header["cut"] == "features.3" and decode_message(_frames(message)).cut == "features.3"
    longest = _activations()
    longest.cut = "c" * 64
    assert decode_message(_frames(longest)).cut == "c" * 64


INFER = _frames(_activations())


@pytest.mark.parametrize("frames", [
    _replace_header(HELLO, cut=""), _replace_header(HELLO, cut="c" * 65), _replace_header(HELLO, cut=3),
    _replace_header(HELLO, cut=None), _replace_header(HELLO, cut=["block1"]),
    _replace_header(INFER, cut=""), _replace_header(INFER, cut="c" * 65), _replace_header(TRAIN, cut=True),
    _replace_header(GRAD, cut="block1"), _replace_header(PRED, cut="block1"),  # replies never carry it
])
def test_a_bad_cut_is_refused(frames):
    with pytest.raises(WireError) as info:
        decode_message(frames)
    assert info.value.code == "bad_header", str(info.value)
