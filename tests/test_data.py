"""Dataset loaders: shapes, scaling, determinism, and one clear DataError per kind of bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_rt.data.datasets import (
    CIFAR10_NORMALISATION,
    CropFlipDataset,
    Normalisation,
    TensorSplit,
    crop_flip,
    load_cifar10_subset,
    load_digits,
    load_npz,
    load_torchvision,
    split_by_seed,
)
from sparse_rt.errors import DataError

SHAPE = (1, 8, 8)
CLASSES = 3


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _xy(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), np.arange(n, dtype=np.int64) % CLASSES


# --- load_digits ---------------------------------------------------------------------------------

def test_digits_shapes_dtype_range() -> None:
    split = load_digits(seed=0)
    n_train, n_test = len(split.y_train), len(split.y_test)
    assert n_train + n_test == 1797
    assert abs(n_test / 1797 - 0.2) < 0.01
    assert split.x_train.shape == (n_train, 1, 8, 8) and split.x_test.shape == (n_test, 1, 8, 8)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.x_train.min() >= 0 and split.x_train.max() == 1.0


def test_digits_deterministic_per_seed_and_stratified() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_test, c.x_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 30  # every class about 20% of its ~180 samples


def test_split_by_seed_never_empty_and_falls_back_to_plain_permutation() -> None:
    x = torch.arange(5.0).view(5, 1, 1, 1)
    y = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one sample: no stratification possible
    split = split_by_seed(x, y, seed=0, test_fraction=0.01)
    assert len(split.y_test) == 1 and len(split.y_train) == 4
    assert sorted(torch.cat([split.x_train, split.x_test]).flatten().tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="at least 2 samples"):
        split_by_seed(x[:1], y[:1], seed=0)


# --- load_npz: good input ------------------------------------------------------------------------

def test_npz_xy_is_split_and_deterministic(tmp_path: Path) -> None:
    x, y = _xy()
    path = _write(tmp_path / "d.npz", x=x, y=y)
    a = load_npz(path, SHAPE, CLASSES, seed=3)
    assert len(a.y_train) + len(a.y_test) == 30 and a.x_train.shape[1:] == SHAPE
    assert set(a.y_test.tolist()) == {0, 1, 2}
    assert torch.equal(a.x_train, load_npz(path, SHAPE, CLASSES, seed=3).x_train)


def test_npz_presplit_kept_as_is(tmp_path: Path) -> None:
    x, y = _xy()
    path = _write(tmp_path / "d.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    split = load_npz(path, SHAPE, CLASSES, seed=0)
    assert torch.equal(split.x_train, torch.from_numpy(x[:20]))
    assert torch.equal(split.y_test, torch.from_numpy(y[20:]))


def test_npz_channel_axis_added_and_uint8_scaled(tmp_path: Path) -> None:
    x = np.full((4, 8, 8), 255, dtype=np.uint8)
    x[0] = 0
    path = _write(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1]))
    split = load_npz(path, SHAPE, 2, seed=0)
    both = torch.cat([split.x_train, split.x_test])
    assert both.shape == (4, 1, 8, 8) and both.dtype == torch.float32
    assert set(both.unique().tolist()) == {0.0, 1.0}


def test_npz_float64_and_normalisation(tmp_path: Path) -> None:
    x = np.full((4, 3, 2, 2), 0.5)
    x[:, 1] = 1.0
    path = _write(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1]))
    norm = Normalisation(mean=(0.5, 0.5, 0.0), std=(1.0, 0.25, 2.0))
    split = load_npz(path, (3, 2, 2), 2, seed=0, normalisation=norm)
    sample = split.x_train[0]
    assert split.x_train.dtype == torch.float32
    assert torch.allclose(sample[:, 0, 0], torch.tensor([0.0, 2.0, 0.25]))


# --- load_npz: each bad input is one DataError naming the file and the problem -------------------

def _bad_cases() -> dict[str, tuple[dict[str, np.ndarray], str]]:
    x, y = _xy()
    pre = dict(x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    nan = x.copy()
    nan[3, 0, 0, 0] = np.nan
    return {
        "missing arrays": (dict(images=x, labels=y), "expected 'x' and 'y'"),
        "partly split": (dict(x_train=x, y_train=y), "'x_train', 'y_train', 'x_test' and 'y_test'"),
        "wrong shape": (dict(x=np.zeros((30, 3, 32, 32), np.float32), y=y),
                        r"x has shape \(30, 3, 32, 32\) but this pipeline expects \(1, 8, 8\) per sample "
                        r"\(or \(8, 8\) without a channel axis\)"),
        "int dtype": (dict(x=x.astype(np.int32), y=y), "x has dtype int32"),
        "n mismatch": (dict(x=x, y=y[:29]), r"y has shape \(29,\) but its images hold 30 samples"),
        "label 2-D": (dict(x=x, y=y[:, None]), r"y has shape \(30, 1\)"),
        "non-integer labels": (dict(x=x, y=y + 0.5), "non-integer"),
        "label too big": (dict(x=x, y=y + 1), r"labels from 1 to 3 but this pipeline expects labels in \[0, 3\)"),
        "negative label": (dict(x=x, y=y - 1), "labels from -1"),
        "empty": (dict(x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64)), "holds no samples"),
        "nan": (dict(x=nan, y=y), "x contains NaN"),
        "train/test shapes": ({**pre, "x_test": np.zeros((10, 8, 8), np.float32)},
                              r"x_train has per-sample shape \(1, 8, 8\) but x_test has \(8, 8\)"),
        "test label range": ({**pre, "y_test": y[20:] + 5}, "y_test has labels"),
        "one sample": (dict(x=x[:1], y=y[:1]), "cannot split 1 sample"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_npz_bad_input_raises_one_line_data_error(tmp_path: Path, case: str) -> None:
    arrays, expected = _bad_cases()[case]
    path = _write(tmp_path / "mydata.npz", **arrays)
    with pytest.raises(DataError, match=expected) as info:
        load_npz(path, SHAPE, CLASSES, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("mydata.npz: ") or "cannot split" in message


def test_npz_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.npz: no such file"):
        load_npz(tmp_path / "nope.npz", SHAPE, CLASSES, seed=0)


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04 truncated zip"])
def test_npz_not_an_npz(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="junk.npz: not a valid .npz"):
        load_npz(path, SHAPE, CLASSES, seed=0)


def test_npz_bare_npy_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.npy"
    np.save(path, np.zeros((3, 8, 8), np.float32))
    with pytest.raises(DataError, match="bare.npy: holds one bare array"):
        load_npz(path, SHAPE, CLASSES, seed=0)


class _Trap:
    """Unpickling this creates a file: proof that code in a data file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


