"""The report: figures as PNG and a markdown summary of one or more recorded runs, in one folder.

    python -m analysis report runs/bp.h5 runs/fa.h5 runs/kp.h5 -o report/

writes alignment.png (angle(B, W) per layer, one panel a run), errors.png (error angle against
backprop), curves.png (training loss and held-out top-1 error of every run), <run>-circuit.png
(the circuit's pathways) and summary.md (final accuracy, final and mean angles per rule, and a
table per run of its projections).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from . import figures, stats
from .run import Run, open_run


def _unique_names(runs: Sequence[Run]) -> list[str]:
    """Run names for file names, numbered where two runs share a name."""
    names = [r.name for r in runs]
    return [f"{n}-{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def report(paths: Sequence[str | os.PathLike], out: str | os.PathLike, threshold: float = stats.ALIGNED_DEGREES,
           progress: bool = True) -> list[Path]:
    """Write the figures and summary.md of the recordings at `paths` into `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as opened:
        runs = [opened.enter_context(open_run(p)) for p in paths]
        for run in runs:     # every table read first: a file that cannot be read fails before any figure is drawn
            run.steps, run.alignment, run.errors, run.updates, run.evaluations
        names = _unique_names(runs)
        jobs = [("alignment.png", lambda: figures.alignment(runs)), ("errors.png", lambda: figures.error_angles(runs)),
                ("curves.png", lambda: figures.curves(runs))]
        jobs += [
            (f"{name}-circuit.png", lambda run=run: figures.circuit(run)) for name, run in zip(names, runs, strict=True)
        ]
        written = [figures.save(draw(), out / file) for file, draw in tqdm(jobs, desc="figures", disable=not progress)]
        written.append(_summary(runs, names, written, out / "summary.md", threshold))
    return written


def _summary(runs: Sequence[Run], names: Sequence[str], images: Sequence[Path], path: Path, threshold: float) -> Path:
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
    parts += [stats.markdown(stats.compare(runs, threshold), threshold), ""]
    for name, run in zip(names, runs, strict=True):
        parts += [f"## {name}", "", f"`{run.path}`: circuit {run.circuit.graph['name']!r}, rule {run.rule}, "
                  f"{len(run.steps)} rows, {len(run.evaluations)} evaluations."]
        if name in nonfinite:
            described = nonfinite[name].describe()
            parts[-1] += f" {described[0].upper()}{described[1:]}."
        parts += ["", stats.projection_markdown(run, threshold), ""]
    parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    path.write_text("\n".join(parts))
    return path
