"""Messages as frames: one typed dataclass per kind, one encoder, one decoder.

A message is a list of frames: the JSON header (see header.py), then raw
buffers whose layout the header describes. The receiver needs nothing but
the message to decode it; :func:`decode_message` checks every byte count,
index and value before any tensor reaches a model. No ZeroMQ here: frames
are plain bytes-like objects, so this layer is tested without sockets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

from sparse_rt.errors import WireError
from sparse_rt.wire.codecs import codec_names, get_codec
from sparse_rt.wire.header import decode_header, encode_header

# Largest decoded tensor a message may describe. It bounds what a lossless
# lz4 frame may inflate to before the bytes are checked against the shape.
MAX_TENSOR_BYTES = 1 << 30

INDEX_DTYPE = np.dtype("<u2")
LOGITS_DTYPE = np.dtype("<f4")
LABEL_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ("uint8", "uint16", "int32", "int64")}


@dataclass
class Hello:
    """Edge -> server: open a session for this pipeline and these settings."""

    id: int
    pipeline: str
    channels: int
    budget: int
    codec: str
    lz4: bool
    mode: str  # "train" or "infer"
    resolution: int = 0  # resolution compression r at the cut; both sides must use the same
    grad_codec: str | None = None  # the gradients' codec, when not ``codec`` (sent only then)
    grad_lz4: bool | None = None  # lz4 on the gradients, when not ``lz4`` (sent only then)
    resume: str | None = None  # a session this edge held (after a restart): go on with it if the server has it
    timing: bool | None = None  # True: the session's pred and grad replies state server_ms (sent only when True)
    # inference only: further encodings ("fp16", "int8+lz4") its infer messages may use besides codec/lz4
    codecs: tuple[str, ...] | None = None
    cut: str | None = None  # the layer the session starts at, when not the server's default cut (sent only then)


@dataclass
class Welcome:
    """Server -> edge: the session is open; later messages carry its id.

    It also states what the edge must match (the cut's channels and sent
    size, the classes) and the server's limits, so a client needs no
    out-of-band configuration to size its requests.
    """

    id: int
    session: str
    channels: int
    sent_height: int
    sent_width: int
    classes: int
    limits: dict[str, int | float]  # header.LIMITS
    resumed: bool = False  # the hello's ``resume`` session, going on
    next_step: int = 0  # the step number the server expects next: one past the last it applied


@dataclass
class Bye:
    """Edge -> server, and its answer: the session is over; the server frees it and its stored reply now."""

    id: int
    session: str


@dataclass
class Activations:
    """Edge -> server: the B sent channels of one batch; labels make it a training step."""

    id: int
    session: str
    codec: str
    lz4: bool
    channels: int
    indices: torch.Tensor  # (B,) int64, strictly ascending
    values: torch.Tensor  # (N, B, h, w) float32
    labels: torch.Tensor | None = None  # (N,) int64 when training
    step: int = 0
    lr_scale: float = 1.0  # training only: the tail's learning rate times this for this step (schedules' boost)
    cut: str | None = None  # the layer the values are cut after, when not the session's cut (sent only then)

    @property
    def kind(self) -> str:
        return "infer" if self.labels is None else "train"


@dataclass
class Gradients:
    """Server -> edge: the loss gradient for exactly the channels the edge sent."""

    id: int
    session: str
    step: int
    codec: str
    lz4: bool
    indices: torch.Tensor
    values: torch.Tensor
    loss: float
    server_ms: float | None = None  # the server's time on the request (its session asked for timing), else None


@dataclass
class Predictions:
    """Server -> edge: the model's output (logits) for an inference batch."""

    id: int
    session: str
    logits: torch.Tensor  # (N, K) float32
    server_ms: float | None = None  # the server's time on the request (its session asked for timing), else None


@dataclass
class ErrorReply:
    """Either side: the request with this id was refused, and why."""

    id: int
    code: str
    message: str


Message = Union[Hello, Welcome, Bye, Activations, Gradients, Predictions, ErrorReply]

_FRAME_COUNTS = {"hello": 1, "welcome": 1, "bye": 1, "error": 1, "train": 4, "infer": 3, "grad": 3, "pred": 2}


