"""ImageNet training of ResNet circuits under one feedback rule, on one process or many (torchrun).

    python -m models.imagenet --data /datasets/imagenet --arch resnet18 --rule kp
    torchrun --nproc_per_node=8 -m models.imagenet --data /datasets/imagenet --arch resnet50 --rule wm

The recipe of the paper's era (He et al. 2016, as in pytorch/examples imagenet; Goyal et al. 2017 for
large batches) is the default; every value is a flag. See docs/imagenet.md for the sources.

  SGD, momentum 0.9, weight decay 1e-4 on every trained parameter (W, biases, batch norm, and B under KP)
  lr = 0.1 x batch / 256 (linear scaling, batch = the global batch over all processes)
  warm-up: 5 epochs rising linearly from 0.1 when the batch exceeds 256 (Goyal et al.), none otherwise
  90 epochs; lr x 0.1 at epochs 30 and 60 ("step"), or cosine annealing to 0 ("cosine"); set per step
  train: random-resized crop 224 + flip; val: centre crop 224 of the image resized to 256

Distributed: one process per GPU under torchrun, DistributedDataParallel (NCCL on GPU, gloo on CPU).
DDP all-reduces the autograd gradients, which include B's under Kolen-Pollack; weight-mirror updates of
B happen outside autograd and are all-reduced by circuits.phases.mirror.mirror_step. Only rank 0 prints and
writes checkpoints.

Rank 0 records the run to OUT/run.h5 (circuits.recording.recorder.Recorder: loss, lr, alignment of B and W per
projection every --record-every ticks, error and update angles to backprop on a fixed validation batch
every --probe-every steps, top-1/top-5 after each epoch). Checkpoints (OUT/checkpoint.pt, replaced
atomically) are taken between learning steps every --checkpoint-every steps and after each epoch:
W, B, batch-norm state, optimizer, lr schedule, the phase schedule's position, the data position,
every rank's RNG states and the recorder's position. --resume continues the same run, appending to
the same recording; a run that stopped before its first checkpoint is run again from step 0 into its
recording by --resume. A resume with changed settings applies them (the optimizer's settings, the lr schedule
rebuilt for them where the run stands in epochs, the data position kept by examples seen) or refuses them with the
reason: models.imagenet_resume. A checkpoint the disk has no room for is an error saying so; the last one stays.
The end-of-epoch checkpoint is taken after the epoch's evaluation, so a resumed
run keeps every evaluation row. Rank 0 holds OUT/checkpoint.pt.lock while it runs: a second process on
the same folder is refused.

The recipe, its resolution and the lr schedule: models.imagenet_recipe; reading and writing checkpoints and the
run folder's lock: models.imagenet_checkpoint.

Divergence: a non-finite loss, parameter or buffer stops the run with a DivergenceError naming the step (see
circuits.phases.trainer); every checkpoint is checked first, so none is ever written from a non-finite state
and the last good one survives.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

import circuits
from circuits.phases.divergence import DivergenceError
from circuits.phases.progress import rng_state, set_rng_state
from circuits.phases.schedule import Schedule
from circuits.recording import RecordingError
from circuits.recording.recorder import Recorder

from .cli import parse
from .imagenet_checkpoint import load_checkpoint, lock_run, write_checkpoint
from .imagenet_dali import LOADERS, DaliBatches
from .imagenet_data import Batches, DatasetError
from .imagenet_recipe import Recipe, Worker, architecture, feedback_rule, lr_schedule, resolve
from .imagenet_resume import apply_changes, changed_settings, check_changes, saved_steps_per_epoch, warmup_batches


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m models.imagenet") -> Recipe:
    """The command line into a Recipe (flags are the field names with dashes)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return parse(Recipe, argv, p)[0]


# --- distributed set-up ------------------------------------------------------------------------
def start_processes() -> Worker:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU); one CUDA device per process."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    rank, local_rank = int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Worker(rank, world_size, local_rank, local_world, device)


