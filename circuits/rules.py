"""Feedback rules: how each feedback projection B is set and learns.

Every rule shares the forward pass a = W y and the weight update dW = -eta delta_{l+1} y_l^T;
they differ only in B (stored in W's layout, see circuits.synapse):

- Backprop (bp):            B = W at every step (weight transport).
- FeedbackAlignment (fa):   B fixed and random, drawn independently of W.
- SignSymmetry (ss):        B = sign(W) * s, s = sqrt(2 / fan_out), recomputed from W each step.
- KolenPollack (kp):        dW = -eta delta y^T - lambda W,  dB = -eta delta y^T - lambda B,
                            so W - B shrinks by (1 - eta lambda) per plain SGD step.
- WeightMirror (wm):        B learns only in mirror phases, from noise y ~ N(0, sigma^2):
                            dB = eta_B y_{l+1} y_l^T - lambda_B B,  E[B] -> (eta_B sigma^2 / lambda_B) W.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Union

import torch
from torch import Tensor, nn

from .errors import CircuitError

if TYPE_CHECKING:
    from .synapse import Synapse


@dataclass(frozen=True)
class FeedbackRule:
    """Base class. A rule is configuration only; the state (B) lives on the synapse."""

    short_name: ClassVar[str] = ""
    stores_feedback: ClassVar[bool] = True
    learns_by_gradient: ClassVar[bool] = False
    mirrors: ClassVar[bool] = False
    decay: ClassVar[float] = 0.0

    def attach(self, synapse: Synapse) -> None:
        """Give a synapse its own B, drawn at random and independently of W."""
        if self.stores_feedback:
            synapse.B = nn.Parameter(_independent_like(synapse.weight), requires_grad=self.learns_by_gradient)

    def feedback(self, synapse: Synapse) -> Tensor:
        """B as the backward pass uses it now."""
        return synapse.B

    def set_feedback(self, synapse: Synapse, value: Tensor) -> None:
        if not self.stores_feedback:
            raise CircuitError(f"rule {self.short_name} keeps no B of its own: its B is computed from W")
        if value.shape != synapse.B.shape:
            raise CircuitError(f"feedback of shape {tuple(value.shape)} does not fit W's shape {tuple(synapse.B.shape)}")
        with torch.no_grad():
            synapse.B.copy_(value)

    def __str__(self) -> str:
        return self.short_name


def _independent_like(weight: Tensor) -> Tensor:
    """Uniform random values with W's standard deviation, independent of W."""
    std = float(weight.detach().std()) if weight.numel() > 1 else 0.0
    if not std > 0:
        std = 1 / math.sqrt(weight[0].numel())
    return torch.empty_like(weight).uniform_(-math.sqrt(3) * std, math.sqrt(3) * std).detach()


@dataclass(frozen=True)
class Backprop(FeedbackRule):
    """B = W at every step: the error travels back through the transported forward weights."""

    short_name: ClassVar[str] = "bp"
    stores_feedback: ClassVar[bool] = False

    def feedback(self, synapse: Synapse) -> Tensor:
        return synapse.weight


@dataclass(frozen=True)
class FeedbackAlignment(FeedbackRule):
    """B fixed and random, never learns (Lillicrap et al. 2016)."""

    short_name: ClassVar[str] = "fa"


@dataclass(frozen=True)
class SignSymmetry(FeedbackRule):
    """B = sign(W) * s with s = sqrt(2 / fan_out), the He-init std (Liao et al. 2016; Xiao et al. 2018).

    Transports the signs of W, not their magnitudes; recomputed from the current W each step.
    """

    short_name: ClassVar[str] = "ss"
    stores_feedback: ClassVar[bool] = False

    @staticmethod
    def scale(weight: Tensor) -> float:
        fan_out = weight.shape[0] * math.prod(weight.shape[2:])
        return math.sqrt(2.0 / fan_out)

    def feedback(self, synapse: Synapse) -> Tensor:
        w = synapse.weight.detach()
        return torch.sign(w).mul_(self.scale(w))


@dataclass(frozen=True)
class KolenPollack(FeedbackRule):
    """B receives W's update, transposed, and the same decay (paper eqs. 16-17):

        dW = -eta delta_{l+1} y_l^T - lambda W
        dB = -eta y_l delta_{l+1}^T - lambda B      (B^T in the paper; W's layout here)

    so D = W - B obeys D(t+1) = (1 - eta lambda) D(t) under plain SGD. B is a parameter that the
    optimizer updates with W's gradient; any weight decay of the optimizer adds to lambda for both.
    """

    short_name: ClassVar[str] = "kp"
    learns_by_gradient: ClassVar[bool] = True
    decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.decay < 0:
            raise CircuitError(f"KolenPollack decay must be >= 0, got {self.decay}")


@dataclass(frozen=True)
class WeightMirror(FeedbackRule):
    """B learns in mirror phases by the Hebbian rule of the paper's eq. 7, with decay:

        y_l ~ N(0, sigma^2)  (independent per unit),   y_{l+1} = W y_l
        dB = eta_B y_{l+1} y_l^T - lambda_B B           (averaged over the noise batch)
        E[dB] = eta_B sigma^2 W - lambda_B B   =>   B -> (eta_B sigma^2 / lambda_B) W

    Defaults give B -> W (eta_B sigma^2 = lambda_B); lambda_B sets the speed and the noise
    averaging: about 2 * batch / lambda_B noise samples contribute to B. With n inputs per unit
    and N effective samples the angle between B and W settles near atan(sqrt(n / N)).
    noise: "gaussian" (default) or "uniform" (the authors' code), both of variance sigma^2.
    """

    short_name: ClassVar[str] = "wm"
    mirrors: ClassVar[bool] = True
    sigma: float = 1.0
    eta: float = 0.02
    decay: float = 0.02
    noise: str = "gaussian"

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and self.eta > 0 and 0 < self.decay < 1):
            raise CircuitError(f"WeightMirror needs sigma > 0, eta > 0 and 0 < decay < 1, got {self}")
        if self.noise not in ("gaussian", "uniform"):
            raise CircuitError(f"WeightMirror noise must be 'gaussian' or 'uniform', got {self.noise!r}")

    @property
    def target_scale(self) -> float:
        """The expected fixed point B = target_scale * W."""
        return self.eta * self.sigma**2 / self.decay


RULES: dict[str, type[FeedbackRule]] = {r.short_name: r for r in (Backprop, FeedbackAlignment, SignSymmetry, KolenPollack, WeightMirror)}

RuleLike = Union[str, FeedbackRule]


def get(rule: RuleLike) -> FeedbackRule:
    """A rule from a FeedbackRule or a short name ('bp', 'fa', 'ss', 'kp', 'wm')."""
    if isinstance(rule, FeedbackRule):
        return rule
    if isinstance(rule, str) and rule.lower() in RULES:
        return RULES[rule.lower()]()
    raise CircuitError(f"unknown feedback rule {rule!r}; known rules: {', '.join(RULES)} (or a circuits.rules.FeedbackRule)")
