"""Codecs: pack the channels an edge sends into one raw byte buffer (one ZeroMQ frame).

A codec turns a float32 tensor ``x`` of shape ``S`` into bytes and back. ``S`` is not in the
bytes: the receiver takes it from the message header. All numbers are little-endian whatever the
host; ``numel`` is the product of ``S`` (1 for ``S == ()``); "C order" is row-major order of ``x``.

Byte layouts (wire name -> bytes):

``fp32``  ``numel`` IEEE-754 binary32 values, C order. Size ``4 * numel``.

``fp16``  ``numel`` IEEE-754 binary16 values, C order. Values beyond the float16 range are clamped to
          +-65504 (``torch.finfo(torch.float16).max``) before rounding, so never inf. Size ``2 * numel``.

``int8``  Symmetric quantisation per channel. The channel axis is dim 1: ``C = S[1]`` for rank >= 2;
          a tensor of rank 0 or 1 is one channel (``C = 1``). Layout: ``C`` binary32 scales, then
          ``numel`` int8 values ``q`` (two's complement), C order. Size ``4 * C + numel``.
          ``scale[c] = max|x[:, c, ...]| / 127`` in binary32 arithmetic (capped at ``INT8_SCALE_MAX``
          so that ``127 * scale`` stays finite); ``q = x / scale[c]``
          rounded half to even, clamped to [-127, 127] (-128 is never used); ``q = 0`` where
          ``scale[c] == 0`` (an all-zero channel, or one whose max|x| underflows when divided by
          127). Decoding gives ``q * scale[c]`` in binary32.

``lz4``   A flag on top of any of the above (the wire carries it beside the codec name): the inner
          bytes as exactly one LZ4 frame (lz4 frame format, doc/lz4_Frame_format.md in the lz4
          repository). This encoder writes independent 64 KiB blocks, the content size and a content
          checksum; a decoder accepts any valid frame (checksums optional) and nothing after it.

A receiver rejects with :class:`~sparse_rt.errors.WireError`: a shape entry that is not an int
>= 0; a buffer whose length differs from the size above; any decoded value that is NaN or inf (a
hostile peer must not poison a shared model); an int8 scale that is negative or not finite, or an
int8 value of -128; an lz4 frame that is invalid, truncated, followed by more bytes, or that
decompresses to a size other than the inner size (never decompressing more than that size).

Local misuse (encoding a tensor that is not a finite float32 CPU tensor) raises ``ValueError``.
Encoders may return a view of ``x``'s memory: do not modify ``x`` until the buffer is sent.
"""
from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from lz4 import frame as lz4_frame
import numpy as np
import torch

from sparse_rt.errors import WireError

Buffer = bytes | bytearray | memoryview

CODEC_NAMES: tuple[str, ...] = ("fp32", "fp16", "int8")
"""Wire names of the built-in codecs, in the order the registry must first hold them (checked at import).

A codec of one's own joins them with :func:`register_codec`; :func:`codec_names`
lists every registered one, and that registry is what a receiver checks.
"""

FP16_MAX = torch.finfo(torch.float16).max  # 65504.0
INT8_QMAX = torch.iinfo(torch.int8).max  # 127; -128 unused so the range is symmetric
# Largest int8 scale whose 127 * scale is still finite in float32 (about 2.68e36).
INT8_SCALE_MAX = float(np.nextafter(np.float32(torch.finfo(torch.float32).max) / INT8_QMAX, np.float32(0)))
LZ4_BLOCK_SIZE = 64 * 1024  # bytes; matches lz4_frame.BLOCKSIZE_MAX64KB passed to compress()
# Worst-case frame: magic 4 + FLG/BD 2 + content size 8 + dictionary id 4 + header checksum 1,
# per block a 4-byte size and a 4-byte block checksum (an incompressible block is stored raw),
# end mark 4 + content checksum 4.
_LZ4_HEADER_MAX, _LZ4_PER_BLOCK, _LZ4_TRAILER = 4 + 2 + 8 + 4 + 1, 4 + 4, 4 + 4
# One lz4 sequence byte expands to at most 255 output bytes (a match-length byte of 255), so a
# frame of n bytes holds at most 255 * n bytes; checked before allocating the output.
_LZ4_MAX_RATIO = 255


