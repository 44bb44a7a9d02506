"""A circuit: a networkx graph of forward populations, their feedback partners and projections.

Forward pathway: population nodes and projection edges pre -> post (W, or a local operation).
Feedback pathway: a partner node δp for every population p. By default every forward edge
pre -> post has a layer-local feedback edge δpost -> δpre that carries the error back (through B
for synaptic projections, through the local derivative otherwise). `feedback(source, target)` adds
a direct feedback edge δsource -> δtarget with its own B and rule (circuits.graph.feedback), and removes
the layer-local feedback edges into δtarget: a population's error comes either layer by layer or
directly. Several projections into one population sum, forward and feedback alike, except into a
junction (`junction`), whose inputs combine by an operation such as a * b or attention; its node in the
graph carries `junction`, the operation as text.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

import networkx as nx
import torch

from .. import rules
from ..errors import CircuitError
from . import schema
from .network import CircuitNet
from .operations import JunctionInput, Operation
from .population import Population
from .projections import Projection

PopulationLike = Union[str, Population]


class Circuit:
    """A network of populations and projections, defined in a script and compiled by `build()`.

    >>> c = Circuit("mlp")
    >>> x = c.input("retina", shape=(784,))
    >>> h = c.population("hidden", shape=(500,), activation="relu")
    >>> c.connect(x, h, Dense(), rule="wm")
    """

    def __init__(self, name: str = "circuit", rule: rules.RuleLike = "bp") -> None:
        """`rule`: the feedback rule of synaptic projections connected without one."""
        self.name = name
        self.default_rule = rules.get(rule)
        self.graph = nx.DiGraph(name=name)
        self.dtype: torch.dtype | None = None    # the built net's parameters (None: torch's default)
        self.training = True                     # the built net's mode
        self.returns: Any = None    # what the built net returns: output population names in a tuple, list or dict

    # --- populations -------------------------------------------------------------------------
    def input(self, name: str, shape: tuple[int, ...]) -> Population:
        """An input population, driven by data."""
        return self._add(Population(name, tuple(shape), "identity", is_input=True))

    def population(self, name: str, shape: tuple[int, ...], activation: str = "identity") -> Population:
        """A population that sums its incoming projections and fires activation(sum)."""
        return self._add(Population(name, tuple(shape), activation))

    def junction(self, name: str, operands: list[PopulationLike], operation: Projection,
                 activation: str = "identity") -> Population:
        """A population whose inputs combine by `operation` (circuits.graph.operations.Operation) instead of summing:
        a = op(y_0, y_1, ...) of the `operands` in argument order (Operand(i) in its template), y = phi(a). Its
        shape is what the operation makes of theirs. No synapses: the error crosses through the operation's
        own derivative, under every rule."""
        if not isinstance(operation, Operation):
            raise CircuitError(f"junction {name!r}: {operation!r} is not an Operation")
        pops = [self[p] for p in operands]
        if len({p.name for p in pops}) != len(pops) or operation.operands != len(pops):
            raise CircuitError(f"junction {name!r}: {operation} reads {operation.operands} operands; give as many "
                               f"distinct populations, got {[p.name for p in pops]}")
        shape = operation.shape_of(pops, name)
        post = self._add(Population(name, shape, activation, junction=operation))
        for position, pre in enumerate(pops):
            self.connect(pre, post, JunctionInput(position))
        return post

    def _add(self, pop: Population) -> Population:
        if pop.name in self.graph:
            raise CircuitError(f"circuit {self.name!r} already has a population named {pop.name!r}")
        schema.add_population(self.graph, pop.name, population=pop,
                             **({"junction": repr(pop.junction)} if pop.junction is not None else {}))
        return pop

    def __getitem__(self, pop: PopulationLike) -> Population:
        name = _name(pop)
        node = self.graph.nodes.get(name)
        if node is None or node["pathway"] != schema.FORWARD:
            raise CircuitError(f"circuit {self.name!r} has no population named {name!r}")
        if isinstance(pop, Population) and pop is not node["population"]:
            raise CircuitError(f"population {name!r} was made by another circuit; circuit {self.name!r} has its own "
                               f"population of that name: pass the one this circuit made")
        return node["population"]

    def populations(self) -> list[Population]:
        """Forward populations in the order they were added."""
        return [d["population"] for _, d in self.forward_graph().nodes(data=True)]

    # --- projections -------------------------------------------------------------------------
    def connect(self, pre: PopulationLike, post: PopulationLike, projection: Projection,
                rule: rules.RuleLike | None = None, name: str | None = None) -> str:
        """Project `pre` onto `post`; a synaptic projection's feedback learns by `rule` (default: the circuit's).

        Returns the projection's name (default "pre->post").
        """
        pre, post = self[pre], self[post]
        if not isinstance(projection, Projection):
            raise CircuitError(f"connect({pre.name!r}, {post.name!r}): {projection!r} is not a circuits projection")
        if post.is_input:
            raise CircuitError(f"{post.name!r} is an input population: nothing projects onto it")
        if self.graph.has_edge(pre.name, post.name):
            raise CircuitError(f"{pre.name!r} already projects onto {post.name!r}")
        projection.check(pre, post)
        direct = self.receives_direct_feedback(pre)
        if not projection.synaptic and rule is not None:
            raise CircuitError(f"{projection} from {pre.name!r} to {post.name!r} is a local operation "
                               f"with no synapses; it takes no feedback rule")
        if not projection.sends_error and rule is not None:
            raise CircuitError(f"{projection} from {pre.name!r} to {post.name!r} sends no error back (its input "
                               f"carries none); it takes no feedback rule")
        if direct and rule is not None:
            raise CircuitError(f"{pre.name!r} receives direct feedback, so the projection {pre.name!r} -> "
                               f"{post.name!r} has no feedback of its own; it takes no feedback rule")
        if projection.synaptic and projection.sends_error and not direct:
            rule = rules.get(rule) if rule is not None else self.default_rule
        name = name or f"{pre.name}->{post.name}"
        self._check_new_name(name)
        schema.add_projection(self.graph, pre.name, post.name, name=name, projection=projection, rule=rule)
        if not direct and projection.sends_error:
            schema.add_feedback(self.graph, post.error_name, pre.error_name, name=name, direct=False, rule=rule,
                               carries=schema.CARRIES_B if projection.synaptic else schema.CARRIES_LOCAL)
        return name

    def feedback(self, source: PopulationLike, target: PopulationLike, rule: rules.RuleLike = "dfa",
                 name: str | None = None) -> str:
        """A direct feedback projection δsource -> δtarget with its own B and `rule` (default "dfa").

        delta_target = phi'(a_target) * (B^T delta_source); `source` must lie downstream of `target`.
        The layer-local feedback of every projection leaving `target` is removed (they keep W and
        learn, but send no error back): `target`'s error now comes by direct feedback alone.
        Returns the projection's name (default "δsource->δtarget").
        """
        source, target = self[source], self[target]
        rule = rules.get(rule)
        rule.check(f"direct feedback projection from {source.error_name!r} to {target.error_name!r}", has_weight=False)
        if target.is_input:
            raise CircuitError(f"{target.name!r} is an input population: it needs no error")
        if source.name == target.name or not nx.has_path(self.forward_graph(), target.name, source.name):
            raise CircuitError(f"direct feedback from {source.name!r} to {target.name!r}: the source must lie "
                               f"downstream of the target in the forward pathway")
        if self.graph.has_edge(source.error_name, target.error_name) and self.graph.edges[
                source.error_name, target.error_name]["direct"]:
            raise CircuitError(f"{source.error_name!r} already projects directly onto {target.error_name!r}")
        name = name or f"{source.error_name}->{target.error_name}"
        self._check_new_name(name)
        for post in list(self.graph.successors(target.name)):      # layer-local feedback into δtarget goes
            edge = self.graph.edges[target.name, post]
            edge["rule"] = None
            if self.graph.has_edge(self[post].error_name, target.error_name):
                self.graph.remove_edge(self[post].error_name, target.error_name)
        schema.add_feedback(self.graph, source.error_name, target.error_name, name=name, direct=True,
                           carries=schema.CARRIES_B, rule=rule)
        return name

    def direct_feedback(self, rule: rules.RuleLike = "dfa", source: PopulationLike | None = None) -> list[str]:
        """Wire `source` (default: the one output population) directly to every hidden population
        that feeds a synaptic projection, with `rule` (DFA: Nokland 2016). Projections leaving input
        populations lose their feedback too (an input needs no error). Returns the new names."""
        forward = self.forward_graph()
        if source is None:
            sinks = [n for n in forward if forward.out_degree(n) == 0 and not self[n].is_input]
            if len(sinks) != 1:
                raise CircuitError(f"circuit {self.name!r} has output populations {sinks}: name the source "
                                   f"of direct feedback, or wire it with circuit.feedback(source, target)")
            source = sinks[0]
        source = self[source]
        targets = [n for n in nx.topological_sort(forward)
                   if any(d["projection"].synaptic for _, _, d in forward.out_edges(n, data=True))]
        names = []
        for target in targets:
            if self[target].is_input:
                for post in list(self.graph.successors(target)):
                    self.graph.edges[target, post]["rule"] = None
                    if self.graph.has_edge(self[post].error_name, self[target].error_name):
                        self.graph.remove_edge(self[post].error_name, self[target].error_name)
            else:
                names.append(self.feedback(source, target, rule))
        return names

    def receives_direct_feedback(self, pop: PopulationLike) -> bool:
        """Whether population `pop`'s error comes by direct feedback projections."""
        return any(d["direct"] for *_, d in self.graph.in_edges(self[pop].error_name, data=True))

    def feedback_projections(self) -> list[tuple[str, str, str, rules.FeedbackRule]]:
        """(name, source error population, target error population, rule) of every direct feedback projection."""
        return [(d["name"], u, v, d["rule"]) for u, v, d in self.feedback_graph().edges(data=True) if d["direct"]]

    def _check_new_name(self, name: str) -> None:
        if any(d.get("name") == name for *_, d in self.graph.edges(data=True)):
            raise CircuitError(f"circuit {self.name!r} already has a projection named {name!r}")

    def projections(self) -> list[tuple[str, str, str, Projection, rules.FeedbackRule | None]]:
        """(name, pre, post, projection, rule) for every forward projection."""
        return [(d["name"], u, v, d["projection"], d["rule"]) for u, v, d in self.forward_graph().edges(data=True)]

    def forward_graph(self) -> nx.DiGraph:
        """The forward pathway alone (populations and projections)."""
        return schema.pathway(self.graph, schema.FORWARD)

    def feedback_graph(self) -> nx.DiGraph:
        """The feedback pathway alone (error populations and feedback projections)."""
        return schema.pathway(self.graph, schema.FEEDBACK)

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
        """Compile into a torch.nn.Module whose backward pass is the feedback pathway. With a dtype (a converted
        module's), every parameter and buffer is made in it, so that a state in that dtype loads without rounding."""
        if self.dtype is None:
            return CircuitNet(self).train(self.training)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            net = CircuitNet(self)
        finally:
            torch.set_default_dtype(default)
        return net.to(self.dtype).train(self.training)

    def __repr__(self) -> str:
        return (f"Circuit({self.name!r}, {len(self.populations())} populations, "
                f"{len(self.projections())} projections)")


