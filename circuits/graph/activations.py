"""Activation functions of populations: y = phi(a), torch's own functions with their settings.

A population sums its incoming projections into a, its summed synaptic input, and fires
y = phi(a). The derivative phi'(a) is local to the population, so every rule shares it. phi is
pointwise, or acts along one axis (softmax, log_softmax, softmin over `dim`); it keeps the shape.

An activation is named by a spec string (circuits.graph.schema.activation_spec): a name, with any
settings that differ from torch's defaults, e.g. "leaky_relu(negative_slope=0.2)". The network
applies torch's function with those settings, so a converted module computes the same bits.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CircuitError
from .schema import activation_spec, parse_activation


def identity(a: Tensor) -> Tensor:
    """phi(a) = a."""
    return a


REQUIRED = object()
"""A setting with no default (softmax's dim): the activation must be given one."""

ACTIVATIONS: dict[str, tuple[Callable[..., Tensor], dict[str, Any]]] = {
    "identity": (identity, {}),
    "relu": (F.relu, {}),
    "sigmoid": (torch.sigmoid, {}),
    "tanh": (torch.tanh, {}),
    "gelu": (F.gelu, {"approximate": "none"}),
    "softplus": (F.softplus, {"beta": 1.0, "threshold": 20.0}),
    "relu6": (F.relu6, {}),
    "silu": (F.silu, {}),
    "hardswish": (F.hardswish, {}),
    "hardsigmoid": (F.hardsigmoid, {}),
    "mish": (F.mish, {}),
    "elu": (F.elu, {"alpha": 1.0}),
    "celu": (F.celu, {"alpha": 1.0}),
    "selu": (F.selu, {}),
    "leaky_relu": (F.leaky_relu, {"negative_slope": 0.01}),
    "hardtanh": (F.hardtanh, {"min_val": -1.0, "max_val": 1.0}),
    "threshold": (F.threshold, {"threshold": REQUIRED, "value": REQUIRED}),
    "hardshrink": (F.hardshrink, {"lambd": 0.5}),
    "softshrink": (F.softshrink, {"lambd": 0.5}),
    "logsigmoid": (F.logsigmoid, {}),
    "softsign": (F.softsign, {}),
    "tanhshrink": (F.tanhshrink, {}),
    "softmax": (F.softmax, {"dim": REQUIRED}),
    "log_softmax": (F.log_softmax, {"dim": REQUIRED}),
    "softmin": (F.softmin, {"dim": REQUIRED}),
}
"""name -> (torch's function, its settings in torch's positional order with torch's defaults)."""


def settings(name: str, given: dict[str, Any], where: str) -> str:
    """The spec of activation `name` with settings `given` (torch's defaults dropped): a CircuitError naming
    `where` for an unknown activation, an unknown or missing setting, or a setting that is not a plain value."""
    if name not in ACTIVATIONS:
        raise CircuitError(f"{where}: unknown activation {name!r}; known activations: {', '.join(sorted(ACTIVATIONS))}")
    defaults = ACTIVATIONS[name][1]
    for key, value in given.items():
        if key not in defaults:
            raise CircuitError(f"{where}: activation {name!r} has no setting {key!r}; its settings: {list(defaults)}")
        if not isinstance(value, (bool, int, float, str)):
            raise CircuitError(f"{where}: activation {name!r} setting {key}={value!r} is not a number or a string")
    missing = [key for key, default in defaults.items() if default is REQUIRED and key not in given]
    if missing:
        raise CircuitError(f"{where}: activation {name!r} needs {', '.join(missing)}")
    return activation_spec(name, {k: given[k] for k, default in defaults.items()     # in torch's order
                                  if k in given and (given[k] != default or default is REQUIRED)})


def activation(spec: str) -> Callable[[Tensor], Tensor]:
    """phi for an activation spec ("relu", "gelu(approximate='tanh')"), or a CircuitError listing the known names."""
    try:
        name, given = parse_activation(spec)
    except ValueError as e:
        raise CircuitError(str(e)) from None
    settings(name, given, f"activation {spec!r}")
    function = ACTIVATIONS[name][0]
    return functools.partial(function, **given) if given else function
