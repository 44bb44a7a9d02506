"""What circuits.from_torch refuses, found on the traced graph before the module is run: tied and shared weights,
and calls on the data that no circuit part computes. Each refusal says why and what to do (docs/conversion.md).

A node depends on the data when it reads the input through anything but a shape read (x.size(), x.shape,
x.dim(), x.dtype) or a new tensor's dtype and device (x.new_zeros(sizes)): such a node becomes a population, so its
call must be one the walk converts.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CircuitError
from ..graph.operations import op_name
from .layers import call_activation, call_projection, is_activation, projection

SHAPE_READS = {("call_method", "size"), ("call_method", "dim"), ("call_method", "numel"), ("call_function", getattr)}
SUMS = (operator.add, torch.add, operator.iadd)
SYNAPTIC_FUNCTIONS = {F.linear: "F.linear", F.conv1d: "F.conv1d", F.conv2d: "F.conv2d",
                      F.conv_transpose2d: "F.conv_transpose2d"}
"""Functions that become a synaptic projection (with a B) when their weight is a module's own parameter."""
GUIDE = "docs/conversion.md"
_SHAPE_OF_SECOND = {"reshape_as", "view_as", "expand_as", "type_as"}
"""Methods that read only the shape or dtype of their second argument."""
NEW_TENSORS = {"new_zeros", "new_ones", "new_full"}
"""Tensor methods that make a new tensor, reading only their tensor's dtype and device."""


def is_shape_read(node: fx.Node) -> bool:
    """x.size(), x.dim(), x.numel(), x.shape, x.ndim, x.dtype, x.device: a plain value, not a population."""
    return (node.op, node.target) in SHAPE_READS and (node.target != getattr or node.args[1] in ("shape", "ndim",
                                                                                                  "dtype", "device"))


def is_new_tensor(node: fx.Node, data: set[fx.Node]) -> bool:
    """x.new_zeros(sizes), x.new_ones, x.new_full whose sizes and fill do not follow the data (`data`): a tensor
    that reads only x's dtype and device, a constant (torchvision Swin's attention mask starts so)."""
    return node.op == "call_method" and node.target in NEW_TENSORS and not any(
        a in data for a in node.all_input_nodes if a is not node.args[0])


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """The parameters that two different modules hold (tied weights, b.weight = a.weight), each as its names."""
    owners: dict[int, dict[nn.Module, str]] = {}
    for prefix, m in module.named_modules(remove_duplicate=False):
        for name, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), {}).setdefault(m, f"{prefix}.{name}" if prefix else name)
    return [list(names.values()) for names in owners.values() if len(names) > 1]


def refuse_tied(module: nn.Module) -> None:
    """A CircuitError naming the tied parameters, if any: a circuit gives each projection its own W and B."""
    tied = tied_parameters(module)
    if tied:
        names = "; ".join(" = ".join(repr(n) for n in names) for names in tied)
        raise CircuitError(f"{type(module).__name__} ties weights ({names}): one parameter under several layers. "
                           f"Each converted projection owns its W and its B, so the tie would break (two parameters "
                           f"where torch has one) and learning would diverge from torch's. Untie them before "
                           f"converting, e.g. b.weight = nn.Parameter(a.weight.detach().clone()) (see {GUIDE}, "
                           f"'Shared weights')")


def has_state(layer: nn.Module) -> bool:
    """Whether the module holds parameters or buffers of its own (a second call would share them)."""
    return any(True for _ in layer.parameters()) or any(True for _ in layer.buffers())


def data_nodes(traced: fx.GraphModule) -> set[fx.Node]:
    """The nodes that depend on the data: reached from an input (a placeholder not fixed at its default) other than
    through shape reads and new tensors (is_new_tensor)."""
    found: set[fx.Node] = set()
    for node in traced.graph.nodes:
        if (node.op == "placeholder" and not node.args) or (
                not is_shape_read(node) and not is_new_tensor(node, found) and node.op != "output"
                and any(a in found for a in node.all_input_nodes)):
            found.add(node)
    return found


