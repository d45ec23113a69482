"""Hostile messages and the check of what comes back: the fuzzer's half that knows the protocol.

:func:`mutate` turns one message into a hostile variant (random frames, flipped
or cut bytes, wrong frame counts, fields of the wrong type or range, other
versions and kinds, unknown sessions, raw header text, shape and size games,
NaN/inf/huge values). :func:`inspect_reply` classifies a server's reply from its
raw frames first, so a NaN the decoder would refuse is counted, not hidden.
``sparse-rt bench fuzz`` (fuzz.py) and tests/test_protocol_client.py's
thousand-message test both send what :func:`mutate` makes.
"""
from __future__ import annotations

import json
import math
import random
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sparse_rt.errors import WireError
from sparse_rt.wire.header import MAX_HEADER_BYTES, PROTOCOL_VERSION, REFUSED_VERSIONS
from sparse_rt.wire.messages import decode_message

F32 = struct.Struct("<f")
HUGE = F32.pack(3e38)  # finite, but its square (or a sum of a few) is not
WEIRD_VALUES = [None, True, False, 0, -1, 1, 2, 3.5, -0.0, 1e308, 3e38, -3e38, 2**31, 2**31 + 1, 2**63 - 1, 2**63,
                2**64, -2**63, 65535, 65536, "", "x", "1", "fp32", "infer", "x" * 3000, "\u00e9\u4e2d\U0001F600",
                "\x00\n\"\\", "\ud800", [], [1, 2, 3, 4], [2, 2, 4, 4], [0, 0, 0, 0], [2**31] * 4, [-1, 2, 4, 4],
                [1.5, 2, 4, 4], ["2", 2, 4, 4], {}, {"a": {"b": [1, {"c": None}]}}, [[[[[[[]]]]]]],
                float("nan"), float("inf"), PROTOCOL_VERSION, PROTOCOL_VERSION + 1]
VERSION_VALUES = [0, -1, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, str(PROTOCOL_VERSION), float(PROTOCOL_VERSION),
                  True, None, 2**70, [PROTOCOL_VERSION], {"v": PROTOCOL_VERSION}]
KIND_VALUES = ["hello", "grad", "pred", "error", "welcome", "train", "infer", "bye", "HELLO", "", "x" * 17, 1, None,
               ["hello"]]
EXTRA_KEYS = ["extra", "v2", "", "x" * 200, "kind2", "\u00e9", "resume", "lr_scale", "grad_codec"]
VALUE_PATTERNS = [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\xff\xff\xff\xff", b"\x80",
                  HUGE, F32.pack(-3e38), b"\x00\x7c", b"\x00\x7e", b"\xff\x7b", b"\x01\x00\x00\x00"]
FILL_PATTERNS = [HUGE, F32.pack(-3e38), F32.pack(1e30), b"\xff\x7b", b"\x01\x00\x00\x00", b"\x00\x00\x00\x00",
                 b"\x7f", b"\x80"]
_NOT_FINITE_TEXT = re.compile(r"\bnan\b|\binf\b|infinit|not finite|nan/inf|must be finite", re.IGNORECASE)


# ---- mutations -------------------------------------------------------------------------------------------------

def header_of(frames: list[bytes]) -> dict[str, Any] | None:
    """frames[0] as a JSON object as the server's parser would read it, else None."""
    try:
        fields = json.loads(frames[0].decode("utf-8")) if frames else None
    except (ValueError, RecursionError):
        return None
    return fields if isinstance(fields, dict) else None


def dump_header(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, allow_nan=True, separators=(",", ":")).encode()


