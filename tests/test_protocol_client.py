"""docs/PROTOCOL.md is enough to talk to a real server: an independent client, then 1,000 hostile messages.

Part 1 (the client) is written from docs/PROTOCOL.md alone, with plain pyzmq, json, struct, numpy and the
``lz4.frame`` package (the LZ4 *frame* format the document names); it imports nothing from sparse_rt.
Part 2 (the harness) starts a real ``sparse-rt node --role server`` process and rebuilds the server's tail
with sparse_rt to know what a correct reply is.
"""
from __future__ import annotations

import itertools
import json
import math
import random
import struct
import time

import lz4.frame
import numpy as np
import pytest
import zmq

# =====================================================================================================
# Part 1. ProtocolClient: written from docs/PROTOCOL.md alone. NO sparse_rt imports in this part.
# =====================================================================================================

PROTOCOL_VERSION = 2                               # section 3, `v`
MAX_HEADER_BYTES = 4096                            # section 3
MAX_ID = 2**63 - 1                                 # section 3, `id`
MAX_SHAPE_ELEMENT = 2**31                          # section 3, shape(r)
MAX_TENSOR_BYTES = 2**30                           # section 5, limits
CODECS = ("fp32", "fp16", "int8")                  # section 5
LABEL_DTYPES = {"uint8": "<u1", "uint16": "<u2", "int32": "<i4", "int64": "<i8"}   # section 4.3
FRAME_COUNTS = {"hello": 1, "welcome": 1, "bye": 1, "train": 4, "infer": 3, "grad": 3, "pred": 2,  # section 2
                "error": 1}
LIMITS = ("max_batch", "max_frame_bytes", "max_lr_scale", "session_idle_s", "sessions_per_peer")  # section 4.2
ERROR_CODES = {                                    # section 7
    "bad_header", "bad_version", "bad_kind", "bad_frames", "bad_frame", "bad_shape", "bad_indices",
    "bad_budget", "bad_labels", "bad_codec", "bad_message", "too_large", "unknown_session", "wrong_mode",
    "stale_step", "handshake_refused", "busy", "bad_step", "bad_output", "reply_lost", "internal", "bad_cut",
}
MAX_CUT_NAME = 64                                  # sections 4.1, 4.3, 4.4: `cut` is a string(64)


def _largest_int8_scale() -> np.float32:
    """Section 5: the largest binary32 scale whose 127 * scale is still finite (about 2.68e36)."""
    scale = np.float32(np.finfo(np.float32).max / np.float32(127))
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(127) * scale):
            scale = np.nextafter(scale, np.float32(0))
        while np.isfinite(np.float32(127) * np.nextafter(scale, np.float32(np.inf))):
            scale = np.nextafter(scale, np.float32(np.inf))
    return np.float32(scale)


INT8_SCALE_CAP = _largest_int8_scale()


class ProtocolError(Exception):
    """The server answered `error` (section 4.7)."""

    def __init__(self, code: str, message: str, request_id: int) -> None:
        super().__init__(f"{code} (id {request_id}): {message}")
        self.code, self.message, self.request_id = code, message, request_id


class MalformedReply(AssertionError):
    """A reply that breaks docs/PROTOCOL.md."""


# ---- section 3: header --------------------------------------------------------------------------------

def encode_header(fields: dict) -> bytes:
    """UTF-8 JSON object, `v` first, no spaces, non-ASCII as \\uXXXX, no NaN/Infinity."""
    ordered = {"v": fields["v"], **{k: value for k, value in fields.items() if k != "v"}} if "v" in fields else fields
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("utf-8")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise MalformedReply(f"repeated key in header: {keys}")
    return dict(pairs)


def _no_constants(token):
    raise MalformedReply(f"non-standard JSON token {token}")


