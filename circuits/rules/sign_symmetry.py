"""The sign-symmetry family: B made from the signs of W (Liao et al. 2016; Xiao et al. 2018; BioTorch).

    uSF (ss, usf):  B = s sign(W),        s = the He-init std of W's layer kind, recomputed every step
    brSF:           B = |M| * sign(W),    M redrawn Xavier-uniform at every batch
    frSF:           B = |M| * sign(W),    M drawn Xavier-uniform once and kept

Each transports the signs of W, not their magnitudes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import FeedbackHost, FromWeight, _xavier, register


def sign_symmetry_scale(weight: Tensor) -> float:
    """The He-init std of W's layer kind, as in Xiao et al. 2018's code: 1 / sqrt(fan_in) for a dense
    W (out x in), sqrt(2 / (k_h k_w out)) for a conv kernel (out x in/groups x k_h x k_w)."""
    if weight.dim() == 2:
        return 1.0 / math.sqrt(weight.shape[1])
    return math.sqrt(2.0 / (weight.shape[0] * math.prod(weight.shape[2:])))


@register
@dataclass(frozen=True)
class SignSymmetry(FromWeight):
    """uSF: B = sign(W) * s, recomputed from the current W each step (Liao et al. 2016; Xiao et al. 2018).

    Transports the signs of W, not their magnitudes. s is sign_symmetry_scale(W): 1/sqrt(fan_in) for dense
    layers and sqrt(2 / (k_h k_w out)) for conv layers, Xiao et al.'s init std per layer kind.
    """

    short_name: ClassVar[str] = "ss"
    source: ClassVar[str] = "Liao et al. 2016; Xiao et al. 2018"

    def feedback(self, host: FeedbackHost) -> Tensor:
        w = host.weight.detach()
        return torch.sign(w).mul_(sign_symmetry_scale(w))


@register
@dataclass(frozen=True)
class UniformSignSymmetry(SignSymmetry):
    """usf: the name BioTorch (Sanfiz & Akrout 2021) gives sign symmetry; the same rule as ss."""

    short_name: ClassVar[str] = "usf"


@register
@dataclass(frozen=True)
class BatchRandomSignSymmetry(FromWeight):
    """brSF: B = |M| * sign(W), M redrawn Xavier-uniform at every batch (Liao et al. 2016; BioTorch)."""

    short_name: ClassVar[str] = "brsf"
    source: ClassVar[str] = "Liao et al. 2016; BioTorch (Sanfiz & Akrout 2021)"

    def feedback(self, host: FeedbackHost) -> Tensor:
        w = host.weight.detach()
        return _xavier(tuple(w.shape), w).abs_().mul_(torch.sign(w))


@register
@dataclass(frozen=True)
class FixedRandomSignSymmetry(FromWeight):
    """frSF: B = |M| * sign(W), M drawn Xavier-uniform once and kept (Liao et al. 2016; BioTorch)."""

    short_name: ClassVar[str] = "frsf"
    source: ClassVar[str] = "Liao et al. 2016; BioTorch (Sanfiz & Akrout 2021)"

    def attach(self, host: FeedbackHost) -> None:
        host.register_buffer("feedback_magnitude", _xavier(tuple(host.weight.shape)).abs_())

    def feedback(self, host: FeedbackHost) -> Tensor:
        return host.feedback_magnitude * torch.sign(host.weight.detach())
