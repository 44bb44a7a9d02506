"""ImageNet batches decoded and augmented by NVIDIA DALI (pip install 'mirrorcircuits[dali]').

The same batches as models.imagenet_data, made by a DALI pipeline instead of DataLoader workers:

  python workers (DALI's parallel external source, one batch per call): read this rank's files in the
      order of models.imagenet_data.EpochSampler, read each image's size from its header (PIL, no
      decoding) and draw its crop with models.imagenet_data.Augmentation.box from
      example_seed(seed, epoch, index);
  decoders.image_slice: decode only the crop window (decode="device" on CUDA: DALI's "mixed" nvJPEG
      decoder, the hardware JPEG decoder where the GPU has one; else libjpeg-turbo on the CPU);
  resize to size x size (bilinear, antialiased), then crop_mirror_normalize: the flip and
      x = (pixels - 255 mean) / (255 std) with the ImageNet statistics, on the GPU when there is one.

So the order, the shard of each rank, the crops and the flips are those of the torch loader: the
batches differ from it only by the decoder's and the resize's rounding. Nothing is drawn from DALI's
random generators: an epoch depends on (seed, epoch) alone, and a run resumed mid-epoch replays the
epoch's first batches as it does with the torch loader.

A file that is not an image (its header cannot be read) takes the slot of a readable image of the same
batch, as in models.imagenet_data, and is counted in DaliBatches.skipped. A file with a readable header
but corrupt data stops the run with DALI's decoder error (DALI cannot skip a sample inside a pipeline).
"""
from __future__ import annotations

import io
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

import circuits

from .imagenet_data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmentation,
    Batches,
    DatasetError,
    Decode,
    EpochSampler,
    image_batches,
    image_folders,
)

try:
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:          # the dali extra is not installed: the torch loader only
    Pipeline = None

logger = logging.getLogger(__name__)

MISSING = ("--loader dali needs NVIDIA DALI, which is not installed: pip install 'mirrorcircuits[dali]' "
           "(nvidia-dali-cuda120; nvidia-dali-cuda130 for CUDA 13), or use --loader torch")


def require_dali() -> None:
    """A CircuitError naming the dali extra unless NVIDIA DALI can be imported."""
    if Pipeline is None:
        raise circuits.CircuitError(MISSING)


@dataclass
class Source:
    """One batch of encoded images with their crops, for DALI's parallel external source (batch mode).

    Called in DALI's Python workers with a BatchInfo (iteration within the epoch, epochs since the
    pipeline started); returns the columns (file bytes, label, crop anchor (left, top), crop shape
    (width, height), flip, replaced). Picklable: the workers receive a copy when the pipeline starts.
    """

    samples: list[tuple[str, int]]          # (path, label) of every image of the split
    sampler: EpochSampler | None            # train: this rank's share of the epoch's shuffle
    shard: range                            # val (sampler None): the images of this rank, in order
    augmentation: Augmentation
    batch_size: int
    batches: int                            # batches per epoch
    first_epoch: int = 0                    # the epoch of the pipeline's first
    _order: tuple[int, list[tuple[int, int]]] | None = field(default=None, repr=False)

    def order(self, epoch: int) -> list[tuple[int, int]]:
        """(index, augmentation seed) of this rank's examples in `epoch`, in batch order."""
        if self._order is None or self._order[0] != epoch:
            if self.sampler is None:
                examples = [(i, 0) for i in self.shard]
            else:
                self.sampler.set_epoch(epoch)
                examples = list(self.sampler)
            self._order = epoch, examples
        return self._order[1]

    def __call__(self, info: Any) -> tuple[list[np.ndarray], ...]:
        if info.iteration >= self.batches:
            raise StopIteration
        start = info.iteration * self.batch_size
        examples = self.order(self.first_epoch + info.epoch_idx)[start:start + self.batch_size]
        rows = [self.example(index, seed) for index, seed in examples]
        readable = [row for row in rows if row is not None]
        if not readable:
            raise DatasetError(f"every image of a batch of {len(rows)} was unreadable (see the warnings above for "
                               f"the files): is the data folder damaged?")
        copies = iter(readable * len(rows))      # the k-th unreadable image's slot: readable image k (cyclically)
        rows = [row if row is not None else (*next(copies)[:5], np.ones((), np.int32)) for row in rows]
        return tuple(list(column) for column in zip(*rows, strict=True))

    def example(self, index: int, seed: int) -> tuple[np.ndarray, ...] | None:
        """One image's columns, or None (and a warning) if its file or header cannot be read."""
        path, label = self.samples[index]
        try:
            data = np.fromfile(path, dtype=np.uint8)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            logger.warning("skipping unreadable image %s: %s", path, e)
            return None
        b = self.augmentation.box(seed, height, width)
        return (data, np.array(label, np.int64), np.array([b.left, b.top], np.float32),
                np.array([b.width, b.height], np.float32), np.array(b.flip, np.int32), np.zeros((), np.int32))


