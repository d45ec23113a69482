"""digits_cnn: a small CNN on scikit-learn's 8x8 handwritten digits, cut after its first conv block.

Trains in seconds on a CPU, offline: the fast pipeline for tests and the demo.
At the cut: 32 channels of 4x4 per sample.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from sparse_rt.data.datasets import load_digits
from sparse_rt.pipeline import Pipeline


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def build_model(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        block1=nn.Sequential(*_conv(1, 32), *_conv(32, 32), nn.MaxPool2d(2)),  # 32 x 4 x 4: the cut
        block2=nn.Sequential(*_conv(32, 64), nn.MaxPool2d(2)),  # 64 x 2 x 2
        classifier=nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 2 * 2, num_classes)),
    ))


pipeline = Pipeline(
    name="digits_cnn",
    build_model=build_model,
    cut="block1",
    input_shape=(1, 8, 8),
    num_classes=10,
    load_data=load_digits,
    batch_size=64,
    lr=3e-3,
    optimizer="adam",
    epochs=10,
)
