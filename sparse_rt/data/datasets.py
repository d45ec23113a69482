"""Train/test tensors for a pipeline, loaded offline and checked before training.

Every loader returns a :class:`TensorSplit` of float32 ``(N, C, H, W)`` images and
int64 labels, fully in memory: the datasets sparse-rt trains on are modest, and
tensors in memory make epochs cheap and runs reproducible. Nothing is downloaded.
Anything a user can get wrong raises :class:`~sparse_rt.errors.DataError` with a
one-line message (the CLI prints it as-is) naming the file, the array and the fix.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.npyio import NpzFile
from torch.utils.data import DataLoader, Dataset, TensorDataset, get_worker_info

from sparse_rt.errors import DataError

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(x - mean) / std`` applied after scaling pixels to [0, 1]."""

    mean: tuple[float, ...]  # one per input channel
    std: tuple[float, ...]


CIFAR10_NORMALISATION = Normalisation(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
CIFAR10_SUBSET_ENV = "SPARSE_RT_CIFAR10_SUBSET"
_CIFAR10_SUBSET_FILE = Path("shared", "data", "cifar10-subset.npz")
_SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
_TORCHVISION_LAYOUT = {  # what each torchvision dataset needs under its root directory
    "cifar10": "cifar-10-batches-py/ (CIFAR-10 python version)",
    "stl10": "stl10_binary/",
    "imagefolder": "train/CLASS/IMAGE and test/CLASS/IMAGE",
}


@dataclass(frozen=True)
class TensorSplit:
    """A dataset as tensors: images float32 ``(N, C, H, W)`` already normalised, labels int64 ``(N,)``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def loaders(self, batch_size: int, seed: int, augment: bool = False) -> tuple[DataLoader, DataLoader]:
        """Train loader shuffled by its own generator (same seed, same order); test loader in order.

        ``augment`` crops and flips every training sample anew each epoch (:class:`CropFlipDataset`,
        seeded by ``seed``); the test data is never augmented, so accuracy stays comparable.
        """
        generator = torch.Generator().manual_seed(seed)
        dataset = (CropFlipDataset(self.x_train, self.y_train, seed) if augment
                   else TensorDataset(self.x_train, self.y_train))
        # A last training batch of one sample is dropped: batch norm cannot train on a single sample.
        train = DataLoader(dataset, batch_size=batch_size,
                           shuffle=True, generator=generator, drop_last=len(self.y_train) % batch_size == 1)
        test = DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=batch_size,
                          shuffle=False, drop_last=False)
        return train, test

    def shard(self, k: int, n: int) -> "TensorSplit":
        """The k-th of n interleaved parts of the training data (1-based), as one of n edges holds it.

        Interleaving keeps the class mix of every shard; the test data stays whole.
        """
        return TensorSplit(self.x_train[k - 1::n], self.y_train[k - 1::n], self.x_test, self.y_test)


class CropFlipDataset(Dataset):
    """Training images with the usual CIFAR-10 augmentation, drawn anew on every access.

    Each image is padded by ``padding`` pixels on every side, cropped back to its size at a
    random offset and mirrored left-right with probability 1/2 (:func:`crop_flip`). The work is
    done here, per sample, so it runs wherever the loader runs: in the source stage's thread or
    in the DataLoader's workers. Not for data whose class a mirror changes (digits).

    Draws come from the dataset's own generator (one per DataLoader worker, seeded by the
    worker's seed), never from torch's global one: the model draws from that (Gumbel noise) on
    another thread, and sharing it would make neither reproducible. With ``num_workers=0`` the
    same seed gives the same crops and flips.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int, padding: int = 4) -> None:
        if x.ndim != 4 or len(x) != len(y):
            raise DataError(f"augmentation needs images (N, C, H, W) and N labels, got images of shape "
                            f"{tuple(x.shape)} and labels of shape {tuple(y.shape)}")
        if padding < 0:
            raise DataError(f"augmentation padding must be at least 0 pixels, got {padding}")
        self.x, self.y, self.padding = x, y, padding
        self._generator = torch.Generator().manual_seed(seed)
        self._worker: tuple[int, torch.Generator] | None = None  # (worker seed, its generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = self._draws()
        top, left = torch.randint(0, 2 * self.padding + 1, (2,), generator=generator).tolist()
        flip = bool(torch.randint(0, 2, (), generator=generator))
        return crop_flip(self.x[index], top, left, flip, self.padding), self.y[index]

    def _draws(self) -> torch.Generator:
        worker = get_worker_info()
        if worker is None:
            return self._generator
        # Each worker holds a copy of this dataset: copies of one generator would repeat each
        # other's draws, so each worker seeds its own (new workers, new seeds, every epoch).
        if self._worker is None or self._worker[0] != worker.seed:
            self._worker = (worker.seed, torch.Generator().manual_seed(worker.seed))
        return self._worker[1]