class DaliBatches:
    """(images, labels) on the device from a DALI pipeline, like models.imagenet_data.Batches:
    images float (N, 3, size, size), normalised (channels_last: a view of DALI's N x H x W x 3 output);
    labels int64. len() is the number of batches per epoch, `sampler.set_epoch` sets the epoch.

    The pipeline and its Python workers start on the first pass and serve the following epochs; a pass
    left before its end (or a jump to another epoch) starts a new pipeline at the next pass.
    """

    def __init__(self, source: Source, device: torch.device, *, decode: Decode, workers: int,
                 channels_last: bool = False) -> None:
        self.source, self.device, self.decode = source, torch.device(device), decode
        self.workers, self.channels_last = max(1, workers), channels_last
        self.skipped = 0                   # unreadable images replaced so far
        self._pipe: Any = None
        self._next_epoch: int | None = None      # the epoch the pipeline gives next, None: mid-epoch

    @property
    def sampler(self) -> EpochSampler | None:
        return self.source.sampler

    @property
    def batch_size(self) -> int:
        return self.source.batch_size

    def __len__(self) -> int:
        return self.source.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.sampler.epoch if self.sampler is not None else 0
        if self._pipe is None or self._next_epoch != epoch:
            self._start(epoch)
        self._next_epoch = None
        cuda = self.device.type == "cuda"
        for batch in itertools.count():
            try:
                images, labels, replaced = self._pipe.run()
            except StopIteration:
                break
            except RuntimeError as e:      # the pipeline is unusable after an operator error
                self._pipe = None
                raise DatasetError(self._decoder_error(str(e), epoch, batch)) from e
            x = _to_torch(images, torch.float32, self.device)
            x = x.permute(0, 3, 1, 2) if self.channels_last else x
            self.skipped += int(_to_torch(replaced, torch.int32, torch.device("cpu")).sum())
            yield x, _to_torch(labels, torch.int64, torch.device("cpu")).to(self.device, non_blocking=cuda)
        self._pipe.reset()
        self._next_epoch = epoch + 1 if self.sampler is not None else 0

    def _decoder_error(self, message: str, epoch: int, batch: int) -> str:
        """What to say when the pipeline fails on batch `batch` of `epoch`: the file, where DALI's decoder
        names the sample it failed on."""
        start = batch * self.batch_size
        examples = self.source.order(epoch)[start:start + self.batch_size]
        paths = [self.source.samples[index][0] for index, _ in examples]
        said = " ".join(message.split())[:800]
        sample = re.search(r"Failed to decode sample #(\d+)", message)
        if sample is None or int(sample[1]) >= len(paths):
            return f"the DALI pipeline failed on batch {batch} of epoch {epoch} (images {paths}): {said}"
        return (f"DALI could not decode the image {paths[int(sample[1])]} (batch {batch} of epoch {epoch}): it is "
                f"corrupt or truncated. DALI cannot skip an image whose header reads: remove or replace the file, "
                f"or use --loader torch, which skips unreadable images. DALI said: {said}")

    def _start(self, epoch: int) -> None:
        """A new pipeline whose first epoch is `epoch` (the previous one, if any, shut down)."""
        if self._pipe is not None:
            self._pipe._shutdown()        # noqa: SLF001 - DALI's own way to stop a pipeline and its workers
        self.source.first_epoch = epoch
        self._pipe = dali_pipeline(self.source, self.device, size=self.source.augmentation.size, decode=self.decode,
                                   workers=self.workers, channels_last=self.channels_last)


