"""Feedback rules: how a feedback projection's B is made, how the error crosses it, and how B learns.

A rule is one small object beside its equation. The same rule serves a layer-local feedback
projection (B in its forward projection W's layout, out x in or a conv kernel, so B == W is
perfect alignment) and, where it needs no W, a direct feedback projection (circuits.feedback:
B of shape (source units x target units), delta_target = phi'(a_target) * (B^T delta_source)).
Every rule shares the forward pass a = W y and the weight update dW = -eta delta_{l+1} y_l^T.

A rule answers, for the projection ("host") it is attached to:
  attach(host)             the state it keeps there: a stored B, a mask, fixed magnitudes
  feedback(host)           B as the error crosses it now
  signal(error)            what arrives on the far side of B (imperfections add noise here)
  learns_by_gradient       B is a parameter the optimizer steps, with feedback_gradient(...) as its gradient
  mirrors                  B learns in mirror phases, by mirror_update([B], [correlation]) (circuits.mirror)

`register` adds a user's rule to the short names that circuits, models and command lines accept:

    @circuits.rules.register
    @dataclass(frozen=True)
    class Scaled(circuits.rules.FeedbackRule):
        short_name: ClassVar[str] = "scaled"
        ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, TypeVar, Union

import torch
from torch import Tensor, nn

from .errors import CircuitError

if TYPE_CHECKING:
    from .synapse import ConvOperator, DenseOperator


class FeedbackHost(Protocol):
    """A module that carries feedback: a Synapse (weight is W) or a DirectFeedback (weight is None)."""

    weight: Tensor | None
    feedback_shape: tuple[int, ...]

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None: ...


def _finite(rule: object, **values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CircuitError(f"{type(rule).__name__}: {name} must be a finite number, got {value!r}")


def _xavier(shape: tuple[int, ...], like: Tensor | None = None) -> Tensor:
    """Xavier-uniform values U(-a, a), a = sqrt(6 / (fan_in + fan_out)), torch's fans of a weight of `shape`."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    kwargs = dict(dtype=like.dtype, device=like.device) if like is not None else {}
    return torch.empty(shape, **kwargs).uniform_(-bound, bound)


def _independent_like(weight: Tensor) -> Tensor:
    """Uniform random values with W's standard deviation, independent of W."""
    std = float(weight.detach().std()) if weight.numel() > 1 else 0.0
    if not std > 0:
        std = 1 / math.sqrt(weight[0].numel())
    return torch.empty_like(weight).uniform_(-math.sqrt(3) * std, math.sqrt(3) * std).detach()


@dataclass(frozen=True)
class FeedbackRule:
    """Base class: a fixed B drawn at random, independent of W (what feedback alignment keeps).

    Subclasses override what differs. A rule is configuration only; its state lives on the host.
    """

    short_name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    """Where the rule comes from, for documentation."""
    needs_weight: ClassVar[bool] = False
    """B is made from, or learns against, a forward weight W of its own shape (layer-local only)."""
    direct: ClassVar[bool] = False
    """Used circuit-wide, the rule sends the output error straight to every hidden population."""

    # --- B and the error that crosses it --------------------------------------------------
    def attach(self, host: FeedbackHost) -> None:
        """Give the host its own B: W's spread if it has a W, else Xavier-uniform."""
        w = host.weight
        b = _independent_like(w) if w is not None else _xavier(host.feedback_shape)
        host.B = nn.Parameter(b, requires_grad=self.learns_by_gradient)

    def feedback(self, host: FeedbackHost) -> Tensor:
        """B as the backward pass uses it now."""
        return host.B

    def set_feedback(self, host: FeedbackHost, value: Tensor) -> None:
        stored = getattr(host, "B", None)
        if not isinstance(stored, Tensor):
            raise CircuitError(f"rule {self} keeps no B of its own: its B is computed from W")
        if value.shape != stored.shape:
            raise CircuitError(f"feedback of shape {tuple(value.shape)} does not fit B's shape {tuple(stored.shape)}")
        with torch.no_grad():
            stored.copy_(value)

    def signal(self, error: Tensor) -> Tensor:
        """The error as it arrives after crossing B (B^T delta); exact by default."""
        return error

    def check(self, host_kind: str, has_weight: bool) -> None:
        """Raise a CircuitError if this rule cannot serve a host of this kind."""
        if self.needs_weight and not has_weight:
            raise CircuitError(
                f"rule {self} needs the forward weight W that B mirrors; a {host_kind} has none "
                f"(rules for direct feedback: {', '.join(n for n, r in RULES.items() if not r.needs_weight)})"
            )

    # --- learning by gradient --------------------------------------------------------------
    @property
    def learns_by_gradient(self) -> bool:
        """B is a parameter with a gradient from feedback_gradient(), stepped by the optimizer."""
        return False

    @property
    def saves_weight(self) -> bool:
        """The backward pass reads W beside B (in feedback_gradient or weight_gradient). It gets W as stored,
        the parameter itself: under autocast, in its own dtype, not the forward's cast (no copy is kept)."""
        return False

    def feedback_gradient(self, hebbian: Tensor, y: Tensor, weight: Tensor, feedback: Tensor,
                          operator: DenseOperator | ConvOperator) -> Tensor:
        """dL/dB on one batch; `hebbian` is delta y^T, W's own gradient. Only when learns_by_gradient.
        `weight` is W as stored (saves_weight); under autocast the other tensors are in the autocast dtype."""
        raise NotImplementedError

    def weight_gradient(self, grad: Tensor, weight: Tensor) -> Tensor:
        """W's gradient as this rule has it (delta y^T, unless the rule decays W too); `weight` as stored."""
        return grad

    # --- learning in mirror phases ---------------------------------------------------------
    @property
    def mirrors(self) -> bool:
        """B learns in mirror phases (circuits.mirror) by mirror_update()."""
        return False

    def __str__(self) -> str:
        return self.short_name or type(self).__name__


