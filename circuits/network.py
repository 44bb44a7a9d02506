"""A built circuit: one torch.nn.Module that runs the forward populations in topological order.

Its backward pass is the circuit's feedback pathway: each synaptic projection sends the error
back through its B (circuits.synapse), local projections through their own derivative.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from .activations import activation
from .circuit import Circuit
from .errors import CircuitError
from .synapse import Synapse


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
        if not self.outputs:
            raise CircuitError(f"circuit {circuit.name!r} has no output population")
        self.proj = nn.ModuleDict()
        self._names: dict[str, str] = {}
        for name, pre, post, projection, rule in circuit.projections():
            key = module_key(name)
            if key in self.proj:
                raise CircuitError(f"projection names {name!r} and {self._names[key]!r} collide")
            self.proj[key] = projection.build(circuit[pre], circuit[post], rule)
            self._names[key] = name
        last_use = {}
        for step, pop in enumerate(order):
            for pre in graph.predecessors(pop):
                last_use[pre] = step
        self._plan = []
        for step, pop in enumerate(order):
            if circuit[pop].is_input:
                continue
            incoming = [(module_key(graph.edges[pre, pop]["name"]), pre) for pre in graph.predecessors(pop)]
            if not incoming:
                raise CircuitError(f"population {pop!r} has no incoming projection and is not an input")
            release = [p for p, s in last_use.items() if s == step and p not in self.outputs]
            self._plan.append((pop, activation(circuit[pop].activation), incoming, release))

    def forward(self, *args: Tensor, monitor: dict[str, Trace] | None = None, **inputs: Tensor):
        """Run the forward populations; with `monitor`, keep each population's Trace in it."""
        if args:
            if len(args) != 1 or len(self.inputs) != 1 or inputs:
                raise CircuitError(f"pass one tensor for a single input population, or name each of {self.inputs}")
            inputs = {self.inputs[0]: args[0]}
        if set(inputs) != set(self.inputs):
            raise CircuitError(f"circuit {self.circuit.name!r} takes inputs {self.inputs}, got {sorted(inputs)}")
        activity = dict(inputs)
        for pop, phi, incoming, release in self._plan:
            a = None
            for key, pre in incoming:
                drive = self.proj[key](activity[pre])
                a = drive if a is None else a + drive
            y = phi(a)
            activity[pop] = y
            if monitor is not None:
                if a.requires_grad:
                    a.retain_grad()
                monitor[pop] = Trace(a, y)
            for p in release:
                del activity[p]
        if len(self.outputs) == 1:
            return activity[self.outputs[0]]
        return {name: activity[name] for name in self.outputs}

    def projections(self) -> Iterator[tuple[str, Synapse]]:
        """(name, projection) for every synaptic projection: `.weight` is W, `.feedback` is B."""
        for key, module in self.proj.items():
            if isinstance(module, Synapse):
                yield self._names[key], module

    def projection(self, name: str) -> nn.Module:
        """The module of the projection called `name`."""
        key = module_key(name)
        if key not in self.proj:
            raise CircuitError(f"circuit {self.circuit.name!r} has no projection named {name!r}")
        return self.proj[key]

    def forward_parameters(self) -> Iterator[nn.Parameter]:
        """The forward pathway's parameters (W, biases, batch-norm affine), without any B."""
        for name, p in self.named_parameters():
            if not name.endswith(".B"):
                yield p

    def feedback_parameters(self) -> Iterator[nn.Parameter]:
        """Every stored B."""
        for _, synapse in self.projections():
            if "B" in synapse._parameters:
                yield synapse.B
