"""Figures of recorded runs, drawn with matplotlib's object API (no display, no pyplot state).

- alignment(runs): angle(B, W) of every projection over training, one panel a run, one line a layer,
  depth as colour: the paper's alignment-per-layer figure, under each rule.
- error_angles(runs): the angle between each hidden population's error and backprop's on the probe batch.
- curves(runs): training loss and held-out top-1 error of several runs, each on one axis.
- seeds(summaries): each rule's final accuracy, paired difference to the baseline and final angles across
  seeds: per-seed values as dots, the mean with its 95% t-interval as an error bar, the claims' bars as lines.
- circuit(run): the forward pathway above, the feedback pathway below, feedback projections coloured
  by their rule.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import networkx as nx
import numpy as np
from matplotlib import cm, colormaps, colors, lines, ticker
from matplotlib.figure import Figure

from circuits.graph import schema
from circuits.graph.schema import error_name

from .run import Run, Series
from .stats import LAST_EVALUATIONS, Interval, SeedSummary, hidden_populations

RULE_COLOURS = {"bp": "tab:blue", "fa": "tab:red", "dfa": "tab:brown", "ss": "tab:orange", "usf": "tab:orange",
                "brsf": "tab:olive", "frsf": "tab:pink", "kp": "tab:green", "wm": "tab:purple", "ia": "tab:cyan",
                "sa": "tab:gray"}
"""Feedback projections in circuit drawings; other rules are grey."""
DEPTH_MAP = "viridis"


def _panels(count: int, width: float = 4.8, height: float = 3.6) -> tuple[Figure, list]:
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, list(axes[:count])


def _by_depth(fig: Figure, ax, series: Mapping[str, Series], depth: Mapping[str, int], column: str, label: str) -> None:
    """One line per name, coloured by depth, with a colour bar."""
    top = max(depth.values(), default=1)
    norm = colors.Normalize(vmin=1, vmax=max(top, 2))
    cmap = colormaps[DEPTH_MAP]
    for name, s in series.items():
        ax.plot(s.step, s[column], color=cmap(norm(depth[name])), lw=1.2, label=name)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    bar.set_label(label)


def alignment(runs: Sequence[Run], column: str = "angle") -> Figure:
    """angle(B, W) (or another alignment column) of every synaptic projection over learning steps."""
    fig, axes = _panels(len(runs))
    labels = {"angle": "angle(B, W) (°)", "norm_ratio": "|B| / |W|", "sign_match": "fraction sign(B) = sign(W)"}
    for ax, run in zip(axes, runs):
        _by_depth(fig, ax, run.alignment, run.depth, column, "depth (synaptic layers from the input)")
        ax.set(title=f"{run.name} ({run.rule})", xlabel="learning step", ylabel=labels.get(column, column))
        if column == "angle":
            ax.axhline(90, color="grey", lw=0.6, ls=":")
            ax.set_ylim(bottom=0)
        if not run.alignment:
            ax.text(0.5, 0.5, "not defined: no B in W's layout\n(direct feedback; see the error angles)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
    return fig


def error_angles(runs: Sequence[Run]) -> Figure:
    """Angle between each hidden population's error under its rules and under backprop, on the probe batch."""
    fig, axes = _panels(len(runs))
    for ax, run in zip(axes, runs):
        hidden = hidden_populations(run)
        errors = {p: s for p, s in run.errors.items() if p in hidden}
        ax.set(title=f"{run.name} ({run.rule})", xlabel="learning step", ylabel="error angle to backprop (°)")
        if not any(len(s) for s in errors.values()):
            ax.text(0.5, 0.5, "no probe batch recorded", ha="center", va="center", transform=ax.transAxes)
            continue
        _by_depth(fig, ax, errors, {p: i + 1 for i, p in enumerate(hidden)}, "angle", "population (topological order)")
        ax.axhline(90, color="grey", lw=0.6, ls=":")
        ax.set_ylim(bottom=0)
    return fig


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def curves(runs: Sequence[Run], smoothing: int | None = None) -> Figure:
    """Training loss (running mean over `smoothing` learning steps, default 1/50 of the run) and held-out
    top-1 error of every run, one axis each."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    loss_ax, error_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        colour, label = f"C{i}", f"{run.name} ({run.rule})"
        steps = run.steps
        learn = steps["phase"] == "learn"
        loss = steps["loss"][learn]
        if len(loss):
            loss_ax.plot(
                steps.step[learn], running_mean(loss, smoothing or max(1, len(loss) // 50)), color=colour, label=label
            )
        ev = run.evaluations
        if len(ev) and "top1" in ev.columns:
            error_ax.plot(ev.step, 100 * (1 - ev["top1"]), "o-", ms=3, color=colour, label=label)
    loss_ax.set(title="training loss", xlabel="learning step", ylabel="loss", yscale="log")
    error_ax.set(title="held-out top-1 error", xlabel="learning step", ylabel="top-1 error (%)")
    for ax in (loss_ax, error_ax):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


def _intervals(ax, rows: Sequence[tuple[str, Sequence[float], Interval]]) -> None:
    """One column a rule: its per-seed values as dots, the mean with its t-interval (clipped to the data's
    range where one seed gives an infinite interval) as an error bar."""
    for x, (rule, values, found) in enumerate(rows):
        colour = RULE_COLOURS.get(rule, "tab:gray")
        ax.plot([x] * len(values), values, "o", ms=3, color=colour, alpha=0.6)
        if found.n > 1:
            ax.errorbar([x], [found.mean], yerr=[[found.mean - found.low], [found.high - found.mean]], fmt="s",
                        ms=5, color=colour, capsize=4)
    ax.set_xticks(range(len(rows)), [rule for rule, _, _ in rows])


def seeds(summaries: Sequence[SeedSummary], baseline: str = "bp", points: float = 0.5,
          threshold: float = 45.0) -> Figure:
    """Across seeds, per rule: accuracy (mean of the last evaluations), its paired difference to `baseline`
    with the ±`points` bar, and each projection's final angle(B, W) with the `threshold` line."""
    projections = list(dict.fromkeys(p for s in summaries for p in s.angles))
    fig, axes = _panels(2 + len(projections))
    _intervals(axes[0], [(s.rule, list(s.top1_tail.values()), s.accuracy()) for s in summaries])
    axes[0].set(title=f"test accuracy, mean of the last {LAST_EVALUATIONS} evaluations", ylabel="top-1 (%)")
    paired = [s for s in summaries if s.difference is not None]
    base = {s.rule: s for s in summaries}.get(baseline)
    _intervals(axes[1], [(s.rule, [s.top1_tail[k] - base.top1_tail[k] for k in s.seeds if k in base.top1_tail],
                          s.difference) for s in paired])
    for bar in (-points, points):
        axes[1].axhline(bar, color="grey", lw=0.8, ls="--")
    axes[1].axhline(0, color="grey", lw=0.6, ls=":")
    axes[1].set(title=f"paired difference to {baseline} (bar ±{points:g})", ylabel="top-1 difference (points)")
    for ax, p in zip(axes[2:], projections):
        _intervals(ax, [(s.rule, list(s.angles[p].values()), s.angle(p)) for s in summaries if p in s.angles])
        ax.axhline(threshold, color="grey", lw=0.8, ls="--")
        ax.set(title=f"final angle(B, W), {p}", ylabel="angle (°)")
        ax.set_ylim(bottom=0)
    return fig


