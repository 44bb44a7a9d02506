"""Alignment statistics of recorded runs: when B aligns with W, how far it gets, and how rules compare.

The functions on Series take a dict by projection or population (run.alignment, run.errors,
run.updates) and a column ("angle" by default), and skip NaN rows (undefined angles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .run import Run, Series


def first_below(series: Mapping[str, Series], threshold: float, column: str = "angle") -> dict[str, int | None]:
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
    hidden populations (None without a probe).
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


def _average(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def summarize(run: Run, threshold: float = 45.0) -> list[RuleSummary]:
    """One RuleSummary per feedback rule of `run` (one for a single-rule circuit)."""
    alignment, evaluations, steps = run.alignment, run.evaluations, run.steps
    finals, means, below = final(alignment), mean(alignment), first_below(alignment, threshold)
    hidden = hidden_populations(run)
    error = final({p: s for p, s in run.errors.items() if p in hidden and len(s)})
    last = {m: float(evaluations[m][-1]) if len(evaluations) and m in evaluations.columns else None for m in ("top1", "top5")}
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
            error_angle=_average(list(error.values())) if error else None))
    return out


def compare(runs: Sequence[Run], threshold: float = 45.0) -> list[RuleSummary]:
    """Every rule of every run, e.g. BP / FA / SS / KP / WM runs of one circuit side by side."""
    return [row for run in runs for row in summarize(run, threshold)]


def _cell(value: float | int | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(rows: Sequence[RuleSummary], threshold: float = 45.0) -> str:
    """A markdown table of RuleSummary rows (accuracies in percent, angles in degrees)."""
    lines = [f"| run | rule | projections | steps | top-1 accuracy (%) | top-5 accuracy (%) | final angle(B, W) (°) "
             f"| mean angle(B, W) (°) | all below {threshold:g}° at step | error angle vs BP (°) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.run} | {r.rule} | {len(r.projections)} | {r.steps} | "
                     f"{_cell(None if r.top1 is None else 100 * r.top1, '.2f')} | "
                     f"{_cell(None if r.top5 is None else 100 * r.top5, '.2f')} | {_cell(r.final_angle, '.2f')} | "
                     f"{_cell(r.mean_angle, '.2f')} | {_cell(r.aligned_at, 'd')} | {_cell(r.error_angle, '.2f')} |")
    return "\n".join(lines)


def projection_markdown(run: Run, threshold: float = 45.0) -> str:
    """Per feedback projection through a B of one run: depth (of its forward projection; – for direct
    feedback), rule, final and mean angle(B, W) (– where not defined), first step below threshold."""
    alignment = run.alignment
    finals, means, below, depth = final(alignment), mean(alignment), first_below(alignment, threshold), run.depth
    lines = [f"| projection | depth | rule | final angle(B, W) (°) | mean angle(B, W) (°) | first below {threshold:g}° at step |",
             "|---|---:|---|---:|---:|---:|"]
    for name, rule in run.rules.items():
        lines.append(f"| {name} | {_cell(depth.get(name), 'd')} | {rule} | {_cell(finals.get(name), '.2f')} "
                     f"| {_cell(means.get(name), '.2f')} | {_cell(below.get(name), 'd')} |")
    return "\n".join(lines)
