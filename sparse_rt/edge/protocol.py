"""An edge's protocol state, with no sockets in it: what it proposed, its session, its step count.

The asyncio driver (session.py) asks it for the handshake and for each
step's context, and tells it when a step was applied; pyzmq keeps its core
(zmq/_future.py) apart from its asyncio layer the same way, so this part is
tested without a loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_rt.stages.base import Kind, StepContext
from sparse_rt.stages.chain import EdgeChain
from sparse_rt.wire.messages import Hello, Welcome


@dataclass(frozen=True)
class SessionSettings:
    """What the edge proposes in its handshake."""

    pipeline: str
    channels: int
    budget: int
    codec: str = "fp32"
    lz4: bool = False
    mode: str = "train"
    resolution: int = 0
    grad_codec: str | None = None  # the gradients' codec, if not the activations'
    grad_lz4: bool | None = None
    codecs: tuple[str, ...] | None = None  # inference: the other encodings requests may switch to ("int8+lz4")
    timing: bool = False  # ask the server to say its own time in each reply (the link estimate needs it)
    cut: str | None = None  # the layer the session starts at; None: the server's default cut (left out of the hello)

    @classmethod
    def of_chain(cls, chain: EdgeChain, pipeline: str, mode: str = "train", resolution: int = 0) -> "SessionSettings":
        """What the chain will send: its cut's channels, its compressor's budget, its codec stage's choices and cut.

        Read from the stages themselves, so the handshake cannot promise one codec (or cut) while the chain sends
        another.
        """
        up, down = chain.codec.up, chain.codec.down
        same = (down.name, down.lz4) == (up.name, up.lz4)
        return cls(pipeline, chain.codec.channels, chain.budget, up.name, up.lz4, mode, resolution,
                   None if same else down.name, None if same else down.lz4, cut=chain.codec.cut)


class EdgeProtocol:
    """The edge's side of one session: the hello it sends, the session id it got, the steps applied."""

    def __init__(self, settings: SessionSettings, resume: str | None = None) -> None:
        self.settings = settings
        self.session_id: str | None = None
        self.resume = resume  # a session held before a restart, asked for in the first hello
        self.steps = 0  # training steps applied by the server; the next step's number
        self.steps_skipped = 0  # steps the tail applied after the head's last checkpoint: not run again
        self.welcome: Welcome | None = None  # what the server said about its cut and limits

    def hello(self, request_id: int) -> Hello:
        s = self.settings  # a None grad_codec/grad_lz4 is left out: the server's default is the activations' own
        return Hello(request_id, s.pipeline, s.channels, s.budget, s.codec, s.lz4, s.mode, s.resolution,
                     s.grad_codec, s.grad_lz4, self.session_id or self.resume, timing=s.timing or None,
                     codecs=s.codecs, cut=s.cut)

    def opened(self, welcome: Welcome) -> str:
        """The session is open; a resumed one goes on at the server's next step if the tail got further."""
        if welcome.resumed and welcome.next_step > self.steps:
            # The head restarted from a checkpoint older than the tail's last step: those batches reached the
            # tail once; sending them again would apply them twice, so the edge skips them.
            self.steps_skipped += welcome.next_step - self.steps
            self.steps = welcome.next_step
        self.session_id, self.resume, self.welcome = welcome.session, None, welcome
        return welcome.session

    def context(self, kind: Kind, request_id: int, labels: torch.Tensor | None = None,
                lr_scale: float = 1.0) -> StepContext:
        """A fresh context for one request; a training step carries the next step number."""
        if self.session_id is None:
            raise RuntimeError("open the session (the handshake) before sending steps")
        ctx = StepContext(kind, labels, self.steps if kind == "train" else 0, self.session_id, lr_scale)
        ctx.meta["request_id"] = request_id
        return ctx

    def applied(self) -> None:
        """The server answered the step with its gradient: the next step gets the next number."""
        self.steps += 1
