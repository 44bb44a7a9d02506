"""The report: figures as PNG and a markdown summary of one or more recorded runs, in one folder.

    python -m analysis report runs/bp.h5 runs/fa.h5 runs/kp.h5 -o report/

writes alignment.png (angle(B, W) per layer, one panel a run), errors.png (error angle against
backprop), curves.png (training loss and held-out top-1 error of every run), <run>-circuit.png
(the circuit's pathways) and summary.md (final accuracy, final and mean angles per rule, and a
table per run of its projections). Where a rule was run with two seeds or more, summary.md also holds
each rule's statistics across seeds (mean, SD and 95% t-interval of the final accuracy and of each
projection's final angle, the paired difference to a baseline rule) with the claims judged on those
intervals, and seeds.png draws them. summary.md names, above its table and in each run's section, what
it cannot vouch for: a run that is unfinished (not closed normally by its writer), cut short (and
which tables lost rows to the cut), or holds non-finite numbers (which, from when, and whether the
final value is one).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from circuits.recording import cut_short

from . import figures, stats
from .run import Run, open_run


def _unique_names(runs: Sequence[Run]) -> list[str]:
    """Run names for file names, numbered where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def report(paths: Sequence[str | os.PathLike], out: str | os.PathLike, threshold: float = stats.ALIGNED_DEGREES,
           progress: bool = True, baseline: str = "bp", points: float = 0.5) -> list[Path]:
    """Write the figures and summary.md of the recordings at `paths` into `out`; returns the files written.
    Across seeds: differences to the `baseline` rule, judged against a bar of `points` accuracy points."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot write the report into {out}: {e.strerror or e}") from e
    if not os.access(out, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        raise PermissionError(errno.EACCES, f"cannot write the report into {out}: the folder is not writable")
    with contextlib.ExitStack() as opened:
        runs = [opened.enter_context(open_run(p)) for p in paths]
        for run in runs:     # every table read first: a file that cannot be read fails before any figure is drawn
            run.steps, run.alignment, run.errors, run.updates, run.evaluations
        names = _unique_names(runs)
        jobs = [("alignment.png", lambda: figures.alignment(runs)), ("errors.png", lambda: figures.error_angles(runs)),
                ("curves.png", lambda: figures.curves(runs))]
        seeds: list[str] = []
        try:
            summaries = stats.across_seeds([r for run in runs if (r := stats.seed_run(run)) is not None], baseline)
        except ValueError as e:          # two runs of one rule and seed
            summaries, seeds = [], ["## Across seeds", "", f"No statistics across seeds: {e}.", ""]
        if any(len(s.seeds) > 1 for s in summaries):
            seeds = _seed_section(summaries, baseline, points, threshold)
            jobs.append(("seeds.png", lambda: figures.seeds(summaries, baseline, points, threshold)))
        jobs += [
            (f"{name}-circuit.png", lambda run=run: figures.circuit(run)) for name, run in zip(names, runs, strict=True)
        ]
        written = [figures.save(draw(), out / file) for file, draw in tqdm(jobs, desc="figures", disable=not progress)]
        written.append(_summary(runs, names, written, out / "summary.md", threshold, seeds))
    return written


def _seed_section(summaries: Sequence[stats.SeedSummary], baseline: str, points: float, threshold: float) -> list[str]:
    """Statistics across seeds and the claims judged on their intervals: holds, fails or undecided."""
    claims = [stats.accuracy_claim(s, points, baseline) for s in summaries if s.difference is not None]
    claims += [stats.angle_claim(s, threshold) for s in summaries if s.angles and s.rule != baseline]
    return ["## Across seeds", "",
            f"Per rule over its seeds: mean ± sample SD [{stats.CONFIDENCE:.0%} t-interval]; accuracy after the "
            f"last evaluation and as the mean of the last {stats.LAST_EVALUATIONS} evaluations (less of one "
            f"epoch's noise); the difference to {baseline.upper()} is paired over matched seeds (same data order "
            "and forward weights) on that mean. A claim holds when its whole interval clears the bar, fails when "
            "the whole interval misses it, and is undecided when the interval straddles it. Runs that ended "
            "diverged are left out.", "",
            stats.seed_markdown(summaries, baseline), ""] + [f"- {v}: {text}" for text, v in claims] + [""]


def _summary(runs: Sequence[Run], names: Sequence[str], images: Sequence[Path], path: Path, threshold: float,
             seeds: Sequence[str] = ()) -> Path:
    parts = ["# Recorded runs", "",
             "Accuracies on the held-out data after the last evaluation; angles in degrees, averaged over the "
             "rule's projections: final = each projection's last angle(B, W), mean = its mean over training; "
             f"'all below {threshold:g}°' = the learning step by which every projection of the rule had first "
             "aligned that far; error angle = the last angle between the hidden populations' errors and "
             "backprop's on the probe batch.", ""]
    nonfinite = {
        name: found for name, run in zip(names, runs, strict=True) if (found := stats.divergence(run)) is not None
    }
    for name, found in nonfinite.items():
        parts += [f"**{name} {found.describe()}.**" + ("" if found.recovered else
                  f" Its accuracies and angles below are of the rows before step {found.step}."), ""]
    doubts = {name: _doubts(run) for name, run in zip(names, runs, strict=True)}
    for name, found in doubts.items():
        if found:
            parts += [f"**{name}: {', '.join(found)}; see its section below.**", ""]
    parts += [stats.markdown(stats.compare(runs, threshold), threshold), "", *seeds]
    for name, run in zip(names, runs, strict=True):
        parts += [f"## {name}", "", f"`{run.path}`: circuit {run.circuit.graph['name']!r}, rule {run.rule}, "
                  f"{len(run.steps)} rows, {len(run.evaluations)} evaluations."]
        if name in nonfinite:
            described = nonfinite[name].describe()
            parts[-1] += f" {described[0].upper()}{described[1:]}."
        details = [f"- {line}" for lines in doubts[name].values() for line in lines]
        parts += [""] + (details + [""] if details else []) + [stats.projection_markdown(run, threshold), ""]
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    path.write_text("\n".join(parts))
    return path


def _doubts(run: Run) -> dict[str, list[str]]:
    """What summary.md cannot vouch for in `run`, by kind (unfinished, cut short, non-finite numbers): a line each."""
    doubts: dict[str, list[str]] = {}
    if run.finished is False:
        doubts["unfinished"] = ["Unfinished: its writer has not closed it normally (the run is still being written, "
                                "was killed, or an error ended it)."]
    short = cut_short(run.path)
    if short is not None:
        lost = "; ".join(f"/{t} keeps {read} of its {recorded} rows" if recorded is not None else
                         f"/{t} lies past the end" for t, (read, recorded) in run.rows_cut().items())
        doubts["cut short"] = [f"Cut short: the file has {short[0]} of its {short[1]} bytes; "
                               f"{lost or 'every recorded row lies in it'}."]
    nonfinite = stats.nonfinite(run)
    if nonfinite:
        doubts["non-finite numbers"] = [f"Non-finite: {line}." for line in nonfinite]
    return doubts
