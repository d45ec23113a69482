"""The header frame: a small JSON object that says what the other frames are.

JSON keeps the header readable in a packet capture and easy to produce from
any language; it is parsed by the standard library's parser only (no
objects, no code) and then checked field by field against :data:`SCHEMAS`.
Unknown fields are refused, so a typo never passes silently.
docs/PROTOCOL.md is the normative description of every field.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any, Callable

from sparse_rt.errors import WireError

PROTOCOL_VERSION = 2
# Versions this peer no longer speaks but still answers, in their own format, with a `bad_version` error
# that names the version it speaks: a v1 client reads a refusal, not a reply it cannot parse.
REFUSED_VERSIONS = (1,)
MAX_HEADER_BYTES = 4096
MAX_ID = 2**63 - 1
MAX_CHANNELS = 65535  # channel indices travel as uint16
MAX_EXTRA_CODECS = 8  # entries of a hello's codecs
LZ4_SUFFIX = "+lz4"  # a codecs entry "int8+lz4": int8 inside an lz4 frame
MAX_CUT_NAME = 64  # characters of a cut's layer name (the optional `cut` of hello, train and infer)

Check = Callable[[Any], bool]


def _int(lo: int = 0, hi: int = MAX_ID) -> Check:
    return lambda v: type(v) is int and lo <= v <= hi


def _str(max_len: int = 256) -> Check:
    return lambda v: type(v) is str and 0 < len(v) <= max_len


def _one_of(*choices: Any) -> Check:
    return lambda v: type(v) in (str, bool) and v in choices


def _str_list(max_items: int, max_len: int) -> Check:
    """A JSON array of 1 to max_items distinct strings, each of 1 to max_len characters."""
    item = _str(max_len)
    return lambda v: (type(v) is list and 0 < len(v) <= max_items and all(item(s) for s in v)
                      and len(set(v)) == len(v))


def _shape(rank: int) -> Check:
    return lambda v: type(v) is list and len(v) == rank and all(type(d) is int and 0 <= d <= 2**31 for d in v)


_is_bool: Check = lambda v: type(v) is bool
# Finite, and within a float's range: a JSON integer of 400 digits is an int here, and float() of it overflows.
_is_number: Check = lambda v: type(v) in (int, float) and v == v and abs(v) <= sys.float_info.max
_is_positive: Check = lambda v: _is_number(v) and v > 0
_is_nonnegative: Check = lambda v: _is_number(v) and v >= 0


def _object(fields: dict[str, Check]) -> Check:
    """A JSON object with exactly these fields, each passing its check."""
    return lambda v: (type(v) is dict and set(v) == set(fields)
                      and all(check(v[name]) for name, check in fields.items()))


# What a server allows, stated in its welcome (docs/PROTOCOL.md 4.2).
LIMITS: dict[str, Check] = {
    "max_batch": _int(1),  # samples a message may carry in any codec without passing max_frame_bytes
    "max_frame_bytes": _int(0),  # largest frame the server reads; a larger one drops the connection (0: none)
    "max_lr_scale": _is_positive,  # lr_scale above this is applied as this
    "session_idle_s": _is_positive,  # a session silent for this long ends
    "sessions_per_peer": _int(1),  # open sessions one peer (key, or connection) may hold
}

# Largest learning-rate multiplier a training step may ask for: schedules boost by a few x, not more.
MAX_LR_SCALE = 100.0
_is_lr_scale: Check = lambda v: _is_number(v) and 0 < v <= MAX_LR_SCALE

# Fields every message has. The codecs' wire names are listed in codecs.CODEC_NAMES;
# they are checked against the codec registry when the data frame is decoded.
COMMON: dict[str, Check] = {"v": _int(PROTOCOL_VERSION, PROTOCOL_VERSION), "kind": _str(16), "id": _int()}

_TENSOR = {"session": _str(64), "codec": _str(16), "lz4": _is_bool}

SCHEMAS: dict[str, dict[str, Check]] = {
    "hello": {
        "pipeline": _str(),
        "channels": _int(1, MAX_CHANNELS),
        "budget": _int(1, MAX_CHANNELS),
        "codec": _str(16),
        "lz4": _is_bool,
        "mode": _one_of("train", "infer"),
        "resolution": _int(0, 255),
    },
    "welcome": {"session": _str(64), "resumed": _is_bool, "next_step": _int(), "channels": _int(1, MAX_CHANNELS),
                "sent_height": _int(1, 2**31), "sent_width": _int(1, 2**31), "classes": _int(1, 2**31),
                "limits": _object(LIMITS)},
    "bye": {"session": _str(64)},
    "train": {**_TENSOR, "step": _int(), "channels": _int(1, MAX_CHANNELS), "shape": _shape(4),
              "label_dtype": _one_of("uint8", "uint16", "int32", "int64")},
    "infer": {**_TENSOR, "channels": _int(1, MAX_CHANNELS), "shape": _shape(4)},
    "grad": {**_TENSOR, "step": _int(), "shape": _shape(4), "loss": _is_number},
    "pred": {"session": _str(64), "shape": _shape(2)},
    "error": {"code": _str(64), "message": _str(2048)},
}

# Fields a message may leave out; absent means the default given in docs/PROTOCOL.md.
OPTIONAL: dict[str, dict[str, Check]] = {
    "train": {"lr_scale": _is_lr_scale,  # the tail's learning-rate multiplier for this step (default 1)
              "cut": _str(MAX_CUT_NAME)},  # the layer its values are cut after (default: the session's cut)
    "infer": {"cut": _str(MAX_CUT_NAME)},  # likewise: a model-set server with several cuts serves any it holds
    # the gradients' encoding when it differs from the activations' (default: codec and lz4)
    "hello": {"grad_codec": _str(16), "grad_lz4": _is_bool,
              "resume": _str(64),  # a session this client held: resumed if the server still has it for this peer
              "timing": _is_bool,  # true: every pred and grad of the session states server_ms
              # inference only: further encodings its infer messages may use ("int8", "fp16+lz4", ...)
              "codecs": _str_list(MAX_EXTRA_CODECS, 16 + len(LZ4_SUFFIX)),
              "cut": _str(MAX_CUT_NAME)},  # the layer the session starts at (default: the server's default cut)
    # ms from reading the request off the socket to encoding this reply; only to a session whose hello had timing
    "pred": {"server_ms": _is_nonnegative},
    "grad": {"server_ms": _is_nonnegative},
}


def codec_entry(entry: str) -> tuple[str, bool]:
    """A ``codecs`` entry of a hello as (codec, lz4): ``"int8+lz4"`` is int8 inside an lz4 frame."""
    return (entry[: -len(LZ4_SUFFIX)], True) if entry.endswith(LZ4_SUFFIX) else (entry, False)


def entry_name(encoding: tuple[str, bool]) -> str:
    """(codec, lz4) as a ``codecs`` entry names it."""
    codec, lz4 = encoding
    return codec + LZ4_SUFFIX if lz4 else codec


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with a key twice is ambiguous (which value wins depends on the parser): refuse it."""
    fields = dict(pairs)
    if len(fields) != len(pairs):
        repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"repeated key(s) {', '.join(repeated)}")
    return fields


