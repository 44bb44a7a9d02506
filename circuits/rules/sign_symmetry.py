"""The sign-symmetry family: B made from the signs of W (Liao et al. 2016; Xiao et al. 2018; BioTorch).

    ss:    B = s sign(W),        s = Xiao et al.'s per layer kind, recomputed from W every step
    usf:   B = s sign(W),        s = sqrt(2 / (fan_in + fan_out)), BioTorch's uSF (its Xavier init's std)
    brSF:  B = |M| * sign(W),    M redrawn Xavier-uniform at every training forward (one draw per batch)
    frSF:  B = |M| * sign(W),    M drawn Xavier-uniform once and kept

Each transports the signs of W, not their magnitudes. Fans are torch's: a dense W (out x in) has fan_in = in,
fan_out = out; a kernel (out x in/groups x k_h x k_w) fan_in = in/groups k_h k_w, fan_out = out k_h k_w.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import FeedbackHost, FromWeight, _xavier, register


def sign_symmetry_scale(weight: Tensor) -> float:
    """Xiao et al. 2018's scale (willwx/sign-symmetry): 1 / sqrt(fan_in) for a dense W (out x in), the bound
    of torch's old nn.Linear init, and sqrt(2 / (k_h k_w out)) for a conv kernel (out x in/groups x k_h x k_w),
    the std of He's init of a convolution by fan_out."""
    if weight.dim() == 2:
        return 1.0 / math.sqrt(weight.shape[1])
    return math.sqrt(2.0 / (weight.shape[0] * math.prod(weight.shape[2:])))


def xavier_std(weight: Tensor) -> float:
    """sqrt(2 / (fan_in + fan_out)) with torch's fans: the std of Xavier's init, BioTorch's uSF scale."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return math.sqrt(2.0 / (fan_in + fan_out))


@register
@dataclass(frozen=True)
class SignSymmetry(FromWeight):
    """B = sign(W) * s, recomputed from the current W each step (Liao et al. 2016; Xiao et al. 2018).

    Transports the signs of W, not their magnitudes. s is sign_symmetry_scale(W), Xiao et al.'s:
    1/sqrt(fan_in) for dense layers and sqrt(2 / (k_h k_w out)) for conv layers.
    """

    short_name: ClassVar[str] = "ss"
    source: ClassVar[str] = "Liao et al. 2016; Xiao et al. 2018 (willwx/sign-symmetry)"

    def scale(self, weight: Tensor) -> float:
        return sign_symmetry_scale(weight)

    def feedback(self, host: FeedbackHost) -> Tensor:
        w = host.weight.detach()
        return torch.sign(w).mul_(self.scale(w))


@register
@dataclass(frozen=True)
class UniformSignSymmetry(SignSymmetry):
    """uSF as BioTorch has it (Sanfiz & Akrout 2021): B = sign(W) * sqrt(2 / (fan_in + fan_out)), torch's fans,
    the std of BioTorch's Xavier init (biotorch/layers/fa_constructor, option init "xavier", its default)."""

    short_name: ClassVar[str] = "usf"
    source: ClassVar[str] = "Liao et al. 2016; BioTorch (Sanfiz & Akrout 2021)"

    def scale(self, weight: Tensor) -> float:
        return xavier_std(weight)


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


@register
@dataclass(frozen=True)
class BatchRandomSignSymmetry(FixedRandomSignSymmetry):
    """brSF: B = |M| * sign(W), M redrawn Xavier-uniform at every training forward (Liao et al. 2016; BioTorch).

    The draw happens once per forward that will send an error back (draw(), called by the synapse), never
    when B is read: a recorder reading `.feedback` sees the M the last backward used, and draws nothing.
    """

    short_name: ClassVar[str] = "brsf"

    def draw(self, host: FeedbackHost) -> None:
        magnitude = host.feedback_magnitude
        with torch.no_grad():
            magnitude.copy_(_xavier(tuple(magnitude.shape), magnitude).abs_())
