"""The rule base: FeedbackRule (what every rule answers), the registry of short names, and FromWeight."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, TypeVar, Union

import torch
from torch import Tensor, nn

from ..errors import CircuitError

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


def _rms(t: Tensor) -> Tensor:
    """sqrt(mean(t^2)), without gradient, in t's dtype (computed in float32 at least: a float64 t carries no
    float32 rounding, and a half-precision one does not overflow)."""
    computed = t.detach().to(torch.promote_types(t.dtype, torch.float32))
    return computed.square().mean().sqrt().to(t.dtype)


def forward_shape(host: FeedbackHost) -> tuple[int, ...]:
    """The host's W shape as the ordinary layer's (out, in/groups, k...), whose torch fans are the projection's: W's
    own, but for a transposed convolution's (in, out/groups, k...) (ConvOperator.forward_shape)."""
    shape = tuple(host.weight.shape)
    operator = getattr(host, "operator", None)
    return operator.forward_shape(shape) if operator is not None else shape


def _xavier(shape: tuple[int, ...], like: Tensor | None = None, fans_of: tuple[int, ...] | None = None) -> Tensor:
    """Xavier-uniform values U(-a, a), a = sqrt(6 / (fan_in + fan_out)), torch's fans of a weight of `shape` (or of
    `fans_of`: the forward_shape of a transposed convolution's W)."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(fans_of or shape, device="meta"))
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
    reads_output_error: ClassVar[bool] = False
    """The error crossing B is the circuit's output error, not the projection's own (BioTorch's DFA, ldfa): the
    built net binds the rule to its output (for_output) and sends that error to the projection's input."""

    # --- B and the error that crosses it --------------------------------------------------
    def attach(self, host: FeedbackHost) -> None:
        """Give the host its own B: W's spread if it has a W, else Xavier-uniform."""
        w = host.weight
        b = _independent_like(w) if w is not None else _xavier(host.feedback_shape)
        host.B = nn.Parameter(b, requires_grad=self.learns_by_gradient)

    def for_output(self, units: int) -> FeedbackRule:
        """The rule bound to a circuit whose one output population has `units` units (reads_output_error)."""
        return self

    def draw(self, host: FeedbackHost) -> None:
        """Draw what the rule redraws once per training forward (brSF's M), before feedback() is read for it;
        nothing by default. Called only by a forward that will send an error back."""

    @property
    def draws_while_learning(self) -> bool:
        """A learning step draws from torch's generator for this rule (brSF's M in draw(), a sampled sub-batch)."""
        return type(self).draw is not FeedbackRule.draw

    def feedback(self, host: FeedbackHost) -> Tensor:
        """B as the backward pass uses it now; reading it draws nothing."""
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
        """B learns in mirror phases (circuits.phases.mirror) by mirror_update()."""
        return False

    def __str__(self) -> str:
        return self.short_name or type(self).__name__


R = TypeVar("R", bound=type)
RULES: dict[str, type[FeedbackRule]] = {}
"""The registered rules by short name."""


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: R) -> R:
    """Register a FeedbackRule subclass under its short_name (a class decorator).

    Registering a class again is harmless, and so is registering its redefinition (the same module and
    qualified name: a notebook cell or a module run twice), which replaces it. Another class under a
    name already taken is a CircuitError.
    """
    if not (isinstance(cls, type) and issubclass(cls, FeedbackRule)) or not cls.short_name:
        raise CircuitError(f"register takes a FeedbackRule subclass with a short_name, got {cls!r}")
    taken = RULES.get(cls.short_name)
    if taken is not None and _where(taken) != _where(cls):
        raise CircuitError(f"a rule named {cls.short_name!r} is registered already ({_where(taken)}); "
                           f"{_where(cls)} needs another short_name")
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

