"""ImageNet-layout image folders as training batches: JPEG decoding, augmentation, sharding.

A data folder holds train/ and val/, each a folder of class subfolders of images (the ImageNet
layout that torchvision.datasets.ImageFolder reads). Two paths turn files into batches:

- decode="cpu":    DataLoader workers decode with PIL and crop; uint8 crops travel pinned to the device.
- decode="device": workers only read the encoded bytes; torchvision.io.decode_jpeg decodes the whole
                   batch on the device (nvjpeg on CUDA, with the hardware decoder of A100/H100 for
                   baseline JPEGs) and the crops are made there. Files the device decoder refuses (a PNG
                   named .JPEG, a CMYK JPEG) fall back to decode_image on the CPU.

Augmentation, the ImageNet recipe of Szegedy et al. (2015) as used by He et al. (2016):
  train: a crop of area fraction s ~ U(0.08, 1) and aspect ratio r, log r ~ U(log 3/4, log 4/3),
         resized to size x size, flipped left-right with probability 1/2;
  val:   the centre square of side 0.875 x the shorter side, resized to size x size
         (for size 224: "resize to 256, centre-crop 224").
Every crop depends only on (seed, epoch, index), so a run resumed mid-epoch, any number of workers
and either path see the same crops. On the device each batch is then normalised per channel,
x = (pixels / 255 - mean) / std, with the ImageNet statistics.

An unreadable image (truncated, corrupt, not an image) never stops an epoch: its slot in the batch is
taken by a copy of a readable image of the same batch (with its label), a warning names the file and
Batches.skipped counts it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import queue
import random
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec and warns on every
# call; they remain the decoders torchvision documents for nvjpeg. Silenced here, for this message only.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Decode = Literal["cpu", "device"]


class DatasetError(ValueError):
    """A data folder that cannot be used, with the reason and the expected layout."""


LAYOUT = (
    "expected DIR/train/CLASS/*.JPEG and DIR/val/CLASS/*.JPEG (the ImageNet layout read by torchvision ImageFolder)"
)


def check_folder(root: str | Path) -> tuple[Path, Path]:
    """(train, val) folders of `root`, or a DatasetError saying what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder; {LAYOUT}")
    splits = root / "train", root / "val"
    for split in splits:
        if not split.is_dir():
            raise DatasetError(f"data folder {root} has no {split.name}/ folder; {LAYOUT}")
    return splits


# --- augmentation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A crop (top, left, height, width) in the source image, and whether to flip it left-right."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False


