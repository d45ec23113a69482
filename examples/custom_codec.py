"""Your own codec: bfloat16 on the wire, registered by name and accepted by a server with no edit to sparse-rt.

``bf16`` keeps float32's exponent (its whole range, so nothing is clamped
as fp16 must) in half the bytes, at 8 bits of mantissa: about 0.4% relative
error, plenty for activations. It is a :class:`RawCodec` (a fixed size per
shape, checked before reading; NaN and inf refused after decoding), so lz4
can wrap it too.

A receiver accepts only codecs in its own registry, so the server must
import this module: it does when it loads this file's ``pipeline``
(digits_cnn itself, named by ``module:attribute``). The edge sends
activations as bf16 and asks for the gradients in fp32 (``grad_codec``)::

    python examples/custom_codec.py [--epochs 3]          # starts the server node itself
    PYTHONPATH=examples sparse-rt node --role server --pipeline custom_codec:pipeline --bind tcp://127.0.0.1:5555
    python examples/custom_codec.py --connect tcp://127.0.0.1:5555
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_rt import EdgeClient, get_pipeline
from sparse_rt.nodes.launch import NodeProcess
from sparse_rt.wire.codecs import Buffer, RawCodec, register_codec

BF16_MAX = torch.finfo(torch.bfloat16).max  # about 3.39e38; float32 values beyond it would round to inf


@register_codec
class Bf16(RawCodec):
    """``numel`` bfloat16 values (the top 16 bits of binary32, rounded to nearest even), little-endian, C order."""

    name = "bf16"

    def packed_size(self, shape: tuple[int, ...]) -> int:
        return 2 * math.prod(shape)

    def _pack(self, x: np.ndarray) -> Buffer:
        half = torch.from_numpy(x).clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16)
        return half.view(torch.int16).numpy().astype("<i2", copy=False).reshape(-1).view(np.uint8).data

    def _unpack(self, data: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
        bits = np.frombuffer(data, "<i2").astype(np.int16)  # a copy in host order, owned by the tensor
        return torch.from_numpy(bits).view(torch.bfloat16).float().reshape(shape)


# What the server loads (--pipeline custom_codec:pipeline): loading it imported this module, and the codec with it.
pipeline = get_pipeline("digits_cnn")

EXAMPLES = Path(__file__).resolve().parent


def server_node(pipeline_name: str = "custom_codec:pipeline") -> NodeProcess:
    """A `sparse-rt node --role server` child process that finds this folder's modules."""
    path = os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))
    return NodeProcess("server", {"pipeline": pipeline_name, "bind": "tcp://127.0.0.1:*", "seed": 0, "json": True},
                       env={"PYTHONPATH": path})


@dataclass
class Measured:
    accuracy: float
    steps: int  # training steps this edge made
    bytes_up_per_sample: float  # in training, every frame with its header
    bytes_down_per_sample: float


async def train_against(address: str, epochs: int = 3, budget: int = 8, seed: int = 0) -> Measured:
    """An edge that trains with the server at ``address``: activations up as bf16, gradients down as fp32."""
    train, test = pipeline.load_data(seed).loaders(pipeline.batch_size, seed)
    async with EdgeClient(pipeline, address, mode="train", budget=budget, codec="bf16", grad_codec="fp32",
                          seed=seed) as edge:
        samples = 0
        for _ in range(epochs):
            for x, y in train:
                await edge.train_step(x, y)
                samples += len(y)
        up, down = edge.traffic.bytes_sent, edge.traffic.bytes_received
        accuracy = await edge.evaluate(test)
        return Measured(accuracy, edge.session.steps, up / samples, down / samples)


def main(argv: list[str] | None = None) -> tuple[Measured, dict | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connect", help="a running server that loaded custom_codec:pipeline; default: start one")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=8, help="channels sent of the cut's 32")
    args = parser.parse_args(argv)
    server = None if args.connect else server_node()
    summary = None
    try:
        address = args.connect or server.wait_ready()
        result = asyncio.run(train_against(address, args.epochs, args.budget))
    finally:
        if server is not None:
            server.stop()
            summary = server.result(timeout=60)
    print(f"digits_cnn split at {args.budget} of 32 channels: activations up as bf16, gradients down as fp32")
    print(f"  test accuracy      {result.accuracy:.4f} after {result.steps} steps"
          + (f" (the server applied {summary['steps_applied']})" if summary else ""))
    print(f"  bytes per sample   up {result.bytes_up_per_sample:.1f}, down {result.bytes_down_per_sample:.1f}")
    return result, summary


if __name__ == "__main__":
    main()
