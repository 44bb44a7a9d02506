"""Alignment statistics of recorded runs: when B aligns with W, how far it gets, and how rules compare.

The functions on Series take a dict by projection or population (run.alignment, run.errors,
run.updates) and a column ("angle" by default), and skip NaN rows (undefined angles).

A run diverged when its numbers became non-finite (divergence()): a learning step's training loss,
an evaluation's or the probe's loss, or a projection's |B| / |W| (NaN once W or B is). Its summary
then says so and at which step, and its statistics are of the rows before that step.

Across seeds (scipy.stats): interval() gives mean, SD and a 95% t-interval, prediction() the interval where one
more seed would fall, paired_difference() the interval of a rule's difference to a baseline over matched seeds,
verdict() judges a claim on an interval (holds, fails, undecided), across_seeds() gathers them per rule from
SeedRun rows (seed_run() reads one from a recording), claims() judges the paper's claims on them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.stats

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
    """Per name: the value of `column` in the last row, NaN or infinite as it is (NaN if there is no row)."""
    return {name: float(s[column][-1]) if len(s) else math.nan for name, s in series.items()}


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


LABELS = {"angle": "angle", "norm_ratio": "norm ratio", "sign_match": "sign agreement"}
"""Column names as the report writes them."""


def nonfinite(run: Run) -> list[str]:
    """What `run` recorded as NaN or infinite, a line per series: its columns with the same non-finite rows,
    how many, from which learning step, and whether the last row (the value reported as final) is one.
    The training loss counts learning steps only (a mirror batch's is NaN by design)."""
    steps = run.steps
    learn = steps["phase"] == "learn"
    found = [("training {columns}", steps.step[learn], {"loss": steps["loss"][learn]})]
    for what, series in (("{columns} of {name} (B against W)", run.alignment),
                         ("error {columns} of {name} against backprop", run.errors),
                         ("update {columns} of {name} against backprop", run.updates)):
        found += [(what.replace("{name}", name), s.step, s.columns) for name, s in series.items()]
    found += [("{columns} of the probe batch", run.probe.step, run.probe.columns),
              ("evaluation {columns}", run.evaluations.step, run.evaluations.columns)]
    lines = []
    for what, step, columns in found:
        by_rows: dict[bytes, list[str]] = {}
        for column, values in columns.items():
            bad = ~np.isfinite(values)
            if bad.any():
                by_rows.setdefault(np.packbits(bad).tobytes(), []).append(column)
        for names in by_rows.values():
            values = columns[names[0]]
            bad = ~np.isfinite(values)
            text = what.replace("{columns}", " and ".join(LABELS.get(n, n) for n in names))
            if bad.all():
                lines.append(f"{text}: non-finite in every row ({len(values)}), so it has no value (NaN in averages)")
                continue
            lines.append(f"{text}: non-finite in {int(bad.sum())} of {len(values)} rows, first at learning step "
                         f"{int(step[bad][0])}" + (f"; the last row too, so its final value is {_cell(values[-1], '')}"
                                                   if bad[-1] else ""))
    return lines


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
    final_angle: float | None
    mean_angle: float | None
    aligned_at: int | None
    error_angle: float | None
    diverged_at: int | None = None


def _average(values: Sequence[float]) -> float | None:
    """The mean, NaN if any value is (a projection with no value is not left out); None for no values."""
    return float(np.mean(values)) if len(values) else None


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
            error_angle=_average(list(error.values())), diverged_at=diverged))
    return out


def _diverged_at(run: Run) -> int | None:
    """The step at which `run` diverged, if it ended diverged (not if its non-finite steps were skipped)."""
    found = divergence(run)
    return found.step if found is not None and not found.recovered else None


def _final_cell(value: float | None, diverged_at: int | None) -> str:
    return f"diverged at step {diverged_at}" if diverged_at is not None else _cell(value, ".2f")


