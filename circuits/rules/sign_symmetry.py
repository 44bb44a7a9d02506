"""The sign-symmetry family: B made from the signs of W (Liao et al. 2016; Xiao et al. 2018; BioTorch).

    ss:    B = s sign(W),        s = Xiao et al.'s per layer kind, recomputed from W every step
    usf:   B = s sign(W),        s = sqrt(2 / (fan_in + fan_out)), BioTorch's uSF (its Xavier init's std)
    brSF:  B = |M| * sign(W),    M redrawn Xavier-uniform at every training forward (one draw per batch)
    frSF:  B = |M| * sign(W),    M drawn Xavier-uniform once and kept

Each transports the signs of W, not their magnitudes. Fans are torch's: a dense W (out x in) has fan_in = in,
fan_out = out; a kernel (out x in/groups x k_h x k_w) fan_in = in/groups k_h k_w, fan_out = out k_h k_w. A transposed
convolution's kernel (in x out/groups x k_h x k_w) has the fans of the ordinary convolution from the same inputs to
the same outputs (circuits.rules.base.forward_shape): fan_in = in/groups k_h k_w, fan_out = out k_h k_w, not torch's
fans of its tensor (which are the adjoint convolution's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import FeedbackHost, FromWeight, _xavier, forward_shape, register


def sign_symmetry_scale(weight: Tensor, shape: tuple[int, ...] | None = None) -> float:
    """Xiao et al. 2018's scale (willwx/sign-symmetry): 1 / sqrt(fan_in) for a dense W (out x in), the bound
    of torch's old nn.Linear init, and sqrt(2 / (k_h k_w out)) for a conv kernel (out x in/groups x k_h x k_w),
    the std of He's init of a convolution by fan_out (k_h k_w: k for a 1-D kernel). `shape`: W's shape as the
    ordinary layer's (circuits.rules.base.forward_shape), for a transposed convolution's (in, out/groups, k...)."""
    shape = tuple(weight.shape) if shape is None else shape
    if len(shape) == 2:
        return 1.0 / math.sqrt(shape[1])
    return math.sqrt(2.0 / (shape[0] * math.prod(shape[2:])))


def xavier_std(weight: Tensor, shape: tuple[int, ...] | None = None) -> float:
    """sqrt(2 / (fan_in + fan_out)) with torch's fans (of `shape`, W's as the ordinary layer's, if given): the std
    of Xavier's init, BioTorch's uSF scale."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(
        weight if shape is None else torch.empty(shape, device="meta"))
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

    def scale(self, weight: Tensor, shape: tuple[int, ...] | None = None) -> float:
        return sign_symmetry_scale(weight, shape)

    def feedback(self, host: FeedbackHost) -> Tensor:
        w = host.weight.detach()
        return torch.sign(w).mul_(self.scale(w, forward_shape(host)))


@register
@dataclass(frozen=True)
class UniformSignSymmetry(SignSymmetry):
    """uSF as BioTorch has it (Sanfiz & Akrout 2021): B = sign(W) * sqrt(2 / (fan_in + fan_out)), torch's fans,
    the std of BioTorch's Xavier init (biotorch/layers/fa_constructor, option init "xavier", its default)."""

    short_name: ClassVar[str] = "usf"
    source: ClassVar[str] = "Liao et al. 2016; BioTorch (Sanfiz & Akrout 2021)"

    def scale(self, weight: Tensor, shape: tuple[int, ...] | None = None) -> float:
        return xavier_std(weight, shape)


@register
@dataclass(frozen=True)
class FixedRandomSignSymmetry(FromWeight):
    """frSF: B = |M| * sign(W), M drawn Xavier-uniform once and kept (Liao et al. 2016; BioTorch)."""

    short_name: ClassVar[str] = "frsf"
    source: ClassVar[str] = "Liao et al. 2016; BioTorch (Sanfiz & Akrout 2021)"

    def attach(self, host: FeedbackHost) -> None:
        host.register_buffer("feedback_magnitude",
                             _xavier(tuple(host.weight.shape), fans_of=forward_shape(host)).abs_())

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
            magnitude.copy_(_xavier(tuple(magnitude.shape), magnitude, forward_shape(host)).abs_())
