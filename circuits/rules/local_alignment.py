"""Kunin et al. 2020's local alignment rules, composed of their named primitives (neuroailab/Neural-Alignment).

Each primitive is a layer-local loss on W, B and the projection's input y; a rule is a weighted sum of
them, and B descends its gradient with the optimizer's learning rate (circuits.rules has the rest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import Tensor

from ..errors import CircuitError
from .base import FeedbackRule, _finite, _rms, register

if TYPE_CHECKING:
    from .synapse import ConvOperator, DenseOperator


Primitive = Callable[..., Tensor]


def _batch(y: Tensor) -> int:
    return y.shape[0]


def _decay(y, weight, feedback, operator, y_b=None):
    """d/dB of |W|^2 + |B|^2 = 2 B."""
    return 2 * feedback


def _self(y, weight, feedback, operator, y_b=None):
    """d/dB of -tr(W^T B) = -W."""
    return -weight


def _amp(y, weight, feedback, operator, y_b=None):
    """d/dB of -<(W y) . (B y_b)> = -<(W y) y_b^T>: the weight mirror's Hebbian term (y_b: what crosses B, y)."""
    y_b = y if y_b is None else y_b
    return -operator.backward(operator.forward(y, weight, None), y_b, feedback, (False, True, False))[1] / _batch(y)


def _sparse(y, weight, feedback, operator, y_b=None):
    """d/dB of <|W y|^2 + |B y_b|^2> = 2 <(B y_b) y_b^T>."""
    y_b = y if y_b is None else y_b
    b_y = operator.forward(y_b, feedback, None)
    return 2 * operator.backward(b_y, y_b, feedback, (False, True, False))[1] / _batch(y)


def _null(y, weight, feedback, operator, y_b=None):
    """d/dB of <|B^T W y|^2> = 2 <(W y) r^T>, r = B^T W y (the reconstruction of y through W then B)."""
    z = operator.forward(y, weight, None)
    r = operator.backward(z, y, feedback, (True, False, False))[0]
    return 2 * operator.backward(z, r, feedback, (False, True, False))[1] / _batch(y)


PRIMITIVES: dict[str, Primitive] = {"decay": _decay, "self": _self, "amp": _amp, "sparse": _sparse, "null": _null}
INPUT_PRIMITIVES = ("amp", "sparse", "null")
"""The primitives that read the projection's input y (decay and self need only W and B)."""
"""Kunin et al. 2020's primitives (neuroailab/Neural-Alignment, Alignments/primitives.py), each as its
gradient with respect to B (W's layout) on a batch y of the projection's input, averaged over the batch (summed
over a map's positions, as their reduce_mean over axis 0 does), called (y, W, B, operator[, y_b]): y_b is the
input as it crosses B (Kunin's backward input), y by default."""


@dataclass(frozen=True)
class LocalAlignment(FeedbackRule):
    """B learns by gradient descent on a layer-local loss built from Kunin et al. 2020's primitives:

        R(W, B) = sum of coefficient * primitive over `terms`, e.g. {"amp": 1.0, "decay": 0.1}
        dL/dB   = dR/dB  (+ delta y^T, W's own gradient, if `tie`: Kolen-Pollack's tie)

    with y the projection's input on the learning batch (PRIMITIVES gives each term's gradient). The optimizer
    steps B with its own learning rate; W learns from the task alone.

    How y is prepared, before the primitives read it:
      normalize (this project's, the default):  y <- (y - batch mean) / rms(y - batch mean), the rms over the
          whole batch in y's dtype, so that y has unit variance per unit, as the weight mirror's noise does,
          and a coefficient means the same in every layer. Not an option of Kunin et al.'s code.
      Kunin et al.'s options (neuroailab/Neural-Alignment, Alignments/alignment.py, AlignmentBase; all off
      there by default), applied in their order, after `normalize`:
      center_examples (their center_input):       each example minus its own mean over all its units;
      normalize_examples (their normalize_input): each example centred, then scaled to unit l2 norm;
      center_feedback_input (their batch_center_backward_input): the input that crosses B (in amp and sparse)
          is centred over the batch; W's side (amp's W y, null) keeps the uncentred input.
    With normalize=False and their options, the gradient is theirs (tests/test_peers.py). Special cases
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

    @property
    def learns_by_gradient(self) -> bool:
        return True

    @property
    def saves_weight(self) -> bool:
        return any(name != "decay" for name, _ in self.terms)

    def prepare_input(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(y, y_b): the input as W's side and as B's side of the primitives read it (see the class)."""
        if self.normalize:
            y = y - y.mean(0, keepdim=True)
            y = y / _rms(y).clamp_min(torch.finfo(torch.float32).tiny)
        examples = y.reshape(y.shape[0], -1)
        if self.center_examples:
            examples = examples - examples.mean(1, keepdim=True)
        if self.normalize_examples:
            examples = examples - examples.mean(1, keepdim=True)
            examples = examples / examples.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        y = examples.view_as(y)
        return y, y - y.mean(0, keepdim=True) if self.center_feedback_input else y

    def feedback_gradient(self, hebbian: Tensor, y: Tensor, weight: Tensor, feedback: Tensor,
                          operator: DenseOperator | ConvOperator) -> Tensor:
        grad = hebbian if self.tie else torch.zeros_like(feedback)
        if weight is not None:      # W as stored (None if no term reads it): cast here, in backward, to B's dtype
            weight = weight.to(feedback.dtype)
        y_b = None
        if any(name in INPUT_PRIMITIVES for name, _ in self.terms):
            y, y_b = self.prepare_input(y)
        for name, c in self.terms:
            if c:
                grad = grad + c * PRIMITIVES[name](y, weight, feedback, operator, y_b)
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
