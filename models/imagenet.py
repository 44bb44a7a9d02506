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

Divergence: a non-finite loss, parameter or buffer stops the run with a DivergenceError naming the step (see
circuits.phases.trainer); every checkpoint is checked first, so none is ever written from a non-finite state
and the last good one survives.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR
from tqdm.auto import tqdm

import circuits
from circuits import rules
from circuits.phases.divergence import DivergenceError
from circuits.phases.progress import rng_state, set_rng_state
from circuits.phases.schedule import Schedule
from circuits.recording import RecordingError, WriterLock
from circuits.recording.recorder import Recorder

from .cli import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, option, parse, within
from .imagenet_dali import LOADERS, DaliBatches, require_dali
from .imagenet_data import Batches, DatasetError
from .imagenet_resume import apply_changes, changed_settings, check_changes, saved_steps_per_epoch, warmup_batches
from .resnet import cifar_resnet, resnet

ARCHS: dict[str, Callable[..., circuits.Circuit]] = {
    **{f"resnet{d}": functools.partial(resnet, d) for d in (18, 34, 50, 101, 152)},
    # He et al.'s CIFAR ResNets (3x3 stem, 16-64 channels): small images, smoke runs and tests
    **{f"resnet{d}": functools.partial(cifar_resnet, d, shortcut="projection") for d in (8, 20)},
}


def architecture(name: str) -> Callable[..., circuits.Circuit]:
    """The circuit builder of `--arch name`: this project's ResNet builders (ARCHS), else any torchvision
    classification model, else any timm model (timm installed), each converted by circuits.from_torch at the
    recipe's crop, in float32, untrained. A CircuitError lists what is accepted."""
    if name in ARCHS:
        return ARCHS[name]
    import torchvision
    if name in torchvision.models.list_models(module=torchvision.models):
        single = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}    # one output to learn from
        return functools.partial(_converted, lambda classes: torchvision.models.get_model(name, num_classes=classes,
                                                                                          **single))
    with contextlib.suppress(ImportError):
        import timm
        if timm.is_model(name):
            return functools.partial(_converted, lambda classes: timm.create_model(name, num_classes=classes))
    raise circuits.CircuitError(
        f"unknown arch {name!r}; accepted: {', '.join(sorted(ARCHS))} (this project's builders), any torchvision "
        f"classification model ({', '.join(torchvision.models.list_models(module=torchvision.models))}) and, with "
        f"timm installed, any timm model (timm.list_models())")


def _converted(make: Callable[[int], nn.Module], classes: int, input_shape: tuple[int, ...],
               rule: rules.FeedbackRule) -> circuits.Circuit:
    return circuits.from_torch(make(classes).train(), rule=rule, input_shape=input_shape)


REFERENCE_BATCH = 256        # the batch at which lr = 0.1 (He et al. 2016; Goyal et al. 2017)
_WM = rules.WeightMirror()


WM, KP = "weight mirror (--rule wm)", "Kolen-Pollack (--rule kp)"