def encode_header(fields: dict[str, Any], version: int = PROTOCOL_VERSION) -> bytes:
    """Serialise a header; ``v`` is filled in. Used only for trusted, local data."""
    return json.dumps({"v": version, **fields}, separators=(",", ":")).encode()


def decode_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Parse and validate a header frame, or raise WireError saying what is wrong."""
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header frame is {len(frame)} bytes, the limit is {MAX_HEADER_BYTES}", "bad_header")
    try:
        # Decode as UTF-8 ourselves: json.loads(bytes) would also guess UTF-16/32 and accept a BOM.
        fields = json.loads(bytes(frame).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WireError(f"header frame is not UTF-8 JSON: {exc}", "bad_header") from None
    if type(fields) is not dict:
        raise WireError(f"header must be a JSON object, got {type(fields).__name__}", "bad_header")
    version = fields.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        exc = WireError(f"protocol version {version!r} is not supported; this peer speaks version "
                        f"{PROTOCOL_VERSION} (docs/PROTOCOL.md); upgrade the other side", "bad_version")
        if type(version) is int and version in REFUSED_VERSIONS:
            exc.version = version  # answered in that version's own format, to the request's id when it has one
            request_id = fields.get("id")
            exc.request_id = request_id if type(request_id) is int and 0 <= request_id <= MAX_ID else None
        raise exc
    kind = fields.get("kind")
    if type(kind) is not str or kind not in SCHEMAS:
        raise WireError(f"unknown message kind {kind!r}; expected one of {', '.join(SCHEMAS)}", "bad_kind")
    schema = {**COMMON, **SCHEMAS[kind]}
    optional = OPTIONAL.get(kind, {})
    missing = [name for name in schema if name not in fields]
    if missing:
        raise WireError(f"'{kind}' header lacks field(s) {', '.join(missing)}", "bad_header")
    unknown = [name for name in fields if name not in schema and name not in optional]
    if unknown:
        raise WireError(f"'{kind}' header has unknown field(s) {', '.join(map(str, unknown))}", "bad_header")
    for name, check in {**schema, **optional}.items():
        if name in fields and not check(fields[name]):
            raise WireError(f"'{kind}' header field '{name}' has invalid value {fields[name]!r}", "bad_header")
    return fields