def refuse_early(traced: fx.GraphModule, name: str) -> None:
    """The refusals the graph alone shows, before any run: a CircuitError saying why and what to do."""
    data = data_nodes(traced)
    calls: dict[str, int] = {}
    order = {n: i for i, n in enumerate(traced.graph.nodes)}
    for node in traced.graph.nodes:
        _refuse_unseen_change(traced, node, order, name)
        if node.op == "get_attr" and isinstance(_attribute(traced, node.target), nn.Parameter):
            users = [u for u in node.users if not is_shape_read(u) and not (
                u.target in _SHAPE_OF_SECOND and len(u.args) > 1 and u.args[1] is node)]
            if len(users) > 1:
                raise CircuitError(f"{name}: parameter {node.target!r} is read by {len(users)} calls "
                                   f"({', '.join(u.name for u in users)}): shared weights. {_SHARED}")
        if node not in data:
            _refuse_from_parameters(traced, node, name)
        if node not in data or node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "call_module":
            layer = traced.get_submodule(node.target)
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] > 1 and has_state(layer):
                raise CircuitError(f"{name}: layer {node.target!r} ({type(layer).__name__}) is called more than "
                                   f"once and holds parameters or buffers: shared weights. {_SHARED}")
            if not (is_activation(layer) or isinstance(layer, nn.MultiheadAttention)):
                projection(layer, node.target)       # its refusal, with the reason
            if not type(layer).__module__.startswith("torch.") and (len(node.args) > 1 or node.kwargs):
                raise CircuitError(f"{name}: layer {node.target!r} ({type(layer).__name__}), kept whole by tracing, "
                                   f"is called with more than its input ({node.format_node()}); an operation calling "
                                   f"it reads one population. Convert the module with circuits.in_place (see {GUIDE})")
            if isinstance(layer, nn.ConvTranspose2d) and (len(node.args) > 1 or node.kwargs):
                raise CircuitError(f"{name}: layer {node.target!r} (ConvTranspose2d) is called with output_size "
                                   f"({node.format_node()}): a circuit's transposed convolution has one output size, "
                                   f"set by its output_padding; give the layer output_padding instead (see {GUIDE})")
        elif convertible_call(node) is False:
            raise CircuitError(f"{name}: node {node.name!r} ({node.format_node()}) calls {_target(node)}, which no "
                               f"circuit part computes: operations call only the torch functions listed in "
                               f"circuits.graph.operations.OPS. Write it with those, or convert the module with "
                               f"circuits.in_place, which keeps the module's own forward (see {GUIDE})")


