"""Analysis of recorded runs: open a recording, compute alignment statistics, draw the paper's figures.

    from analysis import open_run, figures, stats
    run = open_run("runs/kp.h5")
    stats.first_below(run.alignment, threshold=10)
    figures.save(figures.alignment([run]), "alignment.png")

Command line: python -m analysis report RUN.h5 [RUN2.h5 ...] -o DIR
"""
from . import figures, stats
from .report import report
from .run import Run, Series, open_run

__all__ = ["open_run", "Run", "Series", "stats", "figures", "report"]