def parse_header(frame: bytes) -> dict:
    """Frame 0 as a JSON object, with the sender rules of section 3 checked strictly."""
    if len(frame) > MAX_HEADER_BYTES:
        raise MalformedReply(f"header of {len(frame)} bytes > {MAX_HEADER_BYTES}")
    if frame.startswith(b"\xef\xbb\xbf"):
        raise MalformedReply("header starts with a byte-order mark")
    try:
        header = json.loads(frame.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                            parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as failure:
        raise MalformedReply(f"header is not UTF-8 JSON: {failure}") from failure
    if not isinstance(header, dict):
        raise MalformedReply(f"header is not a JSON object: {header!r}")
    return header


def is_integer(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high       # `true` is a bool in Python: refused


def is_string(value, longest: int) -> bool:
    return type(value) is str and 1 <= len(value) <= longest


def is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def is_shape(value, rank: int) -> bool:
    return (type(value) is list and len(value) == rank
            and all(is_integer(x, 0, MAX_SHAPE_ELEMENT) for x in value))


# Field types of each kind (sections 4.1 to 4.7); a check per field. Ranges that depend on the server
# (C, its pipeline) are checked by the caller, not here.
FIELD_CHECKS = {
    "hello": {
        "pipeline": lambda x: is_string(x, 256), "channels": lambda x: is_integer(x, 1, 65535),
        "budget": lambda x: is_integer(x, 1, 65535), "codec": lambda x: is_string(x, 16) and x in CODECS,
        "lz4": lambda x: type(x) is bool, "mode": lambda x: x in ("train", "infer"),
        "resolution": lambda x: is_integer(x, 0, 255),
    },
    "welcome": {
        "session": lambda x: is_string(x, 64), "resumed": lambda x: type(x) is bool,
        "next_step": lambda x: is_integer(x, 0, MAX_ID), "channels": lambda x: is_integer(x, 1, 65535),
        "sent_height": lambda x: is_integer(x, 1, 2**31), "sent_width": lambda x: is_integer(x, 1, 2**31),
        "classes": lambda x: is_integer(x, 1, 2**31),
        "limits": lambda x: type(x) is dict and sorted(x) == sorted(LIMITS) and all(
            is_integer(x[k], 0, MAX_ID) for k in ("max_batch", "max_frame_bytes", "sessions_per_peer"))
            and all(is_number(x[k]) and x[k] > 0 for k in ("max_lr_scale", "session_idle_s")),
    },
    "bye": {"session": lambda x: is_string(x, 64)},
    "train": {
        "session": lambda x: is_string(x, 64), "codec": lambda x: is_string(x, 16), "lz4": lambda x: type(x) is bool,
        "channels": lambda x: is_integer(x, 1, 65535), "shape": lambda x: is_shape(x, 4),
        "step": lambda x: is_integer(x, 0, MAX_ID), "label_dtype": lambda x: x in LABEL_DTYPES,
    },
    "infer": {
        "session": lambda x: is_string(x, 64), "codec": lambda x: is_string(x, 16), "lz4": lambda x: type(x) is bool,
        "channels": lambda x: is_integer(x, 1, 65535), "shape": lambda x: is_shape(x, 4),
    },
    "grad": {
        "session": lambda x: is_string(x, 64), "codec": lambda x: is_string(x, 16) and x in CODECS,
        "lz4": lambda x: type(x) is bool, "shape": lambda x: is_shape(x, 4),
        "step": lambda x: is_integer(x, 0, MAX_ID), "loss": is_number,
    },
    "pred": {"session": lambda x: is_string(x, 64), "shape": lambda x: is_shape(x, 2)},
    "error": {"code": lambda x: is_string(x, 64), "message": lambda x: is_string(x, 2048)},
}


def is_codec_list(value) -> bool:
    """Section 3, list(8, 20): 1 to 8 distinct strings of 1 to 20 characters (section 4.1, `codecs`)."""
    return (type(value) is list and 1 <= len(value) <= 8 and all(is_string(x, 20) for x in value)
            and len(set(value)) == len(value))


# Fields a kind may leave out (section 3: "marked optional"; sections 4.1 to 4.6).
OPTIONAL_FIELD_CHECKS = {
    "hello": {"grad_codec": lambda x: is_string(x, 16), "grad_lz4": lambda x: type(x) is bool,
              "resume": lambda x: is_string(x, 64), "timing": lambda x: type(x) is bool, "codecs": is_codec_list,
              "cut": lambda x: is_string(x, MAX_CUT_NAME)},
    "train": {"lr_scale": lambda x: is_number(x) and 0 < x <= 100, "cut": lambda x: is_string(x, MAX_CUT_NAME)},
    "infer": {"cut": lambda x: is_string(x, MAX_CUT_NAME)},
    "grad": {"server_ms": lambda x: is_number(x) and x >= 0},
    "pred": {"server_ms": lambda x: is_number(x) and x >= 0},
}


def validate_header(header: dict) -> None:
    """Section 3: v, kind, id, then exactly the fields of the kind (and any of its optional ones) with exact types."""
    if not is_integer(header.get("v"), PROTOCOL_VERSION, PROTOCOL_VERSION):
        raise MalformedReply(f"bad v in {header}")
    kind = header.get("kind")
    if kind not in FIELD_CHECKS:
        raise MalformedReply(f"bad kind in {header}")
    if not is_integer(header.get("id"), 0, MAX_ID):
        raise MalformedReply(f"bad id in {header}")
    checks, optional = FIELD_CHECKS[kind], OPTIONAL_FIELD_CHECKS.get(kind, {})
    expected = {"v", "kind", "id", *checks}
    if set(header) - set(optional) != expected:
        raise MalformedReply(f"{kind} header fields {sorted(header)} != {sorted(expected)} (+ optional "
                             f"{sorted(optional)})")
    for name, check in {**checks, **optional}.items():
        if name in header and not check(header[name]):
            raise MalformedReply(f"{kind} field {name}={header[name]!r} has the wrong type or range")


# ---- section 5: codecs -------------------------------------------------------------------------------

def codec_size(codec: str, shape) -> int:
    numel = math.prod(shape)
    return {"fp32": 4 * numel, "fp16": 2 * numel, "int8": 4 * shape[1] + numel}[codec]


def int8_quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel (dim 1) int8: (scales binary32 [B], q int8 of x's shape)."""
    channels = x.shape[1]
    magnitudes = np.abs(np.moveaxis(x, 1, 0).reshape(channels, -1))
    peak = magnitudes.max(axis=1) if magnitudes.size else np.zeros(channels, np.float32)
    scale = np.minimum((peak.astype(np.float32) / np.float32(127)).astype(np.float32), INT8_SCALE_CAP)
    view = (1, channels) + (1,) * (x.ndim - 2)
    divisor = np.where(scale == 0, np.float32(1), scale).reshape(view).astype(np.float32)
    q = np.rint((x / divisor).astype(np.float32))               # rint: round half to even
    q = np.where(scale.reshape(view) == 0, 0, np.clip(q, -127, 127)).astype(np.int8)
    return scale.astype(np.float32), q


def int8_dequantise(scale: np.ndarray, q: np.ndarray) -> np.ndarray:
    view = (1, q.shape[1]) + (1,) * (q.ndim - 2)
    return (q.astype(np.float32) * scale.astype(np.float32).reshape(view)).astype(np.float32)


def lz4_compress(raw: bytes) -> bytes:
    """One LZ4 frame, independent 64 KiB blocks, content size and content checksum (as the reference)."""
    return lz4.frame.compress(raw, block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=False,
                              content_checksum=True, store_size=True)


def lz4_decompress(frame: bytes, inner_size: int) -> bytes:
    """Exactly one valid LZ4 frame, nothing after it, content exactly inner_size bytes."""
    if inner_size > 255 * len(frame):
        raise MalformedReply(f"lz4 frame of {len(frame)} bytes cannot hold {inner_size} bytes")
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        content = decompressor.decompress(frame, max_length=inner_size + 1)
    except RuntimeError as failure:
        raise MalformedReply(f"invalid lz4 frame: {failure}") from failure
    if not decompressor.eof or decompressor.unused_data or len(content) != inner_size:
        raise MalformedReply(f"lz4 frame: eof={decompressor.eof}, {len(decompressor.unused_data or b'')} "
                             f"trailing bytes, content {len(content)} bytes, expected {inner_size}")
    return content


def pack(values: np.ndarray, codec: str, use_lz4: bool) -> bytes:
    """A float32 tensor (channel axis = dim 1) -> the data frame."""
    x = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("senders MUST NOT send non-finite values")
    if codec == "fp32":
        raw = x.astype("<f4").tobytes()
    elif codec == "fp16":
        raw = np.clip(x, -65504, 65504).astype("<f2").tobytes()
    elif codec == "int8":
        scale, q = int8_quantise(x)
        raw = scale.astype("<f4").tobytes() + q.astype("i1").tobytes()
    else:
        raise ValueError(codec)
    return lz4_compress(raw) if use_lz4 else raw


def unpack(data: bytes, shape, codec: str, use_lz4: bool) -> np.ndarray:
    """The data frame -> float32 tensor of `shape`, with every check of section 5."""
    size = codec_size(codec, shape)
    raw = lz4_decompress(data, size) if use_lz4 else data
    if len(raw) != size:
        raise MalformedReply(f"{codec} data of {len(raw)} bytes, expected {size}")
    if codec == "fp32":
        x = np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)
    elif codec == "fp16":
        x = np.frombuffer(raw, "<f2").astype(np.float32).reshape(shape)
    else:
        channels = shape[1]
        scale = np.frombuffer(raw[:4 * channels], "<f4").astype(np.float32)
        q = np.frombuffer(raw[4 * channels:], "i1").reshape(shape)
        if not (np.isfinite(scale).all() and (scale >= 0).all()):
            raise MalformedReply(f"bad int8 scales {scale}")
        if (q == -128).any():
            raise MalformedReply("int8 value -128")
        x = int8_dequantise(scale, q)
    if not np.isfinite(x).all():
        raise MalformedReply("non-finite value in a data frame")
    return x


def dequantised(values: np.ndarray, codec: str) -> np.ndarray:
    """What the receiver will decode from `values` sent with `codec` (lz4 is lossless)."""
    return unpack(pack(values, codec, False), values.shape, codec, False)


def smallest_label_dtype(labels: np.ndarray) -> str:
    largest = int(labels.max()) if labels.size else 0
    for name, limit in (("uint8", 2**8), ("uint16", 2**16), ("int32", 2**31), ("int64", 2**63)):
        if largest < limit:
            return name
    raise ValueError(largest)


# ---- section 4: messages -----------------------------------------------------------------------------

def hello_frames(request_id: int, pipeline: str, channels: int, budget: int, codec: str, use_lz4: bool,
                 mode: str, resolution: int, resume: str | None = None, timing: bool = False,
                 codecs: list[str] | None = None, cut: str | None = None) -> list[bytes]:
    """The hello of section 4.1; optional fields are sent as given (a test may send malformed ones)."""
    header = {"v": PROTOCOL_VERSION, "kind": "hello", "id": request_id, "pipeline": pipeline, "channels": channels,
              "budget": budget, "codec": codec, "lz4": use_lz4, "mode": mode, "resolution": resolution}
    if resume is not None:                                  # section 4.1: optional
        header["resume"] = resume
    if timing:                                              # section 4.1: sent only to ask for it
        header["timing"] = True
    if codecs is not None:                                  # section 4.1: inference sessions only
        header["codecs"] = codecs
    if cut is not None:                                     # section 4.1: only for a cut other than the default
        header["cut"] = cut
    return [encode_header(header)]


def bye_frames(request_id: int, session: str) -> list[bytes]:
    return [encode_header({"v": PROTOCOL_VERSION, "kind": "bye", "id": request_id, "session": session})]


def infer_frames(request_id: int, session: str, codec: str, use_lz4: bool, channels: int,
                 indices, values: np.ndarray, cut: str | None = None) -> list[bytes]:
    header = {"v": PROTOCOL_VERSION, "kind": "infer", "id": request_id, "session": session, "codec": codec, "lz4": use_lz4,
              "shape": [int(s) for s in values.shape], "channels": channels}
    if cut is not None:                                     # section 4.4: only for a cut other than the session's
        header["cut"] = cut
    return [encode_header(header), np.asarray(indices, "<u2").tobytes(), pack(values, codec, use_lz4)]


def train_frames(request_id: int, session: str, codec: str, use_lz4: bool, channels: int, indices,
                 values: np.ndarray, labels, step: int, cut: str | None = None) -> list[bytes]:
    labels = np.asarray(labels)
    label_dtype = smallest_label_dtype(labels)
    header = {"v": PROTOCOL_VERSION, "kind": "train", "id": request_id, "session": session, "codec": codec, "lz4": use_lz4,
              "shape": [int(s) for s in values.shape], "channels": channels, "step": step,
              "label_dtype": label_dtype}
    if cut is not None:                                     # section 4.3: = the session's cut
        header["cut"] = cut
    return [encode_header(header), np.asarray(indices, "<u2").tobytes(), pack(values, codec, use_lz4),
            labels.astype(LABEL_DTYPES[label_dtype]).tobytes()]


def refused_version(frames: list[bytes]) -> tuple[dict, None] | None:
    """Section 10: the answer to a v1 message is a v1 `bad_version` error (header, None); anything else: None."""
    header = parse_header(frames[0]) if frames else None
    if not isinstance(header, dict) or header.get("v") != 1:
        return None
    if (len(frames) != 1 or sorted(header) != ["code", "id", "kind", "message", "v"] or header["kind"] != "error"
            or header["code"] != "bad_version" or not is_integer(header["id"], 0, MAX_ID)):
        raise MalformedReply(f"a v1 header that is not the documented refusal: {header}")
    return header, None


def decode_reply(frames: list[bytes]) -> tuple[dict, object]:
    """A server reply (welcome, grad, pred or error), checked against sections 2 to 5.

    Returns (header, payload): payload is None (welcome, error), (indices, gradient) for grad, logits for pred.
    """
    if not frames:
        raise MalformedReply("empty reply")
    header = parse_header(frames[0])
    validate_header(header)
    kind = header["kind"]
    if kind not in ("welcome", "bye", "grad", "pred", "error"):
        raise MalformedReply(f"the server sent a {kind}")
    if len(frames) != FRAME_COUNTS[kind]:
        raise MalformedReply(f"{kind} with {len(frames)} frames, expected {FRAME_COUNTS[kind]}")
    if kind == "error" and header["code"] not in ERROR_CODES:
        raise MalformedReply(f"error code {header['code']!r} is not in section 7")
    if kind == "pred":
        n, k = header["shape"]
        if 4 * n * k > MAX_TENSOR_BYTES:
            raise MalformedReply("pred too large")
        if len(frames[1]) != 4 * n * k:
            raise MalformedReply(f"logits frame of {len(frames[1])} bytes for shape {[n, k]}")
        logits = np.frombuffer(frames[1], "<f4").astype(np.float32).reshape(n, k)
        if not np.isfinite(logits).all():
            raise MalformedReply("non-finite logits")
        return header, logits
    if kind == "grad":
        shape = header["shape"]
        if 4 * math.prod(shape) > MAX_TENSOR_BYTES:
            raise MalformedReply("grad too large")
        if len(frames[1]) != 2 * shape[1]:
            raise MalformedReply(f"grad indices frame of {len(frames[1])} bytes for B={shape[1]}")
        indices = np.frombuffer(frames[1], "<u2").astype(np.int64)
        gradient = unpack(frames[2], shape, header["codec"], header["lz4"])
        return header, (indices, gradient)
    return header, None


class ProtocolClient:
    """An edge that speaks docs/PROTOCOL.md over one DEALER socket (no sparse_rt code)."""

    def __init__(self, context: zmq.Context, address: str, timeout: float = 20.0) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.timeout = timeout
        self._ids = itertools.count(1)          # section 3: number requests from 1 upwards
        self._early: dict[int, list[bytes]] = {}

    def close(self) -> None:
        self.socket.close(linger=0)

    def next_id(self) -> int:
        return next(self._ids)

    def exchange(self, frames: list[bytes]) -> tuple[dict, object]:
        """Send one request, wait (with a timeout) for the reply carrying its id."""
        request_id = parse_header(frames[0])["id"]
        self.socket.send_multipart(frames)
        deadline = time.monotonic() + self.timeout
        while request_id not in self._early:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000), zmq.POLLIN):
                raise TimeoutError(f"no reply to request {request_id} within {self.timeout} s")
            reply = self.socket.recv_multipart()
            self._early[parse_header(reply[0]).get("id")] = reply
        header, payload = decode_reply(self._early.pop(request_id))
        if header["kind"] == "error":
            raise ProtocolError(header["code"], header["message"], header["id"])
        return header, payload

    def welcome(self, pipeline: str, channels: int, budget: int, codec: str = "fp32", use_lz4: bool = False,
                mode: str = "infer", resolution: int = 0, resume: str | None = None, timing: bool = False,
                codecs: list[str] | None = None, cut: str | None = None) -> dict:
        """The whole welcome header (section 4.2)."""
        header, _ = self.exchange(hello_frames(self.next_id(), pipeline, channels, budget, codec, use_lz4, mode,
                                               resolution, resume, timing, codecs, cut))
        if header["kind"] != "welcome" or header["channels"] != channels:
            raise MalformedReply(f"hello answered with {header}")
        if not header["resumed"] and header["next_step"] != 0:
            raise MalformedReply(f"a new session must start at step 0: {header}")
        return header

    def hello(self, pipeline: str, channels: int, budget: int, codec: str = "fp32", use_lz4: bool = False,
              mode: str = "infer", resolution: int = 0, timing: bool = False, codecs: list[str] | None = None,
              cut: str | None = None) -> str:
        return self.welcome(pipeline, channels, budget, codec, use_lz4, mode, resolution, timing=timing,
                            codecs=codecs, cut=cut)["session"]

    def bye(self, session: str) -> None:
        header, _ = self.exchange(bye_frames(self.next_id(), session))
        if header["kind"] != "bye" or header["session"] != session:
            raise MalformedReply(f"bye answered with {header}")

    def infer(self, session: str, codec: str, use_lz4: bool, channels: int, indices, values,
              cut: str | None = None) -> np.ndarray:
        return self.infer_with_header(session, codec, use_lz4, channels, indices, values, cut)[1]

    def infer_with_header(self, session: str, codec: str, use_lz4: bool, channels: int, indices,
                          values, cut: str | None = None) -> tuple[dict, np.ndarray]:
        header, logits = self.exchange(infer_frames(self.next_id(), session, codec, use_lz4, channels, indices,
                                                    values, cut))
        if header["kind"] != "pred" or header["session"] != session or header["shape"][0] != values.shape[0]:
            raise MalformedReply(f"infer answered with {header}")
        return header, logits

    def train(self, session: str, codec: str, use_lz4: bool, channels: int, indices, values, labels,
              step: int, cut: str | None = None) -> tuple[dict, np.ndarray, list[bytes]]:
        frames = train_frames(self.next_id(), session, codec, use_lz4, channels, indices, values, labels, step, cut)
        header, payload = self.exchange(frames)
        if header["kind"] != "grad" or header["session"] != session or header["step"] != step:
            raise MalformedReply(f"train answered with {header}")
        sent_indices, gradient = payload
        if header["shape"] != list(values.shape) or list(sent_indices) != [int(i) for i in indices]:
            raise MalformedReply("grad indices or shape differ from the request's (bad_reply)")
        return header, gradient