def compare(runs: Sequence[Run], threshold: float = ALIGNED_DEGREES) -> list[RuleSummary]:
    """Every rule of every run, e.g. BP / FA / SS / KP / WM runs of one circuit side by side."""
    return [row for run in runs for row in summarize(run, threshold)]


def _cell(value: float | int | None, fmt: str) -> str:
    """'–' where there is no value, NaN and inf as such."""
    if value is None:
        return "–"
    return format(value, fmt) if math.isfinite(value) else str(value).replace("nan", "NaN")


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


# === across seeds ==========================================================================
CONFIDENCE = 0.95
LAST_EVALUATIONS = 3
"""k: a run's final accuracy is also given as the mean of its last k evaluations (epochs), beside the last one."""


@dataclass(frozen=True)
class Interval:
    """Mean, sample standard deviation and t-interval of n values: mean ± t_{(1 + c) / 2, n - 1} SD / sqrt(n)
    (Student's t with n - 1 degrees of freedom, c the confidence), or from prediction() the wider interval of one
    more value. With one value SD is NaN and the interval (-inf, inf): one seed bounds nothing."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    @classmethod
    def from_dict(cls, d: Mapping[str, float | int | None]) -> Interval:
        """An Interval as results.json holds it (dataclasses.asdict, then strict JSON): an undefined SD or bound
        (one seed) is null there, NaN and -inf / inf here."""
        def number(key: str, undefined: float) -> float:
            return undefined if d[key] is None else float(d[key])
        return cls(int(d["n"]), float(d["mean"]), number("sd", math.nan), number("low", -math.inf),
                   number("high", math.inf), float(d.get("confidence", CONFIDENCE)))

    def cell(self, fmt: str = ".2f") -> str:
        """'96.56 ± 0.95 [94.20, 98.92]' (mean ± SD [interval]), or the one value for n = 1."""
        if self.n < 2:
            return f"{self.mean:{fmt}} (1 seed)"
        return f"{self.mean:{fmt}} ± {self.sd:{fmt.lstrip('+')}} [{self.low:{fmt}}, {self.high:{fmt}}]"


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean, sample SD and two-sided t-interval (scipy.stats.t) of `values` (at least one, all finite)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"an interval needs one or more finite values, got {list(values)}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(1, mean, math.nan, -math.inf, math.inf, confidence)
    sd = float(x.std(ddof=1))
    half = float(scipy.stats.t.ppf((1 + confidence) / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return Interval(len(x), mean, sd, mean - half, mean + half, confidence)


def prediction(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Where one more run (a new seed) falls, with probability `confidence`: mean ± t_{(1 + c) / 2, n - 1} SD
    sqrt(1 + 1/n), the prediction interval of a normal sample (the t-interval bounds the mean; this bounds one
    draw, so it is wider by sqrt(n + 1)). The right test of one run of someone else's, as the authors' single run,
    against our n seeds: the gap their run may have from our mean grows with our spread and with 1/n."""
    found = interval(values, confidence)
    if found.n < 2:
        return found
    half = (found.high - found.mean) * math.sqrt(found.n + 1)
    return Interval(found.n, found.mean, found.sd, found.mean - half, found.mean + half, confidence)


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of values[seed] - baseline[seed] over the seeds both have (matched seeds: the same data
    order and forward weights, so the seed's share of the noise cancels)."""
    seeds = [s for s in values if s in baseline]
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(values)} against the baseline's {sorted(baseline)}")
    return interval([values[s] - baseline[s] for s in seeds], confidence)


def verdict(found: Interval, low: float = -math.inf, high: float = math.inf) -> str:
    """'holds' if the whole interval lies within [low, high], 'fails' if it lies wholly outside, else
    'undecided' (the interval straddles a bar: these seeds cannot tell)."""
    if low <= found.low and found.high <= high:
        return "holds"
    if found.high < low or found.low > high:
        return "fails"
    return "undecided"


