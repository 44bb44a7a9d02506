"""What a trainer refuses before it runs: an optimizer of another net, a loader it cannot go through once per
epoch, a state saved from another net or optimizer. Each is a CircuitError that names the problem."""
from __future__ import annotations

import collections.abc
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import CircuitError


def check_optimizer(optimizer: torch.optim.Optimizer, net: nn.Module, loss_fn: Callable) -> None:
    """A CircuitError if the optimizer steps parameters that are neither the net's nor the loss's own: those of
    another net (or of a copy of this one) would train nothing here, silently."""
    ours = {id(p) for p in net.parameters()}
    if isinstance(loss_fn, nn.Module):
        ours |= {id(p) for p in loss_fn.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in held if id(p) not in ours]
    if foreign:
        raise CircuitError(
            f"{len(foreign)} of the {len(held)} parameters the optimizer steps are not parameters of this net "
            f"({type(net).__name__}) or of the loss: it was built for another net, or for a copy of this one, "
            f"and would train nothing here; build it from this net's parameters(), after any copy"
        )


def check_loader(name: str, loader: Any) -> None:
    """A loader fit() can go through once per epoch: re-iterable, and not empty when it knows its length."""
    if isinstance(loader, collections.abc.Iterator):
        raise CircuitError(f"{name} is an iterator ({type(loader).__name__}): it would be empty after its first "
                           f"pass; pass something iterable afresh each epoch (a DataLoader, a list of batches)")
    if not isinstance(loader, collections.abc.Iterable) and not hasattr(loader, "__getitem__"):
        raise CircuitError(f"{name} ({type(loader).__name__}) is not iterable: pass a DataLoader or a list of batches")
    if length(loader) == 0:
        raise CircuitError(f"{name} is empty: it has no batches")


def check_state(state: Any, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A CircuitError naming every way a Trainer's `state` does not fit this net and optimizer."""
    keys = ("net", "optimizer", "scaler", "progress", "rng")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CircuitError(f"not a Trainer state: it needs the entries {list(keys)}, found {found}")
    ours = net.state_dict()
    theirs = state["net"]
    problems = [f"missing {sorted(set(ours) - set(theirs))}"] if set(ours) - set(theirs) else []
    problems += [f"unexpected {sorted(set(theirs) - set(ours))}"] if set(theirs) - set(ours) else []
    problems += [f"{k}: shape {tuple(theirs[k].shape)} in the state, {tuple(v.shape)} in the net"
                 for k, v in ours.items() if k in theirs and isinstance(v, torch.Tensor)
                 and tuple(theirs[k].shape) != tuple(v.shape)]
    groups = [len(g["params"]) for g in state["optimizer"].get("param_groups", [])]
    if groups != [len(g["params"]) for g in optimizer.param_groups]:
        problems.append(f"the optimizer's parameter groups hold {groups} parameters in the state, "
                        f"{[len(g['params']) for g in optimizer.param_groups]} here")
    if problems:
        raise CircuitError("this state was saved from another net or optimizer; nothing was loaded: "
                           + "; ".join(problems))


def length(loader: Iterable) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
