"""A job's folder of runs (models.compare, models.reproduce): each run's result kept as soon as it finishes.

    OUT/runs/<rule>-seed<seed>.partial.h5    the recording of a run in progress (or of one that was stopped)
    OUT/runs/<rule>-seed<seed>.h5            its recording once the run has finished (or diverged)
    OUT/runs/<rule>-seed<seed>.json          its result, the job's settings and command: the run is done
    OUT/runs/<rule>-seed<s>[-<s>...].ckpt    a run in progress after its last whole epoch (the seeds trained
                                             together, circuits.graph.seeds.SeedBatch, share one)

A run is done when its .json exists. Running a job again into the same folder with the same settings skips
the done runs and trains the others: a run with a checkpoint goes on from its last whole epoch, recording into
the same .partial.h5 (models.compare.fit), one without from the start (its .partial.h5 deleted first); with other
settings it is refused, and nothing is ever overwritten without `overwrite` (which deletes every file
named above, results.json, results.md and report/ first). Runs of other rules or seeds made with the same
settings stay and join the job's results (a merge). A folder may be moved or copied: its runs are read from where
it is.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from analysis import stats
from circuits import rules

from .data import write_whole

Run = tuple[str, int]
"""(rule, seed)."""
OUTPUTS = ("results.json", "results.md", "report")
"""What a job writes into its folder beside runs/ (deleted by `overwrite`, rewritten after every run)."""


@dataclass
class RunResult:
    """One trained run: test accuracy (%), angle(B, W) per projection (degrees) before, after each epoch, at the end.

    A run that diverged (circuits.DivergenceError) has `diverged_step`, the first learning step whose loss was
    non-finite (or the step by which a parameter was), and its last finite numbers: `top1` and `final_angles`
    after its last whole epoch (`len(history)`; top1 None and the initial angles if it never finished one)."""

    rule: str
    seed: int
    top1: float | None
    initial_angles: dict[str, float | None]
    final_angles: dict[str, float | None]
    seconds: float
    recording: str | None
    history: list[float] = field(default_factory=list)   # test accuracy (%) after each epoch
    epoch_angles: list[dict[str, float | None]] = field(default_factory=list)   # angle(B, W) after each epoch
    diverged_step: int | None = None

    def describe(self) -> str:
        """One line: the accuracy and final angles, or where it diverged and its last finite numbers."""
        numbers = ", ".join(f"{p} {a:.1f}°" if a is not None else f"{p} –" for p, a in self.final_angles.items())
        if self.diverged_step is None:
            return f"test accuracy {self.top1:.2f}%, angle(B, W) {numbers} ({self.seconds:.0f} s)"
        last = (f"after epoch {len(self.history)}: test accuracy {self.top1:.2f}%" if self.top1 is not None
                else "before training:")
        return f"DIVERGED at learning step {self.diverged_step}; its last finite numbers, {last}, angle(B, W) {numbers}"


def diverged_rows(results: Sequence[RunResult], projections: Sequence[str], columns: int, skip: int = 0) -> list[str]:
    """Table rows of `columns` cells for the diverged runs: rule and seed, the step, the last finite accuracy,
    `skip` cells '–' (the table's other accuracy columns), the last finite angles (after which epoch), '–' in the
    cells after the angles."""
    rows = []
    for r in results:
        if r.diverged_step is None:
            continue
        when = f"epoch {len(r.history)}" if r.top1 is not None else "start"
        accuracy = f"{r.top1:.2f} (epoch {len(r.history)})" if r.top1 is not None else "– (no epoch finished)"
        angles = [f"{r.final_angles[p]:.2f} ({when})" if r.final_angles.get(p) is not None else "–"
                  for p in projections]
        cells = [f"{r.rule.upper()} seed {r.seed}: **diverged at learning step {r.diverged_step}**", accuracy,
                 *["–"] * skip, *angles]
        rows.append("| " + " | ".join(cells + ["–"] * (columns - len(cells))) + " |")
    return rows


def across_seeds(results: Sequence[RunResult], baseline: str = "bp") -> list[stats.SeedSummary]:
    """Per rule over seeds (runs that finished): accuracy after the last epoch and as the mean of the last
    stats.LAST_EVALUATIONS epochs, each projection's final angle, and the paired difference to `baseline`
    (analysis.stats.across_seeds)."""
    return stats.across_seeds([stats.SeedRun(r.rule, r.seed, r.top1, stats.tail_mean(r.history), r.final_angles)
                               for r in results], baseline=baseline)


def tail_epochs(epochs: int) -> str:
    """Which epochs the mean of the last stats.LAST_EVALUATIONS covers: 'epochs 18-20', 'epoch 1'."""
    return f"epochs {max(1, epochs - stats.LAST_EVALUATIONS + 1)}-{epochs}" if epochs > 1 else "epoch 1"


def strict(value: Any) -> Any:
    """`value` (dicts, lists, tuples, numbers) with every NaN or infinite float replaced by None (null in JSON):
    an interval's undefined SD and bounds (one seed) among them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """`value` written to `path` as strict JSON (RFC 8259: non-finite numbers as null, json.dumps(allow_nan=False)
    so that none can slip through)."""
    path.write_text(json.dumps(strict(value), indent=1, allow_nan=False))


def pending_note(pending: Sequence[Run], planned: int, command: str) -> str:
    """The first line of a table written while runs of the job are still to come, or '' when none are."""
    if not pending:
        return ""
    names = ", ".join(f"{rule}-seed{seed}" for rule, seed in pending)
    return (f"**Incomplete: {planned - len(pending)} of {planned} runs of this job are done; not yet: {names}. "
            f"Run `{command}` again to finish them.**\n\n")


def shared_settings(config: Any, bookkeeping: Sequence[str]) -> dict[str, Any]:
    """A job's configuration (a dataclass) but for the fields named in `bookkeeping` (rules, seeds, folders, ...):
    what every run in one folder shares."""
    return {k: v for k, v in asdict(config).items() if k not in bookkeeping}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside the block, as they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def groups(pending: Sequence[Run], batched: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The pending runs as they train: per rule all its seeds at once (batched), or each run alone."""
    if not batched:
        return [(rule, (seed,)) for rule, seed in pending]
    by_rule: dict[str, list[int]] = {}
    for rule, seed in pending:
        by_rule.setdefault(rule, []).append(seed)
    return [(rule, tuple(seeds)) for rule, seeds in by_rule.items()]


