"""Alignment statistics of recorded runs: when B aligns with W, how far it gets, and how rules compare.

The functions on Series take a dict by projection or population (run.alignment, run.errors,
run.updates) and a column ("angle" by default), and skip NaN rows (undefined angles).

A run diverged when its numbers became non-finite (divergence()): a learning step's training loss,
an evaluation's or the probe's loss, or a projection's |B| / |W| (NaN once W or B is). Its summary
then says so and at which step, and its statistics are of the rows before that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .run import Run, Series

ALIGNED_DEGREES = 10.0
"""angle(B, W) in degrees below which a projection counts as aligned: the one default of every threshold here, of
`python -m analysis report` and of the claims `python -m models.compare` checks. The paper's aligning rules end a
few degrees from W (MNIST's last layer: weight mirror 3.8°, Kolen-Pollack 3.6°) while feedback alignment's stays
near 40°; 10° tells the two apart."""


def first_below(series: Mapping[str, Series], threshold: float = ALIGNED_DEGREES,
                column: str = "angle") -> dict[str, int | None]:
    """Per name: the learning step of the first row whose `column` is below `threshold` (None: never)."""
    out = {}
    for name, s in series.items():
        below = np.flatnonzero(s[column] < threshold)
        out[name] = int(s.step[below[0]]) if len(below) else None
    return out


def final(series: Mapping[str, Series], column: str = "angle") -> dict[str, float]:
    """Per name: the last defined value of `column` (NaN if none)."""
    out = {}
    for name, s in series.items():
        values = s[column][np.isfinite(s[column])]
        out[name] = float(values[-1]) if len(values) else math.nan
    return out


def mean(series: Mapping[str, Series], column: str = "angle") -> dict[str, float]:
    """Per name: the mean of `column` over every recorded row (NaN rows skipped)."""
    out = {}
    for name, s in series.items():
        values = s[column][np.isfinite(s[column])]
        out[name] = float(values.mean()) if len(values) else math.nan
    return out


@dataclass(frozen=True)
class Divergence:
    """Where a run's numbers first became non-finite.

    step: the learning step of the first non-finite number; what: which number ("training loss",
    "|B| / |W| of fc1", ...); steps: how many learning steps had a non-finite training loss;
    recovered: whether the last recorded loss and alignment rows are finite again (non-finite steps
    skipped, as with TrainerConfig(nonfinite="skip")), so that the run did not end diverged.
    """

    step: int
    what: str
    steps: int
    recovered: bool

    def describe(self) -> str:
        """'diverged at learning step 10: non-finite training loss', or what happened before it recovered."""
        if self.recovered:
            return (f"had a non-finite {self.what} at learning step {self.step} ({self.steps} learning "
                    f"step{'' if self.steps == 1 else 's'} with a non-finite training loss), but its last recorded "
                    f"rows are finite")
        return f"diverged at learning step {self.step}: non-finite {self.what}"


def divergence(run: Run) -> Divergence | None:
    """The first non-finite training loss (of a learning step), evaluation or probe loss, or |B| / |W|; None if none."""
    steps = run.steps
    learn = steps["phase"] == "learn"
    loss = ("training loss", steps.step[learn], ~np.isfinite(steps["loss"][learn]))
    alignment = [(f"|B| / |W| of {name}", s.step, np.isnan(s["norm_ratio"])) for name, s in run.alignment.items()]
    others = [(name, table.step, ~np.isfinite(table["loss"]))
              for table, name in ((run.evaluations, "evaluation loss"), (run.probe, "probe loss"))
              if "loss" in table.columns]
    found = [(int(step[bad][0]), what) for what, step, bad in [loss, *alignment, *others] if bad.any()]
    if not found:
        return None
    step, what = min(found, key=lambda f: f[0])
    last_rows_bad = [bad[-1] for _, _, bad in [loss, *alignment] if len(bad)]
    return Divergence(step, what, int(loss[2].sum()), recovered=not any(last_rows_bad))


def rows_before(s: Series, step: int) -> Series:
    """The rows of `s` of learning steps before `step`."""
    keep = s.step < step
    return Series(s.tick[keep], s.step[keep], {k: v[keep] for k, v in s.columns.items()})


def before(series: Mapping[str, Series], step: int) -> dict[str, Series]:
    """Each Series cut to its rows of learning steps before `step`."""
    return {name: rows_before(s, step) for name, s in series.items()}


def hidden_populations(run: Run) -> list[str]:
    """Populations that receive an error, without the circuit's outputs (whose error every rule shares)."""
    graph = run.circuit
    return [p for p in run.errors if graph.out_degree(p) > 0]


@dataclass(frozen=True)
class RuleSummary:
    """One rule within one run. Angles in degrees, averaged over the rule's projections; accuracies as fractions.

    final_angle: each projection's last angle(B, W); mean_angle: each projection's mean over training;
    aligned_at: the learning step by which every projection had first fallen below the threshold
    (None: some never did); error_angle: the run's last error angle against backprop, averaged over
    hidden populations (None without a probe). diverged_at: the learning step at which a run that ended
    diverged first had a non-finite number (None: it did not); every other field is then of the rows before it.
    """

    run: str
    rule: str
    projections: tuple[str, ...]
    steps: int
    top1: float | None
    top5: float | None
    final_angle: float
    mean_angle: float
    aligned_at: int | None
    error_angle: float | None
    diverged_at: int | None = None


def _average(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summarize(run: Run, threshold: float = ALIGNED_DEGREES) -> list[RuleSummary]:
    """One RuleSummary per feedback rule of `run` (one for a single-rule circuit)."""
    alignment, evaluations, errors, steps = run.alignment, run.evaluations, run.errors, run.steps
    diverged = _diverged_at(run)
    if diverged is not None:
        alignment, errors = before(alignment, diverged), before(errors, diverged)
        evaluations = rows_before(evaluations, diverged)
    finals, means, below = final(alignment), mean(alignment), first_below(alignment, threshold)
    hidden = hidden_populations(run)
    error = final({p: s for p, s in errors.items() if p in hidden and len(s)})
    last = {
        m: float(evaluations[m][-1]) if len(evaluations) and m in evaluations.columns else None
        for m in ("top1", "top5")
    }
    by_rule: dict[str, list[str]] = {}
    for projection, rule in run.rules.items():
        by_rule.setdefault(rule, []).append(projection)
    out = []
    for rule, names in by_rule.items():
        aligned = [n for n in names if n in alignment]      # angle(B, W) is not defined for direct feedback
        reached = [below[n] for n in aligned]
        out.append(RuleSummary(
            run=run.name, rule=rule, projections=tuple(names), steps=int(steps.step[-1]) if len(steps) else 0,
            top1=last["top1"], top5=last["top5"],
            final_angle=_average([finals[n] for n in aligned]), mean_angle=_average([means[n] for n in aligned]),
            aligned_at=None if None in reached else max(reached, default=None),
            error_angle=_average(list(error.values())) if error else None, diverged_at=diverged))
    return out


def _diverged_at(run: Run) -> int | None:
    """The step at which `run` diverged, if it ended diverged (not if its non-finite steps were skipped)."""
    found = divergence(run)
    return found.step if found is not None and not found.recovered else None


def _final_cell(value: float, diverged_at: int | None) -> str:
    return f"diverged at step {diverged_at}" if diverged_at is not None else _cell(value, ".2f")


def compare(runs: Sequence[Run], threshold: float = ALIGNED_DEGREES) -> list[RuleSummary]:
    """Every rule of every run, e.g. BP / FA / SS / KP / WM runs of one circuit side by side."""
    return [row for run in runs for row in summarize(run, threshold)]


def _cell(value: float | int | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(rows: Sequence[RuleSummary], threshold: float = ALIGNED_DEGREES) -> str:
    """A markdown table of RuleSummary rows (accuracies in percent, angles in degrees)."""
    lines = [f"| run | rule | projections | steps | top-1 accuracy (%) | top-5 accuracy (%) | final angle(B, W) (°) "
             f"| mean angle(B, W) (°) | all below {threshold:g}° at step | error angle vs BP (°) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.run} | {r.rule} | {len(r.projections)} | {r.steps} | "
            f"{_cell(None if r.top1 is None else 100 * r.top1, '.2f')} | "
            f"{_cell(None if r.top5 is None else 100 * r.top5, '.2f')} | {_final_cell(r.final_angle, r.diverged_at)} | "
            f"{_cell(r.mean_angle, '.2f')} | {_cell(r.aligned_at, 'd')} | {_cell(r.error_angle, '.2f')} |"
        )
    return "\n".join(lines)


def projection_markdown(run: Run, threshold: float = ALIGNED_DEGREES) -> str:
    """Per feedback projection through a B of one run: depth (of its forward projection; – for direct
    feedback), rule, final and mean angle(B, W) (– where not defined), first step below threshold (of the
    rows before its divergence, if it ended diverged)."""
    alignment, diverged = run.alignment, _diverged_at(run)
    if diverged is not None:
        alignment = before(alignment, diverged)
    finals, means, below, depth = final(alignment), mean(alignment), first_below(alignment, threshold), run.depth
    lines = [
        f"| projection | depth | rule | final angle(B, W) (°) | mean angle(B, W) (°) "
        f"| first below {threshold:g}° at step |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, rule in run.rules.items():
        final_cell = _final_cell(finals[name], diverged) if name in finals else "–"
        lines.append(
            f"| {name} | {_cell(depth.get(name), 'd')} | {rule} | {final_cell} | {_cell(means.get(name), '.2f')} "
            f"| {_cell(below.get(name), 'd')} |"
        )
    return "\n".join(lines)
