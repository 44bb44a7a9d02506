"""Command line: python -m analysis report RUN.h5 [RUN2.h5 ...] -o DIR"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from circuits.recording import RecordingError

from .report import report
from .stats import ALIGNED_DEGREES


def parser(prog: str = "python -m analysis") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Analysis of mirrorcircuits recordings.")
    commands = p.add_subparsers(dest="command", required=True)
    r = commands.add_parser("report", help="figures (PNG) and a markdown summary of one or more runs",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("runs", nargs="+", help="recordings (.h5) written by circuits.Recorder")
    r.add_argument("-o", "--out", required=True, help="folder for the PNGs and summary.md (created if missing)")
    r.add_argument("--threshold", type=float, default=ALIGNED_DEGREES,
                   help="angle(B, W) in degrees counted as aligned (analysis.stats.ALIGNED_DEGREES)")
    r.add_argument("--baseline", default="bp", help="the rule that others are compared with, over matched seeds")
    r.add_argument("--points", type=float, default=0.5,
                   help="the claim judged across seeds: accuracy within this many points of the baseline")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m analysis") -> int:
    args = parser(prog).parse_args(argv)
    try:
        written = report(args.runs, args.out, args.threshold, progress=not args.no_progress,
                         baseline=args.baseline, points=args.points)
    except (RecordingError, OSError) as e:      # a file that is no recording, a folder that cannot be written
        print(f"{prog} report: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