# =====================================================================================================
# Part 2. Harness: a real server process and the reference tail (sparse_rt allowed from here on).
# =====================================================================================================

PIPELINE, CHANNELS, SIDE, CLASSES, SEED = "digits_cnn", 32, 4, 10, 0


@pytest.fixture(scope="module")
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def _start_server():
    from sparse_rt.nodes.launch import NodeProcess

    server = NodeProcess("server", {"pipeline": PIPELINE, "bind": "tcp://127.0.0.1:*", "seed": SEED, "json": True})
    try:
        return server, server.wait_ready(timeout=120)
    except BaseException:
        server.process.kill()
        server.finish(timeout=10)
        raise


def _stop_server(server) -> dict:
    server.stop()
    return server.result(timeout=60)


class ServerPool:
    """The module's server process, restarted for the next test if a test killed it (so one crash is one failure)."""

    def __init__(self) -> None:
        self.node = None
        self.address = None

    def ensure(self):
        if self.node is not None and self.node.process.poll() is not None:
            self.node.finish(timeout=10)
            self.node = None
        if self.node is None:
            self.node, self.address = _start_server()
        return self.node, self.address

    def close(self) -> None:
        if self.node is not None and self.node.process.poll() is None:
            summary = _stop_server(self.node)
            assert summary["steps_applied"] == 0, summary            # nothing in this module trains it
        elif self.node is not None:
            self.node.finish(timeout=10)


@pytest.fixture(scope="module")
def server_pool():
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def served(server_pool):
    """A server that must not be trained: (NodeProcess, address)."""
    return server_pool.ensure()


@pytest.fixture(scope="module")
def reference():
    """The server's tail at step 0, rebuilt from the seed: (values (N,B,h,w), indices (B,)) -> logits (N, K)."""
    import torch

    from sparse_rt.pipeline import get_pipeline
    from sparse_rt.assembly import server_side

    model, cut = server_side(get_pipeline(PIPELINE), seed=SEED, resolution=0)
    assert (cut.channels, cut.sent_height, cut.sent_width) == (CHANNELS, SIDE, SIDE)
    model.eval()

    def logits(values: np.ndarray, indices) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(values, np.float32)),
                         torch.as_tensor(np.asarray(indices), dtype=torch.int64)).numpy()

    return logits


@pytest.fixture
def client(served, context):
    c = ProtocolClient(context, served[1])
    yield c
    c.close()


