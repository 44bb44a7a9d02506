"""Recording seeds batched: one file per seed (circuits.graph.seeds.SeedBatch).

SeedRecorders takes one Recorder per seed and stands for them where the trainer calls one: begin binds
recorder s to seed s's own net (a CircuitNet whose parameters are views of the batch's, so every metric, probe and
snapshot is that seed's, computed as for a single-seed run) and adds the seed to the file's configuration; step
hands each its own seed's loss; evaluate each its own seed's metrics. Each file is an ordinary recording:
`analysis` reads the seeds as separate runs.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..graph.network import unwrap
from .layout import RecordingError
from .recorder import Recorder


class SeedRecorders:
    """One Recorder per seed of a SeedBatch, in the order of its seeds."""

    def __init__(self, recorders: Sequence[Recorder]) -> None:
        self.recorders = list(recorders)

    def _per_seed(self, net: torch.nn.Module) -> list:
        batch = unwrap(net)
        if not getattr(batch, "is_seed_batch", False) or len(batch) != len(self.recorders):
            raise RecordingError(f"SeedRecorders holds {len(self.recorders)} recorders, one per seed: it records a "
                                 f"SeedBatch of as many seeds, got {type(batch).__name__}")
        return list(zip(batch.seeds, batch.nets, self.recorders, strict=True))

    def check_metrics(self, names: Sequence[str]) -> None:
        for recorder in self.recorders:
            recorder.check_metrics(names)

    def begin(self, net: torch.nn.Module, config: Mapping[str, Any]) -> None:
        """Each recorder begins on its seed's net, with the seed in its configuration."""
        for seed, copy, recorder in self._per_seed(net):
            recorder.begin(copy, {**config, "seed": seed})

    def step(self, tick: int, *, loss: Tensor | None, net: torch.nn.Module, **row: Any) -> None:
        """Each seed's row, with its own loss (loss: (S,), or None for a mirror batch)."""
        for s, (_, copy, recorder) in enumerate(self._per_seed(net)):
            recorder.step(tick, loss=None if loss is None else loss[s], net=copy, **row)

    def records(self, tick: int) -> bool:
        return any(recorder.records(tick) for recorder in self.recorders)

    def evaluate(self, step: int, metrics: Sequence[Mapping[str, float]]) -> None:
        """Each seed's metrics (Trainer.evaluate gives a list, one per seed)."""
        for recorder, seed_metrics in zip(self.recorders, metrics, strict=True):
            recorder.evaluate(step, seed_metrics)

    def close(self, finished: bool | None = None) -> None:
        errors = []
        for recorder in self.recorders:
            try:
                recorder.close(finished)
            except Exception as e:      # close the others whatever one raises, then raise it
                errors.append(e)
        if errors:
            raise errors[0]

    def flush(self) -> None:
        for recorder in self.recorders:
            recorder.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"seeds": [recorder.state_dict() for recorder in self.recorders]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["seeds"]) != len(self.recorders):
            raise RecordingError(f"this state holds {len(state['seeds'])} recorders' states, not "
                                 f"{len(self.recorders)}")
        for recorder, seed_state in zip(self.recorders, state["seeds"], strict=True):
            recorder.load_state_dict(seed_state)