def _lz4_bound(size: int) -> int:
    """Largest lz4 frame this module writes for ``size`` input bytes."""
    blocks = max(1, -(-size // LZ4_BLOCK_SIZE))
    return _LZ4_HEADER_MAX + size + blocks * _LZ4_PER_BLOCK + _LZ4_TRAILER


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as a tuple of Python ints, or WireError (it comes from a peer's header)."""
    if not isinstance(shape, (tuple, list)):
        raise WireError(f"tensor shape must be a list of ints, got {type(shape).__name__}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise WireError(f"tensor shape entries must be ints >= 0, got {list(shape)!r}")
    return tuple(int(d) for d in shape)


def _channels(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` as (before, channels, after) around dim 1; rank < 2 is a single channel."""
    if len(shape) < 2:
        return 1, 1, math.prod(shape)
    return shape[0], shape[1], math.prod(shape[2:])


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _count_not_finite(array: np.ndarray) -> int:
    """How many values are NaN or inf (0 for an empty array).

    One BLAS pass, no allocation: a NaN or inf anywhere makes the sum of
    squares NaN or inf (measured on 4 Mi values: 0.25 ms, against 0.56 ms for
    min and max and 1.0 ms for ``np.isfinite(...).all()``, which also builds a
    boolean array as large as the tensor). Only a result that is not finite
    (a bad value, or finite values so large that their squares overflow) is
    followed by the exact count.
    """
    if array.size == 0:
        return 0
    flat = array.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or inf - inf: counted next
        if np.isfinite(np.dot(flat, flat)):
            return 0
    return int(array.size - np.isfinite(array).sum())


def _input_array(x: torch.Tensor) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (usually a view), or ValueError for local misuse.

    Values are not scanned here: the receiver scans every tensor it decodes
    (the trust boundary), so one pass per direction is enough, and a sender's
    NaN comes back as that receiver's refusal.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        what = f"{x.dtype} tensor on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"codecs encode float32 CPU tensors, got a {what}")
    return x.detach().contiguous().numpy()


def _fill(shape: tuple[int, ...], dtype: torch.dtype, wire_dtype: str, data: memoryview,
          offset: int = 0) -> torch.Tensor:
    """A new tensor owning its memory, filled from ``data`` (one copy, byte order fixed)."""
    out = torch.empty(shape, dtype=dtype)
    out.numpy().reshape(-1)[:] = np.frombuffer(data, wire_dtype, count=out.numel(), offset=offset)
    return out


# Below this size copying is cheaper than keeping a whole received frame alive for a view.
VIEW_MIN_BYTES = 64 * 1024


def _can_view(data: memoryview) -> bool:
    """Whether a float32 tensor may be a view of ``data``: big, writable, 4-byte aligned, little-endian host."""
    if data.nbytes < VIEW_MIN_BYTES or data.readonly or sys.byteorder != "little":
        return False
    return np.frombuffer(data, np.uint8, count=0).ctypes.data % 4 == 0


class Codec(ABC):
    """Packs a float32 tensor into bytes and back; ``decode`` trusts nothing in the bytes."""

    name: ClassVar[str]  # wire name, unique in the registry (see codec_names)
    lz4: ClassVar[bool] = False  # whether the bytes are an lz4 frame around ``name``'s layout

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Buffer:
        """The bytes for float32 CPU tensor ``x``; may share memory with ``x``."""

    @abstractmethod
    def decode(self, buf: Buffer, shape: Sequence[int]) -> torch.Tensor:
        """A writable float32 tensor of exactly ``shape``, or WireError.

        It owns its memory, or (fp32, a large writable buffer) is a view that keeps ``buf`` alive.
        """

    @abstractmethod
    def max_packed_size(self, shape: Sequence[int]) -> int:
        """Bytes ``encode`` returns for ``shape``: exact, or an upper bound for lz4."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RawCodec(Codec):
    """A fixed-size layout: the length is known from the shape and checked before reading."""

    @abstractmethod
    def packed_size(self, shape: tuple[int, ...]) -> int: ...

    @abstractmethod
    def _pack(self, x: np.ndarray) -> Buffer: ...

    @abstractmethod
    def _unpack(self, data: memoryview, shape: tuple[int, ...]) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor) -> Buffer:
        return self._pack(_input_array(x))

    def max_packed_size(self, shape: Sequence[int]) -> int:
        return self.packed_size(_check_shape(shape))

    def decode(self, buf: Buffer, shape: Sequence[int]) -> torch.Tensor:
        shape, data = _check_shape(shape), _byte_view(buf)
        size = self.packed_size(shape)
        if data.nbytes != size:
            raise WireError(f"{self.name} data for shape {shape} must be {size} bytes, got {data.nbytes}")
        out = self._unpack(data, shape)
        bad = _count_not_finite(out.numpy())
        if bad:
            raise WireError(f"{self.name} data for shape {shape} holds {bad} NaN/inf values; refusing to use them")
        return out


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available as ``get_codec(cls.name)``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"codec {cls.name!r} is already registered, by {_REGISTRY[cls.name].__qualname__}; "
                         f"pick another name")
    _REGISTRY[cls.name] = cls
    return cls


@register_codec
class Fp32(RawCodec):
    name = "fp32"

    def packed_size(self, shape: tuple[int, ...]) -> int:
        return 4 * math.prod(shape)

    def _pack(self, x: np.ndarray) -> Buffer:
        return x.astype("<f4", copy=False).reshape(-1).view(np.uint8).data  # x itself on little-endian hosts

    def _unpack(self, data: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        if _can_view(data):  # a big received frame: use its memory instead of copying it
            return torch.from_numpy(np.frombuffer(data, "<f4").reshape(shape))
        return _fill(shape, torch.float32, "<f4", data)


@register_codec
class Fp16(RawCodec):
    name = "fp16"

    def packed_size(self, shape: tuple[int, ...]) -> int:
        return 2 * math.prod(shape)

    def _pack(self, x: np.ndarray) -> Buffer:
        if _count_not_finite(x):  # the clamp below would turn an inf into a finite 65504 the receiver could not tell
            raise ValueError(f"cannot encode a tensor of shape {x.shape} with NaN/inf values in fp16")
        half = torch.from_numpy(x).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
        return half.numpy().astype("<f2", copy=False).reshape(-1).view(np.uint8).data

    def _unpack(self, data: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        return _fill(shape, torch.float16, "<f2", data).float()


@register_codec
class Int8(RawCodec):
    name = "int8"

    def packed_size(self, shape: tuple[int, ...]) -> int:
        return 4 * _channels(shape)[1] + math.prod(shape)

    def _pack(self, x: np.ndarray) -> Buffer:
        n, c, r = _channels(x.shape)
        x3 = torch.from_numpy(x).reshape(n, c, r)
        amax = x3.abs().amax(dim=(0, 2)) if x3.numel() else torch.zeros(c)
        if not bool(torch.isfinite(amax).all()):  # an inf would quantise to a finite 127: the receiver could not tell
            raise ValueError(f"cannot encode a tensor of shape {tuple(x.shape)} with NaN/inf values in int8")
        scale = (amax / INT8_QMAX).clamp_(max=INT8_SCALE_MAX)
        out = np.empty(4 * c + x3.numel(), np.uint8)
        out[: 4 * c].view("<f4")[:] = scale.numpy()
        q = torch.from_numpy(out[4 * c:].view(np.int8).reshape(n, c, r))
        divisor = torch.where(scale > 0, scale, 1.0)[:, None]  # x is 0 (or below 1e-43) where scale is 0
        q.copy_(torch.div(x3, divisor).round_().clamp_(-INT8_QMAX, INT8_QMAX))  # round half to even
        return out.data

    def _unpack(self, data: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        n, c, r = _channels(shape)
        scale = np.frombuffer(data, "<f4", count=c)
        bad = np.flatnonzero(~(np.isfinite(scale) & (scale >= 0)))
        if bad.size:
            raise WireError(f"int8 scales for shape {shape} must be finite and >= 0, "
                            f"got {scale[bad[0]]} for channel {bad[0]}")
        q = _fill((n, c, r), torch.int8, "i1", data, offset=4 * c)
        if q.numel() and int(q.min()) < -INT8_QMAX:
            raise WireError(f"int8 values for shape {shape} must be in [-{INT8_QMAX}, {INT8_QMAX}], "
                            f"got -128 (the range is symmetric)")
        scale32 = torch.from_numpy(scale.astype(np.float32))[:, None]
        return (q * scale32).reshape(shape)


class Lz4(Codec):
    """An lz4 frame around another codec's bytes; ``name`` is the inner codec's, ``lz4`` is True."""

    lz4 = True

    def __init__(self, inner: RawCodec) -> None:
        if not isinstance(inner, RawCodec):
            raise ValueError(f"lz4 wraps a fixed-size codec (a RawCodec such as {', '.join(CODEC_NAMES)}), "
                             f"got {inner!r}")
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def __repr__(self) -> str:
        return f"Lz4({self.inner!r})"

    def encode(self, x: torch.Tensor) -> Buffer:
        return lz4_frame.compress(self.inner.encode(x), block_size=lz4_frame.BLOCKSIZE_MAX64KB,
                                  content_checksum=True, store_size=True)

    def max_packed_size(self, shape: Sequence[int]) -> int:
        return _lz4_bound(self.inner.max_packed_size(shape))

    def decode(self, buf: Buffer, shape: Sequence[int]) -> torch.Tensor:
        shape, data = _check_shape(shape), _byte_view(buf)
        size = self.inner.packed_size(shape)
        what = f"lz4 {self.name} data for shape {shape}"
        if size > _LZ4_MAX_RATIO * data.nbytes:
            raise WireError(f"{what} must decompress to {size} bytes, "
                            f"which {data.nbytes} bytes of lz4 cannot hold (at most {_LZ4_MAX_RATIO}x)")
        decompressor = lz4_frame.LZ4FrameDecompressor()
        try:  # max_length: never produce more than one byte past what the shape allows
            raw = decompressor.decompress(data, max_length=size + 1)
        except (RuntimeError, ValueError) as exc:
            raise WireError(f"{what} is not a valid lz4 frame: {exc}") from None
        if len(raw) > size:
            raise WireError(f"{what} must decompress to {size} bytes, got more")
        if not decompressor.eof:
            raise WireError(f"{what} is a truncated lz4 frame ({data.nbytes} bytes, end of frame missing)")
        if decompressor.unused_data:
            raise WireError(f"{what} has {len(decompressor.unused_data)} bytes after the end of "
                            f"the lz4 frame; send exactly one frame")
        if len(raw) != size:
            raise WireError(f"{what} must decompress to {size} bytes, got {len(raw)}")
        return self.inner.decode(raw, shape)


def codec_names() -> tuple[str, ...]:
    """Every registered codec's wire name: the built-ins first, then the ones registered since."""
    return tuple(_REGISTRY)


def get_codec(name: str, lz4: bool = False) -> Codec:
    """The codec for wire name ``name`` (see :func:`codec_names`), wrapped in :class:`Lz4` if ``lz4``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(_REGISTRY)}")
    codec = _REGISTRY[name]()
    return Lz4(codec) if lz4 else codec


if tuple(_REGISTRY) != CODEC_NAMES:  # the built-in wire names and the registry must agree
    raise ImportError(f"codec registry {tuple(_REGISTRY)} does not match CODEC_NAMES {CODEC_NAMES}")
