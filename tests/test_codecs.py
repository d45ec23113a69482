"""Codec round trips with a tolerance per codec, the documented byte layouts, and hostile bytes."""
from __future__ import annotations

import math

import lz4.frame
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparse_rt.errors import WireError
from sparse_rt.wire import codecs
from sparse_rt.wire.codecs import CODEC_NAMES, FP16_MAX, INT8_QMAX, Lz4, get_codec, register_codec

ALL = [pytest.param(name, lz, id=name + ("+lz4" if lz else ""))
       for name in CODEC_NAMES for lz in (False, True)]  # every codec, with and without lz4
FP16_TINY = torch.finfo(torch.float16).tiny * 2.0**-10  # smallest float16 subnormal
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_SHAPES = st.lists(st.integers(0, 4), max_size=4).map(tuple)
FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def int8_bound(x: torch.Tensor) -> torch.Tensor:
    """Largest error int8 may make per element: half a step of the element's channel scale."""
    x3 = x.reshape(*x.shape[:2], math.prod(x.shape[2:])) if x.dim() >= 2 else x.reshape(1, 1, x.numel())
    amax = x3.abs().amax(dim=(0, 2)) if x3.numel() else torch.zeros(x3.shape[1])
    scale = (amax / INT8_QMAX)[None, :, None].expand_as(x3)
    # a quotient and a product in float32, and an underflowing scale for subnormal data
    return (scale * (0.5 + 1e-4) + 1e-42).reshape(x.shape)


def assert_round_trip(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
    assert y.shape == x.shape and y.dtype == torch.float32
    if name == "fp32":
        assert torch.equal(y, x)
    elif name == "fp16":
        torch.testing.assert_close(y, x.clamp(-FP16_MAX, FP16_MAX), rtol=1e-3, atol=FP16_TINY / 2)
    else:
        assert ((y - x).abs() <= int8_bound(x)).all(), (y - x).abs().max()


def wire_error(codec, buf, shape, match: str) -> WireError:
    with pytest.raises(WireError, match=match) as info:
        codec.decode(buf, shape)
    assert info.value.code == "bad_message"
    return info.value


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 4, 32])
@pytest.mark.parametrize("name,lz", ALL)
def test_round_trip(name, lz, budget):
    gen = torch.Generator().manual_seed(budget)
    # channels of very different magnitudes, so a per-tensor int8 scale would fail the bound
    magnitude = 10.0 ** torch.arange(-3, budget - 3)[None, :, None, None]
    x = torch.randn(8, budget, 4, 4, generator=gen) * magnitude
    codec = get_codec(name, lz)
    buf = bytearray(codec.encode(x))
    y = codec.decode(buf, (8, budget, 4, 4))
    assert_round_trip(name, x, y)
    buf[:] = bytes(len(buf))  # the frame buffer is reused: the tensor must own its memory
    assert_round_trip(name, x, y)
    y += 1  # and be writable


@pytest.mark.parametrize("shape", [(0, 4, 4, 4), (8, 0, 4, 4), (0,), (), (5,), (3, 7)])
@pytest.mark.parametrize("name,lz", ALL)
def test_empty_and_low_rank(name, lz, shape):
    x = torch.randn(shape)
    codec = get_codec(name, lz)
    assert_round_trip(name, x, codec.decode(codec.encode(x), shape))


@pytest.mark.parametrize("name,lz", ALL)
def test_all_zero(name, lz):
    codec = get_codec(name, lz)
    y = codec.decode(codec.encode(torch.zeros(8, 4, 4, 4)), (8, 4, 4, 4))
    assert torch.equal(y, torch.zeros(8, 4, 4, 4))


@pytest.mark.parametrize("lz", [False, True])
def test_fp16_clamps_huge_values(lz):
    x = torch.tensor([1e6, -1e6, 3e38, -3e38, 65519.0, 1.5])
    y = get_codec("fp16", lz).decode(get_codec("fp16", lz).encode(x), (6,))
    assert torch.equal(y, torch.tensor([FP16_MAX, -FP16_MAX, FP16_MAX, -FP16_MAX, FP16_MAX, 1.5]))


@PROPERTY
@given(x=hnp.arrays(np.float32, SMALL_SHAPES, elements=FINITE_F32))
@pytest.mark.parametrize("name,lz", ALL)
def test_round_trip_any_finite_values(name, lz, x):
    x = torch.from_numpy(x)
    codec = get_codec(name, lz)
    assert_round_trip(name, x, codec.decode(codec.encode(x), tuple(x.shape)))


# -- layouts and sizes ------------------------------------------------------------------------


def test_fp32_and_fp16_layouts_are_little_endian_c_order():
    x = torch.tensor([[1.0, -2.5], [3.0, 65504.0]])
    assert bytes(get_codec("fp32").encode(x)) == np.array([1.0, -2.5, 3.0, 65504.0], "<f4").tobytes()
    assert bytes(get_codec("fp16").encode(x)) == np.array([1.0, -2.5, 3.0, 65504.0], "<f2").tobytes()
    assert bytes(get_codec("fp32").encode(x.t())) == np.array([1.0, 3.0, -2.5, 65504.0], "<f4").tobytes()