def _order(run: Run) -> tuple[int, str, int]:
    names = list(rules.RULES)
    return names.index(run[0]) if run[0] in names else len(names), run[0], run[1]


class RunFolder:
    """The runs in `out`/runs made with `settings` (a job's configuration but for its rules, seeds and
    bookkeeping): read when opened, refused if made with other settings, or all deleted with `overwrite`; a
    checkpoint made with other settings is refused when its group would go on from it. `defaults`: the settings'
    default values, which a run or checkpoint kept from before a setting existed ran with."""

    def __init__(self, out: Path, settings: dict[str, Any], *, overwrite: bool = False,
                 defaults: dict[str, Any] | None = None) -> None:
        self.out, self.runs = out, out / "runs"
        self.settings = json.loads(json.dumps(settings))       # as read back from a file: tuples are lists
        self.defaults = json.loads(json.dumps(defaults or {}))
        if overwrite:
            self._delete()
        self.done: dict[Run, RunResult] = {}
        self._commands: dict[Run, str] = {}
        foreign = []
        for path in sorted(self.runs.glob("*.h5")) if self.runs.is_dir() else []:
            if not path.name.endswith(".partial.h5") and not path.with_suffix(".json").is_file():
                foreign.append(path.name)
        if foreign:
            raise FileExistsError(f"{self.runs} holds recordings without a result ({foreign[0]}, ...): not runs of "
                                  f"this job; pass --overwrite to delete them, or --out to write elsewhere")
        for path in sorted(self.runs.glob("*.json")) if self.runs.is_dir() else []:
            kept = json.loads(path.read_text())
            self._refuse_other(kept["settings"], "runs", path.name)
            result = RunResult(**kept["result"])
            if result.recording is not None:    # where the folder is now, whatever the folder and cwd it was made in
                result.recording = str(self.recording(result.rule, result.seed))
            self.done[result.rule, result.seed], self._commands[result.rule, result.seed] = result, kept["command"]

    def _refuse_other(self, settings: dict[str, Any], what: str, name: str) -> None:
        """A FileExistsError naming each setting in which `settings` (read from `name`) differ from this job's."""
        settings = {**self.defaults, **settings}
        if settings != self.settings:
            changed = [f"{k} {settings.get(k)!r} there, {v!r} here" for k, v in self.settings.items()
                       if settings.get(k) != v]
            raise FileExistsError(f"{self.out} holds {what} made with other settings ({name}: {'; '.join(changed)})"
                                  f": pass --overwrite to replace them, or --out to write elsewhere")

    def recording(self, rule: str, seed: int) -> Path:
        return self.runs / f"{rule}-seed{seed}.h5"

    def checkpoint(self, rule: str, seeds: Sequence[int]) -> Path:
        """Where the runs of `rule` with `seeds`, trained together, keep their state after each whole epoch."""
        return self.runs / f"{rule}-seed{'-'.join(map(str, seeds))}.ckpt"

    @staticmethod
    def made_with(checkpoint: Path) -> Path:
        """Where the settings that `checkpoint` was made with are kept (beside it, as JSON)."""
        return checkpoint.with_suffix(".settings")

    def _stale_checkpoints(self, rule: str, seeds: Sequence[int]) -> list[Path]:
        """Checkpoints of `rule` holding any of `seeds` but trained in another group (seeds batched otherwise)."""
        mine = self.checkpoint(rule, seeds)
        return [p for p in self.runs.glob(f"{rule}-seed*.ckpt") if p != mine
                and set(seeds) & {int(s) for s in p.name[len(rule) + 5:-5].split("-")}]

    def pending(self, plan: Sequence[Run]) -> list[Run]:
        """The runs of `plan` not done yet."""
        return [run for run in plan if run not in self.done]

    def results(self) -> list[RunResult]:
        """Every done run in the folder (this job's and earlier jobs' with the same settings), by rule and seed."""
        return [self.done[run] for run in sorted(self.done, key=_order)]

    def commands(self) -> list[str]:
        """The commands that made the done runs, each once, in the order of results()."""
        return list(dict.fromkeys(self._commands[r.rule, r.seed] for r in self.results()))

    def train(self, plan: Sequence[Run], train_group: Callable[[str, tuple[int, ...], list[Path], Path],
                                                               list[RunResult]],
              command: str, progress: bool = True, batched: bool = False) -> Iterator[RunResult]:
        """train_group(rule, seeds, recordings, checkpoint) for the runs of `plan` not done yet, per rule all its
        seeds at once if `batched`, else each alone; each result kept (and yielded, and printed) as soon as its
        group ends. A group stopped before its end (an error, Ctrl-C) leaves its .partial.h5 recordings and its
        checkpoint after the last whole epoch, from which the same group goes on next time. A group may end
        with fewer results than seeds (seeds batched, one diverged): the others train again, in a group of
        their own."""
        skipped = len(plan) - len(self.pending(plan))
        if skipped:
            tqdm.write(f"{skipped} of {len(plan)} runs already done in {self.runs}: kept, not trained again",
                       file=sys.stdout)
        bar = tqdm(total=len(self.pending(plan)), desc="runs", disable=not progress)
        while self.pending(plan):
            rule, seeds = groups(self.pending(plan), batched)[0]
            bar.set_postfix(rule=rule, seeds=",".join(map(str, seeds)))
            self.runs.mkdir(parents=True, exist_ok=True)
            checkpoint = self.checkpoint(rule, seeds)
            for stale in self._stale_checkpoints(rule, seeds):
                stale.unlink()
                self.made_with(stale).unlink(missing_ok=True)
            partials = [self.recording(rule, seed).with_suffix(".partial.h5") for seed in seeds]
            made_with = self.made_with(checkpoint)
            if checkpoint.is_file() and made_with.is_file():
                self._refuse_other(json.loads(made_with.read_text()), "a checkpoint", checkpoint.name)
            if not checkpoint.is_file():
                for partial in partials:
                    partial.unlink(missing_ok=True)
            made_with.write_text(json.dumps(self.settings))
            try:
                results = train_group(rule, seeds, partials, checkpoint)
            finally:
                if not checkpoint.is_file():          # stopped before its first whole epoch: nothing to go on from
                    made_with.unlink(missing_ok=True)
            if not results:
                raise RuntimeError(f"training {rule} with seeds {seeds} gave no result")
            for result in results:
                self._keep(result, partials[seeds.index(result.seed)], command)
                bar.update()
                yield result
            checkpoint.unlink(missing_ok=True)
            made_with.unlink(missing_ok=True)
        bar.close()

    def _keep(self, result: RunResult, partial: Path, command: str) -> None:
        """A finished run: its recording renamed final, its result written beside it."""
        final = self.recording(result.rule, result.seed)
        os.replace(partial, final)
        result.recording = str(final)
        text = json.dumps({"settings": self.settings, "command": command, "result": asdict(result)})
        write_whole(final.with_suffix(".json"), lambda out: out.write(text.encode()))
        self.done[result.rule, result.seed], self._commands[result.rule, result.seed] = result, command
        tqdm.write(f"{result.rule:>2} seed {result.seed}: {result.describe()}", file=sys.stdout)

    def _delete(self) -> None:
        for pattern in ("*.h5", "*.json", "*.ckpt", "*.settings"):
            for path in self.runs.glob(pattern) if self.runs.is_dir() else []:
                path.unlink()
        for name in OUTPUTS:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