R = TypeVar("R", bound=type)
RULES: dict[str, type[FeedbackRule]] = {}
"""The registered rules by short name."""


def register(cls: R) -> R:
    """Register a FeedbackRule subclass under its short_name (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, FeedbackRule)) or not cls.short_name:
        raise CircuitError(f"register takes a FeedbackRule subclass with a short_name, got {cls!r}")
    if cls.short_name in RULES and RULES[cls.short_name] is not cls:
        raise CircuitError(f"a rule named {cls.short_name!r} is registered already ({RULES[cls.short_name].__name__})")
    RULES[cls.short_name] = cls
    return cls


RuleLike = Union[str, FeedbackRule]


def get(rule: RuleLike, settings: Mapping[str, Mapping[str, Any]] | None = None) -> FeedbackRule:
    """A rule from a FeedbackRule or a registered short name ('bp', 'fa', 'dfa', 'ss', 'kp', 'wm', ...).

    settings: per short name, keyword arguments for that rule's constructor, e.g.
    {"kp": {"decay": 0.005}, "wm": {"eta": 0.005, "decay": 0.005}}; rules it does not name get their defaults.
    """
    if isinstance(rule, FeedbackRule):
        return rule
    if isinstance(rule, str) and rule.lower() in RULES:
        name = rule.lower()
        kwargs = dict((settings or {}).get(name, {}))
        try:
            return RULES[name](**kwargs)
        except TypeError as e:
            raise CircuitError(f"rule {name!r} takes no such settings {kwargs}: {e}") from None
    raise CircuitError(f"unknown feedback rule {rule!r}; known rules: {', '.join(RULES)} "
                       f"(or a circuits.rules.FeedbackRule)")


# === transported and fixed feedback ======================================================
@dataclass(frozen=True)
class FromWeight(FeedbackRule):
    """Base of the rules whose B is computed from the current W whenever it is used: they keep no B."""

    needs_weight: ClassVar[bool] = True

    def attach(self, host: FeedbackHost) -> None:
        pass


@register
@dataclass(frozen=True)
class Backprop(FromWeight):
    """B = W at every step: the error travels back through the transported forward weights."""

    short_name: ClassVar[str] = "bp"
    source: ClassVar[str] = "Rumelhart, Hinton & Williams 1986"

    def feedback(self, host: FeedbackHost) -> Tensor:
        return host.weight


@register
@dataclass(frozen=True)
class FeedbackAlignment(FeedbackRule):
    """B fixed and random, never learns (Lillicrap et al. 2016)."""

    short_name: ClassVar[str] = "fa"
    source: ClassVar[str] = "Lillicrap et al. 2016"


@register
@dataclass(frozen=True)
class DirectFeedbackAlignment(FeedbackRule):
    """The output error sent straight to every hidden population through a fixed random B (Nokland 2016):

        delta_h = phi'(a_h) * (B_h^T e),    e = the output population's error

    B_h is Xavier-uniform, (output units x hidden units), as in BioTorch's DFA layers; for a population
    with channels (C x H x W) it is (output units x C), shared over positions, as BioTorch's convolutional
    DFA (a kernel applied to the spatially constant output error) is up to its borders. Usable from any
    population: circuit.feedback(source, target, rule="dfa"). As a layer-local rule it is FA.
    """

    short_name: ClassVar[str] = "dfa"
    source: ClassVar[str] = "Nokland 2016; BioTorch (Sanfiz & Akrout 2021)"
    direct: ClassVar[bool] = True


# The sign-symmetry family (ss, usf, brsf, frsf) lives beside; registered here, in the order rules are listed.
from .sign_symmetry import (BatchRandomSignSymmetry, FixedRandomSignSymmetry, SignSymmetry,  # noqa: E402
                            UniformSignSymmetry, sign_symmetry_scale)


# === Kolen-Pollack ======================================================================
@register
@dataclass(frozen=True)
class KolenPollack(FeedbackRule):
    """B receives W's update, transposed, and the same decay (paper eqs. 16-17, decay inside the gradient):

        dL/dW = delta_{l+1} y_l^T + lambda W,     dL/dB = delta_{l+1} y_l^T + lambda B

    (B in W's layout), so under plain SGD with learning rate eta, D = W - B obeys D <- (1 - eta lambda) D:
    the paper's per-step decay is eta * lambda here. Any weight decay of the optimizer adds to lambda
    for both. In Kunin et al.'s terms B's gradient is LocalAlignment({"decay": lambda / 2}, tie=True).
    """

    short_name: ClassVar[str] = "kp"
    source: ClassVar[str] = "Kolen & Pollack 1994; Akrout et al. 2019, eqs. 16-17"
    needs_weight: ClassVar[bool] = True
    decay: float = 1e-4

    def __post_init__(self) -> None:
        _finite(self, decay=self.decay)
        if self.decay < 0:
            raise CircuitError(f"KolenPollack decay must be >= 0, got {self.decay}")

    @classmethod
    def per_step(cls, lam: float, lr: float) -> KolenPollack:
        """The paper's form, W and B each shrinking by (1 - lam) per step whatever the learning rate:
        decay = lam / lr, exact under plain SGD at a constant learning rate `lr` (with a learning-rate
        schedule the per-step decay follows the schedule)."""
        _finite(cls, lam=lam, lr=lr)
        if not lr > 0:
            raise CircuitError(f"KolenPollack.per_step needs a learning rate > 0, got {lr}")
        return cls(decay=lam / lr)

    @property
    def learns_by_gradient(self) -> bool:
        return True

    @property
    def saves_weight(self) -> bool:
        return bool(self.decay)

    def feedback_gradient(self, hebbian: Tensor, y: Tensor, weight: Tensor, feedback: Tensor,
                          operator: DenseOperator | ConvOperator) -> Tensor:
        return hebbian + self.decay * feedback if self.decay else hebbian

    def weight_gradient(self, grad: Tensor, weight: Tensor) -> Tensor:
        return grad.add_(weight, alpha=self.decay) if self.decay else grad


# === the weight mirror ===================================================================
@register
@dataclass(frozen=True)
class WeightMirror(FeedbackRule):
    """B learns in mirror phases by the Hebbian rule of the paper's eq. 7, with decay:

        y_l ~ noise, zero mean, variance sigma^2 (independent per unit),   y_{l+1} = W y_l
        dB = eta_B <y_{l+1} y_l^T> - lambda_B B           (<.> averages over the noise batch)
        E[dB] = eta_B sigma^2 W - lambda_B B   =>   B -> (eta_B sigma^2 / lambda_B) W

    Defaults give B -> W (eta_B sigma^2 = lambda_B); lambda_B sets the speed and the noise averaging.
    noise: "gaussian" (default) or "uniform" (the authors' code), both of variance sigma^2.
    In Kunin et al.'s terms one mirror batch is a gradient step on decay + amp over the noise.

    Three options reproduce the authors' released code (makrout/Deep-Learning-without-Weight-Transport,
    fcnn/FCNN_WM.py, `mirror`), which departs from eq. 7:
      decay = 0:            no decay, B += eta_B <y_{l+1} y_l^T>: B has no fixed point; it accumulates
                            about eta_B sigma^2 W per batch (linear response, mean), its direction tending
                            to W's. target_scale and circuits.mirror.settled_angle / samples_for_angle
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
                               f"response; it needs noise 'gaussian' and response 'linear', got {self}")
        if not (self.sigma > 0 and self.eta > 0 and 0 <= self.decay < 1):
            raise CircuitError(f"WeightMirror needs sigma > 0, eta > 0 and 0 <= decay < 1, got {self}")
        for name, allowed in (("noise", ("gaussian", "uniform")), ("response", ("linear", "sigmoid")),
                              ("reduction", ("mean", "sum"))):
            if getattr(self, name) not in allowed:
                raise CircuitError(f"WeightMirror {name} must be {' or '.join(map(repr, allowed))}, "
                                   f"got {getattr(self, name)!r}")

    def attach(self, host: FeedbackHost) -> None:
        """B drawn independently of W, and the statistics mirror phases need (circuits.mirror)."""
        from .mirror import attach_statistics      # mirror imports the network, which imports this module

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


# Kunin et al.'s local rules (ia, sa) and imperfect feedback live beside: registered on import.
from .local_alignment import (INPUT_PRIMITIVES, PRIMITIVES, InformationAlignment, LocalAlignment,  # noqa: E402
                              SymmetricAlignment)
from .imperfect import Imperfect  # noqa: E402

__all__ = ["FeedbackRule", "FromWeight", "FeedbackHost", "RULES", "register", "get", "sign_symmetry_scale", "Backprop",
           "FeedbackAlignment", "DirectFeedbackAlignment", "SignSymmetry", "UniformSignSymmetry",
           "BatchRandomSignSymmetry", "FixedRandomSignSymmetry", "KolenPollack", "WeightMirror", "LocalAlignment",
           "InformationAlignment", "SymmetricAlignment", "PRIMITIVES", "INPUT_PRIMITIVES", "Imperfect"]