def crop_flip(image: torch.Tensor, top: int, left: int, flip: bool, padding: int) -> torch.Tensor:
    """``image`` (C, H, W) zero-padded by ``padding``, the H x W window at ``(top, left)``, mirrored if ``flip``.

    Zero is the mean colour of normalised images, so the padding adds no strong edge.
    Offsets lie in ``[0, 2 * padding]``; ``(padding, padding)`` without flip is the image itself.
    """
    if not (0 <= top <= 2 * padding and 0 <= left <= 2 * padding):
        raise ValueError(f"crop offsets must lie in [0, {2 * padding}] for padding {padding}, "
                         f"got top {top} and left {left}")
    height, width = image.shape[-2:]
    padded = torch.nn.functional.pad(image, (padding, padding, padding, padding))
    window = padded[..., top:top + height, left:left + width]
    return window.flip(-1) if flip else window


def split_by_seed(x: torch.Tensor, y: torch.Tensor, seed: int,
                  test_fraction: float = 0.2) -> TensorSplit:
    """Split ``x, y`` into train and test, the same way for the same seed.

    Stratified (the fraction taken from each class) when every class has at least
    two samples, so a small test set still contains every class; otherwise one
    plain permutation. Neither side is ever empty. Samples keep their original order.
    """
    n = len(y)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction is {test_fraction} but must lie strictly between 0 and 1")
    if n < 2:
        raise DataError(f"cannot split {n} sample(s) into train and test; provide at least 2 samples")
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    classes, counts = np.unique(labels, return_counts=True)
    groups = [np.flatnonzero(labels == c) for c in classes] if counts.min() >= 2 else [np.arange(n)]
    test_parts, train_parts = [], []
    for group in groups:
        order = rng.permutation(group)
        n_test = min(max(round(len(group) * test_fraction), 1), len(group) - 1)
        test_parts.append(order[:n_test])
        train_parts.append(order[n_test:])
    train_idx = torch.from_numpy(np.sort(np.concatenate(train_parts)))
    test_idx = torch.from_numpy(np.sort(np.concatenate(test_parts)))
    return TensorSplit(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def load_digits(seed: int, test_fraction: float = 0.2) -> TensorSplit:
    """scikit-learn's 1,797 handwritten 8x8 digits (ships inside the wheel), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only when used

    digits = sklearn_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return split_by_seed(x, y, seed, test_fraction)


def load_npz(path: str | Path, input_shape: Shape, num_classes: int, seed: int,
             normalisation: Normalisation | None = None, test_fraction: float = 0.2) -> TensorSplit:
    """The user's own data: arrays ``x, y`` (split here by ``seed``) or ``x_train, y_train, x_test, y_test``.

    ``x`` is ``(N, C, H, W)``, or ``(N, H, W)`` for one channel; uint8 is divided by
    255, float is taken as it is. ``y`` holds integer labels in ``[0, num_classes)``.
    A file holding both forms is read as already split.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError(f"{name}: no such file at {path.resolve()}; pass an existing .npz file with --data FILE.npz")
    arrays = _read_npz(path)
    if len(arrays) == 2:
        x = _images(name, "x", arrays["x"], input_shape)
        y = _labels(name, "y", arrays["y"], len(x), num_classes)
        split = split_by_seed(x, y, seed, test_fraction)
    else:
        train_shape, test_shape = arrays["x_train"].shape[1:], arrays["x_test"].shape[1:]
        if train_shape != test_shape:
            raise DataError(f"{name}: x_train has per-sample shape {train_shape} but x_test has {test_shape}; "
                            f"both splits must hold samples of the same shape")
        x_train = _images(name, "x_train", arrays["x_train"], input_shape)
        x_test = _images(name, "x_test", arrays["x_test"], input_shape)
        split = TensorSplit(x_train, _labels(name, "y_train", arrays["y_train"], len(x_train), num_classes),
                            x_test, _labels(name, "y_test", arrays["y_test"], len(x_test), num_classes))
    return _normalised(split, normalisation, name)


def load_cifar10_subset(path: str | Path | None = None,
                        normalisation: Normalisation = CIFAR10_NORMALISATION) -> TensorSplit:
    """The real CIFAR-10 subset (3,728 train, 846 test) shipped beside the repository.

    Without ``path``, looks at ``$SPARSE_RT_CIFAR10_SUBSET``, then ``shared/data/`` beside
    the repository, then ``shared/data/`` in and above the working directory.
    """
    if path is None:
        path = _find_cifar10_subset()
    return load_npz(path, (3, 32, 32), num_classes=10, seed=0, normalisation=normalisation)


def _find_cifar10_subset() -> Path:
    from_env = os.environ.get(CIFAR10_SUBSET_ENV)
    if from_env:
        # A set variable is an explicit choice: failing beats silently using another file.
        if not Path(from_env).is_file():
            raise DataError(f"${CIFAR10_SUBSET_ENV} is {from_env} but no file is there; fix or unset it")
        return Path(from_env)
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo.parent / _CIFAR10_SUBSET_FILE, Path.cwd() / _CIFAR10_SUBSET_FILE,
                  Path.cwd().parent / _CIFAR10_SUBSET_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(f"CIFAR-10 subset not found (looked in ${CIFAR10_SUBSET_ENV} and at {looked}); "
                    f"pass --data FILE.npz, set ${CIFAR10_SUBSET_ENV}, or point $SPARSE_RT_CIFAR10_ROOT at the full CIFAR-10 (torchvision layout)")


def load_torchvision(name: str, root: str | Path, input_shape: Shape,
                     normalisation: Normalisation | None) -> TensorSplit:
    """Full datasets already on disk: ``cifar10``, ``stl10`` or ``imagefolder`` (``root/train``, ``root/test``).

    Never downloads. Images are resized to ``input_shape[1:]`` and the whole dataset is
    loaded into memory (all 60,000 CIFAR-10 images at 32x32 take about 740 MB as float32).
    """
    from torchvision import datasets, transforms  # heavy import, only when used

    if name not in _TORCHVISION_LAYOUT:
        raise DataError(f"unknown torchvision dataset '{name}'; expected one of {sorted(_TORCHVISION_LAYOUT)}")
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise DataError(f"{name}: images load with 1 or 3 channels but this pipeline expects {channels}")
    grey = [transforms.Grayscale(1)] if channels == 1 else []
    transform = transforms.Compose([transforms.Resize((height, width)), *grey, transforms.ToTensor()])
    root = Path(root)
    builders = {  # download=False always: a missing dataset is the user's to provide, never fetched here
        "cifar10": lambda train: datasets.CIFAR10(root, train=train, transform=transform, download=False),
        "stl10": lambda train: datasets.STL10(root, split="train" if train else "test", transform=transform,
                                              download=False),
        "imagefolder": lambda train: datasets.ImageFolder(root / ("train" if train else "test"), transform=transform),
    }
    try:
        train, test = builders[name](True), builders[name](False)
    except (RuntimeError, FileNotFoundError) as exc:
        # torchvision's RuntimeError suggests download=True, which does not apply here.
        reason = f" ({exc})" if isinstance(exc, FileNotFoundError) else ""
        raise DataError(f"{name}: not found under {root.resolve()}{reason}; expected {_TORCHVISION_LAYOUT[name]} "
                        f"there (nothing is downloaded): put it there or pass another root") from None
    if getattr(train, "classes", None) != getattr(test, "classes", None):
        raise DataError(f"{name}: {root}/train has classes {train.classes} but {root}/test has {test.classes}; "
                        f"both need the same class folders")
    x_train, y_train = _materialise(train, name, "train")
    x_test, y_test = _materialise(test, name, "test")
    return _normalised(TensorSplit(x_train, y_train, x_test, y_test), normalisation, name)


def _materialise(dataset: Dataset, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(dataset) == 0:
        raise DataError(f"{name}: the {split} split holds no images; add some or pick another root")
    batches = list(DataLoader(dataset, batch_size=256, shuffle=False))
    x = torch.cat([b[0] for b in batches]).float()
    y = torch.cat([torch.as_tensor(b[1]) for b in batches]).long()
    return x, y


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``path``: either ``x, y`` or the four split arrays, nothing else read."""
    name = path.name
    try:
        # NEVER allow pickle: loading a data file must not be able to run code.
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, NpzFile):
            raise DataError(f"{name}: holds one bare array, not named arrays; "
                            f"save it with numpy.savez(FILE, x=..., y=...)")
        with npz:
            present = set(npz.files)
            if present.issuperset(_SPLIT_KEYS):
                keys: tuple[str, ...] = _SPLIT_KEYS
            elif {"x", "y"} <= present:
                keys = ("x", "y")
            else:
                raise DataError(f"{name}: holds arrays {sorted(present)} but expected 'x' and 'y', "
                                f"or 'x_train', 'y_train', 'x_test' and 'y_test'")
            return {key: _read_array(npz, name, key) for key in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{name}: not a valid .npz file ({type(exc).__name__}: {exc}); "
                        f"save it with numpy.savez(FILE, x=..., y=...)") from None


def _read_array(npz: NpzFile, file: str, key: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise DataError(f"{file}: array '{key}' holds Python objects, which are refused because loading "
                        f"data must not run code; save plain numeric arrays") from None


def _images(file: str, key: str, arr: np.ndarray, input_shape: Shape) -> torch.Tensor:
    """Check one image array and return it as float32 ``(N, C, H, W)``."""
    if arr.dtype == np.uint8:
        x = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        x = arr.astype(np.float32)
    else:
        raise DataError(f"{file}: {key} has dtype {arr.dtype} but expected uint8 (0..255) or float; convert it")
    if arr.ndim == 0 or len(arr) == 0:
        raise DataError(f"{file}: {key} holds no samples (shape {arr.shape}); provide at least one")
    channels = input_shape[0]
    if arr.ndim == 3 and channels == 1 and arr.shape[1:] == input_shape[1:]:
        x = x[:, None]
    elif arr.ndim != 4 or arr.shape[1:] != input_shape:
        hint = f" (or {input_shape[1:]} without a channel axis)" if channels == 1 else ""
        raise DataError(f"{file}: {key} has shape {arr.shape} but this pipeline expects {input_shape} "
                        f"per sample{hint}")
    if not np.isfinite(x).all():
        raise DataError(f"{file}: {key} contains NaN or infinite values; clean them before saving")
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(file: str, key: str, arr: np.ndarray, n: int, num_classes: int) -> torch.Tensor:
    """Check one label array against its images and return it as int64 ``(N,)``."""
    if arr.ndim != 1 or len(arr) != n:
        raise DataError(f"{file}: {key} has shape {arr.shape} but its images hold {n} samples; "
                        f"expected labels of shape ({n},)")
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and np.isfinite(arr).all() and (arr == np.round(arr)).all())
    if not integral:
        raise DataError(f"{file}: {key} has dtype {arr.dtype} with non-integer values; "
                        f"expected integer class labels in [0, {num_classes})")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise DataError(f"{file}: {key} has labels from {arr.min():g} to {arr.max():g} "
                        f"but this pipeline expects labels in [0, {num_classes})")
    return torch.from_numpy(arr.astype(np.int64))


def _normalised(split: TensorSplit, normalisation: Normalisation | None, source: str) -> TensorSplit:
    if normalisation is None:
        return split
    channels = split.x_train.shape[1]
    if not len(normalisation.mean) == len(normalisation.std) == channels or min(normalisation.std) <= 0:
        raise DataError(f"{source}: normalisation has mean {normalisation.mean} and std {normalisation.std} "
                        f"but needs {channels} value(s) each, with every std above 0")
    mean = torch.tensor(normalisation.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(normalisation.std, dtype=torch.float32).view(1, -1, 1, 1)
    return TensorSplit((split.x_train - mean) / std, split.y_train, (split.x_test - mean) / std, split.y_test)
