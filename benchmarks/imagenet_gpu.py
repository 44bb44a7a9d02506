"""Training images/s of ImageNet ResNet circuits on one GPU, per feedback rule: the prepared GPU check.

For each rule (bp, fa, kp, wm) and each input source it trains through the same code as
`python -m models.imagenet` (models.imagenet.build_model / training_parts and circuits.Trainer:
bf16 autocast, channels_last, SGD with momentum, per-step lr schedule; under wm the authors' cadence of
one mirror batch per learning step, noise batch = training batch) and times the learning steps:

  synthetic: one random batch already on the GPU, repeated (the net's own ceiling);
  pipeline:  models.imagenet_data on a generated folder of ImageNet-sized JPEGs, decode="device"
             (nvjpeg + crops on the GPU) - and decode="cpu" with --cpu-pipeline;
  dali:      with --loaders ... dali, the same folder through models.imagenet_dali (DALI's nvJPEG
             decoder, resize and normalisation on the GPU; the dali extra).

images/s = examples / wall seconds between the end of the warm-up steps and the end of the last step,
with torch.cuda.synchronize at both ends. With --compile each row is also run under torch.compile
(compilation falls in the warm-up). It also runs benchmarks/loader.py's measurement of the data
pipeline alone. Results print as a table and are written to --json after every row, so a run cut
short by --budget-s (or a device time limit) keeps what it measured.

    python benchmarks/imagenet_gpu.py --json $OUT/imagenet_gpu.json   # resnet50, batch 256, eager rows
    python benchmarks/imagenet_gpu.py --compile --rules bp wm            # adds compiled rows (minutes each)
    python benchmarks/imagenet_gpu.py --loaders dali --rules bp wm       # training fed by DALI against synthetic
    python benchmarks/imagenet_gpu.py --smoke                            # the script at toy size, on the CPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from loader import images_per_second  # benchmarks/loader.py: run as a script, its folder is on sys.path

import circuits
from models import imagenet, imagenet_recipe
from models.imagenet_dali import LOADERS
from models.imagenet_data import synthetic_image_folder

SMOKE = dict(arch="resnet8", rules=["bp", "wm"], batch_size=4, steps=2, warmup=1, images=24, image_size=32,
             workers=1, device="cpu")
"""--smoke: the whole script at toy size on the CPU, to check it before spending GPU time."""


class Repeated:
    """The same (images, labels) batch `n` times: a loader with no data cost."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ((self.x, self.y) for _ in range(self.n))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(recipe: imagenet_recipe.Recipe, device: torch.device, loader: Iterable, epochs: int, warmup: int,
               classes: int) -> dict:
    """Images/s of learning steps after `warmup` steps, over `epochs` passes of `loader`."""
    worker = imagenet_recipe.Worker(device=device)
    net, model = imagenet.build_model(recipe, worker, classes)
    optimizer, lr_scheduler, schedule, config = imagenet.training_parts(net, recipe, worker, len(loader))
    marks: list[tuple[float, int]] = []

    def clock(trainer: circuits.Trainer) -> None:
        if trainer.progress.step == warmup or trainer.progress.step == epochs * len(loader):
            synchronize(device)
            marks.append((time.perf_counter(), trainer.progress.examples))

    trainer = circuits.Trainer(model, optimizer, schedule, lr_scheduler=lr_scheduler, config=config, hooks=[clock])
    trainer.fit(loader, epochs)
    (t0, n0), (t1, n1) = marks
    row = {"images_per_s": (n1 - n0) / (t1 - t0), "timed_steps": trainer.progress.step - warmup}
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=sorted(imagenet_recipe.ARCHS))
    p.add_argument("--rules", nargs="+", default=["bp", "fa", "kp", "wm"], choices=list(circuits.rules.RULES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="timed synthetic steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--images", type=int, default=5120, help="generated JPEGs (pipeline rows: 3 passes, 1 untimed)")
    p.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1))
    p.add_argument("--compile", action="store_true", help="also run every row under torch.compile")
    p.add_argument("--loaders", nargs="+", default=["torch"], choices=sorted(LOADERS),
                   help="the data pipelines of the pipeline rows (dali: models.imagenet_dali, the dali extra)")
    p.add_argument("--cpu-pipeline", action="store_true", help="also run the pipeline rows with decode=cpu")
    p.add_argument("--budget-s", type=float, default=480, help="start no new row after this many seconds")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", ".")) / "imagenet_gpu.json")
    p.add_argument("--smoke", action="store_true", help=f"toy sizes on the CPU: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args(argv, namespace=argparse.Namespace(**SMOKE))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA GPU here: use --smoke to check the script on the CPU, benchmarks/loader.py for CPU figures"
        )
    began = time.perf_counter()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{gpu}, torch {torch.__version__}, {args.arch}, batch {args.batch_size}, {args.image_size}px, "
          f"bf16, channels_last")
    results: list[dict] = []

    def record(row: dict) -> None:
        results.append(row)
        print(f"  {row['source']:18s} {row['mode']:8s} {row['rule']:3s} {row['images_per_s']:9,.0f} images/s"
              f"   ({row.get('timed_steps', '-')} steps, {row.get('max_memory_gib', 0):.1f} GiB)", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "arch": args.arch,
                                         "batch_size": args.batch_size, "rows": results}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        classes = min(100, args.images // 4)
        folder = synthetic_image_folder(Path(tmp), classes=classes, train_per_class=max(1, args.images // classes),
                                        val_per_class=1, size=(375, 500), processes=args.workers)
        decodes = ["device"] + (["cpu"] if args.cpu_pipeline else [])
        pipelines = [(loader, decode) for loader in args.loaders for decode in decodes]
        names = {"torch": "pipeline", "dali": "dali"}          # row names: "pipeline/..." is the torch loader
        for loader, decode in pipelines:
            rate = images_per_second(folder, decode, device, args.batch_size, args.workers, args.image_size, 3, None,
                                     loader)
            record({"source": f"{names[loader]} only/{decode}", "mode": "-", "rule": "-", "images_per_s": rate})
        base = imagenet_recipe.Recipe(data=str(folder), arch=args.arch, batch_size=args.batch_size, mirror_warmup=0,
                               progress=False, amp=True, channels_last=True, workers=args.workers,
                               image_size=args.image_size)
        size = args.image_size
        x = torch.randn(args.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (args.batch_size,), device=device)
        for compiled in [False] + ([True] if args.compile else []):
            for rule in args.rules:
                for loader, decode in [(None, "device"), *pipelines]:
                    source = "synthetic" if loader is None else f"{names[loader]}/{decode}"
                    if time.perf_counter() - began > args.budget_s:
                        print(f"  budget of {args.budget_s:.0f} s spent: skipping the remaining rows")
                        return results
                    recipe = dataclasses.replace(base, rule=rule, compile=compiled, decode=decode,
                                                 loader=loader or "torch")
                    recipe = imagenet_recipe.resolve(recipe, imagenet_recipe.Worker(device=device))
                    imagenet.configure_torch(recipe)
                    torch._dynamo.reset()       # each row compiles afresh, clear of the recompile limit
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    if loader is None:
                        row = train_rate(recipe, device, Repeated(x, y, args.warmup + args.steps), 1, args.warmup, 1000)
                    else:
                        train, _, labels = LOADERS[loader](folder, batch_size=args.batch_size, device=device,
                                                           size=size, decode=decode, workers=args.workers,
                                                           channels_last=True)
                        row = train_rate(recipe, device, train, 3, len(train), len(labels))
                    record({"source": source, "mode": "compiled" if compiled else "eager", "rule": rule, **row})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
