"""cifar_cnn: a small VGG-style CNN on real CIFAR-10 images, cut after its second conv block.

Sized for CPUs: 20 epochs on the 3,728-image CIFAR-10 subset take a few
minutes on 2 cores. At the cut: 64 channels of 8x8 for 32x32 inputs, where
compression visibly costs accuracy (the paper's setting, scaled down).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pipelines.vgg11_cifar10 import load_data
from sparse_rt.data.datasets import CIFAR10_NORMALISATION
from sparse_rt.pipeline import Pipeline


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


def build_model(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        block1=_block(3, 32),  # 32 x 16 x 16
        block2=_block(32, 64),  # 64 x 8 x 8: the cut
        block3=_block(64, 128),  # 128 x 4 x 4
        block4=_block(128, 256),  # 256 x 2 x 2
        classifier=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(256, num_classes)),
    ))


pipeline = Pipeline(
    name="cifar_cnn",
    build_model=build_model,
    cut="block2",
    input_shape=(3, 32, 32),
    num_classes=10,
    load_data=load_data,
    normalisation=CIFAR10_NORMALISATION,
    batch_size=64,
    lr=2e-3,
    optimizer="adam",
    epochs=20,
)
