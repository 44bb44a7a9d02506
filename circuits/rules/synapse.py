"""Synaptic projections: a forward weight W and its feedback weight B, written once for all rules.

Forward:   a_{l+1} = W y_l (+ bias)          (dense product, 2-D convolution, or embedding lookup)
Backward:  delta_l  = B^T delta_{l+1}          (the feedback pathway: B instead of W^T)
           dL/dW    = delta_{l+1} y_l^T        (the same local rule for every method)

B is stored in W's layout (out x in, or a conv kernel), so B == W means B^T = W^T in the
paper's notation: perfect alignment. The feedback rule (circuits.rules) decides what B is.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CircuitError

if TYPE_CHECKING:
    from .base import FeedbackRule


@dataclass(frozen=True)
class DenseOperator:
    """a = W y (+ bias) along the last axis (leading batch and position axes allowed, as nn.Linear)."""

    def forward(self, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(y, weight, bias)

    def backward(self, delta: Tensor, y: Tensor, feedback: Tensor, mask: tuple[bool, bool, bool]):
        """(B^T delta, delta y^T, sum delta) for the requested outputs."""
        delta2, y2 = delta.reshape(-1, delta.shape[-1]), y.reshape(-1, y.shape[-1])
        grad_y = delta @ feedback if mask[0] else None
        grad_w = delta2.t() @ y2 if mask[1] else None
        grad_b = delta2.sum(0) if mask[2] else None
        return grad_y, grad_w, grad_b

    def positions(self, in_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> Tensor:
        """How many (input, output) position pairs each weight entry connects: 1 for a dense W on a 1-D
        population, the number of positions (tokens) on an N-D one, where the same W acts at each."""
        return torch.tensor(float(math.prod(in_shape[:-1])))

    def forward_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """W's shape as (outputs, inputs): W's own."""
        return tuple(weight_shape)


_CONVOLUTIONS = {(1, False): F.conv1d, (2, False): F.conv2d, (1, True): F.conv_transpose1d,
                 (2, True): F.conv_transpose2d}


@dataclass(frozen=True)
class ConvOperator:
    """a = W * y (+ bias): a 1-D or 2-D convolution with zero padding (the dimensionality is len(stride)), or,
    `transposed`, its transpose (torch's ConvTranspose: W in (in, out/groups, k...) layout, padding cropping the
    output, output_padding adding to its size at the far end).

    The same code serves all four: torch's convolution_backward takes `transposed` and `output_padding`, and gives
    the error through B (B in W's layout and place) and W's gradient in one call.
    """

    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    transposed: bool = False
    output_padding: tuple[int, ...] | None = None
    """Transposed only; None: zeros."""

    def __post_init__(self) -> None:
        dims = len(self.stride)
        if dims not in (1, 2) or len(self.padding) != dims or len(self.dilation) != dims:
            raise CircuitError(f"{self}: a 1-D or 2-D convolution takes stride, padding and dilation of one length "
                               f"(1 or 2)")
        object.__setattr__(self, "stride", tuple(self.stride))
        object.__setattr__(self, "padding", tuple(self.padding))
        object.__setattr__(self, "dilation", tuple(self.dilation))
        output_padding = (0,) * dims if self.output_padding is None else tuple(self.output_padding)
        if len(output_padding) != dims or (any(output_padding) and not self.transposed):
            raise CircuitError(f"{self}: output_padding is a transposed convolution's, one number per axis")
        object.__setattr__(self, "output_padding", output_padding)

    @property
    def dims(self) -> int:
        """The spatial axes: 1 or 2."""
        return len(self.stride)

    def forward(self, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = _CONVOLUTIONS[self.dims, self.transposed]
        if self.transposed:
            return conv(y, weight, bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        return conv(y, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, delta: Tensor, y: Tensor, feedback: Tensor, mask: tuple[bool, bool, bool]):
        """Transposed convolution of delta with B, and the weight-gradient convolution of y and delta (for a
        transposed convolution: the ordinary convolution of delta with B, and its weight gradient).

        The weight gradient needs only W's shape, so one cuDNN call with B in W's place gives both.
        """
        return torch.ops.aten.convolution_backward(
            delta, y, feedback, [delta.shape[1]] if mask[2] else None, self.stride, self.padding, self.dilation,
            self.transposed, self.output_padding, self.groups, list(mask),
        )

    def positions(self, in_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> Tensor:
        """Per kernel tap ((k,) or (kh, kw)): how many (input, output) position pairs it connects where the input
        is real (not padding) and the output is one the projection has (a transposed convolution's padding crops).

        Zero padding gives border taps fewer inputs; dividing a weight-gradient correlation by
        this count makes every tap an unbiased average.
        """
        single = dataclasses.replace(self, groups=1)
        ones_in, tap = torch.ones(1, 1, *in_shape[-self.dims:]), torch.ones(1, 1, *weight_shape[-self.dims:])
        ones_out = torch.ones_like(single.forward(ones_in, tap, None))
        return single.backward(ones_out, ones_in, tap, (False, True, False))[1][0, 0]

    def forward_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """W's shape as an ordinary convolution's from the same inputs to the same outputs: (out, in/groups, k...),
        whose torch fans are the projection's (a transposed convolution's (in, out/groups, k...) turned)."""
        if not self.transposed:
            return tuple(weight_shape)
        return (weight_shape[1] * self.groups, weight_shape[0] // self.groups, *weight_shape[2:])

    def output_units(self, feedback_shape: tuple[int, ...], groups: int | None = None) -> Tensor:
        """The output channel of each entry of a W-layout tensor, broadcastable to it: its first axis, or for a
        transposed convolution (in, out/groups, k...) its second within the input channel's group (`groups`: the
        layout's, default the operator's; 1 for a B that reaches every input channel, ldfa's)."""
        tail = [1] * (len(feedback_shape) - 2)
        if not self.transposed:
            return torch.arange(feedback_shape[0]).view(-1, 1, *tail)
        groups = self.groups if groups is None else groups
        inputs, per_group = feedback_shape[:2]
        group = torch.arange(inputs) // (inputs // groups)
        return (group.view(-1, 1) * per_group + torch.arange(per_group).view(1, -1)).view(inputs, per_group, *tail)


@dataclass(frozen=True)
class EmbeddingOperator:
    """a = W[y]: the rows of W (vocabulary x features) that the indices y pick, as nn.Embedding does;
    the dense product W^T e_y with the one-hot population e_y, computed without making it.

    An index input carries no error: no error crosses B (grad_y is None), so an embedding needs no
    feedback of its own and its rule is irrelevant (circuits.graph.projections.Embedding and circuits.in_place
    give it none). W's gradient is the usual delta e_y^T: delta scattered, summed, onto the rows of the
    indices seen (none onto the padding_idx row, as nn.Embedding). Noise cannot drive an index input: there
    is no mirror phase.
    """

    padding_idx: int | None = None

    def forward(self, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.embedding(y, weight, self.padding_idx)

    def backward(self, delta: Tensor, y: Tensor, feedback: Tensor, mask: tuple[bool, bool, bool]):
        """(None, delta e_y^T, None): no input error, and the scatter-add of delta onto W's rows."""
        grad_w = None
        if mask[1]:
            grad_w = torch.zeros_like(feedback).index_add_(0, y.reshape(-1), delta.reshape(-1, delta.shape[-1]))
            if self.padding_idx is not None:
                grad_w[self.padding_idx] = 0
        return None, grad_w, None

    def forward_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """W's own shape (vocabulary x features)."""
        return tuple(weight_shape)

    def positions(self, in_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> Tensor:
        raise CircuitError("an embedding's input is indices, which noise cannot drive: it has no mirror phase "
                           "(and needs no feedback: no error crosses an index input)")


class FeedbackPathway(torch.autograd.Function):
    """Forward through W; send the error back through B; W's gradient as usual.

    The rule shapes what crosses B (rule.signal) and, when B learns by gradient (Kolen-Pollack,
    Kunin et al.'s local rules), gives B's gradient (rule.feedback_gradient) and W's
    (rule.weight_gradient: Kolen-Pollack decays W as well).
    """

    generate_vmap_rule = True   # seeds batched by torch.func.vmap (circuits.graph.seeds): per seed, as written

    @staticmethod
    def forward(y: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor | None,
                stored_weight: Tensor | None, operator, rule: FeedbackRule) -> Tensor:
        return operator.forward(y, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        """`feedback` None means B is W itself (backprop): W is then passed once, not twice,
        so torch.compile sees no duplicated input. A stored B comes as stored and is first read, and cast to
        the forward's dtype, in backward: a mirror batch may change it between forward and backward (circuits.
        mirror_stream), so a B without a gradient is kept as it is (a ctx attribute: no version check; torch.compile
        reads it at backward time too), while a B the optimizer steps (after backward) is saved with its version.
        A B computed in forward (from W, or B times a mask) is cast there. `stored_weight`: W as stored (the
        parameter), where `weight` is a cast of it (autocast) and the rule's backward reads W (rule.saves_weight):
        saved in place of the cast, whose copy then need not live from forward to backward."""
        y, weight, bias, feedback, stored_weight, operator, rule = inputs
        keep_weight = feedback is None or (rule.saves_weight and stored_weight is None)
        versioned = feedback is not None and feedback.requires_grad     # a B the optimizer steps after backward
        ctx.save_for_backward(y, weight if keep_weight else None, feedback if versioned else None, stored_weight)
        ctx.feedback = None if versioned else feedback      # read as it is at backward time (mirror batches)
        ctx.operator, ctx.rule, ctx.dtype = operator, rule, weight.dtype
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, delta: Tensor):
        y, weight, feedback, stored_weight = ctx.saved_tensors
        feedback = ctx.feedback if feedback is None else feedback
        rule = ctx.rule
        learns = rule.learns_by_gradient and ctx.needs_input_grad[3]
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] or learns, ctx.has_bias and ctx.needs_input_grad[2])
        delta = delta.contiguous(memory_format=_memory_format(y))   # y's layout: none copied inside cuDNN
        b = weight if feedback is None else feedback.to(ctx.dtype)     # a stored B is first read here
        grad_y, grad_w, grad_b = ctx.operator.backward(delta, y, b, mask)
        if grad_y is not None:
            grad_y = rule.signal(grad_y)
        weight = weight if stored_weight is None else stored_weight     # what the rule reads as W
        grad_feedback = None
        if learns:      # in B's stored dtype
            grad_feedback = rule.feedback_gradient(grad_w, y, weight, b, ctx.operator).to(feedback.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = rule.weight_gradient(grad_w, weight)
        return grad_y, grad_w if ctx.needs_input_grad[1] else None, grad_b, grad_feedback, None, None, None


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor in it (and not also plain contiguous), else contiguous_format.

    The error delta takes the layout of the input y, never its own: under torch.compile the error's strides when
    traced need not be those it has in eager mode (they were NCHW for a channels_last net, and cuDNN then copied
    every delta to channels_last inside convolution_backward: 15 of 52 ms per resnet50 step on an H200). Read from
    the strides (torch.func.vmap, which batches seeds, answers no is_contiguous query for channels_last)."""
    if t.dim() == 4 and _dense(t, (1, 3, 2, 0)) and not _dense(t, (3, 2, 1, 0)):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t: Tensor, order: tuple[int, ...]) -> bool:
    """Whether t's elements lie densely with its axes nested in `order`, innermost first (axes of size 1 aside)."""
    expected = 1
    for axis in order:
        if t.shape[axis] != 1:
            if t.stride(axis) != expected:
                return False
            expected *= t.shape[axis]
    return True


class Synapse(nn.Module):
    """A synaptic projection W (with optional bias) and its layer-local feedback projection B.

    `weight` is W; `feedback` is B in W's layout, whatever the rule (for backprop it is W itself).
    Rules that keep a B of their own store it as the parameter `B`. With rule None the projection
    has no feedback of its own (its input population's error comes by direct feedback): no error
    crosses it, and only W's gradient is computed (a weight-mirror rule adds what its mirror phases
    need: circuits.rules.weight_mirror.attach_statistics). `transport` (set by
    CircuitNet.backprop_reference) sends the error back through W itself, whatever the rule.
    """

    def __init__(self, operator: DenseOperator | ConvOperator | EmbeddingOperator, weight_shape: tuple[int, ...],
                 bias: bool, rule: FeedbackRule | None, in_shape: tuple[int, ...],
                 state: Mapping[str, Tensor] | None = None, fold: int = 1) -> None:
        """`in_shape`: the input population's shape (without `fold`); `state`: initial W (and bias), else torch's
        init; `fold`: windows or patches per example folded into the batch axis (TNT's pixel patches): the input
        population holds (fold, *in_shape) per example, and the synapse acts on each patch as on an example."""
        super().__init__()
        self.operator = operator
        self.feedback_shape = tuple(weight_shape)
        self.transport = False
        self.in_shape = tuple(in_shape)
        self.fold = fold
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.empty(operator.forward_shape(weight_shape)[0])) if bias else None
        self.reset_parameters()
        if state is not None:
            self.load_state_dict(state)
        self.rule = rule
        if fold > 1 and rule is not None and rule.reads_output_error:
            raise CircuitError(f"rule {rule} sends the output error through B to this convolution's input, which "
                               f"holds {fold} patches per example folded into the batch axis: not supported; give "
                               f"this layer another rule (rules_by_layer)")
        if rule is not None:
            rule.attach(self)

    def reset_parameters(self) -> None:
        """torch's default init for nn.Linear and nn.Conv2d (Kaiming uniform, a = sqrt(5))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def feedback(self) -> Tensor | None:
        """B in W's layout, as the rule defines it now (None: no feedback of its own)."""
        return self.rule.feedback(self) if self.rule is not None else None

    @feedback.setter
    def feedback(self, value: Tensor) -> None:
        if self.rule is None:
            raise CircuitError("this projection has no feedback of its own (its input population gets direct feedback)")
        self.rule.set_feedback(self, value)

    def forward(self, y: Tensor) -> Tensor:
        if self.fold > 1:        # (batch, fold, ...) as torch's (batch * fold, ...), and back
            return self._forward(y.flatten(0, 1)).unflatten(0, (-1, self.fold))
        return self._forward(y)

    def _forward(self, y: Tensor) -> Tensor:
        if self.transport:       # backprop reference: plain autograd through W
            return self.operator.forward(y, self.weight, self.bias)
        if self.rule is None or self.rule.reads_output_error:    # no feedback of its own (ldfa: from the output)
            return self.operator.forward(y.detach(), self.weight, self.bias)
        if not torch.is_grad_enabled():  # no error will travel back: B is not needed
            return self.operator.forward(y, self.weight, self.bias)
        self.rule.draw(self)
        weight, bias, feedback = self.weight, self.bias, self.rule.feedback(self)
        if feedback is weight:  # backprop: B is W, passed once
            feedback = None
        device = y.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            y = y.to(dtype) if y.is_floating_point() else y        # indices stay indices
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
            if feedback is not None and feedback is not getattr(self, "B", None):    # a B computed now (from W)
                feedback = feedback.to(dtype)
        stored_weight = self.weight if self.rule.saves_weight and weight is not self.weight else None
        return FeedbackPathway.apply(y, weight, bias, feedback, stored_weight, self.operator, self.rule)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, {self.operator}, rule={self.rule}"
