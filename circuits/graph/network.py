"""A built circuit: one torch.nn.Module that runs the forward populations in topological order.

A population sums its incoming projections; a junction combines them by its operation instead
(circuits.graph.operations), in the argument order of its JunctionInput projections.

Its backward pass is the circuit's feedback pathway: each synaptic projection sends the error
back through its B (circuits.rules.synapse), local projections through their own derivative, and
direct feedback projections (circuits.graph.feedback) straight from a downstream error population. A projection
whose rule reads the output error (ldfa, BioTorch's DFA) sends none itself: its input receives B^T e from the
output's error e, through OutputFeedbackPathway on the output activity, and what other paths send adds.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import networkx as nx
import torch
from torch import Tensor, nn

from ..errors import CircuitError
from ..rules.synapse import Synapse
from .activations import activation
from .feedback import DirectFeedback, OutputFeedbackPathway

if TYPE_CHECKING:
    from .circuit import Circuit


@dataclass
class Trace:
    """One population's activity on a batch: summed input a and firing y = phi(a).

    After a backward pass, the error delta = dL/da is what the population's feedback partner carries.
    """

    a: Tensor
    y: Tensor


def module_key(name: str) -> str:
    """A projection name as a torch submodule name (torch forbids '.')."""
    return name.replace(".", "_")


class CircuitNet(nn.Module):
    """The compiled circuit. `net(x)` returns the output population's activity.

    With several input populations pass them by name, `net(retina=x, touch=z)`; with several
    output populations (sinks) the result is a dict by name.
    """

    def __init__(self, circuit: Circuit) -> None:
        super().__init__()
        self.circuit = circuit
        order = circuit.order()
        graph = circuit.forward_graph()
        self.inputs = [n for n in order if circuit[n].is_input]
        self.outputs = [n for n in order if graph.out_degree(n) == 0 and not circuit[n].is_input]
        if not self.inputs:
            raise CircuitError(f"circuit {circuit.name!r} has no input population")
        self.input_shapes = {name: circuit[name].shape for name in self.inputs}
        # inputs read only by projections that send no error back (Embedding): indices, not activity
        self._index_inputs = {name for name in self.inputs
                              if all(not graph.edges[name, post]["projection"].sends_error
                                     for post in graph.successors(name))}
        if not self.outputs:
            raise CircuitError(f"circuit {circuit.name!r} has no output population")
        self.proj = nn.ModuleDict()
        self._names: dict[str, str] = {}
        self._reads_output: set[str] = set()     # projections whose input's error comes from the output (ldfa)
        for name, pre, post, projection, rule in circuit.projections():
            key = module_key(name)
            if key in self.proj:
                raise CircuitError(f"projection names {name!r} and {self._names[key]!r} collide")
            if rule is not None and rule.reads_output_error:
                if len(self.outputs) != 1:
                    raise CircuitError(f"rule {rule} of {name!r} sends the output error, but circuit "
                                       f"{circuit.name!r} has output populations {self.outputs}")
                rule = rule.for_output(math.prod(circuit[self.outputs[0]].shape))
                self._reads_output.add(key)
            self.proj[key] = projection.build(circuit[pre], circuit[post], rule)
            self._names[key] = name
        self.feedback_proj = nn.ModuleDict()
        direct: dict[str, list[tuple[str, str]]] = {pop: [] for pop in order}   # source -> [(key, target)]
        for name, source, target, rule in circuit.feedback_projections():
            key = module_key(name)
            if key in self.proj or key in self.feedback_proj:
                raise CircuitError(f"feedback projection name {name!r} collides with another projection's")
            source, target = circuit.graph.nodes[source]["partner"], circuit.graph.nodes[target]["partner"]
            self.feedback_proj[key] = DirectFeedback(circuit[source], circuit[target], rule)
            self._names[key] = name
            direct[source].append((key, target))
        self.direct_targets = {target for pairs in direct.values() for _, target in pairs}
        last_use = {}
        for step, pop in enumerate(order):
            for pre in [*graph.predecessors(pop), *(target for _, target in direct[pop])]:
                last_use[pre] = step
        self._plan = []
        self.junctions = nn.ModuleDict()
        for step, pop in enumerate(order):
            if circuit[pop].is_input:
                continue
            incoming = [(module_key(graph.edges[pre, pop]["name"]), pre) for pre in graph.predecessors(pop)]
            if not incoming:
                raise CircuitError(f"population {pop!r} has no incoming projection and is not an input")
            junction = None
            if circuit[pop].junction is not None:     # inputs in argument order, combined by the operation
                junction = module_key(pop)
                self.junctions[junction] = circuit[pop].junction.build(None, None, None)
                incoming.sort(key=lambda edge: graph.edges[edge[1], pop]["projection"].position)
            release = [p for p, s in last_use.items() if s == step and p not in self.outputs]
            self._plan.append((pop, activation(circuit[pop].activation), incoming, junction, direct[pop], release))
        self._reference = False

    def forward(self, *args: Tensor, monitor: dict[str, Trace] | None = None, **inputs: Tensor):
        """Run the forward populations; with `monitor`, keep each population's Trace in it."""
        if args:
            if len(args) != 1 or len(self.inputs) != 1 or inputs:
                raise CircuitError(f"pass one tensor for a single input population, or name each of {self.inputs}")
            inputs = {self.inputs[0]: args[0]}
        if set(inputs) != set(self.inputs):
            raise CircuitError(f"circuit {self.circuit.name!r} takes inputs {self.inputs}, got {sorted(inputs)}")
        for name, x in inputs.items():
            declared = self.input_shapes[name]
            if tuple(x.shape[1:]) != declared:
                raise CircuitError(
                    f"input population {name!r} was declared with shape {declared} (one example), but "
                    f"got a batch of shape {tuple(x.shape)}: examples of shape {tuple(x.shape[1:])}. Declare "
                    f"the shape the data has (from_torch(..., input_shape=...)): mirror noise, padding "
                    f"statistics and recordings follow the declared shape"
                )
            self._check_dtype(name, x)
        activity = dict(inputs)     # what projections read: a direct target's activity, detached
        sensed: dict[str, Tensor] = {}   # a direct target's activity itself, where its error arrives
        ports: list[tuple[str, Tensor, tuple[int, ...]]] = []   # (key, input, output shape) of ldfa projections
        for pop, phi, incoming, junction, direct, release in self._plan:
            if junction is not None:
                a = self.junctions[junction](*(self.proj[key](activity[pre]) for key, pre in incoming))
            else:       # summed as they come: each drive freed once added
                a = None
                for key, pre in incoming:
                    drive = self.proj[key](activity[pre])
                    if key in self._reads_output and not self._reference:
                        ports.append((key, activity[pre], tuple(drive.shape)))
                    a = drive if a is None else a + drive
            if not self._reference:
                for key, target in direct:
                    a = self.feedback_proj[key](a, sensed[target])
            y = phi(a)
            activity[pop] = y
            if pop in self.direct_targets and not self._reference:
                sensed[pop], activity[pop] = y, y.detach()
            if monitor is not None:
                if a.requires_grad:
                    a.retain_grad()
                monitor[pop] = Trace(a, y)
            for p in release:
                del activity[p]
                sensed.pop(p, None)
        if ports and torch.is_grad_enabled():
            out = self.outputs[0]
            activity[out] = OutputFeedbackPathway.apply(
                activity[out], tuple((self.proj[k].operator, self.proj[k].rule, shape) for k, _, shape in ports),
                *(y for _, y, _ in ports), *(self._cast(self.proj[k].feedback, y) for k, y, _ in ports))
        if self.circuit.returns is not None:
            return _returned(self.circuit.returns, activity)
        if len(self.outputs) == 1:
            return activity[self.outputs[0]]
        return {name: activity[name] for name in self.outputs}

    @staticmethod
    def _cast(feedback: Tensor, y: Tensor) -> Tensor:
        """B in the autocast dtype where autocast is on (as the forward computed), else as stored."""
        device = y.device.type
        return feedback.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else feedback

    @contextlib.contextmanager
    def backprop_reference(self) -> Iterator[None]:
        """Inside, the net computes plain backprop: every error travels back through W itself, layer by
        layer, whatever the rules and direct feedback (the reference the recorder's probe compares to)."""
        synapses = [s for _, s in self.projections()]
        self._reference = True
        for s in synapses:
            s.transport = True
        try:
            yield
        finally:
            self._reference = False
            for s in synapses:
                s.transport = False

    def projections(self) -> Iterator[tuple[str, Synapse]]:
        """(name, projection) for every synaptic projection: `.weight` is W, `.feedback` is B in W's
        layout (None where the projection's input population gets direct feedback)."""
        for key, module in self.proj.items():
            if isinstance(module, Synapse):
                yield self._names[key], module

    def feedback_projections(self) -> Iterator[tuple[str, DirectFeedback]]:
        """(name, projection) for every direct feedback projection: `.source` and `.target` name the
        populations whose errors it joins, `.feedback` is B (source units x target units or channels)."""
        for key, module in self.feedback_proj.items():
            yield self._names[key], module

    def error_populations(self) -> list[str]:
        """Populations, in topological order, whose summed input depends on a trainable parameter: those that
        receive an error (an error is dL/da)."""
        graph = self.circuit.forward_graph()
        sources = {post for name, _, post, _, _ in self.circuit.projections()
                   if any(p.requires_grad for p in self.projection(name).parameters())}
        reached = sources.union(*(nx.descendants(graph, s) for s in sources))
        return [p for p in self.circuit.order() if p in reached]

    def projection(self, name: str) -> nn.Module:
        """The module of the projection called `name` (forward, or direct feedback)."""
        key = module_key(name)
        for modules in (self.proj, self.feedback_proj):
            if key in modules:
                return modules[key]
        raise CircuitError(f"circuit {self.circuit.name!r} has no projection named {name!r}")

    def _check_dtype(self, name: str, x: Tensor) -> None:
        """A CircuitError naming both dtypes if input `x` is not of the net's floating dtype (indices: an integer
        dtype), instead of torch's "mat1 and mat2 must have the same dtype" deep inside a projection."""
        if name in self._index_inputs:
            if x.is_floating_point() or x.is_complex():
                raise CircuitError(f"input population {name!r} holds indices (read by an embedding), but got a "
                                   f"batch of dtype {x.dtype}; pass integer indices (torch.long)")
            return
        dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.dtype != dtype:
            fix = f"convert the data (x.to({dtype}))" + (f" or the net (net.to({x.dtype}))" if x.is_floating_point()
                                                        else "")
            raise CircuitError(f"input population {name!r} got a batch of dtype {x.dtype}, but circuit "
                               f"{self.circuit.name!r} runs in {dtype}: {fix}")

    def forward_parameters(self) -> Iterator[nn.Parameter]:
        """The forward pathway's parameters (W, biases, batch-norm affine), without any B."""
        for name, p in self.named_parameters():
            if not name.endswith(".B"):
                yield p


def _returned(structure: Any, activity: dict[str, Tensor]) -> Any:
    """The outputs in the circuit's structure (Circuit.returns): population names replaced by their activity."""
    if isinstance(structure, str):
        return activity[structure]
    if isinstance(structure, dict):
        return {k: _returned(v, activity) for k, v in structure.items()}
    items = [_returned(v, activity) for v in structure]
    return type(structure)(*items) if hasattr(structure, "_fields") else type(structure)(items)


def unwrap(net: nn.Module) -> CircuitNet:
    """The CircuitNet (or circuits.graph.seeds.SeedBatch, its copies over seeds) inside DistributedDataParallel
    and torch.compile wrappers."""
    while not isinstance(net, CircuitNet) and not getattr(net, "is_seed_batch", False):
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if inner is None:
            raise CircuitError(f"{type(net).__name__} is not a built circuit (CircuitNet)")
        net = inner
    return net
