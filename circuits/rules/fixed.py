"""Transported and fixed feedback: backprop (B = W), feedback alignment and direct feedback alignment."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import FeedbackHost, FeedbackRule, FromWeight, register


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


