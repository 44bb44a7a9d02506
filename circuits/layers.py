"""The layer table of circuits.from_torch: which torch layer, function or method becomes which
population activation or projection, with its settings.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import projections as P
from .activations import ACTIVATIONS, settings
from .errors import CircuitError

_ACTIVATION_MODULES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.ReLU: ("relu", ()), nn.Sigmoid: ("sigmoid", ()), nn.Tanh: ("tanh", ()),
    nn.GELU: ("gelu", ("approximate",)), nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.ReLU6: ("relu6", ()), nn.SiLU: ("silu", ()), nn.Hardswish: ("hardswish", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()), nn.Mish: ("mish", ()), nn.ELU: ("elu", ("alpha",)),
    nn.CELU: ("celu", ("alpha",)), nn.SELU: ("selu", ()), nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")), nn.Threshold: ("threshold", ("threshold", "value")),
    nn.Hardshrink: ("hardshrink", ("lambd",)), nn.Softshrink: ("softshrink", ("lambd",)),
    nn.LogSigmoid: ("logsigmoid", ()), nn.Softsign: ("softsign", ()), nn.Tanhshrink: ("tanhshrink", ()),
    nn.Softmax: ("softmax", ("dim",)), nn.LogSoftmax: ("log_softmax", ("dim",)), nn.Softmin: ("softmin", ("dim",)),
    nn.GLU: ("glu", ("dim",)),
}
"""Activation modules (exact type: ReLU6 is a Hardtanh) -> (activation, the module attributes that are its settings)."""

_ACTIVATION_FUNCTIONS = {getattr(module, name): name for name in ACTIVATIONS for module in (F, torch)
                         if name != "identity" and hasattr(module, name)}
_ACTIVATION_METHODS = {name for name in ACTIVATIONS if hasattr(torch.Tensor, name)}
_IGNORED = {"inplace": None, "_stacklevel": None, "dtype": None}
"""Call arguments that do not change the function (in place or not) or that must keep their default (dtype)."""


def module_activation(layer: nn.Module, name: str) -> str | None:
    """The activation spec of an activation module with its settings (None: not an activation)."""
    found = _ACTIVATION_MODULES.get(type(layer))
    if found is None:
        return None
    act, attributes = found
    given = {a: getattr(layer, a) for a in attributes if getattr(layer, a) is not None}   # Softmax(dim=None): none
    return settings(act, given, f"layer {name!r} ({layer})")


def call_activation(node: fx.Node) -> str | None:
    """The activation spec of an activation function or tensor method call, its arguments mapped to settings by
    torch's positional order (None: not an activation call)."""
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        act = _ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        act = node.target
    else:
        return None
    where = f"node {node.name!r} ({node.format_node()})"
    order = list(ACTIVATIONS[act][1])
    if len(node.args) - 1 > len(order):
        raise CircuitError(f"{where}: activation {act!r} takes settings {order} only; it cannot be converted")
    given: dict[str, Any] = dict(zip(order[:len(node.args) - 1], node.args[1:], strict=True))
    for key, value in node.kwargs.items():
        if key in _IGNORED:
            if key == "dtype" and value is not None:
                raise CircuitError(f"{where}: dtype={value} cannot be converted (a population keeps its dtype)")
        else:
            given[key] = value
    return settings(act, given, where)


def projection(module: nn.Module, name: str) -> P.Projection:
    """The circuit projection equivalent to one torch layer, carrying its parameters."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if isinstance(module, nn.Linear):
        return P.Dense(bias=module.bias is not None, state=state)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise CircuitError(f"layer {name!r} ({module}): only numeric zero padding can be converted")
        return P.Conv2d(module.kernel_size, module.stride, module.padding, module.dilation, module.groups,
                        module.bias is not None, state=state)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return P.BatchNorm(module.eps, module.momentum, module.affine, module.track_running_stats, state=state)
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        return P.MaxPool(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AvgPool2d) and module.divisor_override is None:
        return P.AvgPool(module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return P.AdaptiveAvgPool(module.output_size)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return P.Flatten()
    if isinstance(module, nn.Dropout):
        return P.Dropout(module.p)
    if isinstance(module, nn.Identity):
        return P.Identity()
    raise CircuitError(f"layer {name!r} ({type(module).__name__}) cannot be converted into a circuit projection")