def all_of(verdicts: Sequence[str]) -> str:
    """A claim made of several: 'fails' if one fails, 'holds' if all hold, else 'undecided'."""
    return "fails" if "fails" in verdicts else "holds" if all(v == "holds" for v in verdicts) else "undecided"


def tail_mean(values: Sequence[float], k: int = LAST_EVALUATIONS) -> float:
    """The mean of the last k values (of all, if fewer)."""
    if not len(values):
        raise ValueError("no values to average")
    return float(np.mean(np.asarray(values, dtype=np.float64)[-k:]))


@dataclass(frozen=True)
class SeedRun:
    """One run's final numbers: test accuracy (%) of the last evaluation and the mean of the last k, and each
    projection's final angle(B, W) in degrees (None where not defined, as under direct feedback)."""

    rule: str
    seed: int
    top1: float
    top1_tail: float
    angles: Mapping[str, float | None]


@dataclass(frozen=True)
class SeedSummary:
    """One rule over its seeds: per-seed values by seed, and their Intervals. difference: the paired
    difference of top1_tail to the baseline rule over matched seeds (None for the baseline itself, without it, or
    without a seed in common with it)."""

    rule: str
    top1: dict[int, float]
    top1_tail: dict[int, float]
    angles: dict[str, dict[int, float]]
    difference: Interval | None

    @property
    def seeds(self) -> list[int]:
        return list(self.top1)

    def accuracy(self, tail: bool = True) -> Interval:
        return interval(list((self.top1_tail if tail else self.top1).values()))

    def angle(self, projection: str) -> Interval:
        return interval(list(self.angles[projection].values()))

    def intervals(self) -> dict[str, Any]:
        """The Intervals as plain dicts (results.json's "intervals"; Interval.from_dict reads one back): top1
        (last evaluation), top1_tail (mean of the last k), angles by projection, difference (None: none)."""
        return {"top1": asdict(self.accuracy(tail=False)), "top1_tail": asdict(self.accuracy()),
                "angles": {p: asdict(self.angle(p)) for p in self.angles},
                "difference": None if self.difference is None else asdict(self.difference)}


def across_seeds(runs: Sequence[SeedRun], baseline: str = "bp") -> list[SeedSummary]:
    """One SeedSummary per rule (in the order of `runs`), each with its paired difference to `baseline`."""
    by_rule: dict[str, list[SeedRun]] = {}
    for r in runs:
        by_rule.setdefault(r.rule, []).append(r)
    for rule, group in by_rule.items():
        seeds = [r.seed for r in group]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"rule {rule!r} has two runs of one seed ({seeds}): pair them how?")
    base = {r.seed: r.top1_tail for r in by_rule.get(baseline, [])}
    out = []
    for rule, group in by_rule.items():
        tail = {r.seed: r.top1_tail for r in group}
        angles = {p: {r.seed: r.angles[p] for r in group} for p, a in group[0].angles.items() if a is not None}
        paired = rule != baseline and not base.keys().isdisjoint(tail)
        out.append(SeedSummary(rule, {r.seed: r.top1 for r in group}, tail, angles,
                               paired_difference(tail, base) if paired else None))
    return out


def seed_run(run: Run) -> SeedRun | None:
    """A recording's final numbers (its seed: the "seed" it was recorded with, else torch's initial seed);
    None if it has no top-1 evaluation or ended diverged."""
    evaluations = run.evaluations
    if not len(evaluations) or "top1" not in evaluations.columns or _diverged_at(run) is not None:
        return None
    top1 = 100 * evaluations["top1"]
    seed = run.seeds.get("seed", run.seeds.get("torch_initial_seed"))
    return SeedRun(run.rule, int(seed), float(top1[-1]), tail_mean(top1), final(run.alignment))


