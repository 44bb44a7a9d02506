"""Watch alignment live from a second process: read a recording while its run writes it.

    python examples/watch_alignment.py runs/compare/runs/wm-seed0.h5    # watch a run started elsewhere
    python examples/watch_alignment.py --demo                           # start a run, then watch it
    python examples/watch_alignment.py --demo --smoke                   # the same, at CI size

circuits.Recorder writes HDF5 in single-writer/multiple-reader (SWMR) mode and flushes rows as they
come (every `block` rows or `flush_seconds`), so any number of readers may open the file meanwhile.
analysis.open_run re-reads the file at every access: each poll below sees the rows flushed so far.
--demo trains the weight mirror with `python -m models.compare` in a child process and watches it.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analysis import Run, open_run
from circuits.recording import RecordingError


def latest(run: Run) -> str:
    """The last recorded row: learning step, phase and angle(B, W) of every projection."""
    steps, alignment, evaluations = run.steps, run.alignment, run.evaluations
    if not len(steps):
        return "no rows flushed yet"
    angles = ", ".join(f"{name} {series['angle'][-1]:5.1f}°" for name, series in alignment.items())
    accuracy = f", test accuracy {100 * evaluations['top1'][-1]:.1f}%" if len(evaluations) else ""
    return f"step {int(steps.step[-1]):5d} ({steps['phase'][-1]:>6}): angle(B, W) {angles}{accuracy}"


def wait_for(path: Path, writer: subprocess.Popen | None, timeout: float) -> Run:
    """Open the recording once its writer has created it and switched it to SWMR mode."""
    start = time.monotonic()
    while True:
        try:
            return open_run(path)
        except (FileNotFoundError, RecordingError):   # not there yet, or still locked by its writer's set-up
            if writer is not None and writer.poll() is not None:
                raise RuntimeError(f"the run exited with code {writer.returncode} before recording to {path}")
            if time.monotonic() - start > timeout:
                raise
            time.sleep(0.1)


def watch(path: Path, writer: subprocess.Popen | None = None, interval: float = 1.0, timeout: float = 600) -> None:
    """Print the latest row every `interval` seconds until the writer exits (or, without one, Ctrl-C)."""
    shown = None
    with wait_for(path, writer, timeout) as run:
        while True:
            done = writer is not None and writer.poll() is not None
            line = latest(run)
            if line != shown:
                print(line, flush=True)
                shown = line
            if done:
                return
            time.sleep(interval)


def demo(smoke: bool, interval: float) -> None:
    with tempfile.TemporaryDirectory(prefix="watch-") as out:
        command = [sys.executable, "-m", "models.compare", "--rules", "wm", "--seeds", "0", "--out", out,
                   "--no-report", "--no-progress"] + (["--smoke"] if smoke else [])
        print("writer: python", " ".join(command[1:]), flush=True)
        with subprocess.Popen(command, stdout=subprocess.DEVNULL) as writer:
            watch(Path(out) / "runs" / "wm-seed0.h5", writer, interval)
    if writer.returncode:
        raise SystemExit(f"the run failed with exit code {writer.returncode}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recording", nargs="?", type=Path, help="a recording (.h5) being written by another process")
    p.add_argument("--demo", action="store_true", help="start a weight-mirror run and watch it")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    p.add_argument("--smoke", action="store_true", help="with --demo: the CI-sized run")
    args = p.parse_args(argv)
    if args.demo or args.smoke:
        demo(args.smoke, args.interval)
    elif args.recording is None:
        p.error("name a recording to watch, or pass --demo")
    else:
        try:
            watch(args.recording, interval=args.interval)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
