"""Divergence: a learning step whose loss, or a parameter, is no longer a finite number.

The trainer folds "is the loss finite?" into one flag on the device every learning step (no host
sync) and reads it with "is every parameter finite?" once every `check_every` steps; this module
holds what that needs, and the diagnosis added to the error: which populations' activity or error
is non-finite on the last batch.
"""
from __future__ import annotations

from typing import Callable, ContextManager, Iterable

import torch
from torch import Tensor

from ..graph.network import CircuitNet, Trace

NONE = torch.iinfo(torch.int64).max
"""'No non-finite step yet' in the device flag that keeps the first non-finite step."""


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameter. `step`: the first learning step whose loss was
    non-finite (None if only parameters are), `parameters`: the names of the non-finite parameters."""

    def __init__(self, message: str, step: int | None, parameters: list[str]) -> None:
        super().__init__(message)
        self.step, self.parameters = step, parameters


def all_finite(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    """One boolean on the device: whether every element of every tensor is finite (no host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def message(first: int | None, last_step: int, names: list[str], total: int, diagnosis: list[str],
            check_every: int) -> str:
    """The DivergenceError's text: the first non-finite step (or None), the non-finite parameters, the diagnosis."""
    parts = [f"training diverged: the loss was non-finite at learning step {first}" if first is not None
             else f"training diverged: parameters became non-finite by learning step {last_step}"]
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        parts.append(f"{len(names)} of {total} parameters are non-finite now ({shown})")
    parts += diagnosis
    parts.append(f"found at the check after step {last_step} (TrainerConfig.check_every={check_every}); lower the "
                 f"learning rate, or pass TrainerConfig(nonfinite='skip') to skip such steps")
    return "; ".join(parts)


def diagnose(net: CircuitNet, loss_fn: Callable[[Tensor, Tensor], Tensor], batch: tuple[Tensor, Tensor] | None,
             autocast: Callable[[], ContextManager]) -> list[str]:
    """Which populations' activity and error are non-finite on `batch` (the net's buffers restored)."""
    if batch is None:
        return []
    inputs, target = batch
    buffers = [(b, b.clone()) for b in net.buffers()]
    traces: dict[str, Trace] = {}
    try:
        with torch.enable_grad(), autocast():
            loss = loss_fn(net(inputs, monitor=traces), target)
        names = [p for p, t in traces.items() if t.a.requires_grad]
        errors = torch.autograd.grad(loss, [traces[p].a for p in names], allow_unused=True) if names else ()
    except Exception as e:  # noqa: BLE001 - the divergence is the error to raise; say why there is no diagnosis
        return [f"no diagnosis on the last batch ({type(e).__name__}: {e})"]
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    activity = [p for p, t in traces.items() if not bool(torch.isfinite(t.y).all())]
    error = [p for p, e in zip(names, errors, strict=True) if e is not None and not bool(torch.isfinite(e).all())]
    out = []
    if activity:
        out.append(f"on the last batch the activity is non-finite from population {activity[0]!r} on "
                   f"({len(activity)} populations)")
    if error:
        out.append(f"the error is non-finite at populations {error}")
    return out