def test_int8_layout_scales_then_values():
    x = torch.tensor([[[127.0, -63.5], [0.0, 0.0], [0.5, -2.0]]])  # (1, 3 channels, 2)
    buf = bytes(get_codec("int8").encode(x))
    scales = np.array([1.0, 0.0, 2.0 / 127], "<f4")
    assert buf[:12] == scales.tobytes()
    q = np.frombuffer(buf[12:], "i1")
    assert q.tolist() == [127, -64, 0, 0, 32, -127]  # -63.5 rounds half to even; 0.5 / (2/127) = 31.75
    assert len(buf) == get_codec("int8").max_packed_size((1, 3, 2)) == 4 * 3 + 6


def test_int8_rank_below_two_is_one_channel():
    buf = bytes(get_codec("int8").encode(torch.tensor([2.0, -1.0])))
    assert np.frombuffer(buf[:4], "<f4")[0] == np.float32(2.0) / np.float32(127)
    assert np.frombuffer(buf[4:], "i1").tolist() == [127, -64]  # -63.5 -> -64
    assert get_codec("int8").max_packed_size(()) == 5


@pytest.mark.parametrize("shape", [(8, 1, 4, 4), (8, 32, 4, 4), (0, 4, 4, 4), (64, 32, 16, 16), (3,)])
@pytest.mark.parametrize("name,lz", ALL)
def test_max_packed_size(name, lz, shape):
    codec = get_codec(name, lz)
    for x in (torch.randn(shape), torch.zeros(shape)):  # random floats barely compress
        size = len(bytes(codec.encode(x)))
        if lz:
            assert size <= codec.max_packed_size(shape)
        else:
            assert size == codec.max_packed_size(shape) == codec.packed_size(shape)


def test_lz4_bound_holds_for_incompressible_bytes():
    rng = np.random.default_rng(0)
    for size in (0, 1, 1000, 65536, 65537, 300_000):
        assert len(lz4.frame.compress(rng.bytes(size), block_size=lz4.frame.BLOCKSIZE_MAX64KB,
                                      content_checksum=True)) <= codecs._lz4_bound(size)


def test_lz4_wrapper_keeps_the_inner_name():
    codec = get_codec("int8", lz4=True)
    assert isinstance(codec, Lz4) and codec.name == "int8" and codec.lz4
    assert get_codec("int8").name == "int8" and not get_codec("int8").lz4


# -- local misuse -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,lz", ALL)
@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.float64), np.zeros(3, np.float32)])
def test_encode_rejects_with_value_error(name, lz, bad):
    with pytest.raises(ValueError, match="float32"):
        get_codec(name, lz).encode(bad)


@pytest.mark.parametrize("name,lz", ALL)
@pytest.mark.parametrize("bad", [torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")])])
def test_non_finite_values_never_cross(name, lz, bad):
    """The receiver's scan is the one check: what fp32 packs is refused there. fp16 and int8 refuse to pack,
    since their clamp or scale would turn an inf into a finite value the receiver could not tell from a real one."""
    codec = get_codec(name, lz)
    if name != "fp32":
        with pytest.raises(ValueError, match="NaN/inf"):
            codec.encode(bad)
        return
    wire_error(codec, codec.encode(bad), tuple(bad.shape), "NaN/inf")


def test_unknown_codec():
    with pytest.raises(ValueError, match="'bf16'.*fp32, fp16, int8"):
        get_codec("bf16")


def test_register_twice_names_the_key(monkeypatch):
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))

    class Again(codecs.Fp32):
        name = "fp16"

    with pytest.raises(ValueError, match="'fp16' is already registered"):
        register_codec(Again)
    assert codecs._REGISTRY["fp16"] is codecs.Fp16
    assert tuple(codecs._REGISTRY) == CODEC_NAMES


# -- validation of received bytes -------------------------------------------------------------


def test_wrong_length():
    msg = r"fp16 data for shape \(64, 4, 4, 4\) must be 8192 bytes, got 8190"
    wire_error(get_codec("fp16"), bytes(8190), (64, 4, 4, 4), msg)
    wire_error(get_codec("int8"), bytes(10), (2, 3), r"int8 data for shape \(2, 3\) must be 18 bytes, got 10")
    wire_error(get_codec("fp16", lz4=True), lz4.frame.compress(bytes(8190)), (64, 4, 4, 4),
               r"lz4 fp16 data for shape \(64, 4, 4, 4\) must decompress to 8192 bytes, got 8190")


@pytest.mark.parametrize("shape", [(-1, 2), (2.0,), (True, 1), "ab", None, (1, "2")])
@pytest.mark.parametrize("name,lz", ALL)
def test_bad_shape(name, lz, shape):
    wire_error(get_codec(name, lz), b"", shape, "shape")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("lz", [False, True])
