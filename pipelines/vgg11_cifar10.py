"""vgg11_cifar10: the paper's VGG11-BN on CIFAR-10, cut after the second conv block.

At the cut: 128 channels of 8x8 for 32x32 inputs. Data: the full CIFAR-10
through torchvision when ``SPARSE_RT_CIFAR10_ROOT`` names a directory holding
``cifar-10-batches-py/`` (nothing is downloaded), else the real CIFAR-10
subset that ships beside the repository (shared/data/cifar10-subset.npz).
"""
from __future__ import annotations

import os

from torch import nn

from sparse_rt.data.datasets import CIFAR10_NORMALISATION, TensorSplit, load_cifar10_subset, load_torchvision
from sparse_rt.pipeline import Pipeline

# torchvision's configuration "A": output channels per conv, "M" for a 2x2 max-pool.
VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _features(config: list[int | str]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            in_channels = int(item)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG for 32x32 inputs: after five pools the map is 1x1, so one linear layer classifies."""

    def __init__(self, config: list[int | str] = VGG11, num_classes: int = 10) -> None:
        super().__init__()
        self.features = _features(config)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def load_data(seed: int) -> TensorSplit:
    root = os.environ.get("SPARSE_RT_CIFAR10_ROOT")
    if root:
        return load_torchvision("cifar10", root, (3, 32, 32), CIFAR10_NORMALISATION)
    return load_cifar10_subset()


pipeline = Pipeline(
    name="vgg11_cifar10",
    build_model=VGG,
    cut="features.7",  # conv64, pool, conv128, pool: 128 x 8 x 8
    input_shape=(3, 32, 32),
    num_classes=10,
    load_data=load_data,
    normalisation=CIFAR10_NORMALISATION,
    batch_size=64,
    lr=1e-3,
    optimizer="adam",
    epochs=30,
)
