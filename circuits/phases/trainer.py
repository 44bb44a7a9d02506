"""The trainer: runs a circuit through its schedule of learning and mirror phases.

One learning step: a data batch forward, the loss's error back through every B (the circuit's
backward pass), then the optimizer step on W (and on B under Kolen-Pollack). One mirror batch:
circuits.phases.mirror.mirror_step, no data. Between epochs: the schedule's sleep phase, the
learning-rate schedule, evaluation. The trainer calls its recorder (rank 0 only) through
begin / step / evaluate / close, and saves everything needed to resume in state_dict().

Divergence: every learning step folds "is the loss finite?" and "is the input batch finite?" into flags on
the device (no host sync); every `check_every` learning steps, at the end of each epoch and of fit(),
check_finite() reads them together with "is every parameter and buffer finite?" (one host sync) and raises a
DivergenceError naming the first non-finite step, the non-finite parameters and buffers (batch-norm running
statistics count as state), and then the non-finite input batch if there was one, else the populations whose
activity or error is non-finite on the last batch. With nonfinite="skip" a step whose input, loss, gradient
or buffers are not finite is skipped instead: no optimizer step, as torch's GradScaler does, and the buffers
its forward pass changed are restored.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import CircuitError
from ..graph.network import unwrap
from .checks import check_loader, check_optimizer, check_state, length
from .divergence import NONE, DivergenceError, all_finite, data_message, diagnose, first_nonfinite_example, message
from .mirror import mirrored
from .mirror_stream import MirrorStream, check_beside
from .progress import Progress, rng_state, set_rng_state
from .schedule import Learn, Mirror, Repeat, Schedule

METRICS = ("loss", "top1", "top5")
"""What Trainer.evaluate returns (top1 and top5 only for class targets)."""
AMP_DTYPES = ("bfloat16", "float16")
"""The dtypes torch.autocast runs in (TrainerConfig.amp_dtype)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass
class TrainerConfig:
    """How to run steps: device, mixed precision, memory format, progress bar, learning-rate cadence."""

    device: str | None = None          # default: where the net's parameters are
    amp_dtype: str | None = None       # "bfloat16" or "float16" autocast; None for full precision
    channels_last: bool = False
    lr_per_step: bool = False          # step the lr scheduler after every learning step, else every epoch
    progress: bool = True
    check_every: int = 50              # learning steps between reads of the finite-loss flag (one host sync)
    nonfinite: str = "raise"           # a non-finite loss or gradient: "raise" DivergenceError, or "skip" the step
    mirror_beside_learning: bool = False   # a mirror batch may run beside the next forward (phases.mirror_stream)
    extra: dict[str, Any] = field(default_factory=dict)   # recorded with the run

    def __post_init__(self) -> None:
        if not isinstance(self.check_every, int) or isinstance(self.check_every, bool) or self.check_every < 1:
            raise CircuitError(
                f"TrainerConfig(check_every={self.check_every!r}) must be a positive number of learning steps"
            )
        if self.nonfinite not in ("raise", "skip"):
            raise CircuitError(f"TrainerConfig(nonfinite={self.nonfinite!r}) must be 'raise' or 'skip'")
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise CircuitError(f"TrainerConfig(amp_dtype={self.amp_dtype!r}) must be one of {list(AMP_DTYPES)} "
                               f"(torch.autocast runs in those) or None for full precision")