def welcome_header(request_id: int, session: str) -> dict:
    """A valid welcome (section 4.2), for sending one where it does not belong."""
    return {"v": PROTOCOL_VERSION, "kind": "welcome", "id": request_id, "session": session, "resumed": False,
            "next_step": 0, "channels": CHANNELS, "sent_height": SIDE, "sent_width": SIDE, "classes": CLASSES,
            "limits": {"max_batch": 1, "max_frame_bytes": 0, "max_lr_scale": 1, "session_idle_s": 1,
                       "sessions_per_peer": 1}}


def _batch(rng: np.random.Generator, n: int, b: int, scale: float = 1.0):
    indices = np.sort(rng.choice(CHANNELS, size=b, replace=False))
    return indices, (rng.standard_normal((n, b, SIDE, SIDE)) * scale).astype(np.float32)


# ---- the worked example (section 9), byte for byte ----------------------------------------------------

def test_the_client_encodes_the_worked_example_byte_for_byte():
    values = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32).reshape(2, 2, 1, 1)
    frames = train_frames(3, "9f2c4e1a6b7d8053", "fp32", False, 4, [1, 3], values, [7, 2], step=0)
    assert frames[0] == (b'{"v":2,"kind":"train","id":3,"session":"9f2c4e1a6b7d8053","codec":"fp32","lz4":false,'
                         b'"shape":[2,2,1,1],"channels":4,"step":0,"label_dtype":"uint8"}')
    assert len(frames[0]) == 147
    assert frames[1:] == [bytes.fromhex("01000300"), bytes.fromhex("0000003f000080bf000000400000803e"),
                          bytes.fromhex("0702")]
    assert sum(map(len, frames)) == 169

    grad = [b'{"v":2,"kind":"grad","id":3,"session":"9f2c4e1a6b7d8053","codec":"fp32","lz4":false,'
            b'"shape":[2,2,1,1],"step":0,"loss":1.25}', bytes.fromhex("01000300"),
            bytes.fromhex("0000003e000080bd000000000000c03f")]
    assert len(grad[0]) == 123 and sum(map(len, grad)) == 143
    header, (indices, gradient) = decode_reply(grad)
    assert header["loss"] == 1.25 and list(indices) == [1, 3]
    np.testing.assert_array_equal(gradient.reshape(2, 2), [[0.125, -0.0625], [0.0, 1.5]])

    assert pack(values, "int8", False) == bytes.fromhex("0402813c" "0402013c" "20817f20")
    hello = hello_frames(1, "digits_cnn", 32, 4, "fp32", False, "train", 0)[0]
    assert hello == (b'{"v":2,"kind":"hello","id":1,"pipeline":"digits_cnn","channels":32,"budget":4,"codec":"fp32",'
                     b'"lz4":false,"mode":"train","resolution":0}')


def test_int8_rules_of_section_5():
    x = np.array([0.0, 0.0, 1.0, -3.0, 2.5, 1e-3], np.float32).reshape(1, 6, 1, 1)
    x[0, 1] = 0.0                                             # an all-zero channel: scale 0, q 0
    scale, q = int8_quantise(x)
    assert scale[0] == 0 and q[0, 0, 0, 0] == 0
    assert (q.reshape(-1)[2:] == [127, -127, 127, 127]).all()
    half = np.array([[0.5, 1.5, 2.5, 127.0]], np.float32).reshape(1, 1, 4)   # scale 1: halves round to even
    assert (int8_quantise(half)[1].reshape(-1) == [0, 2, 2, 127]).all()
    assert np.isfinite(np.float32(127) * INT8_SCALE_CAP) and 2.6e36 < INT8_SCALE_CAP < 2.7e36


# ---- inference against the reference ---------------------------------------------------------------

@pytest.mark.parametrize("codec, use_lz4", [("fp32", False), ("fp32", True), ("fp16", False), ("int8", False),
                                            ("int8", True), ("fp16", True)])
def test_inference_matches_the_reference_tail(client, reference, codec, use_lz4):
    rng = np.random.default_rng([CODECS.index(codec), int(use_lz4)])
    session = client.hello(PIPELINE, CHANNELS, budget=8, codec=codec, use_lz4=use_lz4, mode="infer")
    assert is_string(session, 64)
    for n, b in ((5, 6), (1, 1), (8, 8)):                     # B may be below the budget
        indices, values = _batch(rng, n, b)
        logits = client.infer(session, codec, use_lz4, CHANNELS, indices, values)
        assert logits.shape == (n, CLASSES)
        np.testing.assert_allclose(logits, reference(dequantised(values, codec), indices), atol=1e-4, rtol=1e-4)


def test_all_channels_and_a_train_session_may_infer(client, reference):
    rng = np.random.default_rng(7)
    session = client.hello(PIPELINE, CHANNELS, budget=CHANNELS, codec="int8", use_lz4=True, mode="train")
    indices, values = _batch(rng, 3, CHANNELS, scale=20.0)
    logits = client.infer(session, "int8", True, CHANNELS, indices, values)
    np.testing.assert_allclose(logits, reference(dequantised(values, "int8"), indices), atol=1e-4, rtol=1e-4)


def test_replies_are_matched_by_id_with_several_in_flight(client, reference):
    rng = np.random.default_rng(8)
    session = client.hello(PIPELINE, CHANNELS, budget=4)
    sent = {}
    for _ in range(10):
        indices, values = _batch(rng, 2, 4)
        request_id = client.next_id()
        client.socket.send_multipart(infer_frames(request_id, session, "fp32", False, CHANNELS, indices, values))
        sent[request_id] = (indices, values)
    got = {}
    while len(got) < len(sent):
        assert client.socket.poll(20000), "no reply"
        header, logits = decode_reply(client.socket.recv_multipart())
        assert header["kind"] == "pred" and header["id"] in sent and header["id"] not in got
        got[header["id"]] = logits
    for request_id, (indices, values) in sent.items():
        np.testing.assert_allclose(got[request_id], reference(values, indices), atol=1e-4, rtol=1e-4)


# ---- refusals the document names ---------------------------------------------------------------------

def _raw(frames_header: dict | bytes, *rest: bytes) -> list[bytes]:
    head = frames_header if isinstance(frames_header, bytes) else json.dumps(frames_header).encode()
    return [head, *rest]


