"""Pointwise activation functions of populations: y = phi(a).

A population sums its incoming projections into a, its summed synaptic input, and fires
y = phi(a). The derivative phi'(a) is local to the population, so every rule shares it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import CircuitError


def identity(a: Tensor) -> Tensor:
    """phi(a) = a."""
    return a


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": identity,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "softplus": F.softplus,
    "relu6": F.relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The function phi named `name`, or a CircuitError listing the known names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise CircuitError(
            f"unknown activation {name!r}; known activations: {', '.join(sorted(ACTIVATIONS))}"
        ) from None
