"""Your own server stage: an audit and filter in front of the shared tail.

The server trains one tail for every edge, so one edge's hostile step (say,
activations a million times too large) would poison it for all of them.
:class:`Audit` runs before the decompressor (``server_stages=[...]``): it
keeps a table per session (training steps, inference requests, samples, the
activations' mean and largest absolute value) and puts each request's
numbers into ``ctx.meta["audit"]`` for the stages after it. A training step
whose activations exceed ``bound`` in absolute value is refused with
``WireError(..., "refused_by_audit")``: the edge gets an error reply with that
code, nothing reaches the tail, and the server goes on serving.

The example trains digits_cnn split over a real ZeroMQ socket, prints the
audit's table, then sends a hostile step from a raw ZeroMQ DEALER and shows
the refusal::

    python examples/audit_stage.py [--epochs 4] [--bound 1000]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

import torch
import zmq
import zmq.asyncio
from torch.utils.data import DataLoader

from sparse_rt import SplitPair, get_pipeline
from sparse_rt.errors import WireError
from sparse_rt.stages.base import Cut, Stage, StepContext
from sparse_rt.wire.messages import Activations, Hello, Message, decode_message, encode_message

REFUSED = "refused_by_audit"


@dataclass
class SessionAudit:
    """What one session has sent so far."""

    steps: int = 0  # training steps accepted
    inferences: int = 0
    samples: int = 0  # in accepted steps and inference requests
    refused: int = 0
    mean: float = 0.0  # of the latest accepted request's activations
    abs_max: float = 0.0  # largest |value| ever accepted


class Audit(Stage):
    """Records every request per session and refuses training steps whose activations exceed ``bound``.

    Inference is recorded but never refused: an odd input harms only the
    caller's own answer, while an odd training step moves everyone's tail.
    The server runs its chain one request at a time, so the table needs no lock.
    """

    name = "audit"

    def __init__(self, bound: float = 1e3) -> None:
        self.bound = bound
        self.sessions: dict[str, SessionAudit] = {}

    def forward(self, cut: Cut, ctx: StepContext) -> Cut:
        record = self.sessions.setdefault(ctx.session or "", SessionAudit())
        values = cut.values.detach()  # read only: the audit is not part of the graph
        abs_max = float(values.abs().amax()) if values.numel() else 0.0
        mean = float(values.mean()) if values.numel() else 0.0
        ctx.meta["audit"] = {"mean": mean, "abs_max": abs_max}
        if ctx.training and abs_max > self.bound:
            record.refused += 1
            raise WireError(f"step {ctx.step} refused: its activations reach |{abs_max:.3g}|, beyond this server's "
                            f"bound of {self.bound:g}", REFUSED)
        if ctx.training:
            record.steps += 1
        else:
            record.inferences += 1
        record.samples += len(values)
        record.mean, record.abs_max = mean, max(record.abs_max, abs_max)
        return cut


@dataclass
class Trained:
    pair: SplitPair  # still serving
    audit: Audit
    accuracy: float  # split inference on the held-out digits
    test: DataLoader


@contextlib.asynccontextmanager
async def trained_pair(epochs: int = 4, bound: float = 1e3, budget: int = 8, seed: int = 0) -> AsyncIterator[Trained]:
    """A digits_cnn pair over tcp:// with the audit in front of its tail, trained for ``epochs``."""
    pipeline = get_pipeline("digits_cnn")
    torch.manual_seed(seed)
    train, test = pipeline.load_data(seed).loaders(pipeline.batch_size, seed)
    audit = Audit(bound)
    async with SplitPair.for_pipeline(pipeline, budget=budget, transport="tcp", server_stages=[audit]) as pair:
        for _ in range(epochs):
            for x, y in train:
                await pair.train_step(x, y)
        yield Trained(pair, audit, await pair.evaluate(test), test)


async def ask(socket: zmq.asyncio.Socket, message: Message, timeout: float = 10.0) -> Message:
    """One request from a raw DEALER (no sparse-rt edge code) and its decoded reply."""
    await socket.send_multipart(encode_message(message))
    return decode_message(await asyncio.wait_for(socket.recv_multipart(), timeout))


async def raw_step(pair: SplitPair, scale: float = 1e6, step: int = 0) -> Message:
    """From a raw DEALER: open a session of one's own on ``pair``'s server and send a training step of ``scale``s.

    The default is hostile: activations a million times what digits_cnn's head gives (|x| below 2).
    """
    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(pair.address)
    try:
        welcome = await ask(socket, Hello(1, pair.name, pair.cut.channels, pair.budget, "fp32", False, "train"))
        values = torch.full((8, pair.budget, pair.cut.sent_height, pair.cut.sent_width), scale)
        return await ask(socket, Activations(2, welcome.session, "fp32", False, pair.cut.channels,
                                             torch.arange(pair.budget), values, torch.zeros(8, dtype=torch.long),
                                             step))
    finally:
        socket.close(linger=0)
        context.term()


async def run(epochs: int, bound: float) -> None:
    async with trained_pair(epochs, bound) as trained:
        pair, audit = trained.pair, trained.audit
        print(f"digits_cnn split with an audit before the decompressor (bound |x| <= {bound:g})")
        print(f"  test accuracy {trained.accuracy:.4f}")
        print(f"  {'session':>16}  {'steps':>5}  {'infer':>5}  {'samples':>7}  {'refused':>7}  {'mean':>7}  "
              f"{'abs max':>7}")
        for session, record in audit.sessions.items():
            print(f"  {session:>16}  {record.steps:>5}  {record.inferences:>5}  {record.samples:>7}  "
                  f"{record.refused:>7}  {record.mean:>7.3f}  {record.abs_max:>7.3f}")
        reply = await raw_step(pair)
        print(f"  a hostile step of values 1e6 from a raw socket: {type(reply).__name__} "
              f"{getattr(reply, 'code', '')}: {getattr(reply, 'message', '')}")
        print(f"  and the server still serves: test accuracy {await pair.evaluate(trained.test):.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--bound", type=float, default=1e3, help="largest |activation| a training step may send")
    args = parser.parse_args(argv)
    asyncio.run(run(args.epochs, args.bound))


if __name__ == "__main__":
    main()
