"""Conversion of ordinary torch modules into circuits, by torch.fx tracing.

Every traced tensor that depends on the input becomes a population. Torch layers become projections
carrying the layer's current parameters (circuits.convert.layers); additions of two populations become a
population with two incoming Identity projections (residual connections); activations are folded into
the population they act on when nothing else reads its summed input. Any other call becomes an
Operation (circuits.graph.operations) with torch's own function: a local projection when it reads one
population (reshape, x / 4, x + a parameter), a junction when it reads several (a * b, q @ k, cat).

What the graph alone shows cannot convert (tied or shared weights, a call no circuit part computes, a branch only
train mode computes) is refused first (circuits.convert.checks). The module is then run twice, on batches of 2 and
3 examples (circuits.convert.nodes): shapes, sizes and constants come from those runs (a value that follows the
batch size becomes BATCH), so the converted net computes exactly what the module computes, for any batch size. The
built net returns the module's outputs in torch's structure (a tensor, tuple, list, named tuple or dict), and
leaves out what they do not depend on. A tensor whose leading axis is k times the batch (Swin's windows, LeViT's
tokens folded into the batch axis) is a population of shape (k, ...) holding torch's (batch * k, ...) as
(batch, k, ...): operations flatten it back for torch's call (Operation.folds, Operation.fold), and only layers along
the last axis, and batch norms as operations, read it.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import rules
from ..errors import CircuitError
from ..graph import projections as P
from ..graph.circuit import Circuit, LayerRules
from ..graph.operations import BATCH, SYNAPTIC_OPS, Call, Held, Operand, Operation, WhileLearning, follows_mode, op_name
from . import checks, layers
from .checks import GUIDE, SUMS, SYNAPTIC_FUNCTIONS, has_state, is_named_tuple
from .layers import CALL_SETTINGS, attention, call_activation, call_projection, module_activation, synaptic_call
from .layers import projection as layer_projection
from .nodes import BUNDLE, CONSTANT, LEARNED, POPULATION, VALUE, Traced, default_input_shape, literal, run
from .tracing import trace


def _argument(node: fx.Node, position: int, name: str) -> Any:
    """A call's argument by position or keyword (None if not given)."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def _rows(value: Any, row: Tensor, count: int) -> bool:
    """Whether `value` is a tensor of `count` rows, each equal to `row`."""
    return isinstance(value, Tensor) and value.shape == (count, *row.shape) and all(torch.equal(r, row)
                                                                                  for r in value)


def _settings(node: fx.Node) -> dict[str, Any]:
    """A convolution call's settings after input, weight and bias (stride, padding, dilation, groups; a transposed
    one's output_padding), by name, from torch's positional order (CALL_SETTINGS) and keywords."""
    names = CALL_SETTINGS.get(SYNAPTIC_FUNCTIONS[node.target], ())
    return dict(zip(names, node.args[3:], strict=False)) | {k: v for k, v in node.kwargs.items() if k in names}


def from_torch(module: nn.Module, rule: rules.RuleLike = "bp", input_shape: tuple[int, ...] | None = None,
               rules_by_layer: Mapping[str, rules.RuleLike] | None = None, name: str | None = None) -> Circuit:
    """Convert a torch module (fx-traceable, built from circuit layers and torch functions) into a Circuit.

    rule: the feedback rule of every synaptic layer; rules_by_layer overrides it per layer name
    (the module's qualified name, e.g. "layer1.0.conv1"). A direct rule ("dfa") instead sends the
    output error straight to every hidden population that feeds a synaptic layer
    (Circuit.direct_feedback). input_shape: one example's input shape, by default (in_features,) from a
    first Linear layer. The circuit keeps the module's dtype and train/eval mode.
    """
    checks.refuse_tied(module)
    traced = trace(module, input_shape)
    checks.refuse_early(traced, type(module).__name__)
    checks.refuse_dropped_branches(module, traced, lambda: trace(module, input_shape))
    input_shape = tuple(input_shape) if input_shape is not None else default_input_shape(traced, type(module).__name__)
    param = next(module.parameters(), None)
    example = dict(dtype=param.dtype, device=param.device) if param is not None else {}
    walk = _Walk(traced, run(traced, input_shape, example, type(module).__name__), rules_by_layer)
    circuit = Circuit(name or type(module).__name__, rule=rule)
    walk.build(circuit)
    circuit.dtype, circuit.training = example.get("dtype"), module.training
    circuit.returns = walk.returns
    return walk.layer_rules.finish(circuit)


