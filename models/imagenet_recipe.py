"""What an ImageNet run of models.imagenet is: the architectures it accepts (ARCHS, `architecture`: this project's
ResNets, any torchvision classification model, any timm model), the Recipe (every flag, None meaning "derived"),
the process it runs in (Worker), and the recipe resolved and checked for that process (`resolve`: lr scaled
linearly with the batch, Goyal et al.'s warm-up, loader, decoding and precision by device), with the feedback rule
and the per-step lr schedule it names. See models.imagenet for the recipe's sources.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR

import circuits
from circuits import rules

from .cli import COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, option, within
from .imagenet_dali import LOADERS, require_dali
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


WM, KP, IA = "weight mirror (--rule wm)", "Kolen-Pollack (--rule kp)", "Kunin et al.'s IA (--rule ia)"


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
    ia_sub_batch: int | None = option(None, "examples of each per-process batch that IA's primitives read, drawn at "
                                            "random (InformationAlignment.sub_batch: an unbiased estimate of B's "
                                            "gradient at about that fraction of its cost); None: the whole batch",
                                      type=POSITIVE_INT, group=IA)

    @property
    def checkpoint_key(self) -> dict[str, Any]:
        """What a checkpoint must share with this recipe to be continued by it (and the data's number of classes)."""
        return {"arch": self.arch, "rule": self.rule, "image_size": self.image_size}


# --- the process it runs in (models.imagenet.start_processes) ----------------------------------
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
                                          "noise": recipe.wm_noise},
                                   "ia": {"sub_batch": recipe.ia_sub_batch}})


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