def accuracy_claim(summary: SeedSummary, points: float, baseline: str = "bp") -> tuple[str, str]:
    """'<RULE>: test accuracy within `points` points of <BASELINE>', judged on the paired difference's interval."""
    d = summary.difference
    if d is None:
        raise ValueError(f"{summary.rule} has no paired difference to {baseline}")
    return (f"{summary.rule.upper()}: test accuracy (mean of the last {LAST_EVALUATIONS} evaluations, all if "
            f"fewer) within {points:g} points of {baseline.upper()}'s: difference {d.mean:+.2f} points, "
            f"{d.confidence:.0%} interval [{d.low:+.2f}, {d.high:+.2f}] over {d.n} matched seed(s)",
            verdict(d, -points, points))


def angle_claim(summary: SeedSummary, degrees: float) -> tuple[str, str]:
    """'<RULE>: angle(B, W) below `degrees` in every projection', judged on each projection's interval."""
    found = {p: summary.angle(p) for p in summary.angles}
    cells = ", ".join(f"{p} [{a.low:.2f}, {a.high:.2f}]" for p, a in found.items())
    return (f"{summary.rule.upper()}: angle(B, W) below {degrees:g}° in every projection ({CONFIDENCE:.0%} "
            f"intervals: {cells})", all_of([verdict(a, high=degrees) for a in found.values()]))


def claims(summaries: Sequence[SeedSummary], points: float, degrees: float = ALIGNED_DEGREES, baseline: str = "bp",
           aligning: Sequence[str] = ("wm", "kp"), contrast: str = "fa") -> list[tuple[str, str]]:
    """The paper's claims for each `aligning` rule present, judged on 95% t-intervals over seeds (holds, fails,
    undecided): angle(B, W) below `degrees` in every projection, test accuracy within `points` of the
    `baseline`'s (paired over matched seeds), and the `contrast` rule's angle larger in every projection (paired);
    the paired claims only where the two rules have a seed in common."""
    by_rule = {s.rule: s for s in summaries}
    out = []
    for rule in aligning:
        if rule not in by_rule:
            continue
        summary = by_rule[rule]
        out.append(angle_claim(summary, degrees))
        if summary.difference is not None:
            out.append(accuracy_claim(summary, points, baseline))
        if contrast in by_rule and not by_rule[contrast].top1.keys().isdisjoint(summary.top1):
            larger = [verdict(paired_difference(by_rule[contrast].angles[p], angles), low=0)
                      for p, angles in summary.angles.items()]
            out.append((f"{contrast.upper()}'s angle(B, W) larger than {rule.upper()}'s in every layer (paired over "
                        f"seeds)", all_of(larger)))
    return out


def claim_lines(found: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown lines of judged claims, under a line saying how they are judged."""
    return [f"Claims, judged on the {CONFIDENCE:.0%} intervals (holds: the whole interval clears the bar; fails: it "
            "misses it whole; undecided: it straddles the bar):", "",
            *[f"- {v}: {text}" for text, v in found]]


def seed_markdown(summaries: Sequence[SeedSummary], baseline: str = "bp") -> str:
    """Per rule: seeds, accuracy (last evaluation; mean of the last k), paired difference to the baseline,
    and each projection's final angle(B, W), each as mean ± SD [95% t-interval]."""
    projections = list(dict.fromkeys(p for s in summaries for p in s.angles))
    lines = [f"| rule | seeds | top-1 (%), last evaluation | top-1 (%), mean of last {LAST_EVALUATIONS} | "
             f"difference to {baseline.upper()} (points) | "
             + " | ".join(f"final angle(B, W) {p} (°)" for p in projections) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(projections)]
    for s in summaries:
        d = "–" if s.difference is None else s.difference.cell("+.2f")
        angles = [s.angle(p).cell() if p in s.angles else "–" for p in projections]
        lines.append(f"| {s.rule} | {len(s.seeds)} | {s.accuracy(tail=False).cell()} | {s.accuracy().cell()} | "
                     f"{d} | " + " | ".join(angles) + " |")
    return "\n".join(lines)
