"""A circuit: a networkx graph of forward populations, their feedback partners and projections.

Forward pathway: population nodes and projection edges pre -> post (W, or a local operation).
Feedback pathway: a partner node δp for every population p, and for every forward edge pre -> post
an edge δpost -> δpre that carries the error back (through B for synaptic projections, through
the local derivative otherwise). Several projections into one population sum.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

import networkx as nx

from . import rules
from .errors import CircuitError
from .population import Population
from .projections import Projection

if TYPE_CHECKING:
    from .network import CircuitNet

PopulationLike = Union[str, Population]


class Circuit:
    """A network of populations and projections, defined in a script and compiled by `build()`.

    >>> c = Circuit("mlp")
    >>> x = c.input("retina", shape=(784,))
    >>> h = c.population("hidden", shape=(500,), activation="relu")
    >>> c.connect(x, h, Dense(), feedback="wm")
    """

    def __init__(self, name: str = "circuit", rule: rules.RuleLike = "bp") -> None:
        """`rule`: the feedback rule of synaptic projections connected without one."""
        self.name = name
        self.default_rule = rules.get(rule)
        self.graph = nx.DiGraph(name=name)

    # --- populations -------------------------------------------------------------------------
    def input(self, name: str, shape: tuple[int, ...]) -> Population:
        """An input population, driven by data."""
        return self._add(Population(name, tuple(shape), "identity", is_input=True))

    def population(self, name: str, shape: tuple[int, ...], activation: str = "identity") -> Population:
        """A population that sums its incoming projections and fires activation(sum)."""
        return self._add(Population(name, tuple(shape), activation))

    def _add(self, pop: Population) -> Population:
        if pop.name in self.graph:
            raise CircuitError(f"circuit {self.name!r} already has a population named {pop.name!r}")
        self.graph.add_node(pop.name, pathway="forward", population=pop)
        self.graph.add_node(pop.error_name, pathway="feedback", partner=pop.name)
        return pop

    def __getitem__(self, name: str) -> Population:
        node = self.graph.nodes.get(name)
        if node is None or node["pathway"] != "forward":
            raise CircuitError(f"circuit {self.name!r} has no population named {name!r}")
        return node["population"]

    def populations(self) -> list[Population]:
        """Forward populations in the order they were added."""
        return [d["population"] for _, d in self.graph.nodes(data=True) if d["pathway"] == "forward"]

    # --- projections -------------------------------------------------------------------------
    def connect(self, pre: PopulationLike, post: PopulationLike, projection: Projection,
                feedback: rules.RuleLike | None = None, name: str | None = None) -> str:
        """Project `pre` onto `post`; synaptic projections get the feedback rule `feedback`.

        Returns the projection's name (default "pre->post").
        """
        pre, post = self[_name(pre)], self[_name(post)]
        if not isinstance(projection, Projection):
            raise CircuitError(f"connect({pre.name!r}, {post.name!r}): {projection!r} is not a circuits projection")
        if post.is_input:
            raise CircuitError(f"{post.name!r} is an input population: nothing projects onto it")
        if self.graph.has_edge(pre.name, post.name):
            raise CircuitError(f"{pre.name!r} already projects onto {post.name!r}")
        projection.check(pre, post)
        if projection.synaptic:
            rule = rules.get(feedback) if feedback is not None else self.default_rule
        elif feedback is not None:
            raise CircuitError(f"{projection} from {pre.name!r} to {post.name!r} is a local operation "
                               f"with no synapses; it takes no feedback rule")
        else:
            rule = None
        name = name or f"{pre.name}->{post.name}"
        if any(d.get("name") == name for *_, d in self.graph.edges(data=True)):
            raise CircuitError(f"circuit {self.name!r} already has a projection named {name!r}")
        self.graph.add_edge(pre.name, post.name, pathway="forward", name=name, projection=projection, rule=rule)
        self.graph.add_edge(post.error_name, pre.error_name, pathway="feedback", name=name,
                            carries="B" if projection.synaptic else "local derivative",
                            rule=str(rule) if rule else None)
        return name

    def projections(self) -> list[tuple[str, str, str, Projection, rules.FeedbackRule | None]]:
        """(name, pre, post, projection, rule) for every forward projection."""
        return [(d["name"], u, v, d["projection"], d["rule"])
                for u, v, d in self.graph.edges(data=True) if d["pathway"] == "forward"]

    def forward_graph(self) -> nx.DiGraph:
        """The forward pathway alone (populations and projections)."""
        return self.graph.subgraph(n for n, d in self.graph.nodes(data=True) if d["pathway"] == "forward")

    def feedback_graph(self) -> nx.DiGraph:
        """The feedback pathway alone (error populations and feedback projections)."""
        return self.graph.subgraph(n for n, d in self.graph.nodes(data=True) if d["pathway"] == "feedback")

    # --- compilation -------------------------------------------------------------------------
    def order(self) -> list[str]:
        """Forward populations in topological order; a CircuitError names any cycle."""
        forward = self.forward_graph()
        try:
            return list(nx.topological_sort(forward))
        except nx.NetworkXUnfeasible:
            edges = nx.find_cycle(forward)
            cycle = " -> ".join([u for u, _ in edges] + [edges[0][0]])
            raise CircuitError(f"circuit {self.name!r} has a cycle in its forward pathway: {cycle}") from None

    def build(self) -> CircuitNet:
        """Compile into a torch.nn.Module whose backward pass is the feedback pathway."""
        from .network import CircuitNet

        return CircuitNet(self)

    def __repr__(self) -> str:
        return (f"Circuit({self.name!r}, {len(self.populations())} populations, "
                f"{len(self.projections())} projections)")


def _name(pop: PopulationLike) -> str:
    return pop.name if isinstance(pop, Population) else pop
