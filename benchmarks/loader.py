"""Images per second of the ImageNet data pipelines (models.imagenet_data, models.imagenet_dali) on a folder of JPEGs.

Every path produces what training consumes: normalised float batches on the device, train augmentation
(random-resized crop + flip), an epoch's share of a shuffled folder.

  --loader torch (models.imagenet_data):
    cpu:     DataLoader workers decode with PIL and crop; uint8 crops are copied (pinned) to the device.
    device:  workers read the bytes; torchvision.io.decode_jpeg decodes the batch on the device
             (nvjpeg on CUDA; libjpeg in the main process when the device is the CPU) and crops there.
  --loader dali (models.imagenet_dali; pip install '.[dali]'): DALI's Python workers read the bytes
    and draw the crops;
    cpu:     DALI decodes the crop windows with libjpeg-turbo and resizes on the CPU, then normalises
             on the device;
    device:  DALI's nvJPEG ("mixed") decoder and the resize run on the GPU (on a CPU-only machine: as cpu).

The folder is generated (smooth random JPEGs about the size of ImageNet's, ~500 x 375, quality 90)
unless --folder names one (e.g. a real ImageNet, which has train/ and val/). Each path runs
--epochs passes; the first is warm-up (worker start, nvjpeg initialisation) and is not counted.
Time is wall time over whole passes, with torch.cuda.synchronize on GPU.

    python benchmarks/loader.py                                   # both paths, CUDA if present
    python benchmarks/loader.py --loader torch dali --paths device   # the DALI pipeline against torch's
    python benchmarks/loader.py --images 4096 --workers 15 --batch-size 256
    python benchmarks/loader.py --folder /datasets/imagenet --max-batches 200
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch

from models.imagenet_dali import LOADERS
from models.imagenet_data import synthetic_image_folder


def images_per_second(folder: Path, decode: str, device: torch.device, batch_size: int, workers: int,
                      image_size: int, epochs: int, max_batches: int | None, loader: str = "torch") -> float:
    """Train-pipeline throughput over epochs 1.. (epoch 0 warms up: worker start, decoder initialisation)."""
    train, _, _ = LOADERS[loader](folder, batch_size=batch_size, device=device, size=image_size, decode=decode,
                                  workers=workers, channels_last=device.type == "cuda")
    counted, seconds = 0, 0.0
    for epoch in range(epochs):
        train.sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for x, _ in itertools.islice(train, max_batches):
            n += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if epoch > 0:
            counted, seconds = counted + n, seconds + time.perf_counter() - start
    return counted / seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folder", type=Path, default=None, help="an ImageNet-layout folder; default: generate one")
    p.add_argument("--images", type=int, default=1024, help="images to generate (train split)")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--source-size", type=int, nargs=2, default=(375, 500), metavar=("H", "W"),
                   help="typical size of a generated image")
    p.add_argument("--loader", nargs="+", default=["torch"], choices=sorted(LOADERS),
                   help="dali: models.imagenet_dali (needs the dali extra)")
    p.add_argument("--paths", nargs="+", default=["cpu", "device"], choices=["cpu", "device"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3, help="passes per path, the first not counted")
    p.add_argument("--max-batches", type=int, default=None, help="batches per pass (default: the whole folder)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            per_class = max(1, args.images // args.classes)
            t = time.perf_counter()
            folder = synthetic_image_folder(Path(tmp), classes=args.classes, train_per_class=per_class,
                                            val_per_class=1, size=tuple(args.source_size),
                                            processes=args.workers)
            print(f"generated {per_class * args.classes} JPEGs of ~{args.source_size[0]}x{args.source_size[1]} "
                  f"in {time.perf_counter() - t:.1f} s")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
        print(f"device {device} ({name}), batch {args.batch_size}, {args.workers} workers, crop {args.image_size}")
        rates = {}
        for loader in args.loader:
            for decode in args.paths:
                key = decode if loader == "torch" else f"{loader}/{decode}"
                rates[key] = images_per_second(folder, decode, device, args.batch_size, args.workers,
                                               args.image_size, args.epochs, args.max_batches, loader)
                print(f"  loader={loader:5s} decode={decode:7s} {rates[key]:10,.0f} images/s")
    return rates


if __name__ == "__main__":
    main()