_ALONG_LAST_AXIS = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity)
"""Layers that compute on (batch, k, ...) what they compute on (batch * k, ...): along the last axis, or elementwise."""


class _Walk:
    """The fx graph, node by node, into populations (with activation or junction) and projections."""

    def __init__(self, traced: fx.GraphModule, found: dict[fx.Node, Traced],
                 rules_by_layer: Mapping[str, rules.RuleLike] | None) -> None:
        self.traced, self.found = traced, found
        self.layer_rules = LayerRules(rules_by_layer)
        self.pops: dict[str, dict[str, Any]] = {}    # population -> shape, activation, input, junction, operands
        self.edges: list[tuple[str, str, P.Projection, str]] = []
        self.pop_of: dict[fx.Node, str] = {}
        self.used: set[str] = set()                 # layers and parameters already converted once
        self.called: set[str] = set()               # layers called so far
        self.returns: Any = None                    # the output's population names, in torch's structure
        for node in traced.graph.nodes:
            self.visit(node)

    def visit(self, node: fx.Node) -> None:
        kind = self.found[node].kind
        if node in self.pop_of:
            return                              # made by an earlier node's conversion (constant_layer)
        if node.op == "output":
            self.returns = self.returned(node, node.args[0])
        elif kind == POPULATION and node.op == "placeholder":
            self.new_population(node, is_input=True)
        elif kind == POPULATION:
            self.population(node)
        elif kind == LEARNED and node.op == "call_module" and self.constant_layer(node):
            return
        elif kind == LEARNED and node.op == "call_module" and self.shared(node.args[0]):
            self.shared_layer(node)
        elif kind == LEARNED and node.op != "get_attr" and len(node.users) > 1 and all(
                isinstance(v, Tensor) and v.dim() and v.shape[0] == batch for v, batch in zip(self.found[node].values,
                                                                                             (2, 3), strict=True)):
            self.learned_population(node)
        elif kind == BUNDLE and node.op == "call_module":
            if not isinstance(self.traced.get_submodule(node.target), nn.MultiheadAttention):
                raise CircuitError(f"layer {node.target!r} ({node.format_node()}) returns several tensors; it cannot "
                                   f"be converted into a circuit projection")
            self.attention(node)

    def used_populations(self) -> set[str]:
        """The inputs and the populations that the returned ones depend on."""
        inputs: dict[str, list[str]] = {}
        for pre, post, _, _ in self.edges:
            inputs.setdefault(post, []).append(pre)
        for pop, d in self.pops.items():
            inputs.setdefault(pop, []).extend(d.get("operands") or [])
        used = {pop for pop, d in self.pops.items() if d.get("input")}
        todo = list(torch.utils._pytree.tree_leaves(self.returns))
        while todo:
            pop = todo.pop()
            if pop not in used:
                used.add(pop)
                todo.extend(inputs.get(pop, []))
        return used

    def returned(self, node: fx.Node, arg: Any) -> Any:
        """The module's output as population names in torch's structure (a tuple, list, named tuple or dict);
        a population that also drives others is returned through a copy of its own (outputs are sinks)."""
        if isinstance(arg, dict):
            return {k: self.returned(node, v) for k, v in arg.items()}
        if isinstance(arg, fx.Node) and is_named_tuple(arg.target):     # GoogLeNetOutputs(logits, aux2, aux1)
            return arg.target(*(self.returned(node, a) for a in arg.args),
                              **{k: self.returned(node, v) for k, v in arg.kwargs.items()})
        if isinstance(arg, (tuple, list)):
            items = [self.returned(node, a) for a in arg]
            return type(arg)(*items) if hasattr(arg, "_fields") else tuple(items) if isinstance(arg, tuple) else items
        pop = self.source(node, arg)
        if self.pops[pop].get("fold", 1) > 1:
            raise CircuitError(f"node {arg.name!r} ({arg.format_node()}) is returned with {self.pops[pop]['fold']} "
                               f"windows or tokens per example folded into the batch axis: a circuit's output keeps "
                               f"one row per example; reshape it back to the batch before returning it")
        if any(pre == pop for pre, _, _, _ in self.edges) or self.pops[pop].get("input"):
            copy = f"{pop}_returned"
            if copy not in self.pops:
                self.pops[copy] = dict(self.pops[pop], activation="identity", input=False, junction=None,
                                       operands=None)
                self.connect(pop, copy, P.Identity())
            return copy
        return pop

    def population(self, node: fx.Node) -> None:
        if node.op == "call_module":
            layer = self.traced.get_submodule(node.target)
            act = module_activation(layer, node.target)
            if act is not None:
                return self.activate(node, node.args[0], act)
            if has_state(layer):
                self.use(node.target, "layer", "it is called more than once; shared weights cannot be converted")
            if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and self.folded(node, node.args[0]):
                return self.folded_batch_norm(node, layer)
            projection = self.on_patches(node, layer_projection(layer, node.target), isinstance(
                layer, _ALONG_LAST_AXIS), f"layer {type(layer).__name__}")
            name = node.target if node.target not in self.called else None     # a stateless layer: any call
            self.called.add(node.target)
            self.connect(self.source(node, node.args[0]), self.new_population(node), projection, name)
            return None
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.pop_of \
                and self.found[node.args[0]].kind == BUNDLE:
            if node.args[1] != 0:
                raise CircuitError(f"node {node.name!r} reads attention weights; only the attention output converts")
            self.pop_of[node] = self.pop_of[node.args[0]]
            return None
        act = call_activation(node)
        if act is not None:
            return self.activate(node, node.args[0], act)
        if node.op == "call_function" and node.target in SYNAPTIC_FUNCTIONS:
            return self.synaptic_call(node)
        projection = call_projection(node)
        if projection is not None and not self.folded(node, node.args[0]):
            self.connect(self.source(node, node.args[0]), self.new_population(node), projection)
            return None
        if node.target in SUMS and len(node.args) == 2 and not node.kwargs and all(
                self.found.get(a) and self.found[a].kind == POPULATION for a in node.args) \
                and self.pop_of.get(node.args[0]) != self.pop_of.get(node.args[1]) \
                and not any(self.folded(node, a) for a in node.args):
            post = self.new_population(node)
            for arg in node.args:
                self.connect(self.source(node, arg), post, P.Identity())
            return None
        if self.fold(node) is None and all(u.op in ("call_function", "call_method") for u in node.users):
            return None       # not a population (its batch is not its first axis): each user's operation computes it
        operands: list[str] = []
        held: dict[str, Tensor] = {}
        learned: list[str] = []
        call = self.template(node, node, operands, held, learned)
        if learned and call.op in SYNAPTIC_OPS:
            raise CircuitError(f"node {node.name!r} ({node.format_node()}) multiplies by parameters {learned}: a "
                               f"synaptic weight needs a projection with a B; use nn.Linear or nn.Conv2d")
        args, kwargs = follows_mode(call.op, call.args, call.kwargs)
        folds = tuple(self.pops[pop].get("fold", 1) for pop in operands)
        fold = self.fold(node) or 1
        if fold == 1 and set(folds) <= {1}:
            folds = ()
        shared = tuple(i for i, pop in enumerate(operands) if self.pops[pop].get("shared"))
        operation = Operation(call.op, args, kwargs, learned=tuple(learned), state=held or None, folds=folds,
                              fold=fold, shared=shared)
        if len(operands) == 1:
            self.connect(operands[0], self.new_population(node), operation)
        else:
            self.new_population(node, junction=operation, operands=operands)
        return None

    def template(self, node: fx.Node, arg: Any, operands: list[str], held: dict[str, Tensor],
                 learned: list[str]) -> Any:
        """`arg` of `node` as an operation template: populations become Operand, values literals, constant
        tensors and parameters Held, calls on parameters or inside bundles a nested Call."""
        def inner(a: Any) -> Any:
            return self.template(node, a, operands, held, learned)

        if isinstance(arg, (tuple, list)):
            return type(arg)(inner(a) for a in arg)
        if isinstance(arg, dict):
            return {k: inner(v) for k, v in arg.items()}
        if isinstance(arg, slice):
            return slice(inner(arg.start), inner(arg.stop), inner(arg.step))
        if not isinstance(arg, fx.Node):
            return arg
        traced = self.found[arg]
        if arg in self.pop_of and arg is not node:
            if self.pop_of[arg] not in operands:
                operands.append(self.pop_of[arg])
            return Operand(operands.index(self.pop_of[arg]))
        if traced.kind == VALUE:
            return literal(arg, traced.values)
        a, b = traced.values
        if traced.kind == CONSTANT and a.shape == b.shape and torch.equal(a, b):
            held[arg.name] = a
            return Held(arg.name)
        if arg.name in held:
            return Held(arg.name)
        if arg.op == "get_attr":
            self.use(arg.target, "parameter", "it is read more than once; shared parameters cannot be converted")
            held[arg.name] = a
            learned.append(arg.name)
            return Held(arg.name)
        if arg.op == "call_module":
            raise CircuitError(f"layer {arg.target!r} ({arg.format_node()}) computes from parameters and constants "
                               f"alone (not from the data), for node {node.name!r}: its synapses would have no "
                               f"population to learn from; convert with circuits.in_place (see {GUIDE})")
        op = op_name(arg.target) if arg.op in ("call_function", "call_method") else None
        if op is None:
            raise CircuitError(f"node {arg.name!r} ({arg.format_node()}) computes a value from parameters with a "
                               f"function that operations do not call (circuits.graph.operations.OPS), for node "
                               f"{node.name!r}; write it with those, or convert with circuits.in_place (see {GUIDE})")
        return Call(op, inner(arg.args), inner(dict(arg.kwargs)))

    def parameters_alone(self, node: fx.Node, arg: Any, held: dict[str, Tensor], learned: list[str]) -> Any:
        """`arg` of `node` as an operation template that reads parameters and constants alone (a class token, a
        computed bias); a CircuitError where it reads a population (one every example computes from a constant:
        constant_layer), which such an operation would not receive."""
        operands: list[str] = []
        call = self.template(node, arg, operands, held, learned)
        if operands:
            raise CircuitError(f"node {node.name!r} ({node.format_node()}) computes from parameters and from what "
                               f"layers on a constant compute ({', '.join(operands)}), as a class token or a bias "
                               f"would, which converts from parameters alone; convert with circuits.in_place (see "
                               f"{GUIDE})")
        return call

    def attention(self, node: fx.Node) -> None:
        """nn.MultiheadAttention: in-projection, attention, out-projection (circuits.convert.layers.attention)."""
        layer = self.traced.get_submodule(node.target)
        query = node.args[0]
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
        given = dict(zip(names[:len(node.args)], node.args, strict=True)) | dict(node.kwargs)
        if not (given.get("key") is query and given.get("value") is query):
            raise CircuitError(f"layer {node.target!r} ({node.format_node()}): only self-attention, query = key = "
                               f"value, converts")
        settings = {k: self.constant(node, v) for k, v in given.items() if k not in ("query", "key", "value")}
        self.use(node.target, "layer", "it is called more than once; shared weights cannot be converted")
        in_proj, heads, out_proj = attention(layer, node.target, settings)
        pre = self.source(node, query)
        self.refuse_folded(node, query, False, "nn.MultiheadAttention")
        shape = self.pops[pre]["shape"]
        qkv, attended = f"{node.name}_qkv", f"{node.name}_heads"
        for pop, width in ((qkv, 3 * layer.embed_dim), (attended, layer.embed_dim), (node.name, layer.embed_dim)):
            self.pops[pop] = dict(shape=(*shape[:-1], width), activation="identity")
        self.connect(pre, qkv, in_proj, f"{node.target}.in_proj")
        self.connect(qkv, attended, heads)
        self.connect(attended, node.name, out_proj, f"{node.target}.out_proj")
        self.pop_of[node] = node.name

    def folded_batch_norm(self, node: fx.Node, layer: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
        """A batch norm on windows or tokens folded into the batch axis (LeViT): the operation F.batch_norm on
        torch's (batch * k, ...) tensor, whose statistics are over it (circuits.convert.layers.batch_norm_operation)."""
        self.refuse_folded(node, node.args[0], True, f"layer {type(layer).__name__}")     # the same fold in and out
        fold = self.fold(node) or 1
        operation = dataclasses.replace(layers.batch_norm_operation(layer, node.target), folds=(fold,), fold=fold)
        self.connect(self.source(node, node.args[0]), self.new_population(node), operation, node.target)

    def learned_population(self, node: fx.Node) -> None:
        """A tensor computed from parameters alone, one per example (a class token expanded over the batch), that
        several calls read: a population of its own, driven from the input by an operation that holds the
        parameters (it reads the input's batch size only), so that each parameter is used once."""
        held: dict[str, Tensor] = {}
        learned: list[str] = []
        call = self.parameters_alone(node, node, held, learned)
        operation = Operation(call.op, call.args, call.kwargs, learned=tuple(learned), state=held or None)
        self.driven_from_input(node.name, tuple(self.found[node].values[0].shape[1:]), operation)
        self.pop_of[node] = node.name

    def driven_from_input(self, name: str, shape: tuple[int, ...], operation: Operation) -> None:
        """A population `name` that reads no data, driven from the circuit's first input by `operation` (which
        reads the input's batch size only)."""
        first = next(n for n in self.traced.graph.nodes if n.op == "placeholder" and n in self.pop_of)
        self.pops[name] = dict(shape=shape, activation="identity", input=False, junction=None, operands=None)
        self.connect(self.pop_of[first], name, operation)

    def constant_layer(self, node: fx.Node) -> bool:
        """A layer on a constant that is the same for every example. The constant's row becomes a population, driven
        from the input by an operation holding it, and the layer a synapse from it with its B (whose error reaches no
        parameter), so that its weight learns under the rule as any synapse's. Either the layer's result is read one
        per example (XCiT's and EdgeNeXt's Fourier positional encodings: a 1x1 convolution on a table of sines and
        cosines): the constant has the batch's rows, all alike, and so has the layer's result; or the constant has
        one row and the result is repeated or expanded over the batch by its one user (each of whose rows is the
        result's row). Or the constant and the result are tensors that torch computes once for the batch (Swin-V2's
        cpb_mlp on its relative_coords_table, whose result every window of every example reads): the populations
        are then `shared`, each example holding the whole tensor, and their readers compute on it per example
        (Operation.shared). Whether it converted so."""
        constant = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(constant, fx.Node) or self.found[constant].kind != CONSTANT:
            return False
        a, b = self.found[constant].values
        result = self.found[node].values
        if not a.dim() or not all(isinstance(v, Tensor) and v.dim() for v in result):
            return False
        user = next(iter(node.users)) if len(node.users) == 1 else None
        if user is not None and not (user.op == "call_method" and user.target in ("repeat", "expand")
                                     and user.args[0] is node):
            user = None                         # only a copy over the batch is the result, one per example
        shared = False
        if _rows(result[0], result[0][0], 2) and _rows(result[1], result[0][0], 3):
            per_example = node
        elif user is not None and result[0].shape[0] == 1 and all(
                _rows(v, result[0][0], n) for v, n in zip(self.found[user].values, (2, 3), strict=True)):
            per_example = user
        elif a.shape == b.shape and torch.equal(a, b) and result[0].shape == result[1].shape \
                and torch.equal(*result):
            per_example, shared = node, True            # the same tensors whatever the batch
        else:
            return False
        if not shared and not (_rows(a, a[0], len(a)) and _rows(b, a[0], len(b))):
            return False
        self.use(node.target, "layer", "it is called more than once; shared weights cannot be converted")
        row = a if shared else a[0]
        if constant.name not in self.pops:                    # one population for a table that several layers read
            self.driven_from_input(constant.name, tuple(row.shape), Operation(
                ".expand", (Held(constant.name), BATCH, *(-1,) * row.dim()), state={constant.name: row.unsqueeze(0)}))
        self.layer_on(constant.name, per_example, layer_projection(self.traced.get_submodule(node.target), node.target),
                      node.target, shared)
        self.pops[constant.name]["shared"] = shared
        return True

    def shared(self, arg: Any) -> bool:
        """Whether `arg` is a shared population's node: a tensor torch computes once for the batch (constant_layer)."""
        return arg in self.pop_of and self.pops[self.pop_of[arg]].get("shared", False)

    def shared_layer(self, node: fx.Node) -> None:
        """A layer on a shared population (Swin-V2's cpb_mlp after its first Linear): its activation, or a synapse
        into a shared population of its own."""
        layer = self.traced.get_submodule(node.target)
        pre = self.source(node, node.args[0])
        act = module_activation(layer, node.target)
        if act is not None and self.folds_into(node, node.args[0], act):
            return
        if has_state(layer):
            self.use(node.target, "layer", "it is called more than once; shared weights cannot be converted")
        if act is not None:
            projection: P.Projection = P.Identity()
        elif isinstance(layer, nn.Dropout):       # torch draws one mask for its one tensor, not one per example
            projection = Operation("batch_dropout", (Operand(0), layer.p, WhileLearning(True, False)))
        else:
            projection = layer_projection(layer, node.target)
        self.layer_on(pre, node, projection, node.target, shared=True, activation=act)

    def layer_on(self, pre: str, node: fx.Node, projection: P.Projection, name: str, shared: bool,
                 activation: str | None = None) -> None:
        """A population for `node`, its result, reached from population `pre` by `projection` (a layer's; an
        Identity into the population for an activation); shared: the population holds, per example, the whole tensor
        torch computes once for the batch."""
        shape = tuple(self.found[node].values[0].shape)
        self.pops[node.name] = dict(shape=shape if shared else shape[1:], activation=activation or "identity",
                                    input=False, junction=None, operands=None, shared=shared)
        self.pop_of[node] = node.name
        self.connect(pre, node.name, projection, None if activation is not None else name)

    def synaptic_call(self, node: fx.Node) -> None:
        """F.linear / F.conv1d / F.conv2d / F.conv_transpose2d with a module's own weight (and bias): a synaptic
        projection with a B, named after the module that holds the weight (attn.qkv for attn.qkv.weight). F.linear's
        bias computed from parameters (EVA's and BEiT's qkv bias, cat(q_bias, zeros, v_bias)) is an operation after
        the synapse, which adds it and passes its parameters their gradient."""
        weight, bias = _argument(node, 1, "weight"), _argument(node, 2, "bias")
        computed_bias = SYNAPTIC_FUNCTIONS[node.target] == "F.linear" and isinstance(bias, fx.Node) \
            and bias.op != "get_attr" and self.found[bias].kind == LEARNED
        for what, arg in (("weight", weight), ("bias", None if computed_bias else bias)):
            if arg is not None and not (isinstance(arg, fx.Node) and arg.op == "get_attr"
                                        and self.found[arg].kind == LEARNED):
                raise CircuitError(f"node {node.name!r} ({node.format_node()}): its {what} is not a parameter of the "
                                   f"module but computed ({arg}); only a module's own weight and bias become a "
                                   f"synapse with a B. Use the layer itself, or circuits.in_place (see {GUIDE})")
        own_bias = None if computed_bias else bias
        for arg in (weight, own_bias):
            if arg is not None:
                self.use(arg.target, "parameter", "it is read more than once; shared parameters cannot be converted")
        state = {"weight": self.found[weight].values[0]} | (
            {"bias": self.found[own_bias].values[0]} if own_bias is not None else {})
        settings = {k: self.constant(node, v) for k, v in _settings(node).items()}
        where = f"node {node.name!r} ({node.format_node()})"
        layer = weight.target.removesuffix(".weight")
        function = SYNAPTIC_FUNCTIONS[node.target]
        projection = self.on_patches(node, synaptic_call(function, state, settings, where), function == "F.linear",
                                     function)
        pre = self.source(node, node.args[0])
        if not computed_bias:
            self.connect(pre, self.new_population(node), projection, layer)
            return
        held: dict[str, Tensor] = {}
        learned: list[str] = []
        added = self.parameters_alone(node, bias, held, learned)
        unbiased = f"{node.name}_unbiased"
        post = self.new_population(node)
        spec = self.pops.pop(post)
        self.pops[unbiased], self.pops[post] = dict(spec), spec        # the synapse's population first
        self.connect(pre, unbiased, projection, layer)
        self.connect(unbiased, post, Operation("torch.add", (Operand(0), added), learned=tuple(learned),
                                               state=held or None))

    def constant(self, node: fx.Node, arg: Any) -> Any:
        """An argument that must be the same for every batch: its value, or a CircuitError naming `node`."""
        if not isinstance(arg, fx.Node):
            return arg
        traced = self.found[arg]
        if traced.kind == VALUE:
            return literal(arg, traced.values)
        if traced.kind == CONSTANT and torch.equal(*traced.values):
            return traced.values[0]
        raise CircuitError(f"node {node.name!r} ({node.format_node()}) takes {arg.name!r}, which changes with the data "
                           f"or the batch; only constant masks and settings convert")

    def use(self, target: str, what: str, why: str) -> None:
        if target in self.used:
            raise CircuitError(f"{what} {target!r}: {why}")
        self.used.add(target)

    def new_population(self, node: fx.Node, activation: str = "identity", is_input: bool = False,
                       junction: Operation | None = None, operands: list[str] | None = None) -> str:
        fold = self.fold(node)
        if fold is None:
            (two, _), (three, _) = self.found[node].values
            raise CircuitError(f"node {node.name!r} ({node.format_node()}) has shape {two} on 2 examples and {three} "
                               f"on 3: a population keeps the batch as its first axis (an operation may move it "
                               f"only when operations alone read the result)")
        shape = self.found[node].values[0][0][1:]
        self.pops[node.name] = dict(shape=(fold, *shape) if fold > 1 else shape, activation=activation,
                                    input=is_input, junction=junction, operands=operands, fold=fold)
        self.pop_of[node] = node.name
        return node.name

    def fold(self, node: fx.Node) -> int | None:
        """How many windows or tokens per example the node's leading axis holds: 1 where it is the batch (2, then 3),
        k where it is k times the batch (2k, then 3k: Swin's windows folded into the batch axis), its other axes
        staying; None otherwise. A population folded by k holds torch's (batch * k, ...) tensor as (batch, k, ...)."""
        if self.found[node].kind != POPULATION:
            return None
        (two, _), (three, _) = self.found[node].values
        if not two or not three or two[1:] != three[1:]:
            return None
        a, b = two[0], three[0]
        return a // 2 if a > 0 and a % 2 == 0 and 3 * a == 2 * b else None

    def folded(self, node: fx.Node, arg: Any) -> bool:
        """Whether `node` or the population it reads (`arg`) holds windows or tokens folded into the batch axis."""
        return (self.fold(node) or 1) > 1 or (arg in self.pop_of and self.pops[self.pop_of[arg]].get("fold", 1) > 1)

    def on_patches(self, node: fx.Node, projection: P.Projection, along_last_axis: bool, what: str) -> P.Projection:
        """`projection` of `node` (`what`: a layer or function) on its first argument, where it reads windows or
        patches folded into the batch axis: a convolution on each patch (P.Conv2d's fold; TNT's pixel embedding,
        a video's frames), a layer along the last axis as it is, with the same fold in and out; else refused."""
        arg = node.args[0]
        if isinstance(projection, P.Conv2d) and self.folded(node, arg):
            self.refuse_folded(node, arg, True, what)          # the same fold in and out
            return dataclasses.replace(projection, fold=self.fold(node))
        self.refuse_folded(node, arg, along_last_axis, what)
        return projection

    def refuse_folded(self, node: fx.Node, arg: Any, along_last_axis: bool, what: str) -> None:
        """A CircuitError unless `node` (`what`: a layer or function) acts along the last axis or elementwise, where
        it reads or makes windows or tokens folded into the batch axis: on (batch, k, ...) it computes what torch's
        computes on (batch * k, ...) only then, and with the same fold in and out."""
        if not self.folded(node, arg):
            return
        same = arg in self.pop_of and self.pops[self.pop_of[arg]].get("fold", 1) == self.fold(node)
        if not (along_last_axis and same):
            raise CircuitError(f"node {node.name!r} ({node.format_node()}): {what} reads or makes windows or tokens "
                               f"folded into the batch axis, where only layers along the last axis (Linear, "
                               f"LayerNorm, Dropout, Identity, activations), convolutions on each patch (with the "
                               f"same fold in and out) and operations convert; convert with circuits.in_place (see "
                               f"{GUIDE})")

    def source(self, node: fx.Node, arg: Any) -> str:
        if not isinstance(arg, fx.Node) or arg not in self.pop_of:
            raise CircuitError(f"node {node.name!r} ({node.format_node()}) reads {arg!r}, which is not a population")
        return self.pop_of[arg]

    def activate(self, node: fx.Node, arg: fx.Node, act: str) -> None:
        self.refuse_folded(node, arg, "dim=" not in act or "dim=-" in act, f"activation {act}")
        if not self.folds_into(node, arg, act):
            self.connect(self.source(node, arg), self.new_population(node, act), P.Identity())

    def folds_into(self, node: fx.Node, arg: fx.Node, act: str) -> bool:
        """Whether activation `act` of `node` folded into the population it acts on (`arg`'s): where that one has
        none, is no input, and nothing else reads its summed input."""
        pre = self.source(node, arg)
        pop = self.pops[pre]
        if pop["activation"] != "identity" or pop.get("input") or len(arg.users) != 1:
            return False
        pop["activation"] = act
        self.pop_of[node] = pre
        return True

    def connect(self, pre: str, post: str, projection: P.Projection, layer: str | None = None) -> None:
        self.edges.append((pre, post, projection, layer or f"{pre}->{post}"))

    def build(self, circuit: Circuit) -> None:
        """The populations in graph order (a junction with its inputs), then the projections; what the output does
        not depend on (a split's unused piece, an unused branch) is left out."""
        used = self.used_populations()
        for pop, d in self.pops.items():
            if pop not in used:
                continue
            if d.get("input"):
                circuit.input(pop, d["shape"])
            elif d.get("junction") is not None:
                made = circuit.junction(pop, d["operands"], d["junction"], d["activation"])
                if made.shape != d["shape"]:
                    raise CircuitError(f"junction {pop!r}: {d['junction']} makes shape {made.shape}, torch made "
                                       f"{d['shape']}")
            else:
                circuit.population(pop, d["shape"], d["activation"])
        for pre, post, projection, layer in self.edges:
            if post not in used:
                continue
            rule = self.layer_rules(layer) if projection.synaptic and projection.sends_error else None
            circuit.connect(pre, post, projection, rule=rule, name=layer)