@dataclass
class Recipe:
    """One ImageNet run. None means "derived": see `resolve`. Each field is a flag (models.cli)."""

    data: str = option(help="folder with train/ and val/ folders of class subfolders of JPEGs")
    arch: str = option("resnet50", f"{', '.join(sorted(ARCHS))} (this project's builders), any torchvision "
                                   f"classification model, or any timm model (with timm installed)")
    rule: str = option("bp", "feedback rule of every synaptic projection", choices=lambda: list(rules.RULES))
    epochs: int = option(90, type=POSITIVE_INT)
    batch_size: int = option(256, "global batch, split evenly over the processes", type=POSITIVE_INT)
    lr: float | None = option(None, "None: 0.1 x batch-size / 256", type=POSITIVE)
    momentum: float = option(0.9, type=within(0, 1))
    weight_decay: float = option(1e-4, type=NON_NEGATIVE)
    lr_schedule: str = option("step", choices=("step", "cosine"))
    milestones: tuple[int, ...] = option((30, 60), "epochs at which 'step' multiplies lr by 0.1 (none: no drops)",
                                           type=COUNT, empty=True)
    warmup_epochs: float | None = option(None, "None: 5 if batch-size > 256 else 0; the warm-up rises from lr x 256 "
                                               "/ batch-size, so it needs a batch above 256", type=NON_NEGATIVE)
    image_size: int = option(224, "training and evaluation crop (at least 8: the CIFAR ResNets halve it twice)",
                             type=within(8, kind=int))
    loader: str = option("torch", "torch: DataLoader workers (models.imagenet_data); dali: an NVIDIA DALI pipeline "
                                  "(models.imagenet_dali, the dali extra), the same crops", choices=("torch", "dali"))
    decode: str | None = option(None, "None: device on CUDA, else cpu", choices=("cpu", "device"))
    workers: int | None = option(None, "DataLoader workers per process (None: this process's share of the CPUs)",
                                 type=COUNT)
    amp: bool | None = option(None, "bf16 autocast (None: on CUDA)")
    channels_last: bool | None = option(None, "None: on CUDA")
    compile: bool = option(False, "torch.compile the net (and the recorder's alignment metrics)")
    seed: int = 0
    deterministic: bool = option(False, "deterministic kernels (slower on GPU)")
    out: str | None = option(None, "run folder (checkpoint.pt); None: runs/imagenet-ARCH-RULE")
    checkpoint_every: int = option(1000, "learning steps between checkpoints", type=POSITIVE_INT)
    resume: bool = option(False, "continue the run saved in OUT/checkpoint.pt")
    progress: bool = True
    record: bool = option(True, "record to OUT/run.h5 (circuits.recording.recorder.Recorder), rank 0")
    record_every: int = option(10, "ticks (learning steps and mirror batches) between recorded rows",
                               type=POSITIVE_INT)
    probe_every: int = option(1000, "learning steps between recorded error/update angles to backprop on a fixed "
                                    "val batch (0: never)", type=COUNT)
    # the weight mirror: circuits.rules.WeightMirror's defaults; the authors' cadence
    wm_sigma: float = option(_WM.sigma, "noise standard deviation", type=POSITIVE, group=WM)
    wm_eta: float = option(_WM.eta, "eta_B, B's Hebbian learning rate", type=POSITIVE, group=WM)
    wm_decay: float = option(_WM.decay, "lambda_B, B's decay per mirror batch", type=within(0, 1), group=WM)
    wm_noise: str = option(_WM.noise, choices=("gaussian", "uniform"), group=WM)
    mirror_batch_size: int | None = option(None, "noise samples per mirror batch (None: the per-process training "
                                                 "batch)", type=POSITIVE_INT, group=WM)
    mirror_every: int = option(1, "learning steps between mirror batches", type=POSITIVE_INT, group=WM)
    mirror_warmup: int | None = option(None, "mirror batches before learning (None: one epoch's worth of steps)",
                                       type=COUNT, group=WM)
    mirror_beside: bool = option(False, "run each mirror batch on a CUDA side stream beside the next forward pass "
                                        "(circuits.phases.mirror_stream; the same numbers as the serial order)",
                                 group=WM)
    kp_decay: float = option(0.0, "decay of W and B beyond --weight-decay, which already applies to both",
                             type=NON_NEGATIVE, group=KP)

    @property
    def checkpoint_key(self) -> dict[str, Any]:
        """What a checkpoint must share with this recipe to be continued by it (and the data's number of classes)."""
        return {"arch": self.arch, "rule": self.rule, "image_size": self.image_size}


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m models.imagenet") -> Recipe:
    """The command line into a Recipe (flags are the field names with dashes)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return parse(Recipe, argv, p)[0]


# --- distributed set-up ------------------------------------------------------------------------
@dataclass(frozen=True)
class Worker:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or a lone process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


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


# --- the recipe, resolved -----------------------------------------------------------------------
def resolve(recipe: Recipe, worker: Worker) -> Recipe:
    """Fill the derived defaults (None fields) and check the recipe; a CircuitError names any problem."""
    cuda = worker.device.type == "cuda"
    architecture(recipe.arch)       # a CircuitError listing what is accepted
    if recipe.batch_size % worker.world_size:
        raise circuits.CircuitError(
            f"batch size {recipe.batch_size} does not split evenly over {worker.world_size} processes"
        )
    if recipe.loader not in LOADERS:
        raise circuits.CircuitError(f"loader must be 'torch' or 'dali', got {recipe.loader!r}")
    if recipe.loader == "dali":
        require_dali()
    if recipe.lr_schedule not in ("step", "cosine"):
        raise circuits.CircuitError(f"lr schedule must be 'step' or 'cosine', got {recipe.lr_schedule!r}")
    for name in ("epochs", "batch_size", "image_size", "checkpoint_every", "mirror_every", "record_every",
                 "lr", "mirror_batch_size"):
        if getattr(recipe, name) is not None and not getattr(recipe, name) > 0:
            raise circuits.CircuitError(f"{name} must be positive, got {getattr(recipe, name)}")
    for name in ("probe_every", "workers", "warmup_epochs", "mirror_warmup"):
        if getattr(recipe, name) is not None and not getattr(recipe, name) >= 0:
            raise circuits.CircuitError(f"{name} must be 0 or more, got {getattr(recipe, name)}")
    if recipe.warmup_epochs and recipe.batch_size <= REFERENCE_BATCH:
        raise circuits.CircuitError(
            f"warm-up of {recipe.warmup_epochs:g} epochs at batch size {recipe.batch_size}: the warm-up rises from "
            f"lr x {REFERENCE_BATCH} / batch size (Goyal et al.), which is the full lr at batches up to "
            f"{REFERENCE_BATCH}, so it would do nothing; drop --warmup-epochs, or use a batch size above "
            f"{REFERENCE_BATCH}"
        )
    workers = recipe.workers
    if workers is None:
        workers = max(1, len(os.sched_getaffinity(0)) // worker.local_world_size - 1)
    return dataclasses.replace(
        recipe,
        lr=recipe.lr if recipe.lr is not None else 0.1 * recipe.batch_size / REFERENCE_BATCH,
        warmup_epochs=(
            recipe.warmup_epochs
            if recipe.warmup_epochs is not None
            else (5.0 if recipe.batch_size > REFERENCE_BATCH else 0.0)
        ),
        decode=recipe.decode or ("device" if cuda else "cpu"),
        workers=workers,
        amp=cuda if recipe.amp is None else recipe.amp,
        channels_last=cuda if recipe.channels_last is None else recipe.channels_last,
        out=recipe.out or f"runs/imagenet-{recipe.arch}-{recipe.rule}",
        mirror_batch_size=(
            recipe.mirror_batch_size if recipe.mirror_batch_size is not None else recipe.batch_size // worker.world_size
        ),
    )


def feedback_rule(recipe: Recipe) -> rules.FeedbackRule:
    """The rule named by the recipe, with its parameters."""
    return rules.get(recipe.rule, {"kp": {"decay": recipe.kp_decay},
                                   "wm": {"sigma": recipe.wm_sigma, "eta": recipe.wm_eta, "decay": recipe.wm_decay,
                                          "noise": recipe.wm_noise}})


def lr_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int) -> LRScheduler:
    """Per-step learning rate: linear warm-up from lr x 256 / batch (Goyal et al.), then step or cosine."""
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    total = recipe.epochs * steps_per_epoch
    if recipe.lr_schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    else:
        main = MultiStepLR(optimizer, [m * steps_per_epoch - warmup for m in recipe.milestones], gamma=0.1)
    if not warmup:
        return main
    start = min(1.0, REFERENCE_BATCH / recipe.batch_size)
    return SequentialLR(optimizer, [LinearLR(optimizer, start, 1.0, total_iters=warmup), main], milestones=[warmup])


# --- checkpoints ------------------------------------------------------------------------------
def load_checkpoint(path: Path, key: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A checkpoint's contents, or a CircuitError if it is not one or belongs to another run
    (another architecture, rule, crop size or number of classes: `key`, the recipe's checkpoint_key)."""
    if not path.is_file():
        raise circuits.CircuitError(f"--resume: there is no checkpoint {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises OSError, EOFError, RuntimeError, UnpicklingError...
        why = ("it holds objects other than tensors and plain values" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no data'}")
        raise circuits.CircuitError(
            f"{path} cannot be read as a checkpoint: it is truncated, damaged or not a checkpoint "
            f"of models.imagenet ({why}); move it away to run again from step 0, "
            f"or choose another --out"
        ) from None
    if not isinstance(state, dict) or "checkpoint_key" not in state or "trainer" not in state:
        raise circuits.CircuitError(f"{path} is not an ImageNet checkpoint of models.imagenet")
    theirs, ours = state["checkpoint_key"], key
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs.get(k)!r} (this run: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k])
        raise circuits.CircuitError(f"checkpoint {path} belongs to another run: {diff}")
    return state


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save into PATH.partial, then an atomic rename. A write the disk has no room for (torch: "[enforce fail
    at inline_container.cc] unexpected pos", or ENOSPC / EFBIG / EDQUOT) removes the .partial and raises an OSError
    saying so; the previous checkpoint is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    try:
        torch.save(state, partial)
    except (OSError, RuntimeError) as e:
        partial.unlink(missing_ok=True)
        code = getattr(e, "errno", None)
        if "unexpected pos" not in str(e) and code not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        kept = f"the previous checkpoint {path} is kept" if path.is_file() else "no checkpoint was written before"
        raise OSError(code or errno.ENOSPC, (
            f"writing checkpoint {path} failed: the disk is full (or a file size limit was reached; "
            f"{shutil.disk_usage(path.parent).free} bytes free there); {kept} and the partial file was removed; "
            f"free some space and run again with --resume. torch said: {str(e).splitlines()[0][:200]}")) from e
    os.replace(partial, path)


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


def lock_run(recipe: Recipe, worker: Worker) -> WriterLock | None:
    """Rank 0: the run folder's lock (OUT/checkpoint.pt.lock), or a CircuitError naming the process that holds it."""
    out = Path(recipe.out)
    if not worker.main:
        return None
    if recipe.resume and not out.is_dir():
        raise circuits.CircuitError(f"--resume: there is no checkpoint {out / 'checkpoint.pt'} (no folder {out})")
    out.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(out / "checkpoint.pt.lock")
    holder = lock.acquire()
    if holder is not None:
        raise circuits.CircuitError(f"{out} is in use by another run ({holder}): one process writes a run folder at "
                                    f"a time; wait for it to end or stop it, or choose another --out")
    return lock


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