def test_documented_refusals_get_the_documented_code_and_id(served, client, context):
    rng = np.random.default_rng(9)
    infer_session = client.hello(PIPELINE, CHANNELS, budget=4)
    int8_session = client.hello(PIPELINE, CHANNELS, budget=4, codec="int8", use_lz4=True)
    train_session = client.hello(PIPELINE, CHANNELS, budget=4, mode="train")
    indices, values = _batch(rng, 2, 3)

    def infer(request_id=77, session=infer_session, data_codec="fp32", use_lz4=False, **fields):
        frames = infer_frames(request_id, session, data_codec, use_lz4, CHANNELS, indices, values)
        header = json.loads(frames[0])
        header.update(fields)
        return [json.dumps(header).encode(), *frames[1:]]

    def hello(**fields):
        header = json.loads(hello_frames(78, PIPELINE, CHANNELS, 4, "fp32", False, "infer", 0)[0])
        header.update(fields)
        return [json.dumps(header).encode()]

    def train(labels=(1, 2), session=train_session, **fields):
        frames = train_frames(79, session, "fp32", False, CHANNELS, indices, values, np.asarray(labels), 0)
        header = json.loads(frames[0])
        header.update(fields)
        return [json.dumps(header).encode(), *frames[1:]]

    good = infer()
    nan = values.copy()
    nan[1, 2, 3, 0] = np.nan
    int8_data = bytearray(pack(values, "int8", False))
    minus_128 = bytes(int8_data[:12]) + b"\x80" + bytes(int8_data[13:])
    negative_scale = struct.pack("<f", -1.0) + bytes(int8_data[4:])
    lz4_data = lz4_compress(bytes(int8_data))
    int8_head = infer(session=int8_session, data_codec="int8", use_lz4=True)[:2]      # header + indices
    cases = [
        # (frames, accepted codes, expected id)
        (_raw({**json.loads(good[0]), "v": 3}, *good[1:]), {"bad_version"}, 0),
        (_raw({k: v for k, v in json.loads(good[0]).items() if k != "v"}, *good[1:]), {"bad_version"}, 0),
        (_raw({**json.loads(good[0]), "v": "1"}, *good[1:]), {"bad_version"}, 0),
        (_raw({**json.loads(good[0]), "v": 1.0}, *good[1:]), {"bad_version"}, 0),
        (_raw({**json.loads(good[0]), "kind": "shutdown"}, *good[1:]), {"bad_kind"}, 0),
        (_raw({**json.loads(good[0]), "extra": 1}, *good[1:]), {"bad_header"}, 0),
        (_raw({k: v for k, v in json.loads(good[0]).items() if k != "channels"}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "id": 3.0}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "id": True}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "id": 2**63}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "id": -1}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "lz4": 0}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "session": ""}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "session": "s" * 65}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "shape": [2, 3, 4]}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "shape": [2, 3, 4, 2**31 + 1]}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "pad": "x" * 5000}, *good[1:]), {"bad_header"}, 0),
        ([good[0][:-1] + b' ' * (4097 - len(good[0])) + b'}', *good[1:]], {"bad_header"}, 0),   # 4098 bytes
        ([b"not json", *good[1:]], {"bad_header"}, 0),
        ([b"[1, 2]", *good[1:]], {"bad_header"}, 0),
        ([b"\xff\xfe{}", *good[1:]], {"bad_header"}, 0),
        ([good[0][:-1] + b',"x":NaN}', *good[1:]], {"bad_header"}, 0),
        (good[:2], {"bad_frames"}, 77),
        (good + [b""], {"bad_frames"}, 77),
        ([good[0], good[1] + b"\x00", good[2]], {"bad_frame"}, 77),
        ([good[0], good[1][::-1], good[2]], {"bad_indices"}, 77) if len(set(indices)) > 1 else None,
        ([good[0], struct.pack("<3H", 1, 1, 2), good[2]], {"bad_indices"}, 77),
        ([good[0], struct.pack("<3H", 1, 2, 32), good[2]], {"bad_indices"}, 77),
        (infer(shape=[2, 3, 2, 8]), {"bad_shape"}, 77),
        (_raw({**json.loads(good[0]), "shape": [0, 3, 4, 4]}, good[1], b""), {"bad_shape"}, 77),
        (_raw({**json.loads(good[0]), "shape": [2, 0, 4, 4]}, b"", b""), {"bad_shape"}, 77),
        (infer(channels=64), {"bad_budget"}, 77),
        (_raw({**json.loads(good[0]), "shape": [1, 5, 4, 4]}, struct.pack("<5H", 0, 1, 2, 3, 4),
              pack(values[:1, :1].repeat(5, 1), "fp32", False)), {"bad_budget"}, 77),
        (infer(codec="fp16"), {"bad_codec", "bad_message"}, 77),
        (infer(codec="bf16"), {"bad_codec"}, 77),
        (infer(lz4=True), {"bad_codec", "bad_message"}, 77),
        ([good[0], good[1], good[2][:-1]], {"bad_message"}, 77),
        ([good[0], good[1], good[2] + b"\x00" * 4], {"bad_message"}, 77),
        ([good[0], good[1], nan.astype("<f4").tobytes()], {"bad_message"}, 77),
        (int8_head + [lz4_compress(minus_128)], {"bad_message"}, 77),
        (int8_head + [lz4_compress(negative_scale)],
         {"bad_message"}, 77),
        (int8_head + [lz4_data[:-3]], {"bad_message"}, 77),
        (int8_head + [lz4_data + b"\x00"], {"bad_message"}, 77),
        (int8_head + [bytes(int8_data)], {"bad_message"}, 77),
        (int8_head + [lz4_compress(bytes(int8_data) + b"\0")],
         {"bad_message"}, 77),
        (_raw({**json.loads(good[0]), "shape": [2**31, 3, 4, 4]}, *good[1:]), {"too_large"}, 77),
        (infer(session="0123456789abcdef"), {"unknown_session"}, 77),
        (train(session=infer_session), {"wrong_mode"}, 79),
        (train(labels=(1, 10)), {"bad_labels"}, 79),
        (train(labels=(1, 2), label_dtype="int32")[:3] + [struct.pack("<2i", 1, -1)], {"bad_labels"}, 79),
        (train()[:3] + [b"\x01"], {"bad_frame"}, 79),
        (train(label_dtype="float32"), {"bad_header"}, 0),
        (train(step=-1), {"bad_header"}, 0),
        (hello(pipeline="vgg11_cifar10"), {"handshake_refused"}, 78),
        (hello(channels=31), {"handshake_refused"}, 78),
        (hello(budget=33), {"handshake_refused"}, 78),
        (hello(resolution=1), {"handshake_refused"}, 78),
        (hello(codec="bf16"), {"handshake_refused"}, 78),
        (hello(mode="both"), {"bad_header"}, 0),
        (hello(budget=0), {"bad_header"}, 0),
        (hello(budget=65536), {"bad_header", "handshake_refused"}, None),
        (hello(pipeline=""), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "shape": [1, 33, 4, 4]}, struct.pack("<33H", *range(33)), b"\0" * 2112),
         {"bad_budget"}, 77),
        (_raw({**json.loads(good[0]), "loss": float("nan")}, *good[1:]), {"bad_header"}, 0),
        (_raw({**json.loads(good[0]), "\u4e2d" * 1300: 1}, *good[1:]), {"bad_header"}, 0),   # echo > 4096 escaped
        ([encode_header(welcome_header(80, "abc"))], {"bad_kind"}, 80),
        ([json.dumps({"v": PROTOCOL_VERSION, "kind": "error", "id": 81, "code": "x", "message": "y"}).encode()], {"bad_kind"}, 81),
        ([json.dumps({"v": PROTOCOL_VERSION, "kind": "pred", "id": 82, "session": infer_session, "shape": [1, 2]}).encode(),
          b"\0" * 8], {"bad_kind"}, 82),
        ([json.dumps({"v": PROTOCOL_VERSION, "kind": "grad", "id": 83, "session": "ab", "codec": "fp32", "lz4": False,
                      "shape": [1, 1, 4, 4], "step": 0, "loss": 0.5}).encode(), b"\0\0", b"\0" * 64], {"bad_kind"}, 83),
        # Section 3 forbids senders a BOM and repeated keys but says nothing of receivers: either answer is taken.
        ([b"\xef\xbb\xbf" + good[0], *good[1:]], {"bad_header", "pred"}, None),
        ([good[0][:-1] + b',"v":2}', *good[1:]], {"bad_header", "pred"}, None),
    ]
    mismatches = []
    for number, case in enumerate(filter(None, cases)):
        frames, codes, expected_id = case
        client.socket.send_multipart(frames)
        assert client.socket.poll(10000), f"case {number}: no reply to {frames[0][:120]!r}"
        reply = client.socket.recv_multipart()
        header, _ = decode_reply(reply)
        if header.get("code", header["kind"]) not in codes or (expected_id is not None and header["id"] != expected_id):
            mismatches.append(f"case {number} {frames[0][:100]!r}: expected {sorted(codes)} id {expected_id}, "
                              f"got {header}")
    assert not mismatches, "\n".join(mismatches)

    # A session belongs to the connection that opened it (section 6.1).
    other = ProtocolClient(context, served[1])
    try:
        with pytest.raises(ProtocolError) as refused:
            other.infer(infer_session, "fp32", False, CHANNELS, indices, values)
        assert refused.value.code == "unknown_session" and refused.value.request_id == 1
    finally:
        other.close()


def test_a_header_that_is_not_utf8_is_refused(client):
    """Section 3: the header is UTF-8 JSON; section 7: `bad_header` when it is "not UTF-8 JSON"."""
    session = client.hello(PIPELINE, CHANNELS, budget=4)
    indices, values = _batch(np.random.default_rng(10), 1, 2)
    good = infer_frames(90, session, "fp32", False, CHANNELS, indices, values)
    answers = {}
    for encoding in ("utf-16", "utf-16-le", "utf-32"):
        client.socket.send_multipart([good[0].decode().encode(encoding), *good[1:]])
        assert client.socket.poll(10000)
        header, _ = decode_reply(client.socket.recv_multipart())
        answers[encoding] = header.get("code", header["kind"])
    assert answers == dict.fromkeys(answers, "bad_header"), answers


def test_the_welcome_states_the_cut_and_a_session_resumes_by_id_then_ends_with_bye(client, reference):
    """Sections 4.1, 4.2, 4.8 and 6.1: what a client needs to know, resuming, ending."""
    welcome = client.welcome(PIPELINE, CHANNELS, budget=8)
    assert (welcome["sent_height"], welcome["sent_width"], welcome["classes"]) == (SIDE, SIDE, CLASSES)
    assert welcome["limits"]["max_frame_bytes"] >= 4 * welcome["limits"]["max_batch"] * CHANNELS * SIDE * SIDE
    session = welcome["session"]
    again = client.welcome(PIPELINE, CHANNELS, budget=8, resume=session)
    assert (again["session"], again["resumed"], again["next_step"]) == (session, True, 0)
    indices, values = _batch(np.random.default_rng(3), 2, 8)
    np.testing.assert_allclose(client.infer(session, "fp32", False, CHANNELS, indices, values),
                               reference(values, indices), atol=1e-4, rtol=1e-4)
    client.bye(session)
    with pytest.raises(ProtocolError) as gone:
        client.infer(session, "fp32", False, CHANNELS, indices, values)
    assert gone.value.code == "unknown_session"
    fresh = client.welcome(PIPELINE, CHANNELS, budget=8, resume=session)  # gone: a new session, not an error
    assert fresh["session"] != session and not fresh["resumed"]


