"""Imperfect feedback: any rule with noisy, sparse or sign-constrained feedback synapses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import CircuitError
from .base import FeedbackHost, FeedbackRule, _finite, _rms, get
from .fixed import FeedbackAlignment

if TYPE_CHECKING:
    from .synapse import ConvOperator, DenseOperator


@dataclass(frozen=True)
class Imperfect(FeedbackRule):
    """Any rule with imperfect feedback synapses, composable with every rule:

        noise:    the signal that crosses B gains Gaussian noise of std noise * rms(signal)
        sparsity: a fixed random fraction of B's entries is zero (absent synapses)
        dale:     each feedback neuron (a row of B, one source unit) has outgoing synapses of one fixed
                  random sign; entries of the other sign are held at zero (Dale's principle)

    B as used is mask * B, then the sign constraint. Under a rule whose B learns by gradient (kp, ia, sa,
    LocalAlignment) the gradient, which the rule computes with the B that is used, reaches every stored entry of
    a present synapse unchanged (the constraint passes it straight through): an entry held at zero because it
    has the row's other sign keeps learning (by the terms that do not scale with B itself: KP's delta y^T,
    SA's -self W, IA's amp and null; a decay acts on the used zero), and is used once it has the row's sign.
    Absent synapses (sparsity) get no gradient. Rules whose B is fixed or computed from W have nothing to learn.
    """

    rule: FeedbackRule = FeedbackAlignment()
    noise: float = 0.0
    sparsity: float = 0.0
    dale: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", get(self.rule))
        _finite(self, noise=self.noise, sparsity=self.sparsity)
        if self.noise < 0 or not 0 <= self.sparsity < 1:
            raise CircuitError(f"Imperfect needs noise >= 0 and 0 <= sparsity < 1, got {self}")

    @property
    def needs_weight(self) -> bool:   # type: ignore[override]
        return self.rule.needs_weight

    @property
    def direct(self) -> bool:   # type: ignore[override]
        return self.rule.direct

    @property
    def reads_output_error(self) -> bool:   # type: ignore[override]
        return self.rule.reads_output_error

    def for_output(self, units: int) -> Imperfect:
        return dataclasses.replace(self, rule=self.rule.for_output(units))

    def attach(self, host: FeedbackHost) -> None:
        self.rule.attach(host)
        stored = getattr(host, "B", None)
        shape = tuple(stored.shape) if isinstance(stored, Tensor) else host.feedback_shape
        if self.sparsity:
            host.register_buffer("feedback_mask", (torch.rand(shape) >= self.sparsity).float())
        if self.dale:
            host.register_buffer("feedback_sign", self._row_signs(host, shape))

    def _row_signs(self, host: FeedbackHost, shape: tuple[int, ...]) -> Tensor:
        """+-1 per feedback neuron (a forward output unit, B's row: its first axis, or for a transposed convolution's
        (in x out/groups x k...) layout each output channel wherever its group puts it), broadcastable to B."""
        operator = getattr(host, "operator", None)
        if not getattr(operator, "transposed", False):
            return torch.randint(0, 2, (shape[0],) + (1,) * (len(shape) - 1)).float().mul_(2).sub_(1)
        units = operator.output_units(shape, 1 if self.rule.reads_output_error else None)   # ldfa's B: groups 1
        signs = torch.randint(0, 2, (int(units.max()) + 1,)).float().mul_(2).sub_(1)
        return signs[units]

    def draw(self, host: FeedbackHost) -> None:
        self.rule.draw(host)

    def feedback(self, host: FeedbackHost) -> Tensor:
        b = self.rule.feedback(host)
        if self.sparsity:
            b = b * host.feedback_mask.to(b.dtype)
        if self.dale:
            sign = host.feedback_sign.to(b.dtype)
            constrained = (b * sign).clamp_min(0) * sign
            b = b + (constrained - b).detach() if b.requires_grad else constrained    # learns underneath
        return b

    def set_feedback(self, host: FeedbackHost, value: Tensor) -> None:
        self.rule.set_feedback(host, value)

    def signal(self, error: Tensor) -> Tensor:
        error = self.rule.signal(error)
        if not self.noise:
            return error
        return error + torch.randn_like(error) * (self.noise * _rms(error))

    @property
    def learns_by_gradient(self) -> bool:
        return self.rule.learns_by_gradient

    @property
    def saves_weight(self) -> bool:
        return self.rule.saves_weight

    def feedback_gradient(self, hebbian: Tensor, y: Tensor, weight: Tensor, feedback: Tensor,
                          operator: DenseOperator | ConvOperator) -> Tensor:
        return self.rule.feedback_gradient(hebbian, y, weight, feedback, operator)

    def weight_gradient(self, grad: Tensor, weight: Tensor) -> Tensor:
        return self.rule.weight_gradient(grad, weight)

    @property
    def mirrors(self) -> bool:
        return self.rule.mirrors

    def __getattr__(self, name: str):
        """Everything else (a mirror rule's noise, update, decay) is the wrapped rule's."""
        if name.startswith("__") or name == "rule":
            raise AttributeError(name)
        return getattr(self.rule, name)

    def __str__(self) -> str:
        parts = [f"noise={self.noise}"] * bool(self.noise) + [f"sparsity={self.sparsity}"] * bool(self.sparsity)
        return f"{self.rule}({', '.join(parts + ['dale'] * self.dale)})"