def _label_dtype(labels: torch.Tensor) -> str:
    """The smallest label type that holds these labels: labels are a visible share of bytes at small budgets."""
    top = int(labels.max()) if labels.numel() else 0
    for name, limit in (("uint8", 255), ("uint16", 65535), ("int32", 2**31 - 1)):
        if top <= limit:
            return name
    return "int64"


def _timing(msg: Gradients | Predictions) -> dict[str, Any]:
    """``server_ms`` when the reply has it (its session asked for timing): left out otherwise, as before."""
    return {} if msg.server_ms is None else {"server_ms": float(msg.server_ms)}


def _tensor_fields(msg: Activations | Gradients) -> dict[str, Any]:
    return {"session": msg.session, "codec": msg.codec, "lz4": msg.lz4, "shape": list(msg.values.shape)}


def encode_message(msg: Message) -> list[Any]:
    """The frames of ``msg``: header first, then the raw buffers."""
    if isinstance(msg, Activations):
        fields = {"kind": msg.kind, "id": msg.id, **_tensor_fields(msg), "channels": msg.channels}
        frames = [None, msg.indices.numpy().astype(INDEX_DTYPE), get_codec(msg.codec, msg.lz4).encode(msg.values)]
        if msg.labels is not None:
            name = _label_dtype(msg.labels)
            fields.update(step=msg.step, label_dtype=name)
            if msg.lr_scale != 1.0:  # left out at its default: the common header stays as it was
                fields["lr_scale"] = float(msg.lr_scale)
            frames.append(msg.labels.numpy().astype(LABEL_DTYPES[name]))
        if msg.cut is not None:  # left out at the session's cut, as lr_scale at 1
            fields["cut"] = msg.cut
        frames[0] = encode_header(fields)
        return frames
    if isinstance(msg, Gradients):
        header = encode_header({"kind": "grad", "id": msg.id, **_tensor_fields(msg), "step": msg.step,
                                "loss": float(msg.loss), **_timing(msg)})
        return [header, msg.indices.numpy().astype(INDEX_DTYPE), get_codec(msg.codec, msg.lz4).encode(msg.values)]
    if isinstance(msg, Predictions):
        header = encode_header({"kind": "pred", "id": msg.id, "session": msg.session, "shape": list(msg.logits.shape),
                                **_timing(msg)})
        return [header, msg.logits.detach().numpy().astype(LOGITS_DTYPE)]
    kind = {Hello: "hello", Welcome: "welcome", Bye: "bye", ErrorReply: "error"}[type(msg)]
    fields = {k: v for k, v in vars(msg).items() if v is not None}
    if isinstance(msg, Hello):
        if not msg.timing:  # sent only when asked for: a server that predates it never sees it
            fields.pop("timing", None)
        if msg.codecs is not None:
            fields["codecs"] = list(msg.codecs)
    return [encode_header({"kind": kind, **fields})]


def readdressed(frames: Sequence[Any], session: str, request_id: int) -> list[Any]:
    """A request's frames for another session and id (a session the server lost), the data frames untouched."""
    fields = decode_header(bytes(memoryview(frames[0])))
    fields.update(session=session, id=request_id)
    fields.pop("v", None)
    return [encode_header(fields), *frames[1:]]


