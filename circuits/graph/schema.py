"""The circuit graph's schema, in one place: what circuits.Circuit builds and analysis rebuilds from a recording.

A networkx DiGraph whose nodes are populations: forward populations (pathway "forward") and, for each,
a partner error population named ERROR_PREFIX + name (pathway "feedback", `partner` = the forward
name). Forward edges pre -> post (pathway "forward") are projections; feedback edges between error
populations (pathway "feedback") carry "B" or a "local derivative", are `direct` or layer-local, and
name their rule. A forward population's activation is a spec string: a name with any non-default settings,
"leaky_relu(negative_slope=0.2)" (activation_spec, parse_activation). Needs networkx only, not torch.
"""
from __future__ import annotations

import ast
from typing import Any

import networkx as nx

ERROR_PREFIX = "δ"
"""A forward population `p` has a feedback partner population named `δp` carrying its error."""
FORWARD, FEEDBACK = "forward", "feedback"
CARRIES_B, CARRIES_LOCAL = "B", "local derivative"


def error_name(population: str) -> str:
    """The name of the error population partnering forward population `population`."""
    return ERROR_PREFIX + population


def add_population(graph: nx.DiGraph, name: str, **attributes: Any) -> None:
    """A forward population and its error partner."""
    graph.add_node(name, pathway=FORWARD, **attributes)
    graph.add_node(error_name(name), pathway=FEEDBACK, partner=name)


def add_projection(graph: nx.DiGraph, pre: str, post: str, **attributes: Any) -> None:
    """A forward projection pre -> post."""
    graph.add_edge(pre, post, pathway=FORWARD, **attributes)


def add_feedback(graph: nx.DiGraph, source: str, target: str, *, carries: str, direct: bool, **attributes: Any) -> None:
    """A feedback projection between error populations (their δ-names): through B or a local derivative."""
    graph.add_edge(source, target, pathway=FEEDBACK, carries=carries, direct=direct, **attributes)


def pathway(graph: nx.DiGraph, which: str) -> nx.DiGraph:
    """The forward or the feedback pathway alone, as a view."""
    return graph.subgraph(n for n, d in graph.nodes(data=True) if d["pathway"] == which)


def activation_spec(name: str, settings: dict[str, Any]) -> str:
    """A population's activation as text: its name, with settings as keyword arguments, e.g.
    "leaky_relu(negative_slope=0.2)"; plain values only, so that parse_activation reads it back without torch."""
    if not settings:
        return name
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"


def parse_activation(spec: str) -> tuple[str, dict[str, Any]]:
    """(name, settings) of an activation spec written by activation_spec; a ValueError for anything else."""
    try:
        call = ast.parse(spec, mode="eval").body
        if isinstance(call, ast.Name):
            return call.id, {}
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args:
            return call.func.id, {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        pass
    raise ValueError(f"{spec!r} is not an activation spec such as 'relu' or \"gelu(approximate='tanh')\"")
