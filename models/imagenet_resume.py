"""Resuming an ImageNet run (models.imagenet --resume) with settings other than those it was saved with.

A checkpoint holds the optimizer's and the learning-rate scheduler's state, which would win over the command line:
a changed --lr was printed and not used. Every changed setting is now applied or refused with the reason, before
the first step (tests/test_imagenet.py):

  --lr (or the lr a new --batch-size derives), --momentum, --weight-decay: set in the optimizer.
  --batch-size, --epochs, --lr, --lr-schedule, --milestones, --warmup-epochs: the learning-rate schedule is built
      anew from the new settings and advanced to where the run stands in epochs (learning steps of the new size),
      so that what remains of it is what the new settings describe; the recording's lr column shows those rates.
  --batch-size mid-epoch: the data goes on after the examples of the epoch already seen (an epoch's order does
      not depend on the batch size: models.imagenet_data.EpochSampler); refused where they are not a whole number
      of new batches.
  the weight mirror's warm-up (--mirror-warmup, or one epoch's worth of steps by default): the saved position in
      the phase schedule moves with it; --mirror-every is refused once learning has started.
  --seed: refused, it fixes the data order that a resumed epoch replays.

Everything else is read afresh from the command line on every run (data folder, decoding, workers, precision,
compilation, checkpoint and recording cadence, the feedback rule's parameters, the mirror batch size).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from torch.optim.lr_scheduler import LRScheduler

import circuits

LR_SCHEDULE = ("lr", "batch_size", "epochs", "lr_schedule", "milestones", "warmup_epochs")
"""The settings the learning-rate schedule is built from."""
OPTIMIZER = ("momentum", "weight_decay")
RUNTIME = ("resume", "progress")
"""Settings that are not part of a run: never reported as changed."""


def changed_settings(saved: dict[str, Any], recipe: Any) -> dict[str, tuple[Any, Any]]:
    """{setting: (saved value, new value)} for every setting of the resolved `recipe` that differs from `saved`."""
    return {k: (v, getattr(recipe, k)) for k, v in saved.items()
            if k not in RUNTIME and hasattr(recipe, k) and v != getattr(recipe, k)}


def check_changes(changed: dict[str, tuple[Any, Any]], progress: dict[str, Any], saved_batch: int,
                  new_batch: int) -> None:
    """A CircuitError naming each change that cannot be applied where the run stands (`progress`: the saved
    Trainer.progress; the batches: per process, saved and new). Nothing has been loaded yet."""
    problems = []
    if "seed" in changed:
        problems.append(f"--seed {changed['seed'][0]} -> {changed['seed'][1]}: the seed fixes the data order of "
                        f"every epoch, which a resumed epoch replays up to where it stopped; resume with --seed "
                        f"{changed['seed'][0]}")
    seen = progress["batch_in_epoch"] * saved_batch
    if seen % new_batch:
        problems.append(f"--batch-size: the run is {seen} examples (per process) into epoch {progress['epoch']}, not "
                        f"a whole number of batches of {new_batch}; resume with a batch size (per process) that "
                        f"divides {seen}, or with the saved one ({saved_batch} per process) until the epoch ends")
    if "mirror_every" in changed and progress["step"] > 0:
        problems.append(f"--mirror-every {changed['mirror_every'][0]} -> {changed['mirror_every'][1]}: learning "
                        f"has started, and the saved place in the cycle of learning steps and mirror batches is "
                        f"not one of the new cycle; resume with --mirror-every {changed['mirror_every'][0]}")
    if problems:
        raise circuits.CircuitError("--resume with changed settings that cannot be applied; nothing was loaded: "
                                    + "; ".join(problems))


def apply_changes(trainer: circuits.Trainer, changed: dict[str, tuple[Any, Any]], recipe: Any, saved_batch: int,
                  warmups: tuple[int, int], make_lr_schedule: Callable[[], LRScheduler]) -> list[str]:
    """Apply the changes to a trainer that has loaded its checkpoint (check_changes passed); returns what was done,
    to print. `warmups`: the weight mirror's warm-up in mirror batches, saved and new (both 0 without a mirror)."""
    progress, train, done = trainer.progress, trainer.train, []
    new_batch = train.batch_size
    if new_batch != saved_batch and progress.batch_in_epoch:
        seen = progress.batch_in_epoch * saved_batch
        progress.batch_in_epoch = seen // new_batch
        done.append(f"the data goes on after the {seen} examples of epoch {progress.epoch} seen (per process)")
    old_warmup, new_warmup = warmups
    if old_warmup != new_warmup:
        progress.position = progress.position - old_warmup + new_warmup if progress.step else min(
            progress.position, new_warmup)
        done.append(f"the weight mirror's warm-up is {new_warmup} mirror batches ({old_warmup} before)")
    groups = trainer.optimizer.param_groups
    for name in OPTIMIZER:
        if name in changed:
            for group in groups:
                group[name] = getattr(recipe, name)
            done.append(f"{name} {getattr(recipe, name):g}")
    if any(name in changed for name in LR_SCHEDULE):
        for group in groups:
            group["lr"] = group["initial_lr"] = recipe.lr
        scheduler = make_lr_schedule()
        steps = progress.epoch * len(train) + progress.batch_in_epoch
        with warnings.catch_warnings():      # "lr_scheduler.step() before optimizer.step()": no step is taken here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                scheduler.step()
        trainer.lr_scheduler = scheduler
        done.append(f"the learning-rate schedule of the new settings, {steps} steps of {len(train)} per epoch in: "
                    f"lr {groups[0]['lr']:g} now")
    return done


def warmup_batches(mirrors: bool, warmup: int | None, steps_per_epoch: int) -> int:
    """The weight mirror's warm-up in mirror batches (circuits.paper_schedule's default: one epoch's worth)."""
    if not mirrors:
        return 0
    return steps_per_epoch if warmup is None else warmup


def saved_steps_per_epoch(train: Any, saved_batch: int) -> int:
    """Steps per epoch at the saved batch (per process) over this process's share of the data (drop_last)."""
    return len(train.sampler) // saved_batch
