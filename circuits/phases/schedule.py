"""The phase scheduler: how a circuit's life alternates between learning and mirror phases.

A Schedule is a sequence of phases. Learn(steps) takes data batches: activity forward, errors back
through B, plasticity. Mirror(batches) takes no data: noise drives each weight-mirror projection
and B learns (circuits.phases.mirror). Repeat(...) cycles its phases, forever or a number of times.
`sleep` is a mirror-only phase run between epochs.

    Schedule(Mirror(batches=200), Repeat(Learn(steps=1), Mirror(batches=1)))

A schedule unrolls into a stream of single events (one learning step or one mirror batch);
its position in that stream is what a checkpoint stores.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Union

from torch import nn

from ..errors import CircuitError
from .mirror import mirror_step, mirrored, require_mirrored


def _positive(kind: str, field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CircuitError(f"{kind}({field}={value!r}): {field} must be a positive integer")


@dataclass(frozen=True)
class Learn:
    """`steps` learning steps, one data batch each."""

    steps: int = 1

    def __post_init__(self) -> None:
        _positive("Learn", "steps", self.steps)

    def events(self) -> Iterator[Event]:
        return itertools.repeat(Learn(1), self.steps)


@dataclass(frozen=True)
class Mirror:
    """`batches` mirror batches of `batch_size` noise samples per weight-mirror projection.

    With `angle` (degrees) each projection draws instead the samples that let its B settle within
    that angle of W (circuits.phases.mirror.samples_for_angle): few for high-resolution conv layers,
    many for wide dense ones.
    """

    batches: int = 1
    batch_size: int = 128
    angle: float | None = None

    def __post_init__(self) -> None:
        _positive("Mirror", "batches", self.batches)
        _positive("Mirror", "batch_size", self.batch_size)
        if self.angle is not None and not 0 < self.angle < 90:
            raise CircuitError(f"Mirror(angle={self.angle!r}): angle must be between 0 and 90 degrees")

    def events(self) -> Iterator[Event]:
        return itertools.repeat(Mirror(1, self.batch_size, self.angle), self.batches)

    def step(self, net: nn.Module) -> None:
        """One mirror batch of this phase."""
        mirror_step(net, self.batch_size, self.angle)

    def run(self, net: nn.Module) -> None:
        """Run this mirror phase on a built net, with no data."""
        require_mirrored(net)
        for _ in range(self.batches):
            self.step(net)


Phase = Union[Learn, Mirror, "Repeat"]
Event = Union[Learn, Mirror]


@dataclass(frozen=True, init=False)
class Repeat:
    """Its phases in order, `times` times, or forever when times is None."""

    phases: tuple[Phase, ...]
    times: int | None

    def __init__(self, *phases: Phase, times: int | None = None) -> None:
        if not phases:
            raise CircuitError("Repeat() needs at least one phase")
        if times is not None:
            _positive("Repeat", "times", times)
        _check_sequence(phases, "Repeat")
        object.__setattr__(self, "phases", tuple(phases))
        object.__setattr__(self, "times", times)

    def events(self) -> Iterator[Event]:
        rounds = itertools.count() if self.times is None else range(self.times)
        return (e for _ in rounds for p in self.phases for e in p.events())


def _check_sequence(phases: tuple, where: str) -> None:
    for i, p in enumerate(phases):
        if not isinstance(p, (Learn, Mirror, Repeat)):
            raise CircuitError(f"{where}: {p!r} is not a phase (Learn, Mirror or Repeat)")
        if isinstance(p, Repeat) and p.times is None and i < len(phases) - 1:
            raise CircuitError(f"{where}: phases after an endless Repeat would never run: {phases[i + 1:]}")


def _kinds(p: Phase) -> set[type]:
    return set().union(*map(_kinds, p.phases)) if isinstance(p, Repeat) else {type(p)}


@dataclass(frozen=True, init=False)
class Schedule:
    """Phases run in order; `sleep` (a Mirror) runs after every epoch."""

    phases: tuple[Phase, ...]
    sleep: Mirror | None

    def __init__(self, *phases: Phase, sleep: Mirror | None = None) -> None:
        _check_sequence(phases, "Schedule")
        if Learn not in set().union(*map(_kinds, phases)):
            raise CircuitError("a schedule needs at least one Learn phase")
        if sleep is not None and not isinstance(sleep, Mirror):
            raise CircuitError(f"sleep must be a Mirror phase, got {sleep!r}")
        object.__setattr__(self, "phases", tuple(phases))
        object.__setattr__(self, "sleep", sleep)

    @property
    def mirrors(self) -> bool:
        """Whether any phase (or sleep) is a mirror phase."""
        return self.sleep is not None or Mirror in set().union(*map(_kinds, self.phases))

    def events(self, start: int = 0) -> Iterator[Event]:
        """The stream of single events, from position `start`."""
        return itertools.islice((e for p in self.phases for e in p.events()), start, None)

    def check(self, net: nn.Module) -> None:
        """A CircuitError if the schedule has mirror phases but the circuit no weight-mirror projection."""
        if self.mirrors:
            require_mirrored(net, "the schedule's mirror phases")


def paper_schedule(net: nn.Module, steps_per_epoch: int, batch_size: int = 128, warmup: int | None = None,
                   every: int = 1) -> Schedule:
    """The authors' cadence (Akrout et al. 2019; makrout/Deep-Learning-without-Weight-Transport, fcnn/): for
    weight-mirror circuits `warmup` mirror batches before any data (default one epoch's worth, steps_per_epoch),
    then one mirror batch after every `every` learning steps; circuits without one only learn."""
    if not mirrored(net):
        return Schedule(Repeat(Learn(1)))
    warmup = steps_per_epoch if warmup is None else warmup
    cycle = Repeat(Learn(every), Mirror(1, batch_size))
    return Schedule(Mirror(warmup, batch_size), cycle) if warmup else Schedule(cycle)