def _random_frames(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return [rng.randbytes(rng.choice([0, 1, 5, 20, 100, 4097])) for _ in range(rng.randint(1, 5))]


def _flip_bytes(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(frames))
        if frames[i]:
            data = bytearray(frames[i])
            data[rng.randrange(len(data))] ^= rng.randint(1, 255)
            frames[i] = bytes(data)
    return frames


def _truncate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    i = rng.randrange(len(frames))
    frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    return frames


def _extend(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    i = rng.randrange(len(frames))
    frames[i] = frames[i] + rng.randbytes(rng.choice([1, 2, 4, 64]))
    return frames


def _frame_count(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    action = rng.randrange(4)
    if action == 0 and len(frames) > 1:
        del frames[rng.randrange(1, len(frames))]
    elif action == 1:
        frames = frames + frames  # every frame twice
    elif action == 2:
        frames = frames + [b""] * rng.choice([1, 10, 100])
    else:
        frames.insert(rng.randint(1, len(frames)), rng.randbytes(rng.choice([0, 2, 8])))
    return frames


def _header_fields(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Wrong types, out-of-range values, missing and unknown fields."""
    fields = header_of(frames)
    if fields is None:
        return _flip_bytes(rng, frames)
    for _ in range(rng.randint(1, 3)):
        action = rng.randrange(4)
        if action == 0 or not fields:
            fields[rng.choice(EXTRA_KEYS)] = rng.choice(WEIRD_VALUES)
        elif action == 1:
            del fields[rng.choice(sorted(fields))]
        else:
            fields[rng.choice(sorted(fields))] = rng.choice(WEIRD_VALUES)
    frames[0] = dump_header(fields)
    return frames


def _version_or_kind(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    fields = header_of(frames)
    if fields is None:
        return _flip_bytes(rng, frames)
    if rng.random() < 0.5:
        fields["v"] = rng.choice(VERSION_VALUES)
    else:
        fields["kind"] = rng.choice(KIND_VALUES)
    frames[0] = dump_header(fields)
    return frames


def _unknown_session(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    fields = header_of(frames)
    if fields is None:
        return _flip_bytes(rng, frames)
    fields["session"] = rng.choice(["%016x" % rng.getrandbits(64), "z", "s" * 64, "s" * 65, "\u4e2d" * 16,
                                    "\ud800\udfff"])
    frames[0] = dump_header(fields)
    return frames


def _raw_header_text(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """The header's bytes, not its fields: encodings, duplicates, non-standard tokens, nesting, the size limit."""
    text = frames[0]
    version = f'"v":{PROTOCOL_VERSION}'.encode()
    frames[0] = rng.choice([
        b"\xef\xbb\xbf" + text, text[:-1] + b"," + version + b"}", text + b" trailing", text[:-1] + b',"x":NaN}',
        text[:-1] + b',"x":-Infinity}', b"[" * 1500 + b"]" * 1500, b'{"a":' * 800 + b"1" + b"}" * 800,
        text.replace(b'"', b"'"), b"\x80\x81" + text, b"null", b"1", b'"string"', b"{}", b"", b"\x00" * 16,
        text[:-1] + b',"' + b"k" * 4000 + b'":1}', text.replace(version, version + b".0", 1),
        text.replace(version, version + b"e0", 1), text.replace(version, version.replace(b":", b":0"), 1),
        text.replace(version, version.replace(b":", b":  "), 1), re.sub(rb'"id":(\d+)', rb'"id":\1.0', text, 1),
        re.sub(rb'"id":(\d+)', rb'"id":-\1', text, 1), re.sub(rb'"session":"[^"]*"', rb'"session":"\\ud800"', text, 1),
        text.decode("utf-8", "replace").encode("utf-16"), text + b" " * max(0, MAX_HEADER_BYTES - len(text)),
        text + b" " * max(0, MAX_HEADER_BYTES + 1 - len(text)),
    ])
    return frames


def _shape_games(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    fields = header_of(frames)
    if fields is None or type(fields.get("shape")) is not list or not fields["shape"]:
        return _header_fields(rng, frames)
    shape = list(fields["shape"])
    if rng.random() < 0.8:
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 5, 9, 33, 2**16, 2**30, 2**31, 2**31 + 1, -1])
    else:
        shape = rng.choice([[2**15, 2**15, 1, 1], [1, 1, 2**15, 2**15], shape[:-1], shape + [1], [2**31] * 4])
    fields["shape"] = shape
    frames[0] = dump_header(fields)
    return frames


def _hostile_values(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """NaN, inf, -128 (int8), fp16 inf and huge finite floats written somewhere in the data frame."""
    if len(frames) < 3 or not frames[2]:
        return _flip_bytes(rng, frames)
    data = bytearray(frames[2])
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(max(1, len(data) - 3))
        pattern = rng.choice(VALUE_PATTERNS)
        data[position:position + len(pattern)] = pattern
    frames[2] = bytes(data[:len(frames[2])])
    return frames


def _hostile_fill(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """The whole data frame one value (of its own length): huge finite floats make the loss or logits overflow."""
    if len(frames) < 3 or not frames[2]:
        return _flip_bytes(rng, frames)
    pattern = rng.choice(FILL_PATTERNS)
    frames[2] = (pattern * (len(frames[2]) // len(pattern) + 1))[:len(frames[2])]
    return frames


def _indices_or_labels(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Channel indices out of order, repeated or out of range; labels too large or negative."""
    if len(frames) >= 4 and frames[3] and rng.random() < 0.5:
        frames[3] = rng.choice([b"\xff", b"\x80", b"\x0a"]) * len(frames[3])
    elif len(frames) >= 2 and len(frames[1]) >= 2:
        indices = np.frombuffer(frames[1], "<u2").copy()
        choice = rng.randrange(3)
        if choice == 0:
            indices = indices[::-1].copy()
        elif choice == 1:
            indices[-1] = indices[0]
        else:
            indices[rng.randrange(len(indices))] = rng.choice([32, 255, 65535])
        frames[1] = indices.astype("<u2").tobytes()
    else:
        return _flip_bytes(rng, frames)
    return frames


def _unchanged(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return frames


MUTATIONS: tuple[Callable[[random.Random, list[bytes]], list[bytes]], ...] = (
    _random_frames, _flip_bytes, _truncate, _extend, _frame_count, _header_fields, _header_fields, _header_fields,
    _version_or_kind, _unknown_session, _raw_header_text, _shape_games, _hostile_values, _hostile_fill,
    _indices_or_labels, _unchanged, _unchanged)


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One hostile variant of a message (or, now and then, the message itself).

    The same families as tests/test_protocol_client.py's fuzzer, and more: a
    valid message changed in one way finds the checks a purely random one never
    reaches, since the server stops at the first fault.
    """
    frames = [bytes(frame) for frame in frames] or [b""]
    return rng.choice(MUTATIONS)(rng, frames) or [b""]


# ---- replies ---------------------------------------------------------------------------------------------------

@dataclass
class Reply:
    """What one reply was: its label (kind, or error code), id, and whether its numbers were finite."""

    label: str
    kind: str | None
    id: int | None
    session: str | None
    non_finite: bool
    problem: str | None  # why it is malformed, or None


def _raw_not_finite(fields: dict[str, Any], frames: list[bytes]) -> bool:
    """NaN or inf in a pred's logits, a grad's loss or (without lz4) a grad's values, read from the bytes."""
    kind = fields.get("kind")
    if kind == "pred" and len(frames) == 2 and len(frames[1]) % 4 == 0:
        return not bool(np.isfinite(np.frombuffer(frames[1], "<f4")).all())
    if kind != "grad":
        return False
    loss = fields.get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return True
    shape, codec = fields.get("shape"), fields.get("codec")
    if len(frames) != 3 or fields.get("lz4") is not False or type(shape) is not list or len(shape) != 4:
        return False
    data = frames[2]
    if codec == "fp32" and len(data) % 4 == 0:
        return not bool(np.isfinite(np.frombuffer(data, "<f4")).all())
    if codec == "fp16" and len(data) % 2 == 0:
        return not bool(np.isfinite(np.frombuffer(data, "<f2")).all())
    if codec == "int8" and type(shape[1]) is int and 0 <= 4 * shape[1] <= len(data):
        return not bool(np.isfinite(np.frombuffer(data, "<f4", count=shape[1])).all())
    return False


def _old_version_error(fields: dict[str, Any], frames: list[bytes]) -> bool:
    """A refusal written in an older protocol's format, to a peer that spoke it (header.REFUSED_VERSIONS)."""
    return (fields.get("v") in REFUSED_VERSIONS and fields.get("kind") == "error"
            and len(frames) == 1 and set(fields) == {"v", "kind", "id", "code", "message"})


def inspect_reply(frames: list[bytes]) -> Reply:
    """Classify a reply from its raw frames first (so NaN is seen), then check it with sparse-rt's decoder."""
    fields = header_of(frames)
    if fields is None:
        return Reply("undecodable", None, None, None, False, f"reply header is not a JSON object: {frames[:1]!r:.200}")
    kind = fields.get("kind") if isinstance(fields.get("kind"), str) else None
    rid = fields.get("id") if type(fields.get("id")) is int else None
    session = fields.get("session") if isinstance(fields.get("session"), str) else None
    label = str(fields.get("code")) if kind == "error" else str(kind)
    non_finite = _raw_not_finite(fields, frames)
    problem = None
    try:
        decode_message(frames)
    except WireError as exc:
        if _NOT_FINITE_TEXT.search(str(exc)):
            non_finite = True
        elif not _old_version_error(fields, frames):
            problem = f"reply does not decode ({exc.code}: {exc}): {frames[0][:200]!r}"
    except Exception as exc:  # the decoder must refuse with WireError; anything else is a bug worth seeing
        problem = f"decoding the reply raised {type(exc).__name__}: {exc}: {frames[0][:200]!r}"
    return Reply(label, kind, rid, session, non_finite, problem)
