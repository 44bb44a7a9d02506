"""What each node of a traced module is, and its values: the runs that from_torch's fx walk reads.

The traced module runs twice, on batches of 2 and 3 examples, in eval mode; each node is recorded as a population's
activity, a bundle of activities, a plain value, a constant tensor or a tensor learned from parameters alone, with
its values in both runs (shape and dtype only for populations). A value the same in both runs becomes a literal,
one that is the batch size (2, then 3) becomes BATCH, and one that follows the data cannot convert.
circuits.convert.fx builds the circuit from these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import CircuitError
from ..graph.operations import BATCH, Batch
from .checks import is_new_tensor, is_shape_read
from .tracing import evaluating, slow_attention

POPULATION, BUNDLE, VALUE, CONSTANT, LEARNED = "population", "bundle", "value", "constant", "learned"
"""What a traced node is: a population's activity, a tuple holding activities (split, attention), a plain value
(a size, a setting), a constant tensor, or a tensor computed from parameters alone (a class token)."""


@dataclass
class Traced:
    """A node's kind and its values in the runs on 2 and 3 examples (shape and dtype only for populations)."""

    kind: str
    values: list[Any]


class Run(fx.Interpreter):
    """Runs the traced module and records what each node is, and its value."""

    def __init__(self, module: fx.GraphModule, found: dict[fx.Node, Traced]) -> None:
        super().__init__(module)
        self.found = found

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        kinds = {self.found[m].kind for m in n.all_input_nodes}
        if n.op == "placeholder":
            kind = POPULATION if isinstance(out, Tensor) else VALUE
        elif n.op == "get_attr":
            kind = LEARNED if isinstance(out, nn.Parameter) else CONSTANT if isinstance(out, Tensor) else VALUE
        elif is_shape_read(n):
            kind = VALUE
        elif is_new_tensor(n, {m for m in n.all_input_nodes if self.found[m].kind in (POPULATION, BUNDLE)}):
            kind = CONSTANT
        elif kinds & {POPULATION, BUNDLE} and out is not None:     # None: attention weights not computed
            kind = POPULATION if isinstance(out, Tensor) else BUNDLE if holds_tensor(out) else None
            if kind is None:
                raise CircuitError(f"node {n.name!r} ({n.format_node()}) reads a value out of a population's activity; "
                                   f"a circuit cannot convert what depends on the data itself")
        elif (LEARNED in kinds or n.op == "call_module" and any(True for _ in self.module.get_submodule(
                n.target).parameters())) and (isinstance(out, Tensor) or holds_tensor(out)):
            kind = LEARNED
        else:
            kind = CONSTANT if isinstance(out, Tensor) else VALUE
        record = (tuple(out.shape), out.dtype) if kind == POPULATION else out
        self.found.setdefault(n, Traced(kind, [])).values.append(record)
        return out


def holds_tensor(value: Any) -> bool:
    if isinstance(value, dict):
        return holds_tensor(list(value.values()))
    return isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) or holds_tensor(v) for v in value)


def default_input_shape(traced: fx.GraphModule, name: str) -> tuple[int, ...]:
    """(in_features,) for a first Linear layer: the only input shape such a module (named `name`) takes."""
    placeholder = next(n for n in traced.graph.nodes if n.op == "placeholder")
    for user in placeholder.users:
        if user.op == "call_module":
            first = traced.get_submodule(user.target)
            if isinstance(first, nn.Linear):
                return (first.in_features,)
            if isinstance(first, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                axes = "length" if isinstance(first, nn.Conv1d) else "height, width"
                raise CircuitError(f"{name} starts with a convolution, which takes any input size: pass "
                                   f"input_shape=({first.in_channels}, {axes}) to from_torch, the size of the "
                                   f"examples it will learn from (mirror noise and padding statistics follow it)")
    raise CircuitError(f"cannot infer {name}'s input shape (its first layer does not fix it): pass "
                       f"input_shape=(...) to from_torch, the shape of one example")


def run(traced: fx.GraphModule, input_shape: tuple[int, ...], example: dict, name: str) -> dict[fx.Node, Traced]:
    """Every node's kind and values on batches of 2 and 3 examples, in eval mode (batch statistics stay)."""
    found: dict[fx.Node, Traced] = {}
    inputs = [n for n in traced.graph.nodes if n.op == "placeholder" and not n.args]   # not specialized to a default
    try:
        with evaluating(traced), slow_attention():
            for batch in (2, 3):
                Run(traced, found).run(*[torch.zeros(batch, *input_shape, **example_of(traced, n, example))
                                          for n in inputs])
    except CircuitError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many kinds
        raise CircuitError(f"{name} does not run on examples of shape {input_shape}: {e}; pass the "
                           f"input_shape of one example to from_torch") from e
    return found


def example_of(traced: fx.GraphModule, placeholder: fx.Node, example: dict) -> dict:
    """The dtype and device of an example input: indices (int64) for an input that an embedding reads."""
    if any(user.op == "call_module" and isinstance(traced.get_submodule(user.target), nn.Embedding)
           for user in placeholder.users):
        return {**example, "dtype": torch.int64}
    return example


def literal(node: fx.Node, values: list[Any]) -> Any:
    """A value the same in both runs, with BATCH where it is the batch size (2, then 3), BATCH*k where it is k times
    it (2k, then 3k: windows or tokens folded into the batch axis)."""
    a, b = values
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return tuple(literal(node, [x, y]) for x, y in zip(a, b, strict=True))
    if type(a) is int and (a, b) == (2, 3):
        return BATCH
    if type(a) is int and type(b) is int and a > 0 and a % 2 == 0 and 3 * a == 2 * b:
        return Batch(a // 2)
    if isinstance(a, Tensor) or a != b:
        raise CircuitError(f"node {node.name!r} ({node.format_node()}) is {a!r} on 2 examples and {b!r} on 3: only "
                           f"the batch size itself may follow the batch")
    return a
