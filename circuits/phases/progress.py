"""Where a run stands: the counters a checkpoint keeps so that a resumed run goes on exactly where it stopped,
and torch's random number generators beside them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from ..errors import CircuitError


@dataclass
class Progress:
    """A run's counters. A learning step moves step, tick, examples, position and batch_in_epoch; a mirror batch
    moves tick (and position, when the schedule's stream has it); the end of an epoch moves epoch."""

    step: int = 0            # learning steps taken
    tick: int = 0            # learning steps and mirror batches taken (the recorder's row index)
    examples: int = 0        # data examples seen (this rank)
    epoch: int = 0           # epochs completed
    position: int = 0        # events of the schedule consumed: where its stream resumes (sleep batches are none)
    batch_in_epoch: int = 0  # batches of this epoch consumed: where a resumed epoch's data goes on
    finished: bool = False   # the schedule has run out of events
    skipped_steps: int = 0   # learning steps skipped for a non-finite loss or gradient (nonfinite="skip")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        if set(state) != names:
            raise CircuitError(f"a run's progress has the counters {sorted(names)}, got {sorted(state)}")
        for name, value in state.items():
            setattr(self, name, value)


def rng_state() -> dict[str, Any]:
    """torch's random number generators (CPU and every CUDA device), for a checkpoint."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
