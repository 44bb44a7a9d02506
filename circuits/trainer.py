"""The trainer: runs a circuit through its schedule of learning and mirror phases.

One learning step: a data batch forward, the loss's error back through every B (the circuit's
backward pass), then the optimizer step on W (and on B under Kolen-Pollack). One mirror batch:
circuits.mirror.mirror_step, no data. Between epochs: the schedule's sleep phase, the
learning-rate schedule, evaluation. The trainer calls its recorder (rank 0 only) through
begin / step / evaluate / close, and saves everything needed to resume in state_dict().
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .mirror import unwrap
from .schedule import Learn, Mirror, Repeat, Schedule


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class TrainerConfig:
    """How to run steps: device, mixed precision, memory format, progress bar, learning-rate cadence."""

    device: str | None = None          # default: where the net's parameters are
    amp_dtype: str | None = None       # "bfloat16" or "float16" autocast; None for full precision
    channels_last: bool = False
    lr_per_step: bool = False          # step the lr scheduler after every learning step, else every epoch
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)   # recorded with the run


class Trainer:
    """Trains `net` (a CircuitNet, optionally wrapped in DistributedDataParallel or torch.compile)."""

    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule | None = None, *,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 recorder: Any = None, config: TrainerConfig | None = None,
                 hooks: Iterable[Callable[[Trainer], None]] = ()) -> None:
        self.net, self.circuit_net = net, unwrap(net)
        self.optimizer, self.lr_scheduler, self.loss_fn = optimizer, lr_scheduler, loss_fn
        self.schedule = schedule if schedule is not None else Schedule(Repeat(Learn(1)))
        self.schedule.check(self.circuit_net)
        self.config = config or TrainerConfig()
        self.device = torch.device(self.config.device) if self.config.device else next(self.circuit_net.parameters()).device
        self.amp_dtype = getattr(torch, self.config.amp_dtype) if self.config.amp_dtype else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.recorder = recorder if _rank() == 0 else None
        self.hooks = list(hooks)   # called after each learning step, once every counter has moved on
        self._recording = False     # the recorder records inside fit() only
        self._stop = False
        self.step = 0        # learning steps taken
        self.tick = 0        # learning steps and mirror batches taken (the recorder's row index)
        self.examples = 0    # data examples seen (this rank)
        self.epoch = 0
        self.position = 0    # events of the schedule consumed
        self.batch_in_epoch = 0
        self.finished = False

    # --- single events -----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _to_device(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.config.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def learn(self, inputs: Tensor, target: Tensor) -> Tensor:
        """One learning step on a batch; returns the loss (a tensor: no host sync)."""
        inputs, target = self._to_device(inputs), target.to(self.device, non_blocking=True)
        with self.autocast():
            loss = self.loss_fn(self.net(inputs), target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lr_scheduler is not None and self.config.lr_per_step:
            self.lr_scheduler.step()
        self.step += 1
        self.examples += len(target)
        self._record("learn", loss.detach())
        return loss.detach()

    def mirror(self, phase: Mirror) -> None:
        """One mirror batch of `phase`: noise in, B learns; W, batch norm and the optimizer untouched."""
        with self.autocast():
            phase.step(self.net)
        self._record("mirror", None)

    def _record(self, phase: str, loss: Tensor | None) -> None:
        if self._recording:
            self.recorder.step(self.tick, step=self.step, phase=phase, loss=loss,
                               lr=self.optimizer.param_groups[0]["lr"], examples=self.examples, net=self.circuit_net)
        self.tick += 1

    # --- epochs ----------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, epochs: int, val_loader: Iterable | None = None) -> list[dict[str, float]]:
        """Run the schedule over `epochs` passes of the data (or until the schedule ends).

        Returns the evaluation metrics of each epoch (empty dicts without a val_loader). A hook
        that calls stop() ends it after the current learning step, mid-epoch; the state then resumes there.
        """
        if self.recorder is not None:
            self.recorder.begin(self.circuit_net, self.describe())
            self._recording = True
        history, self._stop = [], False
        self.net.train()
        events = self.schedule.events(self.position)
        while self.epoch < epochs and not self.finished and not self._stop:
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            batches = itertools.islice(iter(train_loader), self.batch_in_epoch, None)
            bar = tqdm(total=_length(train_loader), initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                       disable=not self.config.progress or _rank() != 0, leave=False)
            for event in events:
                if isinstance(event, Mirror):
                    self.mirror(event)
                    self.position += 1
                    continue
                batch = next(batches, None)
                if batch is None:                          # epoch over; this learning event waits
                    events = itertools.chain([event], events)
                    break
                loss = self.learn(*batch)
                self.position += 1
                self.batch_in_epoch += 1
                bar.update()
                if self.step % 50 == 0 and not bar.disable:     # reading the loss waits for the device
                    bar.set_postfix(loss=f"{float(loss):.4f}")
                for hook in self.hooks:
                    hook(self)
                if self._stop:
                    break
            else:
                self.finished = True
            bar.close()
            if self._stop:
                break
            self.end_epoch()
            history.append(self.evaluate(val_loader) if val_loader is not None else {})
        if self._recording:
            self.recorder.close()
            self._recording = False
        return history

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
        self.epoch += 1
        self.batch_in_epoch = 0

    @torch.no_grad()
    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy on held-out data (summed over ranks under torch.distributed)."""
        self.net.eval()
        totals = torch.zeros(4, device=self.device, dtype=torch.float64)   # loss sum, top1, top5, count
        for inputs, target in loader:
            inputs, target = self._to_device(inputs), target.to(self.device, non_blocking=True)
            with self.autocast():
                out = self.net(inputs)
            top = out.topk(min(5, out.shape[1]), dim=1).indices
            hit = top.eq(target[:, None])
            totals += torch.stack([F.cross_entropy(out.float(), target, reduction="sum").double(),
                                   hit[:, :1].sum().double(), hit.sum().double(),
                                   torch.tensor(float(len(target)), device=self.device, dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        loss, top1, top5, n = totals.tolist()
        metrics = {"loss": loss / max(n, 1), "top1": top1 / max(n, 1), "top5": top5 / max(n, 1)}
        if self._recording:
            self.recorder.evaluate(self.step, metrics)
        self.net.train()
        return metrics

    # --- description and resume ----------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The run's configuration, for the recorder."""
        return {"trainer": asdict(self.config), "schedule": repr(self.schedule),
                "optimizer": type(self.optimizer).__name__,
                "optimizer_defaults": {k: v for k, v in self.optimizer.defaults.items() if isinstance(v, (int, float, str, bool))},
                "loss_fn": getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
                "rules": {name: repr(s.rule) for name, s in self.circuit_net.projections()}}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run: net, optimizer, schedules, counters, RNG, recorder."""
        state = {"net": self.circuit_net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(),
                 "counters": {k: getattr(self, k) for k in ("step", "tick", "examples", "epoch", "position", "batch_in_epoch", "finished")},
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.recorder is not None:
            state["recorder"] = self.recorder.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.circuit_net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for k, v in state["counters"].items():
            setattr(self, k, v)
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.recorder is not None and "recorder" in state:
            self.recorder.load_state_dict(state["recorder"])


def _length(loader: Iterable) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
