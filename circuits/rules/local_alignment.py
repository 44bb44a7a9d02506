"""Kunin et al. 2020's local alignment rules, composed of their named primitives (neuroailab/Neural-Alignment).

Each primitive is a layer-local loss on W, B and the projection's input y; a rule is a weighted sum of
them, and B descends its gradient with the optimizer's learning rate (circuits.rules has the rest).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..errors import CircuitError
from .base import FeedbackRule, _finite, register

if TYPE_CHECKING:
    from .synapse import ConvOperator, DenseOperator


class Correlation(NamedTuple):
    """scale <post pre^T>: a Hebbian product averaged over the batch (summed over a map's positions), in B's
    layout."""

    post: Tensor
    pre: Tensor
    scale: float


@dataclass
class Signals:
    """What the primitives read on one batch, each product computed at most once: y (as it crosses W), y_b (as
    it crosses B), W, B and the projection's operator."""

    y: Tensor
    y_b: Tensor
    weight: Tensor | None
    feedback: Tensor
    operator: DenseOperator | ConvOperator
    _computed: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def _once(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        if name not in self._computed:      # (not functools.cached_property: torch.compile cannot enter its lock)
            self._computed[name] = compute()
        return self._computed[name]

    @property
    def response(self) -> Tensor:
        """W y."""
        return self._once("response", lambda: self.operator.forward(self.y, self.weight, None))

    @property
    def feedback_response(self) -> Tensor:
        """B y_b."""
        return self._once("feedback_response", lambda: self.operator.forward(self.y_b, self.feedback, None))

    @property
    def reconstruction(self) -> Tensor:
        """B^T W y: y sent through W, then back through B."""
        return self._once("reconstruction", lambda: self.operator.backward(
            self.response, self.y, self.feedback, (True, False, False))[0])


Primitive = Callable[[Signals], "Tensor | Correlation"]


def _decay(s: Signals) -> Tensor:
    """d/dB of |W|^2 + |B|^2 = 2 B."""
    return 2 * s.feedback


def _self(s: Signals) -> Tensor:
    """d/dB of -tr(W^T B) = -W."""
    return -s.weight


def _amp(s: Signals) -> Correlation:
    """d/dB of -<(W y) . (B y_b)> = -<(W y) y_b^T>: the weight mirror's Hebbian term."""
    return Correlation(s.response, s.y_b, -1.0)


def _sparse(s: Signals) -> Correlation:
    """d/dB of <|W y|^2 + |B y_b|^2> = 2 <(B y_b) y_b^T>."""
    return Correlation(s.feedback_response, s.y_b, 2.0)


def _null(s: Signals) -> Correlation:
    """d/dB of <|B^T W y|^2> = 2 <(W y) r^T>, r = B^T W y (the reconstruction of y through W then B)."""
    return Correlation(s.response, s.reconstruction, 2.0)


PRIMITIVES: dict[str, Primitive] = {"decay": _decay, "self": _self, "amp": _amp, "sparse": _sparse, "null": _null}
INPUT_PRIMITIVES = ("amp", "sparse", "null")
"""The primitives that read the projection's input y (decay and self need only W and B)."""
"""Kunin et al. 2020's primitives (neuroailab/Neural-Alignment, Alignments/primitives.py), each as its
gradient with respect to B (W's layout), read from Signals: a tensor, or a Correlation <post pre^T> over the
batch. Terms that share their post (amp and null share W y) cost one weight-gradient product together."""


def _batch_mean(y: Tensor, dtype: torch.dtype) -> Tensor:
    """y's mean over the batch (axis 0, kept), reduced with y's other axes in memory order: the result is strided as
    an example of y is (channels_last stays channels_last), which a CPU reduces 30 times faster."""
    order = sorted(range(1, y.dim()), key=y.stride, reverse=True)
    back = [0, *(1 + order.index(axis) for axis in range(1, y.dim()))]
    return y.permute(0, *order).mean(0, keepdim=True, dtype=dtype).permute(back)


def _normalizer(y: Tensor) -> Callable[[Tensor], Tensor]:
    """t -> (t - m) / s in y's dtype, m the batch mean of y per unit and s the rms of y - m over the whole batch.

    Two reads of y, computed in float32 at least: m, and s^2 = mean(y^2) - mean(m^2) (the batch mean of (y - m)^2
    per unit is that of y^2 less m^2); the centred batch itself is never formed, so that a sub-batch costs only
    its own examples."""
    dtype = torch.promote_types(y.dtype, torch.float32)
    shift = _batch_mean(y, dtype)
    power = torch.linalg.vector_norm(y, dtype=dtype).square() / y.numel()
    scale = (power - shift.square().mean()).clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return lambda t: ((t - shift) / scale).to(y.dtype)


@dataclass(frozen=True)
class LocalAlignment(FeedbackRule):
    """B learns by gradient descent on a layer-local loss built from Kunin et al. 2020's primitives:

        R(W, B) = sum of coefficient * primitive over `terms`, e.g. {"amp": 1.0, "decay": 0.1}
        dL/dB   = dR/dB  (+ delta y^T, W's own gradient, if `tie`: Kolen-Pollack's tie)

    with y the projection's input on the learning batch (PRIMITIVES gives each term's gradient). The optimizer
    steps B with its own learning rate; W learns from the task alone.

    How y is prepared, before the primitives read it:
      normalize (this project's, the default):  y <- (y - batch mean) / rms(y - batch mean), the rms over the
          whole batch (computed in float32 at least, applied in y's dtype), so that y has unit variance per unit,
          as the weight mirror's noise does,
          and a coefficient means the same in every layer. Not an option of Kunin et al.'s code.
      Kunin et al.'s options (neuroailab/Neural-Alignment, Alignments/alignment.py, AlignmentBase; all off
      there by default), applied in their order, after `normalize`:
      center_examples (their center_input):       each example minus its own mean over all its units;
      normalize_examples (their normalize_input): each example centred, then scaled to unit l2 norm;
      center_feedback_input (their batch_center_backward_input): the input that crosses B (in amp and sparse)
          is centred over the batch; W's side (amp's W y, null) keeps the uncentred input.
    With normalize=False and their options, the gradient is theirs (tests/test_peers.py).

    sub_batch (this project's, None by default): the input primitives average over `sub_batch` examples of each
    learning batch, drawn uniformly without replacement from torch's generator, after the whole batch is prepared
    as above. Every term is a mean of per-example products, so the expectation over the draw is the whole batch's
    gradient exactly (unbiased; tests/test_rules.py averages over every possible draw), at about sub_batch / N of
    the primitives' products. A batch of at most sub_batch examples is used whole. Special cases
    (tests/test_rules.py, normalize=False): Kolen-Pollack's B gradient is {"decay": lambda / 2} with tie; one
    mirror batch of the weight mirror is one step of {"decay": lambda_B / 2, "amp": eta_B} on white noise y
    for a dense projection (for a convolution, with amp's coefficient divided per tap by its positions).
    """

    source: ClassVar[str] = "Kunin et al. 2020 (neuroailab/Neural-Alignment)"
    needs_weight: ClassVar[bool] = True
    terms: tuple[tuple[str, float], ...] = ()
    tie: bool = False
    normalize: bool = True
    center_examples: bool = False
    normalize_examples: bool = False
    center_feedback_input: bool = False
    sub_batch: int | None = None

    def __post_init__(self) -> None:
        terms = dict(self.terms)
        unknown = sorted(set(terms) - set(PRIMITIVES))
        if unknown:
            raise CircuitError(
                f"{type(self).__name__}: unknown primitives {unknown}; primitives: {', '.join(PRIMITIVES)}"
            )
        _finite(self, **terms)
        if terms.get("decay", 0) < 0:
            raise CircuitError(f"{type(self).__name__}: the decay coefficient must be >= 0, got {terms['decay']}")
        object.__setattr__(self, "terms", tuple(sorted(terms.items())))
        if self.sub_batch is not None and (not isinstance(self.sub_batch, int) or self.sub_batch < 1):
            raise CircuitError(f"{type(self).__name__}: sub_batch must be a whole number >= 1 (or None: the whole "
                               f"batch), got {self.sub_batch!r}")

    @property
    def draws_while_learning(self) -> bool:
        return self.sub_batch is not None

    @property
    def learns_by_gradient(self) -> bool:
        return True

    @property
    def saves_weight(self) -> bool:
        return any(name != "decay" for name, _ in self.terms)

    def prepare_input(self, y: Tensor, sample: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(y, y_b): the examples `sample` of the batch y (all of them by default) as W's side and as B's side of
        the primitives read them (see the class); every statistic over the batch is the whole batch's."""
        normalized = _normalizer(y) if self.normalize else (lambda t: t)
        x = self._examples(normalized(y if sample is None else y[sample]))
        if not self.center_feedback_input:
            return x, x
        whole = x if sample is None else self._examples(normalized(y))
        return x, x - whole.mean(0, keepdim=True)

    def _examples(self, x: Tensor) -> Tensor:
        """Kunin et al.'s per-example options on prepared examples x (reduced over all axes but the batch's)."""
        units = tuple(range(1, x.dim()))
        if self.center_examples or self.normalize_examples:
            x = x - x.mean(units, keepdim=True)
        if self.normalize_examples:
            x = x / torch.linalg.vector_norm(x, dim=units, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return x

    def feedback_gradient(self, hebbian: Tensor, y: Tensor, weight: Tensor, feedback: Tensor,
                          operator: DenseOperator | ConvOperator) -> Tensor:
        grad = hebbian if self.tie else torch.zeros_like(feedback)
        if weight is not None:      # W as stored (None if no term reads it): cast here, in backward, to B's dtype
            weight = weight.to(feedback.dtype)
        y_b = y
        if any(name in INPUT_PRIMITIVES for name, _ in self.terms):
            sample = None
            if self.sub_batch is not None and y.shape[0] > self.sub_batch:
                sample = torch.randperm(y.shape[0], device=y.device)[:self.sub_batch]
            y, y_b = self.prepare_input(y, sample)
        signals = Signals(y, y_b, weight, feedback, operator)
        by_post: dict[int, list[Correlation]] = {}      # by their post's identity: one product per post
        for name, c in self.terms:
            if not c:
                continue
            term = PRIMITIVES[name](signals)
            if isinstance(term, Correlation):
                by_post.setdefault(id(term.post), []).append(term._replace(scale=c * term.scale))
            else:
                grad = grad + c * term
        for first, *others in by_post.values():     # sum_i a_i <post pre_i^T> = a_1 <post (pre_1 + ...)^T>
            pre = first.pre
            for other in others:
                pre = torch.add(pre, other.pre, alpha=other.scale / first.scale)
            hebbian_product = operator.backward(first.post, pre, feedback, (False, True, False))[1]
            grad = grad + hebbian_product * (first.scale / y.shape[0])
        return grad


@register
@dataclass(frozen=True)
class InformationAlignment(LocalAlignment):
    """IA (Kunin et al. 2020): amp + null + decay on the projection's input during learning.

    The primitives and their sum are Kunin et al.'s; the default coefficients (amp 0.1, null 0.01, decay 0.05)
    and the input normalisation (normalize=True) are this project's, chosen on the digits MLP at SGD lr 0.1
    with momentum 0.9. Their code's defaults (params.py) are amp 2e-3, null 1e-3, decay 1e-3 with no input
    normalisation: InformationAlignment.kunin(). The null term's curvature grows with |W|^2: at larger learning
    rates (the MNIST MLP's lr 1.0) B diverges unless the coefficients shrink with them.
    """

    short_name: ClassVar[str] = "ia"
    terms: tuple[tuple[str, float], ...] = (("amp", 0.1), ("decay", 0.05), ("null", 0.01))

    @classmethod
    def kunin(cls, amp: float = 2e-3, null: float = 1e-3, decay: float = 1e-3, **options: bool) -> InformationAlignment:
        """IA as Kunin et al.'s code runs it: their default coefficients (alpha amp, beta null, gamma decay),
        no normalisation of ours; `options` are their input options by meaning (center_examples,
        normalize_examples, center_feedback_input)."""
        return cls(terms=(("amp", amp), ("decay", decay), ("null", null)), normalize=False, **options)


@register
@dataclass(frozen=True)
class SymmetricAlignment(LocalAlignment):
    """SA (Kunin et al. 2020): decay + self, so dL/dB = 2 decay B - self W and B -> (self / 2 decay) W.

    Their code's defaults (params.py) are decay 1e-3, self 2e-3; this project's 0.5 : 1.0 keeps their ratio
    (so B -> W) at 500 times their step.
    """

    short_name: ClassVar[str] = "sa"
    terms: tuple[tuple[str, float], ...] = (("decay", 0.5), ("self", 1.0))
