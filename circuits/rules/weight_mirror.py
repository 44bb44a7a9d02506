"""The weight mirror: B learns W from noise in mirror phases (paper eq. 7); circuits.phases.mirror runs them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..errors import CircuitError
from .base import FeedbackHost, FeedbackRule, _finite, register

if TYPE_CHECKING:
    from .synapse import Synapse


@register
@dataclass(frozen=True)
class WeightMirror(FeedbackRule):
    """B learns in mirror phases by the Hebbian rule of the paper's eq. 7, with decay:

        y_l ~ noise, zero mean, variance sigma^2 (independent per unit),   y_{l+1} = W y_l
        dB = eta_B <y_{l+1} y_l^T> - lambda_B B           (<.> averages over the noise batch)
        E[dB] = eta_B sigma^2 W - lambda_B B   =>   B -> (eta_B sigma^2 / lambda_B) W

    Defaults give B -> W (eta_B sigma^2 = lambda_B); lambda_B sets the speed and the noise averaging.
    noise: "gaussian" (default) or "uniform" (the authors' code), both of variance sigma^2.
    In Kunin et al.'s terms one mirror batch of a dense projection is a gradient step on decay + amp over the
    noise, exactly (decay lambda_B / 2, amp eta_B); for a convolution the mirror divides each kernel tap's
    correlation by the positions where it meets real inputs, so amp's coefficient differs per tap (border taps
    meet fewer), and the equivalence holds per tap only (tests/test_rules.py).

    Three options reproduce the authors' released code (makrout/Deep-Learning-without-Weight-Transport,
    fcnn/FCNN_WM.py, `mirror`), which departs from eq. 7:
      decay = 0:            no decay, B += eta_B <y_{l+1} y_l^T>: B has no fixed point; it accumulates
                            about eta_B sigma^2 W per batch (linear response, mean), its direction tending
                            to W's. target_scale and circuits.phases.mirror.settled_angle / samples_for_angle
                            refuse it (CircuitError).
      response "sigmoid":   y_{l+1} = sigmoid(W y_l + b) instead of the linear W y_l; for small noise
                            <y_{l+1} y_l^T> ~ sigma^2 diag(sigmoid'(b)) W: row i of B learns W's row i
                            scaled by sigmoid'(b_i), so B's angle to W does not reach 0.
      reduction "sum":      <.> sums over the noise batch instead of averaging (the step grows with
                            the batch size).

    wishart=True draws, for a dense projection or a 1x1 convolution (groups 1), the noise's second moment
    S = sum_t y_t y_t^T directly instead of simulating the input neurons: with Gaussian noise S is a Wishart
    sample W_n(sigma^2 I, k), k = samples x output positions (a 1x1 kernel meets each input position at most
    once), drawn by the Bartlett decomposition (S = sigma^2 A A^T, A lower triangular, A_ii^2 ~ chi^2(k - i + 1),
    A_ij ~ N(0, 1) below the diagonal), and sum_t y_{l+1,t} y_t^T = W S. The correlation then has exactly the
    distribution of the noise-driven one (not the same sample), at n^3 + out n^2 multiply-adds instead of
    2 k n out. It needs the linear response and Gaussian noise, and applies where k >= n (fewer samples give a
    singular S, and simulating them is cheaper); other projections keep their neurons.
    """

    short_name: ClassVar[str] = "wm"
    source: ClassVar[str] = "Akrout et al. 2019, eq. 7"
    needs_weight: ClassVar[bool] = True
    sigma: float = 1.0
    eta: float = 0.02
    decay: float = 0.02
    noise: str = "gaussian"
    response: str = "linear"
    reduction: str = "mean"
    wishart: bool = False

    def __post_init__(self) -> None:
        _finite(self, sigma=self.sigma, eta=self.eta, decay=self.decay)
        if self.wishart and (self.noise, self.response) != ("gaussian", "linear"):
            raise CircuitError(f"WeightMirror wishart=True draws the second moment of Gaussian noise for the linear "
                               f"response; it needs noise 'gaussian' and response 'linear', got "
                               f"noise={self.noise!r}, response={self.response!r}")
        bad = [f"{name}={value!r}" for name, value, ok in (("sigma", self.sigma, self.sigma > 0),
                                                            ("eta", self.eta, self.eta > 0),
                                                            ("decay", self.decay, 0 <= self.decay < 1)) if not ok]
        if bad:
            raise CircuitError(f"WeightMirror needs sigma > 0, eta > 0 and 0 <= decay < 1, got {', '.join(bad)}")
        for name, allowed in (("noise", ("gaussian", "uniform")), ("response", ("linear", "sigmoid")),
                              ("reduction", ("mean", "sum"))):
            if getattr(self, name) not in allowed:
                raise CircuitError(f"WeightMirror {name} must be {' or '.join(map(repr, allowed))}, "
                                   f"got {getattr(self, name)!r}")

    def attach(self, host: FeedbackHost) -> None:
        """B drawn independently of W, and the statistics mirror phases need (circuits.phases.mirror)."""
        super().attach(host)
        attach_statistics(host)

    @property
    def mirrors(self) -> bool:
        return True

    @property
    def target_scale(self) -> float:
        """The expected fixed point B = target_scale * W (linear response, decay > 0)."""
        if not self.decay:
            raise CircuitError(f"{self!r} has no fixed point: with decay 0, B grows without bound")
        return self.eta * self.sigma**2 / self.decay

    def mirror_noise(self, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Zero-mean noise of variance sigma^2 per unit, in `like`'s dtype and device."""
        if self.noise == "gaussian":
            y = torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)
            return y if self.sigma == 1 else y.mul_(self.sigma)
        half_width = math.sqrt(3) * self.sigma      # uniform on [-sqrt(3) sigma, sqrt(3) sigma): variance sigma^2
        return (
            torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator).sub_(0.5).mul_(2 * half_width)
        )

    @property
    def response_uses_bias(self) -> bool:
        """The released code's sigmoid response adds the projection's bias; the linear response does not."""
        return self.response == "sigmoid"

    def mirror_response(self, drive: Tensor) -> Tensor:
        """y_{l+1} from the drive W y_l (+ b): linear, or sigmoid as in the released code."""
        return torch.sigmoid(drive) if self.response == "sigmoid" else drive

    def mirror_count(self, batch_size: int) -> int:
        """What the batch's summed correlation is divided by: the batch size (mean), or 1 (sum)."""
        return batch_size if self.reduction == "mean" else 1

    def mirror_update(self, feedback: list[Tensor], correlation: list[Tensor]) -> None:
        """B += eta_B <y_{l+1} y_l^T> - lambda_B B, in place, for every B of this rule at once (two foreach ops)."""
        torch._foreach_mul_(feedback, 1 - self.decay)
        torch._foreach_add_(feedback, correlation, alpha=self.eta)


def attach_statistics(synapse: Synapse) -> None:
    """What a weight-mirror projection's mirror phases need, kept on it (weight-mirror rules call this
    when they attach): `positions`, per kernel tap the (input, output) position pairs a weight entry
    connects (1 for dense), and as host numbers `live_fan_in`, the inputs of a row at taps that meet real
    inputs (for a transposed convolution, the inputs of an output unit: in/groups k... / stride), and
    `live_positions`, the harmonic mean of those taps' positions."""
    positions = synapse.operator.positions(synapse.in_shape, tuple(synapse.weight.shape))
    synapse.register_buffer("positions", positions.to(synapse.weight.device), persistent=False)
    live = positions[positions > 0].double()    # taps that meet real inputs (all, unless a map is tiny)
    operator = synapse.operator
    per_output = math.prod(operator.forward_shape(tuple(synapse.weight.shape))[1:])     # a row of the ordinary layer
    if getattr(operator, "transposed", False):    # a transposed convolution's output meets 1 / stride of its taps
        per_output /= math.prod(operator.stride)
    synapse.live_fan_in = per_output * live.numel() / positions.numel()
    synapse.live_positions = float(live.numel() / live.reciprocal().sum())
