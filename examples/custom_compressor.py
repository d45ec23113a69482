"""Your own compressor in place of the paper's: a fixed random choice of B of the cut's C channels.

Whatever chooses what crosses the network is one ``nn.Module``:
``forward(x) -> (values, indices)`` (the B sent channels and which of the C
they are, ascending), with attributes ``channels`` and ``budget``. This one
draws its B channels once, from a seed, and sends those for every sample;
it has nothing to learn, so the head learns to put what the tail needs into
them. ``SplitPair(..., compressor=...)`` puts it where the paper's learned
filter would be; the server's Decompressor scatters the B channels back into
C as it always does, and only their bytes cross the socket.

The example trains digits_cnn split at 8 of 32 channels and prints the
accuracy and the bytes sent per training sample (counted at the socket)::

    python examples/custom_compressor.py [--epochs 10] [--budget 8]
"""
from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

import torch
from torch import nn

from sparse_rt import SplitPair, get_pipeline


class RandomChannels(nn.Module):
    """Sends the same ``budget`` of ``channels`` channels, drawn once from ``seed``, for every sample."""

    def __init__(self, channels: int, budget: int, seed: int = 0) -> None:
        super().__init__()
        self.channels, self.budget = channels, budget
        chosen = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))[:budget]
        self.register_buffer("chosen", torch.sort(chosen).values)  # ascending, as the wire requires

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.chosen], self.chosen


@dataclass
class Measured:
    accuracy: float  # split inference on the held-out digits
    channels: list[int]  # the ones sent
    bytes_up_per_sample: float  # in training, every frame with its header
    seconds: float


async def run(epochs: int = 10, budget: int = 8, seed: int = 0) -> Measured:
    pipeline = get_pipeline("digits_cnn")
    torch.manual_seed(seed)
    train, test = pipeline.load_data(seed).loaders(pipeline.batch_size, seed)
    compressor = RandomChannels(32, budget, seed)  # digits_cnn's cut: 32 channels of 4x4
    started = asyncio.get_running_loop().time()
    async with SplitPair.for_pipeline(pipeline, compressor=compressor) as pair:
        samples = 0
        for _ in range(epochs):
            for x, y in train:
                await pair.train_step(x, y)
                samples += len(y)
        sent = pair.traffic.bytes_sent
        accuracy = await pair.evaluate(test)
    return Measured(accuracy, compressor.chosen.tolist(), sent / samples,
                    asyncio.get_running_loop().time() - started)


def main(argv: list[str] | None = None) -> Measured:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budget", type=int, default=8, help="channels sent of the cut's 32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.epochs, args.budget, args.seed))
    print(f"digits_cnn split, a fixed random {args.budget} of 32 channels: {result.channels}")
    print(f"  test accuracy      {result.accuracy:.4f}")
    print(f"  bytes up / sample  {result.bytes_up_per_sample:.1f} in training "
          f"({args.budget} channels x 4x4 x 4 bytes = {args.budget * 64} of data)")
    print(f"  {result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