def test_a_session_that_asks_for_timing_gets_server_ms_on_every_pred(client, reference):
    """Sections 4.1 and 4.6: `timing: true` in the hello, `server_ms` (finite, >= 0) in each pred; none without."""
    rng = np.random.default_rng(12)
    timed = client.hello(PIPELINE, CHANNELS, budget=8, timing=True)
    untimed = client.hello(PIPELINE, CHANNELS, budget=8)
    for _ in range(3):
        indices, values = _batch(rng, 4, 8)
        started = time.perf_counter()
        header, logits = client.infer_with_header(timed, "fp32", False, CHANNELS, indices, values)
        round_trip_ms = (time.perf_counter() - started) * 1e3
        assert is_number(header["server_ms"]) and 0 <= header["server_ms"] <= round_trip_ms, (header, round_trip_ms)
        np.testing.assert_allclose(logits, reference(values, indices), atol=1e-4, rtol=1e-4)
        header, _ = client.infer_with_header(untimed, "fp32", False, CHANNELS, indices, values)
        assert "server_ms" not in header, header


def test_an_inference_session_with_codecs_switches_codec_per_request(client, reference):
    """Sections 4.1 and 6.2: `infer` may use the session's codec or any of its `codecs`; others are bad_codec."""
    rng = np.random.default_rng(13)
    session = client.hello(PIPELINE, CHANNELS, budget=8, codec="fp32", codecs=["fp16", "int8+lz4"])
    indices, values = _batch(rng, 5, 6)
    for codec, use_lz4 in (("fp32", False), ("fp16", False), ("int8", True), ("fp32", False)):
        logits = client.infer(session, codec, use_lz4, CHANNELS, indices, values)   # pred: float32 logits always
        np.testing.assert_allclose(logits, reference(dequantised(values, codec), indices), atol=1e-4, rtol=1e-4)
    for codec, use_lz4 in (("int8", False), ("fp16", True), ("fp32", True)):
        with pytest.raises(ProtocolError) as refused:
            client.infer(session, codec, use_lz4, CHANNELS, indices, values)
        assert refused.value.code == "bad_codec", refused.value
    assert client.infer(session, "int8", True, CHANNELS, indices, values).shape == (5, CLASSES)  # still open

    with pytest.raises(ProtocolError) as training:                  # a training session keeps one codec
        client.hello(PIPELINE, CHANNELS, budget=8, mode="train", codecs=["fp16"])
    assert training.value.code == "handshake_refused" and "codecs is for inference sessions" in training.value.message
    with pytest.raises(ProtocolError) as unknown:                   # each entry must be a codec the server knows
        client.hello(PIPELINE, CHANNELS, budget=8, codecs=["fp16", "bf16+lz4"])
    assert unknown.value.code == "handshake_refused" and "bf16" in unknown.value.message
    for bad in ([], ["fp16", "fp16"], ["x" * 21], [f"c{i}" for i in range(9)], "fp16"):   # not a list(8, 20)
        client.socket.send_multipart(hello_frames(client.next_id(), PIPELINE, CHANNELS, 8, "fp32", False, "infer", 0,
                                                  codecs=bad))
        assert client.socket.poll(10000), f"no answer to a hello with codecs {bad!r}"
        header, _ = decode_reply(client.socket.recv_multipart())
        assert (header["kind"], header.get("code"), header["id"]) == ("error", "bad_header", 0), (bad, header)


CUT = "block1"   # the layer PIPELINE is cut after (its Pipeline.cut), as a client names it (section 4, "Cuts")


def test_a_server_with_one_cut_accepts_its_own_cut_by_name_and_refuses_any_other(client, reference):
    """Sections 4.1, 4.3, 4.4 and 6.2: `cut` may name the server's one cut; any other is refused."""
    rng = np.random.default_rng(15)
    welcome = client.welcome(PIPELINE, CHANNELS, budget=8, cut=CUT)
    assert (welcome["channels"], welcome["sent_height"], welcome["sent_width"]) == (CHANNELS, SIDE, SIDE)
    session = welcome["session"]
    indices, values = _batch(rng, 3, 5)
    for cut in (CUT, None):
        np.testing.assert_allclose(client.infer(session, "fp32", False, CHANNELS, indices, values, cut),
                                   reference(values, indices), atol=1e-4, rtol=1e-4)
    with pytest.raises(ProtocolError) as other:
        client.infer(session, "fp32", False, CHANNELS, indices, values, cut="block2")
    assert other.value.code == "bad_cut" and CUT in other.value.message, other.value
    with pytest.raises(ProtocolError) as hello:
        client.hello(PIPELINE, CHANNELS, budget=8, cut="block2")
    assert hello.value.code == "handshake_refused" and CUT in hello.value.message, hello.value
    trainer = client.hello(PIPELINE, CHANNELS, budget=8, mode="train")
    with pytest.raises(ProtocolError) as step:          # refused before it is applied (6.2): nothing trains here
        client.train(trainer, "fp32", False, CHANNELS, indices, values, [1, 2, 3], step=0, cut="block2")
    assert step.value.code == "bad_cut", step.value
    for bad in ("", "c" * (MAX_CUT_NAME + 1), 3, None, [CUT]):       # not a string(64): section 3
        for frames in (hello_frames(client.next_id(), PIPELINE, CHANNELS, 8, "fp32", False, "infer", 0),
                       infer_frames(client.next_id(), session, "fp32", False, CHANNELS, indices, values)):
            header = json.loads(frames[0])
            header["cut"] = bad
            client.socket.send_multipart([encode_header(header), *frames[1:]])
            assert client.socket.poll(10000), f"no answer to a {header['kind']} with cut {bad!r}"
            reply, _ = decode_reply(client.socket.recv_multipart())
            assert (reply["kind"], reply.get("code"), reply["id"]) == ("error", "bad_header", 0), (bad, reply)


@pytest.fixture(scope="module")
def two_cut_reference(two_cut_set):
    """The model set's tails, rebuilt: (cut, budget, values, indices) -> logits."""
    import torch

    from sparse_rt.pipeline import get_pipeline
    from sparse_rt.store.modelset import load_model_sets

    tails = load_model_sets(two_cut_set, get_pipeline(PIPELINE), "tail")

    def logits(cut: str, budget: int, values: np.ndarray, indices) -> np.ndarray:
        with torch.no_grad():
            return tails.models[cut, budget](torch.from_numpy(np.ascontiguousarray(values, np.float32)),
                                             torch.as_tensor(np.asarray(indices), dtype=torch.int64)).numpy()

    return logits


def test_a_model_set_with_two_cuts_answers_both_on_one_session(served_two_cut_set, two_cut_reference, context):
    """Sections 4.4 and 6.2.1: one hello, then `infer` at any held (cut, budget), each checked against its cut."""
    edge = ProtocolClient(context, served_two_cut_set)
    rng = np.random.default_rng(16)
    held = {"block1": (32, 4), "block2": (64, 2)}                  # C and h = w at each cut of the set

    def batch(cut: str, budget: int, n: int = 3):
        channels, side = held[cut]
        indices = np.sort(rng.choice(channels, size=budget, replace=False))
        return channels, indices, rng.standard_normal((n, budget, side, side)).astype(np.float32)

    try:
        welcome = edge.welcome(PIPELINE, 32, budget=8)                # no cut: the set's default cut
        assert (welcome["channels"], welcome["sent_height"], welcome["sent_width"]) == (32, 4, 4)
        session = welcome["session"]
        for cut, budget in (("block1", 8), ("block2", 8), ("block2", 64), (None, 32), ("block2", 8)):
            channels, indices, values = batch(cut or "block1", budget)
            header, logits = edge.infer_with_header(session, "fp32", False, channels, indices, values, cut)
            assert header["session"] == session
            np.testing.assert_allclose(logits, two_cut_reference(cut or "block1", budget, values, indices),
                                       atol=1e-4, rtol=1e-4)
        refusals = [
            (("block3", *batch("block2", 8)), "bad_cut", "block1, block2"),
            (("block2", *batch("block2", 32)), "bad_budget", "8, 64"),
            (("block2", 32, np.arange(8), batch("block2", 8)[2]), "bad_budget", None),   # C is block1's
            (("block2", *batch("block1", 8)), "bad_budget", None),
            ((None, *batch("block2", 8)), "bad_budget", None),                   # the session's cut is block1
        ]
        _, indices, values = batch("block1", 8)
        refusals.append((("block2", 64, indices, values), "bad_shape", "2x2"))   # block1's 4x4 at block2
        for (cut, channels, indices, values), code, text in refusals:
            with pytest.raises(ProtocolError) as refused:
                edge.infer(session, "fp32", False, channels, indices, values, cut)
            assert refused.value.code == code and (text is None or text in refused.value.message), refused.value
        channels, indices, values = batch("block2", 64)
        np.testing.assert_allclose(edge.infer(session, "fp32", False, channels, indices, values, "block2"),
                                   two_cut_reference("block2", 64, values, indices), atol=1e-4, rtol=1e-4)

        at_block2 = edge.welcome(PIPELINE, 64, budget=8, cut="block2")  # a session that starts at block2
        assert (at_block2["channels"], at_block2["sent_height"], at_block2["sent_width"]) == (64, 2, 2)
        channels, indices, values = batch("block2", 8)
        np.testing.assert_allclose(edge.infer(at_block2["session"], "fp32", False, channels, indices, values),
                                   two_cut_reference("block2", 8, values, indices), atol=1e-4, rtol=1e-4)
        with pytest.raises(ProtocolError) as unknown:
            edge.hello(PIPELINE, 64, budget=8, cut="block3")
        assert unknown.value.code == "handshake_refused" and "block1, block2" in unknown.value.message
    finally:
        edge.close()