class LayerRules:
    """The feedback rule of each named synaptic projection while a circuit is built: an override from
    `rules_by_layer`, else the circuit's rule. `finish` checks that every override matched a
    projection, then, when the circuit's rule is direct (DFA), wires the output error to every hidden
    population (Circuit.direct_feedback). Used by circuits.from_torch and every builder in models."""

    def __init__(self, rules_by_layer: Mapping[str, rules.RuleLike] | None) -> None:
        self.pending = dict(rules_by_layer or {})
        self.overridden = bool(self.pending)

    def __call__(self, name: str) -> rules.RuleLike | None:
        """The rule for projection `name` (None: the circuit's rule)."""
        return self.pending.pop(name, None)

    def finish(self, circuit: Circuit) -> Circuit:
        if self.pending:
            synaptic = [name for name, _, _, projection, _ in circuit.projections() if projection.synaptic]
            raise CircuitError(
                f"rules_by_layer names projections that circuit {circuit.name!r} does not have "
                f"or that have no synapses: {sorted(self.pending)}; its synaptic projections are {synaptic}"
            )
        if circuit.default_rule.direct:
            if self.overridden:
                raise CircuitError(f"rules_by_layer cannot be combined with the direct rule {circuit.default_rule}: "
                                   f"wire the circuit with circuit.feedback(source, target, rule) instead")
            circuit.direct_feedback(circuit.default_rule)
        return circuit


def _name(pop: PopulationLike) -> str:
    return pop.name if isinstance(pop, Population) else pop
