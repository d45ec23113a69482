"""Codec stage: the cut as frames on the wire, and the reply's frames back as tensors.

Activations and gradients may travel in different codecs (``up`` and
``down``, as hivemind chooses compression per tensor role): gradients are
often worth more precision than the activations they answer. Any codec
registered with :func:`~sparse_rt.wire.codecs.register_codec` can be named;
the receiver checks the name against its own registry, so a server accepts a
user's codec once it imports the module that registers it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparse_rt.errors import ConfigError, RemoteError, WireError
from sparse_rt.stages.base import Cut, Stage, StepContext
from sparse_rt.wire.codecs import codec_names
from sparse_rt.wire.header import MAX_CUT_NAME
from sparse_rt.wire.messages import Activations, ErrorReply, Gradients, Message, Predictions, decode_message, \
    encode_message


@dataclass(frozen=True)
class CodecChoice:
    """One direction's wire encoding: a registered codec name, optionally lz4 on top."""

    name: str = "fp32"
    lz4: bool = False

    def __post_init__(self) -> None:
        if self.name not in codec_names():
            raise ConfigError(f"unknown codec '{self.name}'; registered: {', '.join(codec_names())} "
                              f"(a codec of your own must be registered with register_codec before use)")

    def __str__(self) -> str:
        return self.name + ("+lz4" if self.lz4 else "")


class CodecStage(Stage):
    """Edge side: encodes the sent channels (``up``) and decodes the server's reply (gradients in ``down``).

    ``cut`` names the layer the sent values are cut after in every request
    (a model-set server with several cuts picks that cut's tail); ``None``
    leaves it out: the session's cut.
    """

    name = "codec"

    def __init__(self, up: str | CodecChoice = "fp32", down: str | CodecChoice | None = None, *,
                 lz4: bool = False, down_lz4: bool | None = None, channels: int = 0, cut: str | None = None) -> None:
        self.up = up if isinstance(up, CodecChoice) else CodecChoice(up, lz4)
        down_lz4 = self.up.lz4 if down_lz4 is None else down_lz4  # lz4 both ways unless told otherwise
        if isinstance(down, CodecChoice):
            self.down = down
        else:
            self.down = CodecChoice(self.up.name if down is None else down, down_lz4)
        self.channels = channels  # C at the cut, which every activation message states; set by the assembly
        if cut is not None and not (isinstance(cut, str) and 0 < len(cut) <= MAX_CUT_NAME):
            raise ConfigError(f"cut must be a layer name of 1 to {MAX_CUT_NAME} characters, got {cut!r}")
        self.cut = cut

    def forward(self, cut: Cut, ctx: StepContext) -> list[Any]:
        assert ctx.session is not None, "open() the session first"
        ctx.meta["cut"] = cut
        message = Activations(ctx.meta["request_id"], ctx.session, self.up.name, self.up.lz4, self.channels,
                              cut.indices, cut.values.detach(), ctx.labels if ctx.training else None, ctx.step,
                              ctx.lr_scale if ctx.training else 1.0, self.cut)
        return encode_message(message)

    def backward(self, reply: tuple[dict[str, Any], list[Any]], ctx: StepContext) -> torch.Tensor:
        """The reply as a tensor: the gradient of the sent channels in training, the logits in inference."""
        header, frames = reply
        message = decode_reply(header, frames, Gradients if ctx.training else Predictions)
        cut: Cut = ctx.meta["cut"]
        if isinstance(message, Predictions):
            if message.logits.shape[0] != cut.values.shape[0]:
                raise WireError(f"the prediction has {message.logits.shape[0]} rows for the {cut.values.shape[0]} "
                                "sent", "bad_reply")
            return message.logits
        if not torch.equal(message.indices, cut.indices) or message.values.shape != cut.values.shape:
            raise WireError("the gradient reply does not match the channels sent", "bad_reply")
        if (message.codec, message.lz4) != (self.down.name, self.down.lz4):
            raise WireError(f"the gradient came as {message.codec} (lz4 {message.lz4}), the session agreed on "
                            f"{self.down}", "bad_codec")
        ctx.meta["loss"] = message.loss
        return message.values


def decode_reply(header: dict[str, Any], frames: list[Any], expected: type) -> Message:
    """A reply of the ``expected`` type, or the server's refusal as :class:`RemoteError`."""
    reply = decode_message(frames, header)
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.message)
    if not isinstance(reply, expected):
        raise WireError(f"expected a {expected.__name__} reply, got {type(reply).__name__}", "bad_kind")
    return reply
