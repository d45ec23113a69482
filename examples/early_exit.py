"""An edge stage in the chain: the runtime's confidence early exit, trained together with the split model.

:class:`~sparse_rt.stages.exit.ConfidenceExit` (the head's features
average-pooled to 2x2, then one Linear layer) sits between the head and the
compressor. In training it adds its own cross-entropy loss (``ctx.add_loss``),
so it trains in the same backward as the server's gradient, and every row
goes on to the server (`sparse-rt train exit` trains one afterwards
instead, for each model of a model set, with the head frozen). In inference
it answers the rows it is sure of (softmax confidence >= the threshold)
itself with ``ctx.answer`` and passes on only the others: those rows never
leave the device, and a batch it answers completely sends nothing at all.

The example trains digits_cnn split over a real ZeroMQ socket, then prints
the accuracy, the share of test samples answered on the device, and the
bytes sent per test sample with the exit and without it (counted at the
socket)::

    python examples/early_exit.py [--epochs 8] [--threshold 0.9] [--budget 8]
"""
from __future__ import annotations

import argparse
import asyncio
import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from sparse_rt import SplitPair, get_pipeline
from sparse_rt.stages.exit import ConfidenceExit


@dataclass
class Measured:
    accuracy: float  # split inference with the exit, on the held-out digits
    accuracy_without_exit: float
    on_device: float  # share of test samples the exit answered
    bytes_up_per_sample: float  # inference bytes sent per test sample, with the exit
    bytes_up_per_sample_without_exit: float
    confident_batch: int  # samples in a batch made only of rows the exit answers
    confident_batch_bytes: int | None  # bytes that batch sent (0: it never reached the network); None: no such row


async def measure_inference(pair: SplitPair, loader: DataLoader) -> tuple[float, float]:
    """(accuracy, bytes sent per sample) of split inference over ``loader``."""
    before = pair.traffic.bytes_sent
    accuracy = await pair.evaluate(loader)
    samples = sum(len(y) for _, y in loader)
    return accuracy, (pair.traffic.bytes_sent - before) / samples


async def run(epochs: int = 8, threshold: float = 0.9, budget: int | None = 8, seed: int = 0) -> Measured:
    pipeline = get_pipeline("digits_cnn")
    torch.manual_seed(seed)
    data = pipeline.load_data(seed)
    train, test = data.loaders(pipeline.batch_size, seed)
    channels = 32  # at digits_cnn's cut (after block1): 32 x 4 x 4
    early_exit = ConfidenceExit(channels, pipeline.num_classes, threshold)
    async with SplitPair.for_pipeline(pipeline, budget=budget, edge_stages=[early_exit]) as pair:
        for _ in range(epochs):
            for x, y in train:
                await pair.train_step(x, y)

        accuracy, sent = await measure_inference(pair, test)
        on_device = early_exit.answered / early_exit.seen

        early_exit.threshold = math.inf  # the same model, every row to the server
        accuracy_without, sent_without = await measure_inference(pair, test)
        early_exit.threshold = threshold

        with torch.inference_mode():  # the test rows the exit is sure of (the head is in eval mode since inference)
            exit_logits = early_exit.classifier(pair.edge_model.head(data.x_test))
            sure = data.x_test[exit_logits.softmax(dim=1).amax(dim=1) >= threshold]
        confident_bytes = None
        if len(sure):  # as one batch
            before = pair.traffic.bytes_sent
            logits = await pair.infer(sure)
            assert logits.shape == (len(sure), pipeline.num_classes)
            confident_bytes = pair.traffic.bytes_sent - before
    return Measured(accuracy, accuracy_without, on_device, sent, sent_without, len(sure), confident_bytes)


def main(argv: list[str] | None = None) -> Measured:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9, help="softmax confidence the exit answers at")
    parser.add_argument("--budget", type=int, default=8, help="channels sent of the cut's 32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.epochs, args.threshold, args.budget, args.seed))
    print(f"digits_cnn split, early exit at confidence >= {args.threshold}, budget {args.budget} of 32")
    print(f"  accuracy           {result.accuracy:.4f} (without the exit {result.accuracy_without_exit:.4f})")
    print(f"  answered on device {result.on_device:.1%} of the test samples")
    print(f"  bytes up / sample  {result.bytes_up_per_sample:.1f} (without the exit "
          f"{result.bytes_up_per_sample_without_exit:.1f})")
    print(f"  a batch of {result.confident_batch} confident samples sent {result.confident_batch_bytes} bytes")
    return result


if __name__ == "__main__":
    main()