def changes_in_place(traced: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` changes its first argument in place: a tensor method named with a trailing underscore
    (x.add_(y)), a call with inplace=True, a layer built with inplace=True (nn.ReLU(inplace=True))."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        return getattr(traced.get_submodule(node.target), "inplace", False) is True
    return node.op == "call_function" and node.kwargs.get("inplace") is True


def _refuse_unseen_change(traced: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int], name: str) -> None:
    """A CircuitError where `node` changes a tensor in place that a later call reads (other than its shape): the
    graph gives that call the tensor before the change, torch gives it the changed one. (An item of a new tensor
    filled in place is a copy by then: tracing's _fills_as_copies.)"""
    changed = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if changed is None or not changes_in_place(traced, node):
        return
    base = changed                       # what the tensor is a view of, and every view of that made before
    while _is_view(base) and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    aliases, todo = set(), [base]
    while todo:
        alias = todo.pop()
        aliases.add(alias)
        todo.extend(u for u in alias.users if _is_view(u) and order[u] < order[node] and u not in aliases)
    later = sorted({u.name for a in aliases for u in a.users if order[u] > order[node] and not is_shape_read(u)})
    if later:
        raise CircuitError(f"{name}: node {node.name!r} ({node.format_node()}) changes {changed.name!r} in place, "
                           f"and later calls read it or what it views ({', '.join(later)}): the converted graph "
                           f"would give them the tensor before the change. Compute it out of place (y = x.add(...), "
                           f"inplace=False), or convert the module with circuits.in_place (see {GUIDE})")


_VIEWS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "narrow", "select", "expand",
          "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "t", "movedim", "swapaxes", "unbind",
          "split", "chunk", torch.narrow, torch.select, torch.transpose, torch.permute, torch.reshape, torch.squeeze,
          torch.unsqueeze, torch.flatten, torch.movedim, torch.swapaxes, torch.unbind, torch.split, torch.chunk}
"""Calls whose result may be a view of their first argument (so a change of it changes the argument)."""


def _is_view(node: fx.Node) -> bool:
    """Whether `node`'s result may be a view of its first argument (an item of it, a reshape, ...)."""
    return node.op in ("call_method", "call_function") and bool(node.args) and (
        node.target is operator.getitem or node.target in _VIEWS)


def _refuse_from_parameters(traced: fx.GraphModule, node: fx.Node, name: str) -> None:
    """A CircuitError for a node off the data that a circuit cannot compute: a layer with parameters called on what
    parameters compute, other than in a chain of layers on a constant (on_constant; one with buffers alone computes a
    constant), whose synapses would have no population to learn from; a tensor method that modifies in place a
    tensor computed from parameters, which an operation computing that tensor would not see (an item of a new
    tensor filled in place traces as a copy: tracing's _fills_as_copies)."""
    read = [u.name for u in node.users if not is_shape_read(u)]
    layer = traced.get_submodule(node.target) if node.op == "call_module" else None
    if layer is not None and read and any(True for _ in layer.parameters()) and from_parameters(traced, node.args[0]) \
            and not on_constant(traced, node):
        raise CircuitError(f"{name}: layer {node.target!r} ({type(layer).__name__}) computes from parameters and "
                           f"constants alone (not from the data), for {', '.join(read)}: its synapses would have no "
                           f"population to learn from. Convert the module with circuits.in_place (see {GUIDE})")
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") and \
            from_parameters(traced, node.args[0]):
        raise CircuitError(f"{name}: node {node.name!r} ({node.format_node()}) modifies in place a tensor computed "
                           f"from parameters, which an operation computing that tensor would not see. Compute it "
                           f"without in-place methods, or convert the module with circuits.in_place (see {GUIDE})")


def on_constant(traced: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` is a layer in a chain of layers, each reading the one before, on a constant (torchvision
    Swin-V2's cpb_mlp on relative_coords_table): its synapses learn from populations of the constant (fx's
    constant_layer)."""
    while isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "get_attr" and \
        not isinstance(_attribute(traced, node.target), nn.Parameter)


def from_parameters(traced: fx.GraphModule, node: Any) -> bool:
    """Whether `node` is computed from parameters: a parameter, or a layer holding some, among what it reads (not
    through shape reads, dtype and device included)."""
    seen: set[fx.Node] = set()
    todo = [node] if isinstance(node, fx.Node) else []
    while todo:
        n = todo.pop()
        if n in seen or is_shape_read(n):
            continue
        seen.add(n)
        if n.op == "get_attr" and isinstance(_attribute(traced, n.target), nn.Parameter) or n.op == "call_module" \
                and any(True for _ in traced.get_submodule(n.target).parameters()):
            return True
        todo.extend(n.all_input_nodes)
    return False


def refuse_dropped_branches(module: nn.Module, traced: fx.GraphModule, retrace: Callable[[], fx.GraphModule]) -> None:
    """A module converted in eval mode whose train-mode graph computes more from the data (GoogLeNet's and
    Inception-v3's auxiliary heads): a CircuitError saying so, as the circuit computes one graph in both modes.
    `retrace`: the module's graph, traced now (in train mode)."""
    if module.training:
        return
    modes = {m: m.training for m in module.modules()}
    module.train()
    try:
        trained = retrace()
    except CircuitError:        # not traceable in train mode: nothing to compare (in_place converts it)
        return
    finally:
        for m, mode in modes.items():
            m.training = mode
    calls = {(n.op, str(n.target)) for n in data_nodes(traced)}
    dropped = sorted({n.name for n in data_nodes(trained) if (n.op, str(n.target)) not in calls})
    if dropped:
        names = ", ".join(dropped[:6]) + (", ..." if len(dropped) > 6 else "")
        raise CircuitError(f"{type(module).__name__} computes more in train mode than in eval mode ({names}), and "
                           f"a circuit computes one graph in both modes: "
                           f"converted in eval mode it would drop those branches. Call module.train() before "
                           f"from_torch (the circuit then returns them in both modes), or build the model without "
                           f"them (e.g. aux_logits=False) (see {GUIDE})")


def is_named_tuple(target: Any) -> bool:
    """Whether a call target is a named tuple class (a module's several outputs: GoogLeNetOutputs)."""
    return isinstance(target, type) and issubclass(target, tuple) and hasattr(target, "_fields")


def convertible_call(node: fx.Node) -> bool:
    """Whether from_torch converts a call_function or call_method node on the data (a named tuple of outputs
    included)."""
    return bool(node.target is operator.getitem or is_named_tuple(node.target) or node.target in SUMS
                or node.target in SYNAPTIC_FUNCTIONS
                or op_name(node.target) is not None or call_activation(node) is not None
                or call_projection(node) is not None)


_SHARED = (f"A circuit gives each projection its own W and B, so a weight used twice would become two. Give each use "
           f"a layer of its own, or convert the module with circuits.in_place, where a layer called twice stays one "
           f"Synapse (see {GUIDE}, 'Shared weights')")


def _attribute(traced: fx.GraphModule, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(traced.get_submodule(owner) if owner else traced, attr, None)


def _target(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return f"the tensor method .{target}()"
    return f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', repr(target))}".lstrip(".")