def _to_torch(output: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A DALI TensorList of equal-shaped samples as one torch tensor (copied on the current CUDA stream)."""
    tensor = output.as_tensor()
    out = torch.empty(tensor.shape(), dtype=dtype, device=device)
    return feed_ndarray(tensor, out, torch.cuda.current_stream(device) if device.type == "cuda" else None)


def dali_pipeline(source: Source, device: torch.device, *, size: int, decode: Decode, workers: int,
                  channels_last: bool) -> Any:
    """The built DALI pipeline of `source`: decode the crop windows, resize, flip, normalise.

    Outputs (images, labels, replaced): images float N x 3 x size x size (N x size x size x 3 if
    channels_last) on `device`; labels and replaced on the CPU. DALI's Python workers are forked from
    this process, or spawned (each imports torch: seconds) once CUDA is initialised here, since DALI
    refuses to fork a process that holds a CUDA context."""
    cuda = device.type == "cuda"
    on_device = cuda and decode == "device"
    pipe = Pipeline(batch_size=source.batch_size, num_threads=workers,
                    device_id=(device.index if device.index is not None else torch.cuda.current_device()) if cuda
                    else None,
                    py_num_workers=workers,
                    py_start_method="spawn" if torch.cuda.is_initialized() else "fork", prefetch_queue_depth=2)
    with pipe:
        data, labels, anchor, shape, flip, replaced = fn.external_source(source, num_outputs=6, parallel=True,
                                                                         batch=True, batch_info=True)
        images = fn.decoders.image_slice(data, anchor, shape, device="mixed" if on_device else "cpu",
                                         output_type=types.RGB, axis_names="WH", normalized_anchor=False,
                                         normalized_shape=False, adjust_orientation=False)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        if cuda and not on_device:
            images = images.gpu()
        images = fn.crop_mirror_normalize(images, mirror=flip, mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD], dtype=types.FLOAT,
                                          output_layout="HWC" if channels_last else "CHW")
        pipe.set_outputs(images, labels, replaced)
    pipe.build()
    return pipe


def dali_batches(root: str | Path, *, batch_size: int, device: torch.device | str, size: int = 224,
                 decode: Decode = "cpu", workers: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False) -> tuple[DaliBatches, DaliBatches, list[str]]:
    """(train, val, class names) as models.imagenet_data.image_batches gives them, made by DALI;
    a CircuitError naming the dali extra if DALI is not installed."""
    require_dali()
    train, val = image_folders(root, batch_size=batch_size, size=size, decode=decode, world_size=world_size)
    sampler = EpochSampler(range(len(train)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    shard = range(rank, len(val), world_size)
    sources = (Source(train.samples, sampler, range(0), Augmentation(size, train=True), batch_size,
                      len(sampler) // batch_size),
               Source(val.samples, None, shard, Augmentation(size, train=False), batch_size,
                      -(-len(shard) // batch_size)))
    made = [DaliBatches(s, torch.device(device), decode=decode, workers=workers, channels_last=channels_last)
            for s in sources]
    return made[0], made[1], train.classes


LOADERS: dict[str, Callable[..., tuple[Batches | DaliBatches, Batches | DaliBatches, list[str]]]] = {
    "torch": image_batches, "dali": dali_batches}