def circuit(run: Run) -> Figure:
    """The circuit: populations by topological generation, left to right; the forward pathway above,
    each population's feedback partner δp mirrored below; feedback projections coloured by rule."""
    graph = run.circuit
    forward = schema.pathway(graph, schema.FORWARD)
    generations = [sorted(g) for g in nx.topological_generations(forward)]
    widest = max(len(g) for g in generations)
    gap = 0.5 * widest + 0.2
    pos, labels = {}, {}
    for x, gen in enumerate(generations):
        for i, pop in enumerate(gen):
            y = i - (len(gen) - 1) / 2
            pos[pop], pos[error_name(pop)] = (x, gap + y), (x, -gap - y)
            labels[pop], labels[error_name(pop)] = (x, gap + y + 0.3), (x, -gap - y - 0.3)
    fig = Figure(figsize=(max(7.0, 1.2 * len(generations) + 3), 1.2 * (2 * gap + 1.6)), layout="constrained")
    ax = fig.subplots()
    ax.set_ylim(-gap - widest / 2 - 0.3, gap + widest / 2 + 0.3)
    feedback_nodes = list(schema.pathway(graph, schema.FEEDBACK))
    nx.draw_networkx_nodes(
        graph, pos, nodelist=list(forward), node_color="white", edgecolors="black", node_size=320, ax=ax
    )
    nx.draw_networkx_nodes(
        graph, pos, nodelist=feedback_nodes, node_color="whitesmoke", edgecolors="grey", node_size=320, ax=ax
    )
    feedback = list(schema.pathway(graph, schema.FEEDBACK).edges(data=True))
    for skip in (False, True):      # an edge that skips generations (a shortcut) arcs away from the other pathway
        style = dict(node_size=320, ax=ax, connectionstyle="arc3,rad=-0.3" if skip else "arc3")
        nx.draw_networkx_edges(graph, pos, edgelist=[(u, v) for u, v in forward.edges if _skips(pos, u, v) == skip],
                               edge_color="black", **style)
        for synaptic in (True, False):
            edges = [(u, v, d) for u, v, d in feedback if d["synaptic"] == synaptic and _skips(pos, u, v) == skip]
            nx.draw_networkx_edges(
                graph,
                pos,
                edgelist=[(u, v) for u, v, _ in edges],
                style="--" if synaptic else ":",
                edge_color=[RULE_COLOURS.get(d["rule"], "grey") if synaptic else "grey" for *_, d in edges],
                **style,
            )
    nx.draw_networkx_labels(graph, labels, font_size=7, ax=ax)
    handles = [lines.Line2D([], [], color="black", label="forward projection")]
    handles += [lines.Line2D([], [], color=RULE_COLOURS.get(r, "grey"), ls="--", label=f"feedback through B ({r})")
                for r in dict.fromkeys(run.rules.values())]
    handles.append(lines.Line2D([], [], color="grey", ls=":", label="feedback through a local derivative"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(f"{graph.graph['name']}: forward pathway (top), feedback pathway (bottom)", fontsize=9)
    ax.set_axis_off()
    return fig


def _skips(pos: Mapping[str, tuple[float, float]], u: str, v: str) -> bool:
    return abs(pos[u][0] - pos[v][0]) > 1


def save(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a figure as PNG (or the format the suffix names) and return its path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