@dataclass(frozen=True)
class Augmentation:
    """Random-resized crop and flip (train) or centre crop (val) to size x size.

    The random draws come from random.Random(seed) alone: torchvision's RandomResizedCrop draws the
    same distribution from torch's global generator, which a background thread must not touch.
    """

    size: int = 224
    train: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    centre: float = 0.875       # val: the centre crop's side over the shorter side (224 / 256)

    def box(self, seed: int, height: int, width: int) -> Box:
        """The crop of a height x width image for the example with this seed."""
        if not self.train:
            side = max(1, round(min(height, width) * self.centre))
            return Box((height - side) // 2, (width - side) // 2, side, side)
        rng = random.Random(seed)
        area, log_ratio = height * width, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return Box(rng.randint(0, height - h), rng.randint(0, width - w), h, w, rng.random() < 0.5)
        aspect = width / height           # no fit in 10 tries: the largest centre crop within the ratios
        w, h = (width, round(width / self.ratio[0])) if aspect < self.ratio[0] else \
               (round(height * self.ratio[1]), height) if aspect > self.ratio[1] else (width, height)
        return Box((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)

    def __call__(self, image: Image.Image | Tensor, seed: int) -> Image.Image | Tensor:
        """The crop of one image (PIL, or a C x H x W tensor on any device), resized and maybe flipped."""
        height, width = F.get_size(image)
        b = self.box(seed, height, width)
        out = F.resized_crop(image, b.top, b.left, b.height, b.width, [self.size, self.size], antialias=True)
        return F.horizontal_flip(out) if b.flip else out


def example_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of example `index` in `epoch`: a pure function, for exact resume."""
    return hash((seed, epoch, index))


# --- datasets and samplers ---------------------------------------------------------------------
class Examples(ImageFolder):
    """An ImageFolder whose items are indexed by (index, seed) and never raise on a bad file.

    encoded=False: item = (uint8 crop 3 x size x size, label, readable); decoded with PIL and cropped here.
    encoded=True:  item = (the file's bytes as a uint8 tensor, label, seed, path); decoded later, on the device.
    """

    def __init__(self, root: Path, augmentation: Augmentation, encoded: bool) -> None:
        try:
            super().__init__(str(root))
        except FileNotFoundError as e:     # no class folder, or a class folder without images
            raise DatasetError(f"{root}: {e} {LAYOUT}") from None
        self.augmentation, self.encoded = augmentation, encoded

    def __getitem__(self, item: int | tuple[int, int]) -> tuple:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        path, label = self.samples[index]
        if self.encoded:
            try:
                data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
            except OSError as e:
                logger.warning("skipping unreadable image %s: %s", path, e)
                data = torch.empty(0, dtype=torch.uint8)
            return data, label, seed, path
        try:
            with Image.open(path) as image:
                crop = self.augmentation(image.convert("RGB"), seed)
            return F.pil_to_tensor(crop), label, True
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            logger.warning("skipping unreadable image %s: %s", path, e)
            size = self.augmentation.size
            return torch.zeros(3, size, size, dtype=torch.uint8), label, False


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (this rank's share of a seeded per-epoch shuffle) that hands each
    example its augmentation seed: it yields (index, example_seed(seed, epoch, index))."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i, example_seed(self.seed, self.epoch, i)) for i in super().__iter__())


def collate_encoded(batch: list[tuple]) -> tuple[list[Tensor], Tensor, list[int], list[str]]:
    """Encoded items into (list of byte tensors, labels, seeds, paths): the images differ in size."""
    data, labels, seeds, paths = zip(*batch, strict=True)
    return list(data), torch.tensor(labels), list(seeds), list(paths)


# --- batches on the device ---------------------------------------------------------------------
_END = object()


class Batches:
    """(images, labels) on the device, ready for the net: images float (N, 3, size, size), normalised;
    labels int64. A background thread finishes batches ahead of use (on its own CUDA stream), so
    decoding and cropping on the device overlap the training step.

    Trainer-compatible: len() is the number of batches per epoch and `sampler.set_epoch` sets the epoch.
    """

    def __init__(self, loader: DataLoader, device: torch.device, augmentation: Augmentation, *, encoded: bool,
                 channels_last: bool = False, prefetch: int = 2) -> None:
        """encoded: the loader yields collate_encoded batches of file bytes, to decode on `device`."""
        self.loader, self.device, self.augmentation = loader, torch.device(device), augmentation
        self.encoded, self.channels_last, self.prefetch = encoded, channels_last, prefetch
        self.skipped = 0            # unreadable images replaced so far
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    for raw in self.loader:
                        x, y, bad = self._finish(raw)
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                        if not put((x, y, bad, event)):
                            return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=produce, name="batches", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                x, y, bad, event = item
                if cuda:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                self.skipped += bad
                yield x, y
        finally:
            stop.set()
            thread.join()

    def _finish(self, raw: tuple) -> tuple[Tensor, Tensor, int]:
        """A loader batch into (normalised images, labels, number of unreadable images replaced)."""
        if self.encoded:
            data, labels, seeds, paths = raw
            images, readable = self._decode(data, seeds, paths)
        else:
            images, labels, readable = raw
        bad = (~readable).nonzero().flatten()
        if len(bad):
            good = readable.nonzero().flatten()
            if not len(good):
                raise DatasetError(f"every image of a batch of {len(readable)} was unreadable (see the warnings "
                                   f"above for the files): is the data folder damaged?")
            source = good[torch.arange(len(bad)) % len(good)]
            images[bad.to(images.device)], labels[bad] = images[source.to(images.device)], labels[source]
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.float().sub_(self._mean).div_(self._std)
        return x, labels.to(self.device, non_blocking=True), len(bad)

    def _decode(self, data: list[Tensor], seeds: list[int], paths: list[str]) -> tuple[Tensor, Tensor]:
        """Decode a batch on the device and crop each image there; (float crops in [0, 255], readable mask).

        Per image only a view, a cast and one antialiased bilinear resize; the flips are one batched op.
        """
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:       # one bad file fails the whole call: decode one by one
            decoded = [self._decode_one(d, p) for d, p in zip(data, paths, strict=True)]
        size = self.augmentation.size
        blank = torch.zeros(1, 3, size, size, device=self.device)
        crops, flips = [], []
        for image, seed in zip(decoded, seeds, strict=True):
            if image is None:
                crops.append(blank)
                flips.append(False)
                continue
            b = self.augmentation.box(seed, image.shape[-2], image.shape[-1])
            region = image[None, :, b.top:b.top + b.height, b.left:b.left + b.width].float()
            crops.append(torch.nn.functional.interpolate(region, size=(size, size), mode="bilinear",
                                                         align_corners=False, antialias=True))
            flips.append(b.flip)
        crops = torch.cat(crops)
        flip = torch.tensor(flips, device=self.device)[:, None, None, None]
        return torch.where(flip, crops.flip(-1), crops), torch.tensor([image is not None for image in decoded])

    def _decode_one(self, data: Tensor, path: str) -> Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except (RuntimeError, ValueError):
            pass
        try:     # a PNG or a JPEG the device decoder refuses (CMYK, progressive on some nvjpeg versions)
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device)
        except (RuntimeError, ValueError) as e:
            logger.warning("skipping unreadable image %s: %s", path, e)
            return None


def image_folders(root: str | Path, *, batch_size: int, size: int = 224, decode: Decode = "cpu",
                  world_size: int = 1) -> tuple[Examples, Examples]:
    """(train, val) Examples of an ImageNet-layout folder, or a DatasetError: a missing split, class
    folders that differ between the splits, fewer train images than one batch per process, or an
    unknown `decode`."""
    if decode not in ("cpu", "device"):
        raise DatasetError(f"decode must be 'cpu' or 'device', got {decode!r}")
    train_dir, val_dir = check_folder(root)
    encoded = decode == "device"
    train = Examples(train_dir, Augmentation(size, train=True), encoded)
    val = Examples(val_dir, Augmentation(size, train=False), encoded)
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise DatasetError(f"{root}: train/ and val/ have different class folders (in one only: {only[:10]})")
    if len(train) < batch_size * world_size:
        raise DatasetError(f"{train_dir} has {len(train)} images, fewer than one batch of {batch_size} on each of "
                           f"{world_size} processes")
    return train, val


def image_batches(root: str | Path, *, batch_size: int, device: torch.device | str, size: int = 224,
                  decode: Decode = "cpu", workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                  channels_last: bool = False) -> tuple[Batches, Batches, list[str]]:
    """(train, val, class names) for an ImageNet-layout folder, sharded for `rank` of `world_size`.

    batch_size: examples per batch on this rank. train: this rank's share of a per-epoch shuffle,
    incomplete last batch dropped (static shapes for torch.compile). val: examples rank, rank + world_size, ...
    each seen once (no padding, so top-1 over all ranks is exact).
    """
    device, encoded = torch.device(device), decode == "device"
    train, val = image_folders(root, batch_size=batch_size, size=size, decode=decode, world_size=world_size)
    train_aug, val_aug = train.augmentation, val.augmentation

    def loader(dataset, sampler, shuffle_drop: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate_encoded if encoded else None,
                          pin_memory=device.type == "cuda" and not encoded, drop_last=shuffle_drop,
                          persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                          generator=torch.Generator())   # worker seeds drawn apart from torch's global stream

    sampler = EpochSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    shard = Subset(val, range(rank, len(val), world_size))
    return (Batches(loader(train, sampler, True), device, train_aug, encoded=encoded, channels_last=channels_last),
            Batches(loader(shard, None, False), device, val_aug, encoded=encoded, channels_last=channels_last),
            train.classes)


# --- a generated folder, for tests and benchmarks ----------------------------------------------
def _write_class(folder: Path, n: int, size: tuple[int, int], seed: tuple[int, ...]) -> None:
    gen = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(s * gen.uniform(0.75, 1.25)) for s in size)
        coarse = gen.uniform(0, 255, (max(2, h // 16), max(2, w // 16), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float64)
        pixels = np.clip(smooth + gen.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{folder.parent.name}_{folder.name}_{i}.JPEG", quality=90)


def synthetic_image_folder(root: str | Path, *, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                           size: tuple[int, int] = (48, 64), corrupt: int = 0, seed: int = 0,
                           processes: int = 1) -> Path:
    """Write an ImageNet-layout folder of smooth random JPEGs (natural-image-like entropy), sizes
    varying around `size` = (height, width); `corrupt` extra train files are truncated JPEGs.
    `processes` > 1 writes the class folders in parallel."""
    root = Path(root)
    jobs = [
        (root / split / f"n{c:08d}", n, tuple(size), (seed, s, c))
        for s, (split, n) in enumerate((("train", train_per_class), ("val", val_per_class)))
        for c in range(classes)
    ]
    if processes > 1:
        with concurrent.futures.ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_class, *zip(*jobs)))
    else:
        for job in jobs:
            _write_class(*job)
    good = next((root / "train" / "n00000000").iterdir()).read_bytes()
    for i in range(corrupt):
        (root / "train" / "n00000000" / f"corrupt_{i}.JPEG").write_bytes(good[: len(good) // 3])
    return root
