"""Transported and fixed feedback: backprop (B = W), feedback alignment and direct feedback alignment."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from ..errors import CircuitError
from .base import FeedbackHost, FeedbackRule, FromWeight, _xavier, register

if TYPE_CHECKING:
    from .synapse import ConvOperator, DenseOperator


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

        delta_h = phi'(a_h) * (B_h^T e),    e = dL/da_out, the output population's error

    B_h is Xavier-uniform, (output units x hidden units); for a population with channels (C x H x W) it is
    (output units x C), shared over positions. A population with direct feedback gets its error from it alone:
    an error that would reach it by a local operation (a residual skip) is not added. Usable from any
    population: circuit.feedback(source, target, rule="dfa"). As a layer-local rule it is FA. BioTorch's
    DFA, per synaptic layer, is `ldfa` (LayerwiseDirectFeedbackAlignment).
    """

    short_name: ClassVar[str] = "dfa"
    source: ClassVar[str] = "Nokland 2016"
    direct: ClassVar[bool] = True


@register
@dataclass(frozen=True)
class LayerwiseDirectFeedbackAlignment(FeedbackRule):
    """DFA as BioTorch computes it (Sanfiz & Akrout 2021; jsalbert/biotorch, biotorch/layers/dfa): every
    synaptic projection owns a fixed random B, Xavier-uniform, shaped like its W with the output units in
    place of W's outputs: (output units x in) dense, (output units x in x k_h x k_w) conv (k for a 1-D one),
    (in x output units x k_h x k_w) transposed conv (torch's layout of it). The error that its
    input receives through it is

        delta_y_l = B^T e                  dense (e over every position, for tokens)
        delta_y_l = B^T * E                conv: the transposed convolution of E, e at every position of the
                                           projection's output map, with B, at the projection's stride,
                                           padding and dilation
        e = dL/dy_out, the gradient at the circuit's output activity (its output population's y)

    and W's gradient is the usual delta_{l+1} y_l^T from the error at its own output. Only the synapse's
    contribution is replaced: errors crossing local operations (a residual skip, pooling, batch norm) still
    add at the input population. e differs from Nokland's dL/da_out (dfa) where the output population has a
    non-linear activation. A grouped convolution's B reaches every input channel (output units x C x k_h x k_w;
    BioTorch's code passes the layer's groups, which fails there). Bound to a built net's output (for_output);
    unbound (a circuit without one output) it is refused.
    """

    short_name: ClassVar[str] = "ldfa"
    source: ClassVar[str] = "BioTorch (Sanfiz & Akrout 2021), biotorch/layers/dfa"
    needs_weight: ClassVar[bool] = True
    reads_output_error: ClassVar[bool] = True
    output_units: int = 0

    def for_output(self, units: int) -> LayerwiseDirectFeedbackAlignment:
        return dataclasses.replace(self, output_units=units)

    def attach(self, host: FeedbackHost) -> None:
        if not self.output_units:
            raise CircuitError("rule ldfa sends the circuit's output error to each projection: it needs a circuit "
                               "with one output population, whose built net binds it (CircuitNet)")
        w = host.weight
        if w.dim() == 2:
            b = _xavier((self.output_units, w.shape[1]))
        elif getattr(host.operator, "transposed", False):     # W (in x out/groups x k...): B (in x output units x k...)
            b = _xavier((host.in_shape[0], self.output_units, *w.shape[2:]), fans_of=(
                self.output_units, host.in_shape[0], *w.shape[2:]))
        else:                           # a grouped conv's B reaches all input channels
            b = _xavier((self.output_units, host.in_shape[0], *w.shape[2:]))
        host.B = nn.Parameter(b, requires_grad=False)


def output_error_to_input(error: Tensor, out_shape: tuple[int, ...], y: Tensor, feedback: Tensor,
                          operator: DenseOperator | ConvOperator) -> Tensor:
    """B^T e at a projection's input y: e (batch x output units) at every position of its output map
    (out_shape, with the batch), then the operator's transposed product with B (a convolution's at its
    stride, padding and dilation, groups 1: each output unit's kernel reaches every input channel; a transposed
    convolution's, the ordinary convolution with B in its (in x output units x k...) layout)."""
    n, units = error.shape
    if feedback.dim() > 2:
        spatial = out_shape[2:]
        spread = error.view(n, units, *[1] * len(spatial)).expand(n, units, *spatial)
        operator = dataclasses.replace(operator, groups=1)
    else:
        spread = error.view(n, *[1] * (len(out_shape) - 2), units).expand(*out_shape[:-1], units)
    return operator.backward(spread, y, feedback, (True, False, False))[0]