def _array(frame: Any, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    view = memoryview(frame)
    if view.nbytes != count * dtype.itemsize:
        raise WireError(f"{what} frame must be {count * dtype.itemsize} bytes ({count} x {dtype.name}), "
                        f"got {view.nbytes}", "bad_frame")
    return np.frombuffer(view, dtype=dtype).astype(dtype.newbyteorder("="))


def _indices(frame: Any, budget: int, channels: int | None) -> torch.Tensor:
    if budget < 1:
        raise WireError("a tensor message must carry at least one channel", "bad_shape")
    indices = _array(frame, INDEX_DTYPE, budget, "indices").astype(np.int64)
    if (indices[1:] <= indices[:-1]).any():
        raise WireError("channel indices must be strictly ascending (each channel once)", "bad_indices")
    if channels is not None:
        if budget > channels:
            raise WireError(f"{budget} channels sent but the cut has only {channels}", "bad_budget")
        if indices[-1] >= channels:
            raise WireError(f"channel index {indices[-1]} is out of range for {channels} channels", "bad_indices")
    return torch.from_numpy(indices)


def _check_size(shape: list[int]) -> None:
    """Refuse a shape too large to hold before anything is sized from it."""
    if math.prod(shape) * 4 > MAX_TENSOR_BYTES:  # Python ints: no overflow
        raise WireError(f"shape {shape} exceeds the {MAX_TENSOR_BYTES} byte tensor limit", "too_large")


def _values(fields: dict[str, Any], frame: Any) -> torch.Tensor:
    shape = tuple(fields["shape"])
    if fields["codec"] not in codec_names():
        raise WireError(f"unknown codec {fields['codec']!r}; expected one of {', '.join(codec_names())}", "bad_codec")
    try:
        codec = get_codec(fields["codec"], fields["lz4"])
    except ValueError as exc:  # a combination the registry cannot build, e.g. lz4 around a variable-size codec
        raise WireError(str(exc), "bad_codec") from None
    return codec.decode(frame, shape)


def _server_ms(fields: dict[str, Any]) -> float | None:
    return None if "server_ms" not in fields else float(fields["server_ms"])


def _decode_body(fields: dict[str, Any], frames: Sequence[Any]) -> Message:
    kind, rid = fields["kind"], fields["id"]
    if "shape" in fields:
        _check_size(fields["shape"])
    if kind in ("train", "infer"):
        n, budget = fields["shape"][:2]
        indices = _indices(frames[1], budget, fields["channels"])
        labels = None
        if kind == "train":
            labels = torch.from_numpy(_array(frames[3], LABEL_DTYPES[fields["label_dtype"]], n, "labels")
                                      .astype(np.int64))
            if labels.numel() and labels.min() < 0:
                raise WireError("labels must be non-negative class indices", "bad_labels")
        return Activations(rid, fields["session"], fields["codec"], fields["lz4"], fields["channels"], indices,
                           _values(fields, frames[2]), labels, fields.get("step", 0), fields.get("lr_scale", 1.0),
                           fields.get("cut"))
    if kind == "grad":
        indices = _indices(frames[1], fields["shape"][1], None)
        return Gradients(rid, fields["session"], fields["step"], fields["codec"], fields["lz4"], indices,
                         _values(fields, frames[2]), float(fields["loss"]), _server_ms(fields))
    if kind == "pred":
        n, k = fields["shape"]
        logits = _array(frames[1], LOGITS_DTYPE, n * k, "logits").reshape(n, k)
        if not np.isfinite(logits).all():
            raise WireError("logits contain NaN or infinity", "bad_values")
        return Predictions(rid, fields["session"], torch.from_numpy(logits), _server_ms(fields))
    if kind == "hello":
        return Hello(rid, fields["pipeline"], fields["channels"], fields["budget"], fields["codec"], fields["lz4"],
                     fields["mode"], fields["resolution"], fields.get("grad_codec"), fields.get("grad_lz4"),
                     fields.get("resume"), fields.get("timing"),
                     None if "codecs" not in fields else tuple(fields["codecs"]), fields.get("cut"))
    if kind == "welcome":
        return Welcome(rid, fields["session"], fields["channels"], fields["sent_height"], fields["sent_width"],
                       fields["classes"], fields["limits"], fields["resumed"], fields["next_step"])
    if kind == "bye":
        return Bye(rid, fields["session"])
    return ErrorReply(rid, fields["code"], fields["message"])


def decode_message(frames: Sequence[Any], header: dict[str, Any] | None = None) -> Message:
    """Parse and validate every frame, or raise WireError (with the request id once known).

    ``header`` is frames[0] already validated by :func:`decode_header` (a
    receiver that routed by it), so it is not parsed twice.
    """
    if not frames:
        raise WireError("empty message: expected a header frame", "bad_frames")
    fields = decode_header(frames[0]) if header is None else header
    expected = _FRAME_COUNTS[fields["kind"]]
    try:
        if len(frames) != expected:
            raise WireError(f"'{fields['kind']}' message must have {expected} frames, got {len(frames)}",
                            "bad_frames")
        return _decode_body(fields, frames)
    except WireError as exc:
        exc.request_id = fields["id"]
        raise
