"""Conversion of ordinary torch modules into circuits, by torch.fx tracing.

Every traced value becomes a population; torch layers become projections carrying the layer's
current parameters; additions become populations with several incoming Identity projections
(residual connections); activations are folded into the population they act on when nothing
else reads its summed input. The converted net computes exactly what the module computes.
"""
from __future__ import annotations

import operator
from typing import Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import projections as P
from . import rules
from .circuit import Circuit, LayerRules
from .errors import CircuitError
from .layers import call_activation, module_activation, projection as layer_projection

def _default_input_shape(root: nn.Module, graph: fx.Graph) -> tuple[int, ...]:
    """(in_features,) for a first Linear layer: the only input shape such a module takes."""
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    for user in placeholder.users:
        if user.op == "call_module":
            first = root.get_submodule(user.target)
            if isinstance(first, nn.Linear):
                return (first.in_features,)
            if isinstance(first, nn.Conv2d):
                raise CircuitError(f"{type(root).__name__} starts with a convolution, which takes any image size: pass "
                                   f"input_shape=({first.in_channels}, height, width) to from_torch, the size of the "
                                   f"images it will learn from (mirror noise and padding statistics follow it)")
    raise CircuitError(f"cannot infer {type(root).__name__}'s input shape: pass input_shape=(...) to from_torch")


def from_torch(module: nn.Module, rule: rules.RuleLike = "bp", input_shape: tuple[int, ...] | None = None,
               rules_by_layer: Mapping[str, rules.RuleLike] | None = None, name: str | None = None) -> Circuit:
    """Convert a torch module (fx-traceable, built from circuit layers) into a Circuit.

    rule: the feedback rule of every synaptic layer; rules_by_layer overrides it per layer name
    (the module's qualified name, e.g. "layer1.0.conv1"). A direct rule ("dfa") instead sends the
    output error straight to every hidden population that feeds a synaptic layer
    (Circuit.direct_feedback). input_shape: one example's input shape, by default (in_features,) or
    (in_channels, 224, 224) from the first layer.
    """
    try:
        traced = fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise CircuitError(f"{type(module).__name__} cannot be traced by torch.fx: {e}") from e
    input_shape = tuple(input_shape) if input_shape is not None else _default_input_shape(module, traced.graph)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    was_training = traced.training
    traced.eval()
    param = next(module.parameters(), None)
    example = dict(dtype=param.dtype, device=param.device) if param is not None else {}
    with torch.no_grad():
        ShapeProp(traced).propagate(*[torch.zeros(2, *input_shape, **example) for _ in placeholders])
    traced.train(was_training)

    layer_rules = LayerRules(rules_by_layer)
    circuit = Circuit(name or type(module).__name__, rule=rule)
    pops: dict[str, list] = {}   # population name -> [shape, activation, is_input], in graph order
    edges: list[tuple[str, str, P.Projection, str]] = []
    pop_of: dict[fx.Node, str] = {}
    used_layers: set[str] = set()

    def new_population(node: fx.Node, activation: str = "identity", is_input: bool = False) -> str:
        pops[node.name] = [tuple(node.meta["tensor_meta"].shape[1:]), activation, is_input]
        pop_of[node] = node.name
        return node.name

    def source(node: fx.Node, arg) -> str:
        if not isinstance(arg, fx.Node) or arg not in pop_of:
            raise CircuitError(f"node {node.name!r} ({node.format_node()}) reads {arg!r}, which is not a population")
        return pop_of[arg]

    def activate(node: fx.Node, arg: fx.Node, act: str) -> None:
        pre = source(node, arg)
        if pops[pre][1] == "identity" and not pops[pre][2] and len(arg.users) == 1:
            pops[pre][1] = act          # fold phi into the population it acts on
            pop_of[node] = pre
        else:
            edges.append((pre, new_population(node, act), P.Identity(), f"{pre}->{node.name}"))

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            new_population(node, is_input=True)
        elif node.op == "call_module":
            layer = traced.get_submodule(node.target)
            act = module_activation(layer, node.target)
            if act is not None:
                activate(node, node.args[0], act)
                continue
            if node.target in used_layers:
                raise CircuitError(
                    f"layer {node.target!r} is called more than once; shared weights cannot be converted"
                )
            used_layers.add(node.target)
            projection = layer_projection(layer, node.target)
            edges.append((source(node, node.args[0]), new_population(node), projection, node.target))
        elif (act := call_activation(node)) is not None:
            activate(node, node.args[0], act)
        elif (
            node.op == "call_function"
            and node.target in (operator.add, torch.add, operator.iadd)
            and len(node.args) == 2
            and not node.kwargs
        ):
            a, b = (source(node, x) for x in node.args)
            if a == b:
                raise CircuitError(f"node {node.name!r} adds a population to itself; this cannot be converted")
            post = new_population(node)
            edges += [(a, post, P.Identity(), f"{a}->{post}"), (b, post, P.Identity(), f"{b}->{post}")]
        elif (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"
        ):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise CircuitError(f"node {node.name!r}: only flatten(x, 1) (all but the batch) can be converted")
            pre = source(node, node.args[0])
            edges.append((pre, new_population(node), P.Flatten(), f"{pre}->{node.name}"))
        elif node.op == "output":
            source(node, node.args[0])
        else:
            raise CircuitError(f"node {node.name!r} ({node.format_node()}) cannot be converted into a circuit")

    for pop, (shape, act, is_input) in pops.items():
        circuit.input(pop, shape) if is_input else circuit.population(pop, shape, act)
    for pre, post, projection, layer in edges:
        circuit.connect(pre, post, projection, feedback=layer_rules(layer) if projection.synaptic else None, name=layer)
    circuit.dtype, circuit.training = example.get("dtype"), module.training
    return layer_rules.finish(circuit)