# --- the trainer (checkpoints: models.imagenet_checkpoint) ------------------------------------
class ImageNetTrainer(circuits.Trainer):
    """circuits.Trainer that checkpoints between learning steps and after each epoch, and reports
    images/s and unreadable images each epoch on rank 0."""

    def __init__(self, *args, recipe: Recipe, worker: Worker, train: Batches | DaliBatches,
                 checkpoint_key: dict[str, Any], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recipe, self.worker, self.train, self.checkpoint_key = recipe, worker, train, checkpoint_key
        self.path = Path(recipe.out) / "checkpoint.pt"
        self.saved_at: int | None = None
        self.skipped_before_epoch = 0      # unreadable images this rank met before the current epoch
        self.clock, self.clock_examples = time.perf_counter(), 0
        self.hooks.append(self.checkpoint_due)

    def checkpoint_due(self, _: circuits.Trainer) -> None:
        """A hook, after each learning step: save every checkpoint_every steps, except at an epoch's last
        (epoch_done saves there, after the evaluation)."""
        if self.progress.step % self.recipe.checkpoint_every == 0 and self.progress.batch_in_epoch < len(self.train):
            self.save()

    def end_epoch(self) -> None:
        super().end_epoch()
        seconds = time.perf_counter() - self.clock
        skipped = torch.tensor([self.train.skipped], device=self.device)
        if self.worker.distributed:
            dist.all_reduce(skipped)
        if self.worker.main:
            images = (self.progress.examples - self.clock_examples) * self.worker.world_size
            tqdm.write(f"epoch {self.progress.epoch - 1}: step {self.progress.step}, {images / seconds:,.0f} images/s, "
                       f"{int(skipped)} unreadable images skipped so far")
        self.skipped_before_epoch = self.train.skipped

    def epoch_done(self, metrics: dict[str, float]) -> None:
        """The end-of-epoch checkpoint, after the evaluation: a resumed run keeps its row."""
        self.save()
        self.clock, self.clock_examples = time.perf_counter(), self.progress.examples

    def evaluate(self, loader) -> dict[str, float]:
        metrics = super().evaluate(loader)
        if self.worker.main:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            tqdm.write(f"validation after epoch {self.progress.epoch - 1}: {scores}")
        return metrics

    def save(self) -> None:
        """Write the checkpoint (rank 0), with every rank's RNG states and counts; all ranks must call this.

        First a DivergenceError if the state is not finite: no checkpoint is written from it."""
        self.check_finite()
        mine = {"rng": rng_state(), "skipped_before_epoch": self.skipped_before_epoch}
        ranks = [None] * self.worker.world_size
        if self.worker.distributed:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        self.saved_at = self.progress.step
        if not self.worker.main:
            return
        state = {"checkpoint_key": self.checkpoint_key, "recipe": asdict(self.recipe), "trainer": self.state_dict(),
                 "ranks": ranks}
        write_checkpoint(state, self.path)

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: trainer state, then this rank's own RNG streams and counts.

        The trainer replays the data of the current epoch up to the saved batch, so the count of
        unreadable images restarts from the epoch's start."""
        self.load_state_dict(state["trainer"])
        self.saved_at = self.progress.step
        ranks = state["ranks"]
        if len(ranks) == self.worker.world_size:
            set_rng_state(ranks[self.worker.rank]["rng"])
            self.skipped_before_epoch = ranks[self.worker.rank]["skipped_before_epoch"]
        else:
            if self.worker.main:
                tqdm.write(f"resuming on {self.worker.world_size} processes a run saved on {len(ranks)}: "
                           f"the random streams (mirror noise) differ from an uninterrupted run")
            self.skipped_before_epoch = sum(r["skipped_before_epoch"] for r in ranks) if self.worker.main else 0
        self.train.skipped = self.skipped_before_epoch


# --- the run --------------------------------------------------------------------------------
def configure_torch(recipe: Recipe) -> None:
    """Deterministic kernels if asked, else cuDNN autotuning; TF32 matmuls."""
    if recipe.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not recipe.deterministic
    torch.set_float32_matmul_precision("high")


def build_model(recipe: Recipe, worker: Worker, classes: int) -> tuple[circuits.CircuitNet, nn.Module]:
    """(the circuit's net, the module to train: the net, wrapped in DDP and torch.compile as asked).

    Every rank builds the same initial W and B (seed), then seeds its own stream (seed + rank) for noise.
    """
    torch.manual_seed(recipe.seed)
    circuit = architecture(recipe.arch)(classes=classes, input_shape=(3, recipe.image_size, recipe.image_size),
                                 rule=feedback_rule(recipe))
    net = circuit.build().to(worker.device)
    if recipe.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model: nn.Module = net
    if worker.distributed:
        model = DistributedDataParallel(net, device_ids=[worker.device] if worker.device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    if recipe.compile:
        model = torch.compile(model)
    torch.manual_seed(recipe.seed + worker.rank)
    return net, model


def training_parts(net: circuits.CircuitNet, recipe: Recipe, worker: Worker, steps_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, LRScheduler, Schedule, circuits.TrainerConfig]:
    """Optimizer (every trained parameter, B too under KP), lr schedule, phase schedule, trainer config."""
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=recipe.lr,
                                momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    config = circuits.TrainerConfig(device=str(worker.device), amp_dtype="bfloat16" if recipe.amp else None,
                                    channels_last=recipe.channels_last, lr_per_step=True,
                                    progress=recipe.progress, mirror_beside_learning=recipe.mirror_beside,
                                    extra=asdict(recipe))
    schedule = circuits.paper_schedule(net, steps_per_epoch, recipe.mirror_batch_size, warmup=recipe.mirror_warmup,
                                       every=recipe.mirror_every)
    return optimizer, lr_schedule(optimizer, recipe, steps_per_epoch), schedule, config


def build_trainer(recipe: Recipe, worker: Worker
                  ) -> tuple[ImageNetTrainer, Batches | DaliBatches, Batches | DaliBatches]:
    """The data, net, optimizer, schedules and trainer of a resolved recipe (resumed if asked).

    --resume without a checkpoint but with a recording (a run that stopped before its first checkpoint)
    runs again from step 0 into that recording. The first validation batch is read here, so that an
    unreadable validation set stops the run before its first step."""
    out = Path(recipe.out)
    checkpoint, recording = out / "checkpoint.pt", out / "run.h5"
    if checkpoint.exists() and not recipe.resume:
        raise circuits.CircuitError(f"{checkpoint} exists: pass --resume to continue that run, or --out for a new one")
    restart = recipe.resume and not checkpoint.is_file()
    if restart and not (recipe.record and recording.is_file()):
        raise circuits.CircuitError(f"--resume: there is no checkpoint {checkpoint}")
    if recipe.record and not recipe.resume and recording.exists():
        raise circuits.CircuitError(f"{recording} exists but {checkpoint} does not: that run stopped before its first "
                                    f"checkpoint. Pass --resume to run it again from step 0 into the same recording "
                                    f"(its rows are recorded anew), or --out for a new run")
    configure_torch(recipe)
    train, val, classes = LOADERS[recipe.loader](recipe.data, batch_size=recipe.batch_size // worker.world_size,
                                        device=worker.device, size=recipe.image_size, decode=recipe.decode,
                                        workers=recipe.workers, seed=recipe.seed, rank=worker.rank,
                                        world_size=worker.world_size, channels_last=recipe.channels_last)
    batches = iter(val)
    first_val = next(batches, None)    # a DatasetError now if the validation images cannot be read
    batches.close()
    key = {**recipe.checkpoint_key, "classes": len(classes)}
    state = load_checkpoint(checkpoint, key, worker.device) if recipe.resume and not restart else None
    if state is not None:      # changed settings: applied after the load, or refused now (models.imagenet_resume)
        changed = changed_settings(state["recipe"], recipe)
        saved_batch = state["recipe"]["batch_size"] // len(state["ranks"])
        check_changes(changed, state["trainer"]["progress"], saved_batch, recipe.batch_size // worker.world_size)
    net, model = build_model(recipe, worker, len(classes))
    optimizer, lr_scheduler, schedule, config = training_parts(net, recipe, worker, len(train))
    recorder = None
    if recipe.record and worker.main:
        recorder = Recorder(recording, every=recipe.record_every, probe=first_val if recipe.probe_every else None,
                            probe_steps=recipe.probe_every or 1, seeds={"seed": recipe.seed}, compiled=recipe.compile)
        if restart:
            tqdm.write(f"no checkpoint in {out}: that run stopped before its first one; running it again from "
                       f"step 0 into {recording}")
            recorder.restart()
    trainer = ImageNetTrainer(model, optimizer, schedule, lr_scheduler=lr_scheduler, recorder=recorder,
                              config=config, recipe=recipe, worker=worker, train=train, checkpoint_key=key)
    if state is not None:
        if changed and worker.main:
            tqdm.write(
                "resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            )
        trainer.resume(state)
        mirrors = trainer.schedule.mirrors
        warmups = (warmup_batches(mirrors, state["recipe"]["mirror_warmup"], saved_steps_per_epoch(train, saved_batch)),
                   warmup_batches(mirrors, recipe.mirror_warmup, len(train)))
        done = apply_changes(trainer, changed, recipe, saved_batch, warmups,
                             lambda: lr_schedule(optimizer, recipe, len(train)))
        if done and worker.main:
            tqdm.write("applied: " + "; ".join(done))
    return trainer, train, val


def main(argv: Sequence[str] | None = None, prog: str = "python -m models.imagenet") -> ImageNetTrainer:
    """Train as the command line says; returns the trainer (its net holds the final W and B)."""
    worker = start_processes()
    lock = None
    try:
        recipe = resolve(parse_args(argv, prog), worker)
        lock = lock_run(recipe, worker)
        trainer, train, val = build_trainer(recipe, worker)
        if worker.main:
            tqdm.write(f"{recipe.arch} under {recipe.rule} on {worker.world_size} x {worker.device.type}: "
                       f"{len(train)} steps per epoch of {recipe.batch_size} images, lr {recipe.lr:g}, "
                       f"{recipe.loader} loader decoding on {recipe.decode}, out {recipe.out}")
        trainer.fit(train, recipe.epochs, val)
        if trainer.progress.step != trainer.saved_at:
            trainer.save()
        return trainer
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def command(argv: Sequence[str] | None = None, prog: str = "python -m models.imagenet") -> int:
    """main() as a command: 0 when training ends, 1 with the error on stderr when a run cannot go on."""
    try:
        main(argv, prog)
    except (circuits.CircuitError, DatasetError, DivergenceError, RecordingError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(command())