def test_a_version_1_client_reads_its_refusal_in_version_1(client):
    """Section 10: a v1 message is answered in v1's own format, to its id, naming the version spoken."""
    v1_hello = {"v": 1, "kind": "hello", "id": 41, "pipeline": PIPELINE, "channels": CHANNELS, "budget": 4,
                "codec": "fp32", "lz4": False, "mode": "infer", "resolution": 0}
    client.socket.send_multipart([json.dumps(v1_hello, separators=(",", ":")).encode()])
    assert client.socket.poll(10000), "no answer to a v1 hello"
    reply = client.socket.recv_multipart()
    header = parse_header(reply[0])
    assert len(reply) == 1 and sorted(header) == ["code", "id", "kind", "message", "v"]
    assert (header["v"], header["kind"], header["id"], header["code"]) == (1, "error", 41, "bad_version")
    assert "version 2" in header["message"]


@pytest.mark.parametrize("kind", [["infer"], {"a": 1}])
def test_a_kind_that_is_not_a_string_is_refused_and_the_server_keeps_serving(served, client, kind):
    """Section 7: `bad_kind` (id 0) when `kind` is not a known kind; section 11: a bad request costs an error."""
    client.socket.send_multipart([json.dumps({"v": PROTOCOL_VERSION, "kind": kind, "id": 91}).encode()])
    replied = client.socket.poll(10000)
    time.sleep(0.2)
    alive = served[0].process.poll() is None
    assert alive, "the server died on it; its log ends:\n" + "".join(served[0].log[-8:])
    assert replied
    header, _ = decode_reply(client.socket.recv_multipart())
    assert (header["kind"], header.get("code"), header["id"]) == ("error", "bad_kind", 0)


# ---- 1,000 hostile messages ------------------------------------------------------------------------

FUZZ_MESSAGES = 1000
WEIRD_VALUES = [None, True, False, 0, -1, 1, 2, 3.5, -0.0, 1e308, 2**31, 2**31 + 1, 2**63 - 1, 2**63, 2**64,
                -2**63, 65535, 65536, "", "x", "1", "fp32", "infer", "x" * 3000, "\u00e9\u4e2d\U0001F600",
                "\x00\n\"\\", [], [1, 2, 3, 4], [2, 2, 4, 4], [0, 0, 0, 0], [2**31] * 4, [-1, 2, 4, 4],
                [1.5, 2, 4, 4], ["2", 2, 4, 4], {}, {"a": {"b": [1, {"c": None}]}}, [[[[[[[]]]]]]],
                float("nan"), float("inf")]


def _fuzz_message(rng: random.Random, request_id: int, templates) -> list[bytes]:
    frames = list(rng.choice(templates)(request_id))
    mutation = rng.randrange(14)
    if mutation == 0:                                          # nothing but random frames
        frames = [rng.randbytes(rng.choice([0, 1, 5, 20, 100])) for _ in range(rng.randint(1, 5))]
    elif mutation == 1:                                        # byte flips anywhere
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(frames))
            if frames[i]:
                data = bytearray(frames[i])
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
                frames[i] = bytes(data)
    elif mutation == 2:                                        # truncation
        i = rng.randrange(len(frames))
        frames[i] = frames[i][:rng.randrange(len(frames[i]) + 1)]
    elif mutation == 3:                                        # extension
        i = rng.randrange(len(frames))
        frames[i] = frames[i] + rng.randbytes(rng.choice([1, 2, 4, 64]))
    elif mutation == 4:                                        # wrong frame count
        if len(frames) > 1 and rng.random() < 0.5:
            del frames[rng.randrange(1, len(frames))]
        else:
            frames.insert(rng.randint(1, len(frames)), rng.randbytes(rng.choice([0, 2, 8])))
    elif mutation in (5, 6, 7):                                # header fields: wrong types, ranges, unknowns
        header = json.loads(frames[0])
        for _ in range(rng.randint(1, 3)):
            action = rng.randrange(4)
            if action == 0 or not header:
                header[rng.choice(["extra", "v2", "", "x" * 200, "kind2", "\u00e9"])] = rng.choice(WEIRD_VALUES)
            elif action == 1:
                del header[rng.choice(sorted(header))]
            else:
                header[rng.choice(sorted(header))] = rng.choice(WEIRD_VALUES)
        frames[0] = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    elif mutation == 8:                                        # version and kind
        header = json.loads(frames[0])
        header[rng.choice(["v", "kind"])] = rng.choice([0, 3, -1, "2", 2.0, True, None, 2**70, "hello", "grad",
                                                         "pred", "error", "welcome", "train", "infer", "HELLO"])
        frames[0] = json.dumps(header).encode()
    elif mutation == 9:                                        # unknown sessions
        header = json.loads(frames[0])
        header["session"] = rng.choice(["%016x" % rng.getrandbits(64), "z", "s" * 64, "\u4e2d" * 16])
        frames[0] = json.dumps(header).encode()
    elif mutation == 10:                                       # raw header text
        text = frames[0]
        frames[0] = rng.choice([
            b"\xef\xbb\xbf" + text, text[:-1] + b',"v":2}', text + b" trailing", text[:-1] + b',"x":NaN}',
            text[:-1] + b',"x":-Infinity}', b"[" * 1500 + b"]" * 1500, b'{"a":' * 800 + b"1" + b"}" * 800,
            text.replace(b'"', b"'"), b"\x80\x81" + text, b"null", b"1", b'"string"', b"{}", b"",
            text[:-1] + b',"' + b"k" * 4000 + b'":1}', text.replace(b":1,", b":1.0,", 1),
            text.replace(b":1,", b":1e0,", 1), text.replace(b":1,", b":01,", 1),
        ])
    elif mutation == 11:                                       # shape / size games
        header = json.loads(frames[0])
        if "shape" in header:
            shape = list(header["shape"])
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, 3, 5, 9, 33, 2**16, 2**30, 2**31])
            header["shape"] = shape
        frames[0] = json.dumps(header).encode()
    elif mutation == 12:                                       # hostile data values
        if len(frames) >= 3:
            data = bytearray(frames[2])
            if data:
                position = rng.randrange(max(1, len(data) - 3))
                data[position:position + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x80",
                                                          b"\xff\xff\xff\xff", b"\x00\x00\x80\xff"])
            frames[2] = bytes(data)
    # mutation 13: the template unchanged (a valid message, or an invalid one by design)
    return frames or [b""]


def _sent_id(frames: list[bytes]):
    try:
        header = json.loads(frames[0])
        return header.get("id") if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def _decode_request(frames: list[bytes]):
    """(values, indices) of an infer request this client can decode, else None."""
    try:
        header = parse_header(frames[0])
        validate_header(header)
        if header["kind"] != "infer" or len(frames) != 3 or header["codec"] not in CODECS:
            return None
        shape = header["shape"]
        indices = np.frombuffer(frames[1], "<u2").astype(np.int64)
        if len(frames[1]) != 2 * shape[1] or 4 * math.prod(shape) > 2**20:
            return None
        return unpack(frames[2], shape, header["codec"], header["lz4"]), indices
    except (MalformedReply, ValueError, RecursionError):
        return None