def test_npz_pickled_object_array_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    x = np.empty(2, dtype=object)
    x[:] = [_Trap(marker), _Trap(marker)]
    path = _write(tmp_path / "evil.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(DataError, match="evil.npz: array 'x' holds Python objects"):
        load_npz(path, SHAPE, CLASSES, seed=0)
    assert not marker.exists()
    with np.load(path, allow_pickle=True) as npz:  # the trap is real: pickle would have run it
        for handle in npz["x"]:
            handle.close()
    assert marker.exists()


# --- CIFAR-10 subset -----------------------------------------------------------------------------

def _real_subset_or_skip() -> TensorSplit:
    try:
        return load_cifar10_subset()
    except DataError as exc:
        pytest.skip(f"real CIFAR-10 subset not available beside the repository: {exc}")


def test_cifar10_subset_shapes_and_normalised_stats() -> None:
    split = _real_subset_or_skip()
    assert split.x_train.shape == (3728, 3, 32, 32) and split.x_test.shape == (846, 3, 32, 32)
    assert split.y_train.shape == (3728,) and split.y_test.shape == (846,)
    assert set(split.y_train.unique().tolist()) == set(range(10))
    channel_means = split.x_train.mean(dim=(0, 2, 3))
    assert channel_means.abs().max() < 0.1
    # The customary CIFAR-10 std (0.2023, ...) is a per-image figure, smaller than the
    # whole-set std (about 0.247), so normalised channels have std about 1.2, not 1.
    channel_stds = split.x_train.std(dim=(0, 2, 3))
    assert ((channel_stds > 1.0) & (channel_stds < 1.4)).all()


def test_cifar10_subset_env_var_and_missing_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="absent.npz: no such file"):
        load_cifar10_subset(tmp_path / "absent.npz")
    monkeypatch.setenv("SPARSE_RT_CIFAR10_SUBSET", str(tmp_path / "gone.npz"))
    with pytest.raises(DataError, match="SPARSE_RT_CIFAR10_SUBSET is .*gone.npz but no file is there"):
        load_cifar10_subset()
    x = np.zeros((2, 3, 32, 32), np.uint8)
    _write(tmp_path / "tiny.npz", x_train=x, y_train=np.array([0, 9]), x_test=x, y_test=np.array([1, 2]))
    monkeypatch.setenv("SPARSE_RT_CIFAR10_SUBSET", str(tmp_path / "tiny.npz"))
    split = load_cifar10_subset()
    expected = -CIFAR10_NORMALISATION.mean[0] / CIFAR10_NORMALISATION.std[0]
    assert split.x_train.shape == (2, 3, 32, 32)
    assert split.x_train[0, 0, 0, 0].item() == pytest.approx(expected)