def test_non_finite_values(value, lz):
    raw32 = np.array([1.0, value], "<f4").tobytes()
    raw16 = np.array([1.0, value], "<f2").tobytes()
    wrap = lz4.frame.compress if lz else bytes
    wire_error(get_codec("fp32", lz), wrap(raw32), (2,), r"fp32 data for shape \(2,\) holds 1 NaN/inf")
    wire_error(get_codec("fp16", lz), wrap(raw16), (1, 2), r"fp16 data .* holds 1 NaN/inf")


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf"), -0.5e-40])
def test_int8_bad_scale(scale):
    buf = np.array([1.0, scale], "<f4").tobytes() + bytes([1, 2, 3, 4])
    wire_error(get_codec("int8"), buf, (1, 2, 2), r"int8 scales .* must be finite and >= 0, got .* channel 1")


def test_int8_rejects_minus_128_and_overflow():
    wire_error(get_codec("int8"), np.array([1.0], "<f4").tobytes() + bytes([0x80]), (1,), "got -128")
    huge = np.array([3e38], "<f4").tobytes() + bytes([127])  # 127 * 3e38 overflows to inf
    wire_error(get_codec("int8"), huge, (1, 1), "NaN/inf")


@pytest.fixture
def frame() -> bytes:
    return bytes(get_codec("fp16", lz4=True).encode(torch.randn(8, 4, 4, 4)))


SHAPE = (8, 4, 4, 4)


def test_lz4_corrupt(frame):
    codec = get_codec("fp16", lz4=True)
    wire_error(codec, b"not an lz4 frame" * 4, SHAPE, "not a valid lz4 frame")
    wire_error(codec, frame[:-8] + bytes(b ^ 0xFF for b in frame[-8:]), SHAPE, "not a valid lz4 frame")
    body = bytearray(frame)
    body[len(body) // 2] ^= 0x01  # caught by the content checksum
    wire_error(codec, bytes(body), SHAPE, "not a valid lz4 frame")


@pytest.mark.parametrize("cut", [0, 1, 4, 7, 20, -5, -1])
def test_lz4_truncated(frame, cut):
    wire_error(get_codec("fp16", lz4=True), frame[:cut], SHAPE, "truncated|cannot hold")


def test_lz4_trailing_bytes(frame):
    wire_error(get_codec("fp16", lz4=True), frame + b"\0", SHAPE, "1 bytes after the end of the lz4 frame")
    wire_error(get_codec("fp16", lz4=True), frame + frame, SHAPE, "bytes after the end of the lz4 frame")


def test_lz4_wrong_decompressed_size(frame):
    codec = get_codec("fp16", lz4=True)
    wire_error(codec, frame, (8, 4, 4, 3), r"shape \(8, 4, 4, 3\) must decompress to 768 bytes, got more")
    wire_error(codec, frame, (8, 4, 4, 5), r"must decompress to 1280 bytes, got 1024")


def test_lz4_decompression_bomb_is_refused_before_allocating():
    bomb = lz4.frame.compress(bytes(1 << 20))  # 1 MiB of zeros in a few KiB
    codec = get_codec("fp32", lz4=True)
    wire_error(codec, bomb, (1 << 40,), "cannot hold")  # 4 TiB: refused without trying
    wire_error(codec, bomb, (1000,), "got more")  # decompression stops just past 4000 bytes


# -- hostile bytes: a tensor of the right shape or WireError, nothing else --------------------


def decode_or_wire_error(codec, buf, shape) -> None:
    try:
        y = codec.decode(buf, shape)
    except WireError:
        return
    assert y.shape == shape and y.dtype == torch.float32 and torch.isfinite(y).all()


@PROPERTY
@given(buf=st.binary(max_size=200), shape=SMALL_SHAPES)
@pytest.mark.parametrize("name,lz", ALL)
def test_arbitrary_bytes(name, lz, buf, shape):
    decode_or_wire_error(get_codec(name, lz), buf, shape)


@PROPERTY
@given(data=st.data(), shape=SMALL_SHAPES)
@pytest.mark.parametrize("name,lz", ALL)
def test_arbitrary_bytes_of_the_right_size(name, lz, data, shape):
    size = get_codec(name).max_packed_size(shape)
    raw = data.draw(st.binary(min_size=size, max_size=size))
    decode_or_wire_error(get_codec(name, lz), lz4.frame.compress(raw) if lz else raw, shape)


@PROPERTY
@given(data=st.data(), shape=SMALL_SHAPES)
@pytest.mark.parametrize("name,lz", ALL)
def test_mutated_encodings(name, lz, data, shape):
    codec = get_codec(name, lz)
    buf = bytearray(codec.encode(torch.randn(shape) * 100))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip" and buf:
        at = data.draw(st.integers(0, len(buf) - 1))
        buf[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del buf[data.draw(st.integers(0, len(buf))):]
    else:
        buf += data.draw(st.binary(min_size=1, max_size=16))
    decode_or_wire_error(codec, bytes(buf), shape)