def test_a_thousand_hostile_messages_do_not_hurt_the_server(served, client, reference, context):
    server, address = served
    started = time.monotonic()
    rng = random.Random(20240611)
    nprng = np.random.default_rng(20240611)
    sessions = {(codec, use_lz4): client.hello(PIPELINE, CHANNELS, budget=8, codec=codec, use_lz4=use_lz4)
                for codec, use_lz4 in (("fp32", False), ("fp32", True), ("fp16", False), ("int8", True))}

    def infer_template(codec, use_lz4):
        def make(request_id):
            indices, values = _batch(nprng, rng.randint(1, 4), rng.randint(1, 8))
            return infer_frames(request_id, sessions[codec, use_lz4], codec, use_lz4, CHANNELS, indices, values)
        return make

    def train_template(request_id):                           # an infer session: never applied (wrong_mode)
        indices, values = _batch(nprng, rng.randint(1, 4), rng.randint(1, 8))
        labels = nprng.integers(0, CLASSES, values.shape[0])
        return train_frames(request_id, sessions["fp32", False], "fp32", False, CHANNELS, indices, values,
                            labels, rng.randint(0, 5))

    def hello_template(request_id):
        return hello_frames(request_id, PIPELINE, CHANNELS, rng.randint(1, 32), rng.choice(CODECS),
                            rng.random() < 0.5, "infer", 0)

    def reply_template(request_id):                            # server -> edge kinds sent to the server
        session = sessions["fp32", False]
        return rng.choice([
            [encode_header(welcome_header(request_id, session))],
            [encode_header({"v": PROTOCOL_VERSION, "kind": "error", "id": request_id, "code": "internal", "message": "m"})],
            [encode_header({"v": PROTOCOL_VERSION, "kind": "pred", "id": request_id, "session": session, "shape": [1, 2]}),
             b"\0" * 8],
            [encode_header({"v": PROTOCOL_VERSION, "kind": "grad", "id": request_id, "session": session, "codec": "fp32",
                            "lz4": False, "shape": [1, 1, 4, 4], "step": 0, "loss": 0.5}), b"\0\0", b"\0" * 64],
        ])

    templates = [infer_template(*key) for key in sessions] * 2 + [train_template, hello_template, reply_template]

    sent: dict[int, list[list[bytes]]] = {}
    for number in range(FUZZ_MESSAGES):
        frames = _fuzz_message(rng, 1_000_000 + number, templates)
        request_id = _sent_id(frames)
        if type(request_id) is int:
            sent.setdefault(request_id, []).append(frames)
        if not client.socket.poll(10000, zmq.POLLOUT):
            pytest.fail(f"the server stopped reading at message {number} ({frames[0][:200]!r}); "
                        f"alive: {server.process.poll() is None}; its log ends:\n" + "".join(server.log[-30:]))
        client.socket.send_multipart(frames)

    replies, codes, problems = 0, {}, []
    answered: dict[int, int] = {}
    while client.socket.poll(2000):
        reply = client.socket.recv_multipart()
        replies += 1
        try:
            header, payload = refused_version(reply) or decode_reply(reply)
        except MalformedReply as failure:
            problems.append(f"malformed reply {reply[:1]!r}: {failure}")
            continue
        request_id = header["id"]
        label = header["code"] if header["kind"] == "error" else header["kind"]
        codes[label] = codes.get(label, 0) + 1
        if request_id != 0:
            answered[request_id] = answered.get(request_id, 0) + 1
            if request_id not in sent:
                problems.append(f"reply to an id never sent: {header}")
            elif answered[request_id] > len(sent[request_id]):
                problems.append(f"more replies than requests for id {request_id}: {header}")
        if header["kind"] in ("grad",):
            problems.append(f"a grad although no train session was used: {header}")
        if header["kind"] == "welcome" and request_id == 0:
            problems.append(f"welcome with id 0: {header}")
        if header["kind"] == "pred":
            if request_id in sent and len(sent[request_id]) == 1:
                decoded = _decode_request(sent[request_id][0])
                if decoded is not None:
                    values, indices = decoded
                    if not np.allclose(payload, reference(values, indices), atol=1e-4, rtol=1e-4):
                        problems.append(f"wrong logits for {sent[request_id][0][0]!r}")
    fuzz_seconds = time.monotonic() - started
    assert server.process.poll() is None, "the server died; its log ends:\n" + "".join(server.log[-12:])
    print(f"\nfuzz: {FUZZ_MESSAGES} messages, {replies} replies in {fuzz_seconds:.1f} s; replies by kind/code: "
          + ", ".join(f"{k}={v}" for k, v in sorted(codes.items())))
    assert not problems, "\n".join(problems[:20])
    assert replies > FUZZ_MESSAGES // 2
    assert codes.get("internal", 0) == 0, codes

    # Still serving, and still right, on the old connection and on a new one.
    assert server.process.poll() is None, "".join(server.log[-20:])
    indices, values = _batch(nprng, 4, 8)
    for codec, use_lz4 in sessions:
        logits = client.infer(sessions[codec, use_lz4], codec, use_lz4, CHANNELS, indices, values)
        np.testing.assert_allclose(logits, reference(dequantised(values, codec), indices), atol=1e-4, rtol=1e-4)
    fresh = ProtocolClient(context, address)
    try:
        session = fresh.hello(PIPELINE, CHANNELS, budget=8, codec="int8", use_lz4=True)
        logits = fresh.infer(session, "int8", True, CHANNELS, indices, values)
        np.testing.assert_allclose(logits, reference(dequantised(values, "int8"), indices), atol=1e-4, rtol=1e-4)
    finally:
        fresh.close()
    assert server.process.poll() is None


# ---- training, on a server of its own (it changes the tail) --------------------------------------------

def test_training_steps_are_applied_exactly_once(context):
    server, address = _start_server()
    edge = ProtocolClient(context, address)
    try:
        rng = np.random.default_rng(11)
        session = edge.hello(PIPELINE, CHANNELS, budget=6, codec="int8", use_lz4=True, mode="train")
        indices, values = _batch(rng, 8, 5)
        labels = rng.integers(0, CLASSES, 8)
        first, gradient = edge.train(session, "int8", True, CHANNELS, indices, values, labels, step=0)
        assert gradient.shape == (8, 5, SIDE, SIDE) and np.isfinite(gradient).all() and np.abs(gradient).sum() > 0
        assert first["loss"] > 0

        again, same = edge.train(session, "int8", True, CHANNELS, indices, values, labels, step=0)   # a retry
        assert again["loss"] == first["loss"] and again["id"] != first["id"]
        np.testing.assert_array_equal(same, gradient)

        later, _ = edge.train(session, "int8", True, CHANNELS, indices, values, labels, step=5)  # gaps are fine
        assert later["step"] == 5
        with pytest.raises(ProtocolError) as stale:
            edge.train(session, "int8", True, CHANNELS, indices, values, labels, step=3)
        assert stale.value.code == "stale_step"
        with pytest.raises(ProtocolError) as refused:
            edge.train(session, "int8", True, CHANNELS, indices, values, np.full(8, CLASSES), step=6)
        assert refused.value.code == "bad_labels"
        assert edge.infer(session, "int8", True, CHANNELS, indices, values).shape == (8, CLASSES)
    finally:
        edge.close()
        summary = _stop_server(server) if server.process.poll() is None else None
    assert summary is not None and summary["steps_applied"] == 2, summary     # step 0 once, then step 5


def test_a_training_session_that_asks_for_timing_gets_server_ms_on_every_grad(context):
    """Sections 4.1, 4.5 and 6.3: `server_ms` on each grad of a timed session, a resent step's included."""
    server, address = _start_server()
    edge = ProtocolClient(context, address)
    try:
        rng = np.random.default_rng(14)
        timed = edge.hello(PIPELINE, CHANNELS, budget=4, codec="fp16", mode="train", timing=True)
        untimed = edge.hello(PIPELINE, CHANNELS, budget=4, codec="fp16", mode="train")
        indices, values = _batch(rng, 4, 4)
        labels = rng.integers(0, CLASSES, 4)
        for step in (0, 0, 1):                                      # the second is a resend, from the stored reply
            started = time.perf_counter()
            header, gradient = edge.train(timed, "fp16", False, CHANNELS, indices, values, labels, step)
            round_trip_ms = (time.perf_counter() - started) * 1e3
            assert is_number(header["server_ms"]) and 0 <= header["server_ms"] <= round_trip_ms, header
            assert np.isfinite(gradient).all()
        header, _ = edge.train(untimed, "fp16", False, CHANNELS, indices, values, labels, 0)
        assert "server_ms" not in header, header
        assert "server_ms" in edge.infer_with_header(timed, "fp16", False, CHANNELS, indices, values)[0]
    finally:
        edge.close()
        summary = _stop_server(server) if server.process.poll() is None else None
    assert summary is not None and summary["steps_applied"] == 3, summary     # steps 0 and 1, and the other's 0