# --- torchvision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar10", "stl10", "imagefolder"])
def test_torchvision_empty_root_is_data_error_without_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    import torchvision.datasets.utils as utils

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(utils, "download_url", no_download)
    with pytest.raises(DataError, match=f"{name}: not found under {tmp_path}.*nothing is downloaded"):
        load_torchvision(name, tmp_path, (3, 32, 32), CIFAR10_NORMALISATION)
    assert list(tmp_path.iterdir()) == []


def test_torchvision_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown torchvision dataset 'mnist'; expected one of"):
        load_torchvision("mnist", tmp_path, (3, 32, 32), None)


def _png_tree(root: Path, per_split: dict[str, int]) -> None:
    from PIL import Image

    for split, count in per_split.items():
        for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12, 10), colour).save(folder / f"{i}.png")


def test_imagefolder_loads_resized_tensors(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": 3, "test": 2})
    split = load_torchvision("imagefolder", tmp_path, (3, 8, 8), None)
    assert split.x_train.shape == (6, 3, 8, 8) and split.x_test.shape == (4, 3, 8, 8)
    assert split.y_train.tolist() == [0, 0, 0, 1, 1, 1] and split.y_train.dtype == torch.int64
    assert torch.allclose(split.x_train[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # "cat" is red
    grey = load_torchvision("imagefolder", tmp_path, (1, 4, 4), Normalisation((0.5,), (0.5,)))
    assert grey.x_test.shape == (4, 1, 4, 4)


def test_imagefolder_class_mismatch(tmp_path: Path) -> None:
    _png_tree(tmp_path, {"train": 1, "test": 1})
    (tmp_path / "test" / "dog").rename(tmp_path / "test" / "fox")
    with pytest.raises(DataError, match="both need the same class folders"):
        load_torchvision("imagefolder", tmp_path, (3, 8, 8), None)


# --- TensorSplit.loaders -------------------------------------------------------------------------

def test_loaders_order_follows_seed() -> None:
    x = torch.arange(40.0).view(40, 1, 1, 1)
    split = TensorSplit(x, torch.zeros(40, dtype=torch.int64), x[:7], torch.zeros(7, dtype=torch.int64))

    def train_order(seed: int) -> list[float]:
        train, _ = split.loaders(batch_size=16, seed=seed)
        return torch.cat([batch for batch, _ in train]).flatten().tolist()

    assert train_order(5) == train_order(5) != train_order(6)
    assert sorted(train_order(5)) == x.flatten().tolist()
    train, test = split.loaders(batch_size=16, seed=5)
    assert [len(b) for b, _ in train] == [16, 16, 8]
    assert torch.cat([b for b, _ in test]).flatten().tolist() == list(range(7))


# --- augmentation --------------------------------------------------------------------------------

def _indexed_split(n_train: int = 48, n_test: int = 16, size: int = 8) -> TensorSplit:
    """Random images whose label is their index, so a shuffled batch says which samples it holds."""
    x = torch.randn(n_train + n_test, 3, size, size, generator=torch.Generator().manual_seed(0))
    return TensorSplit(x[:n_train], torch.arange(n_train), x[n_train:], torch.arange(n_test))


def _epoch_by_index(loader) -> torch.Tensor:
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    return x[y.argsort()]


def test_flip_mirrors_left_right_and_the_centre_crop_is_the_image() -> None:
    image = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    flipped = crop_flip(image, 4, 4, True, 4)
    for j in range(5):
        assert torch.equal(flipped[:, :, j], image[:, :, 4 - j])
    assert torch.equal(crop_flip(image, 4, 4, False, 4), image)


def test_crop_shifts_the_image_and_pads_with_zeros() -> None:
    image = torch.randn(3, 8, 8) + 10.0  # nothing in it is zero
    corner = crop_flip(image, 0, 0, False, 4)  # the window's top-left lies in the padding
    assert corner.shape == image.shape
    assert (corner[:, :4] == 0).all() and (corner[:, :, :4] == 0).all()
    assert torch.equal(corner[:, 4:, 4:], image[:, :4, :4])
    with pytest.raises(ValueError, match=r"crop offsets must lie in \[0, 8\] for padding 4, got top 9"):
        crop_flip(image, 9, 0, False, 4)


def test_augmented_sample_is_one_crop_and_flip_of_its_image() -> None:
    split = _indexed_split()
    dataset = CropFlipDataset(split.x_train, split.y_train, seed=0)
    for index in range(10):
        x, y = dataset[index]
        image = split.x_train[index]
        assert y == index and x.shape == image.shape and x.dtype == torch.float32
        assert any(torch.equal(x, crop_flip(image, top, left, flip, 4))
                   for top in range(9) for left in range(9) for flip in (False, True))


def test_without_padding_every_draw_is_the_image_or_its_mirror() -> None:
    image = torch.randn(3, 6, 6)
    mirror = image.flip(-1)
    assert not torch.equal(image, mirror)
    dataset = CropFlipDataset(image.expand(64, -1, -1, -1), torch.zeros(64, dtype=torch.int64), seed=1,
                              padding=0)
    draws = [dataset[i][0] for i in range(64)]
    mirrored = sum(torch.equal(x, mirror) for x in draws)
    assert mirrored + sum(torch.equal(x, image) for x in draws) == 64
    assert 0 < mirrored < 64  # both occur (either one alone has chance 2**-64)


def test_augment_changes_training_samples_every_epoch_but_never_test_samples() -> None:
    split = _indexed_split()
    train, test = split.loaders(batch_size=16, seed=3, augment=True)
    first, second = _epoch_by_index(train), _epoch_by_index(train)
    assert first.shape == split.x_train.shape and first.dtype == torch.float32
    differ = sum(not torch.equal(a, b) for a, b in zip(first, second))
    assert differ >= 0.9 * len(split.y_train)  # a repeat of crop and flip has chance 1/162 per sample
    assert not torch.equal(first, split.x_train)
    assert torch.equal(_epoch_by_index(test), split.x_test) and torch.equal(_epoch_by_index(test), split.x_test)


def test_augment_is_reproducible_per_seed_and_keeps_the_order() -> None:
    split = _indexed_split()

    def epoch(seed: int, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        train, _ = split.loaders(batch_size=16, seed=seed, augment=augment)
        xs, ys = zip(*train)
        return torch.cat(xs), torch.cat(ys)

    (xa, ya), (xb, yb), (xc, _) = epoch(5, True), epoch(5, True), epoch(6, True)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    assert torch.equal(ya, epoch(5, False)[1])  # augmentation leaves the shuffled order alone


def test_augment_workers_draw_their_own_crops() -> None:
    image = torch.randn(1, 3, 8, 8)
    dataset = CropFlipDataset(image.expand(16, -1, -1, -1), torch.arange(16), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    first, second = (x for x, _ in loader)  # one batch from each worker
    assert not torch.equal(first, second)  # copies of one generator would draw the same crops


def test_augment_bad_input() -> None:
    with pytest.raises(DataError, match=r"needs images \(N, C, H, W\) and N labels, got images of shape \(4, 8, 8\)"):
        CropFlipDataset(torch.zeros(4, 8, 8), torch.zeros(4), seed=0)
    with pytest.raises(DataError, match="padding must be at least 0 pixels, got -1"):
        CropFlipDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4), seed=0, padding=-1)


def test_cifar10_subset_augmented_batches() -> None:
    split = _real_subset_or_skip()
    train, test = split.loaders(batch_size=64, seed=0, augment=True)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x_test, _ = next(iter(test))
    assert torch.equal(x_test, split.x_test[:64])