class Trainer:
    """Trains `net` (a CircuitNet, optionally wrapped in DistributedDataParallel or torch.compile)."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule | None = None, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 recorder: Any = None, config: TrainerConfig | None = None,
                 hooks: Iterable[Callable[[Trainer], None]] = ()) -> None:
        self.net, self.circuit_net = net, unwrap(net)
        self.seeded = getattr(self.circuit_net, "is_seed_batch", False)   # seeds batched: circuits.graph.seeds
        check_optimizer(optimizer, self.circuit_net, loss_fn)
        self.optimizer, self.lr_scheduler, self.loss_fn = optimizer, lr_scheduler, loss_fn
        self.schedule = schedule if schedule is not None else Schedule(Repeat(Learn(1)))
        self.schedule.check(self.circuit_net)
        self.config = config or TrainerConfig()
        self.device = (
            torch.device(self.config.device) if self.config.device else next(self.circuit_net.parameters()).device
        )
        self.amp_dtype = getattr(torch, self.config.amp_dtype) if self.config.amp_dtype else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._mirrors = MirrorStream(self.device, beside=self.config.mirror_beside_learning)
        if self.config.mirror_beside_learning:
            check_beside(mirrored(self.circuit_net))
        self.recorder = recorder if _rank() == 0 else None
        self.hooks = list(hooks)   # called after each learning step, once every counter has moved on
        self._recording = False     # the recorder records inside fit() only
        self._stop = False
        self.progress = Progress()   # where the run stands: what a checkpoint keeps to resume it
        self._first_nonfinite = torch.full((), NONE, dtype=torch.int64, device=self.device)
        # the first learning step whose input batch was non-finite, and that batch's first non-finite example
        self._first_bad_data = torch.tensor([NONE, -1], dtype=torch.int64, device=self.device)
        self._last_batch: tuple[Tensor, Tensor] | None = None   # for the diagnosis of a divergence

    # --- single events -----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def learn(self, inputs: Tensor, target: Tensor) -> Tensor:
        """One learning step on a batch; returns the loss (a tensor: no host sync, except every
        `check_every` steps and, with nonfinite="skip", once per step). Seeds batched: inputs and targets have the
        seed axis first, and the loss is each seed's, (S,)."""
        lr = self.optimizer.param_groups[0]["lr"]          # the rate this step uses, recorded as such
        inputs, target = self._to_device(inputs), target.to(self.device, non_blocking=True)
        self._last_batch = (inputs, target)
        skip = self.config.nonfinite == "skip"
        buffers = [(b, b.clone()) for b in self.circuit_net.buffers()] if skip else []   # restored if skipped
        bad_example = first_nonfinite_example(*(t.flatten(0, 1) for t in (inputs, target)) if self.seeded
                                              else (inputs, target))
        with self.autocast():
            out = self.net(inputs)
            # seeds batched: each seed's loss, (S,); their sum gives each copy its own run's gradient
            loss = self.circuit_net.losses(self.loss_fn, out, target) if self.seeded else self.loss_fn(out, target)
        total = loss.sum() if self.seeded else loss
        self.optimizer.zero_grad(set_to_none=True)
        self.join_mirror()          # the backward reads B
        self.scaler.scale(total).backward()
        self.progress.step += 1
        reason = self._skip_reason(loss, bad_example) if skip else None
        if reason is not None:
            with torch.no_grad():   # the forward's running statistics: a skipped step leaves no trace
                for b, saved in buffers:
                    b.copy_(saved)
            self.progress.skipped_steps += 1
            warnings.warn(f"learning step {self.progress.step}: {reason}, step skipped "
                          f"({self.progress.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=2)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if not skip:     # the first non-finite step and the first non-finite batch, kept on the device
                step = torch.where(torch.isfinite(total.detach()), NONE, self.progress.step)
                torch.minimum(self._first_nonfinite, step, out=self._first_nonfinite)
                data = torch.stack([torch.where(bad_example < 0, NONE, self.progress.step), bad_example])
                self._first_bad_data = torch.where(data[0] < self._first_bad_data[0], data, self._first_bad_data)
        if self.lr_scheduler is not None and self.config.lr_per_step:
            self.lr_scheduler.step()
        self.progress.examples += target.shape[1] if self.seeded else len(target)    # per seed
        self._record("learn", loss.detach(), lr)
        if self.progress.step % self.config.check_every == 0:
            self.check_finite()
        return loss.detach()

    def mirror(self, phase: Mirror) -> None:
        """One mirror batch of `phase`: noise in, B learns; W, batch norm and the optimizer untouched.

        With config.mirror_beside_learning it may still be running when this returns: join_mirror() before
        reading B (the trainer does, before a backward, a recorded row, a check or a state_dict)."""
        def batch() -> None:
            with self.autocast():
                phase.step(self.net)

        self._mirrors.launch(batch)
        if self._recording:         # a recorder reads B at the ticks it records (any tick, if it does not say)
            records = getattr(self.recorder, "records", None)
            if records is None or records(self.progress.tick):
                self.join_mirror()
        self._record("mirror", None, self.optimizer.param_groups[0]["lr"])

    def join_mirror(self) -> None:
        """Let every mirror batch started so far finish before what comes next reads B (no host sync)."""
        self._mirrors.join()

    def _record(self, phase: str, loss: Tensor | None, lr: float) -> None:
        if self._recording:
            progress = self.progress
            self.recorder.step(progress.tick, step=progress.step, phase=phase, loss=loss, lr=lr,
                               examples=progress.examples, net=self.circuit_net)
        self.progress.tick += 1

    # --- non-finite numbers -------------------------------------------------------------------
    def _skip_reason(self, loss: Tensor, bad_example: Tensor) -> str | None:
        """Why this step is to be skipped, None if its input, loss, gradients and buffers are finite (one host
        sync; under fp16 the GradScaler judges the gradients itself). Every process agrees under
        torch.distributed."""
        tensors = [loss.detach(), *(b for b in self.circuit_net.buffers() if b.is_floating_point())]
        if not self.scaler.is_enabled():
            tensors += [p.grad for p in self.circuit_net.parameters() if p.grad is not None]
        data_finite = bad_example < 0
        state = torch.stack([all_finite(tensors, self.device) & data_finite, data_finite, bad_example]).to(torch.int64)
        if _distributed():
            dist.all_reduce(state, op=dist.ReduceOp.MIN)
        finite, data_finite, example = state.tolist()
        if finite:
            return None
        if not data_finite:
            return data_message(self.progress.step, None if _distributed() else example)
        return "non-finite loss, gradient or buffer"

    def check_finite(self) -> None:
        """Raise DivergenceError if a learning step's loss was non-finite or a parameter or buffer is (one host
        sync); the error names the first non-finite input batch, if there was one, as the cause.

        fit() calls this every `check_every` learning steps and at the end of each epoch; call it before
        saving a checkpoint, so that no checkpoint is written from a diverged state (buffers included).
        """
        self.join_mirror()
        parameters = list(self.circuit_net.named_parameters())
        buffers = [(n, b) for n, b in self.circuit_net.named_buffers() if b.is_floating_point()]
        bad_state = ~all_finite((t.detach() for _, t in parameters + buffers), self.device)
        state = torch.cat([torch.stack([self._first_nonfinite, bad_state.to(torch.int64).neg()]), self._first_bad_data])
        if _distributed():
            dist.all_reduce(state, op=dist.ReduceOp.MIN)
        first, bad, data_step, example = state.tolist()
        if first == NONE and not bad:
            return
        names, buffer_names = self._nonfinite()
        step = None if first == NONE else first
        data_step = None if data_step == NONE else data_step
        cause = data_step is not None and (step is None or data_step <= step)     # not a batch after the loss's NaN
        data = data_message(data_step, None if _distributed() else example) if cause else None
        diagnosis = [] if data is not None else self._diagnose()
        raise DivergenceError(
            message(step, self.progress.step, names, len(parameters), buffer_names, data, diagnosis,
                    self.config.check_every),
            step, names, buffer_names, data_step,
        )

    def _nonfinite(self) -> tuple[list[str], list[str]]:
        """The names of the non-finite parameters and buffers (seeds batched: each copy's, with its seed)."""
        copies = zip(self.circuit_net.seeds, self.circuit_net.nets) if self.seeded else [(None, self.circuit_net)]
        names: tuple[list[str], list[str]] = ([], [])
        for seed, net in copies:
            where = "" if seed is None else f" (seed {seed})"
            names[0].extend(n + where for n, p in net.named_parameters() if not bool(torch.isfinite(p.detach()).all()))
            names[1].extend(n + where for n, b in net.named_buffers()
                            if b.is_floating_point() and not bool(torch.isfinite(b).all()))
        return names

    def _diagnose(self) -> list[str]:
        """Which populations' activity and error are non-finite on the last batch (seeds batched: in the first
        copy that has a non-finite parameter or buffer, on its own slice of the batch)."""
        if not self.seeded or self._last_batch is None:
            return diagnose(self.circuit_net, self.loss_fn, self._last_batch, self.autocast)
        for s, (seed, net) in enumerate(zip(self.circuit_net.seeds, self.circuit_net.nets, strict=True)):
            if not bool(all_finite([t.detach() for t in [*net.parameters(), *net.buffers()]
                                    if t.is_floating_point()], self.device)):
                batch = tuple(t[s] for t in self._last_batch)
                return [f"seed {seed}: {line}" for line in diagnose(net, self.loss_fn, batch, self.autocast)]
        return []

    # --- epochs ----------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, epochs: int, val_loader: Iterable | None = None) -> list[dict[str, float]]:
        """Run the schedule over `epochs` passes of the data (or until the schedule ends).

        Returns the evaluation metrics of each epoch (empty dicts without a val_loader). A hook
        that calls stop() ends it after the current learning step, mid-epoch; the state then resumes there.
        The recorder is closed on the way out, also when an error ends the run.
        """
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise CircuitError(
                f"fit(epochs={epochs!r}): epochs must be a positive integer (whole passes over the data)"
            )
        for name, loader in (("train_loader", train_loader), ("val_loader", val_loader)):
            if loader is not None:
                check_loader(name, loader)
        if self.recorder is not None:
            if val_loader is not None and hasattr(self.recorder, "check_metrics"):
                self.recorder.check_metrics(METRICS)      # before the first step, not after the first epoch
            self.recorder.begin(self.circuit_net, self.describe())
            self._recording = True
        try:
            return self._fit(train_loader, epochs, val_loader)
        finally:
            self.join_mirror()
            if self._recording:
                self._recording = False
                self.recorder.close()

    def _fit(self, train_loader: Iterable, epochs: int, val_loader: Iterable | None) -> list[dict[str, float]]:
        history, self._stop = [], False
        self.net.train()
        while self.progress.epoch < epochs and not self.progress.finished and not self._stop:
            self._epoch(train_loader)
            if self._stop:
                break
            self.check_finite()
            self.end_epoch()
            metrics = self.evaluate(val_loader) if val_loader is not None else {}
            history.append(metrics)
            self.epoch_done(metrics)
        self.check_finite()
        return history

    def _epoch(self, train_loader: Iterable) -> None:
        """The schedule's events, from where it stands, until the epoch's data is spent (the learning step
        that found no batch waits for the next epoch), the schedule ends (`finished`) or a hook calls stop()."""
        progress = self.progress
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(progress.epoch)
        batches = itertools.islice(iter(train_loader), progress.batch_in_epoch, None)     # a resumed epoch goes on
        bar = tqdm(total=length(train_loader), initial=progress.batch_in_epoch, desc=f"epoch {progress.epoch}",
                   disable=not self.config.progress or _rank() != 0, leave=False)
        for event in self.schedule.events(progress.position):
            if isinstance(event, Mirror):
                self.mirror(event)
                progress.position += 1
                continue
            batch = next(batches, None)
            if batch is None:
                break
            loss = self.learn(*batch)
            progress.position += 1
            progress.batch_in_epoch += 1
            bar.update()
            if progress.step % 50 == 0 and not bar.disable:     # reading the loss waits for the device
                bar.set_postfix(loss=f"{float(loss.mean()):.4f}")
            for hook in self.hooks:
                hook(self)
            if self._stop:
                break
        else:
            progress.finished = True
        bar.close()

    def epoch_done(self, metrics: dict[str, float]) -> None:
        """Called by fit() after each epoch's end and evaluation (its row recorded): for subclasses,
        e.g. to checkpoint there, so that a resumed run keeps the epoch's evaluation."""

    def stop(self) -> None:
        """Ask fit() to return after the current learning step (for hooks: a time limit, a signal)."""
        self._stop = True

    def end_epoch(self) -> None:
        """Sleep (mirror-only) phase, epoch-wise learning-rate step, epoch counter."""
        if self.schedule.sleep is not None:
            for _ in range(self.schedule.sleep.batches):
                self.mirror(self.schedule.sleep)
        if self.lr_scheduler is not None and not self.config.lr_per_step:
            self.lr_scheduler.step()
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float] | list[dict[str, float]]:
        """Loss (the trainer's loss_fn, averaged over examples), top-1 and top-5 accuracy on held-out data
        (summed over ranks under torch.distributed). Accuracies need class targets: class indices, or
        one-hot / soft labels shaped like the output; for other targets only the loss is returned. Seeds
        batched: the loader's batches (without a seed axis) go to every copy, and each seed's metrics come in
        a list, in the order of the seeds."""
        self.net.eval()
        copies = len(self.circuit_net) if self.seeded else 1
        totals = torch.zeros(copies, 4, device=self.device, dtype=torch.float64)   # loss sum, top1, top5, examples
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):    # the run's random stream untouched (a loader's seed draw)
            for inputs, target in loader:
                inputs, target = self._to_device(inputs), target.to(self.device, non_blocking=True)
                with self.autocast():
                    out = self.net(inputs)
                self._count(totals, out, target)
        if _distributed():
            dist.all_reduce(totals)
        if not totals[:, 3].any():
            raise CircuitError("evaluate: the validation loader yielded no examples (an empty data set, or an "
                               "iterator already exhausted)")
        metrics = [{"loss": loss / n, "top1": top1 / n, "top5": top5 / n} if not math.isnan(top1)  # NaN: no classes
                   else {"loss": loss / n} for loss, top1, top5, n in totals.tolist()]
        result = metrics if self.seeded else metrics[0]
        if self._recording:
            self.recorder.evaluate(self.progress.step, result)
        self.net.train()
        return result

    def _count(self, totals: Tensor, out: Tensor, target: Tensor) -> None:
        """Add one batch's loss sum, top-1 and top-5 hits (NaN if its targets are not classes) and examples to each
        copy's row of `totals`."""
        for k, copy in enumerate(out.unbind(0) if self.seeded else [out]):
            hits = torch.full((2,), float("nan"), device=self.device, dtype=torch.float64)
            labels = _class_labels(copy, target)
            if labels is not None:
                hit = copy.topk(min(5, copy.shape[1]), dim=1).indices.eq(labels[:, None])
                hits = torch.stack([hit[:, :1].sum().double(), hit.sum().double()])
            copy = copy.to(torch.promote_types(copy.dtype, torch.float32))       # never narrowing float64
            loss = (self.loss_fn(copy, target).double() * len(target))[None]
            totals[k] += torch.cat([loss, hits, torch.tensor([float(len(target))], dtype=torch.float64,
                                                             device=self.device)])

    # --- description and resume ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The run's configuration, for the recorder."""
        return {
            "trainer": asdict(self.config),
            "schedule": repr(self.schedule),
            "optimizer": type(self.optimizer).__name__,
            "optimizer_defaults": {
                k: v for k, v in self.optimizer.defaults.items() if isinstance(v, (int, float, str, bool))
            },
            "loss_fn": getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
            "rules": {name: repr(s.rule) for name, s in self.circuit_net.projections()},
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run: net, optimizer, schedules, progress, RNG, recorder."""
        self.join_mirror()
        state = {
            "net": self.circuit_net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": self.progress.state_dict(),
            "rng": rng_state(),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.recorder is not None:
            state["recorder"] = self.recorder.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run `state` came from. Everything is checked before anything is loaded: a state
        of another net or optimizer raises a CircuitError and leaves this trainer as it was."""
        check_state(state, self.circuit_net, self.optimizer)
        self.join_mirror()          # no mirror batch launched before may write B after the load
        if self.recorder is not None and "recorder" in state:
            self.recorder.load_state_dict(state["recorder"])
        self.circuit_net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state["progress"])
        set_rng_state(state["rng"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])


def _class_labels(out: Tensor, target: Tensor) -> Tensor | None:
    """The class index of each example if `target` names classes (indices, or labels shaped like `out`)."""
    if out.dim() != 2:
        return None
    if target.dim() == 1 and not target.is_floating_point() and not target.is_complex():
        return target
    if target.shape == out.shape and target.is_floating_point():
        return target.argmax(1)
    return None
