"""Kolen-Pollack: B receives W's update and the same decay, so W - B decays to zero (paper eqs. 16-17)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from ..errors import CircuitError
from .base import FeedbackRule, _finite, register

if TYPE_CHECKING:
    from .synapse import ConvOperator, DenseOperator


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


