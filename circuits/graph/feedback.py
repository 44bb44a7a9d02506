"""Direct feedback projections: an error population projecting straight to an upstream one.

A layer-local feedback projection lives beside its forward weight W (circuits.rules.synapse). A direct
one joins two error populations that no single forward projection joins, with its own B and rule:

    delta_target = phi'(a_target) * (B^T delta_source)

B is stored in the layout of a forward weight from target to source: (source units x target units)
for a 1-D or 2-D target (tokens x features); for a feature map with channels
(C x H x W) it is (source units x C), shared over positions. delta_source is dL/da_source, the error of the
source's summed input. A population that receives direct feedback receives its error from its direct feedback
projections alone (they sum):
the layer-local feedback of every projection leaving it is removed (circuits.Circuit.feedback).

In the built net the projection is an identity on a_source in the forward pass, holding y_target;
in the backward pass it hands delta_source on unchanged and sends B^T delta_source to y_target,
whose activation's derivative then gives delta_target. Autograd orders it: no hooks, no buffers.

BioTorch's DFA (rule ldfa) is per synaptic projection instead: OutputFeedbackPathway, on the output activity,
sends each such projection's input B^T e from the output's error e = dL/dy_out, beside whatever reaches that
input by other paths (a residual skip); the projection itself sends nothing back.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..rules import FeedbackRule
from ..rules.fixed import output_error_to_input
from .population import Population


class DirectFeedbackPathway(torch.autograd.Function):
    """Forward: a_source unchanged. Backward: delta_source unchanged, and B^T delta_source to y_target."""

    generate_vmap_rule = True   # seeds batched by torch.func.vmap (circuits.graph.seeds)

    @staticmethod
    def forward(a_source: Tensor, y_target: Tensor, feedback: Tensor, rule: FeedbackRule) -> Tensor:
        return a_source.view_as(a_source)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        a_source, y_target, feedback, rule = inputs
        ctx.save_for_backward(feedback)
        ctx.rule, ctx.target_shape, ctx.target_dtype = rule, y_target.shape, y_target.dtype

    @staticmethod
    def backward(ctx, delta: Tensor):
        (feedback,) = ctx.saved_tensors
        grad_target = None
        if ctx.needs_input_grad[1]:
            signal = ctx.rule.signal(delta.reshape(delta.shape[0], -1).to(feedback.dtype) @ feedback)
            shape = ctx.target_shape
            spread = (shape[0], shape[1], 1, 1) if len(shape) == 4 else shape     # a map's B: shared over positions
            grad_target = signal.to(ctx.target_dtype).view(spread).expand(shape)
        return delta, grad_target, None, None


class OutputFeedbackPathway(torch.autograd.Function):
    """BioTorch's DFA (rule ldfa, circuits.rules.fixed): forward, the output activity y_out unchanged; backward,
    e = dL/dy_out unchanged, and to the input y_k of each projection k whose rule reads the output error the
    error B_k^T e crossing its B (the transposed product of e, spread over k's output map, with B_k). Those
    projections send nothing back themselves; what reaches y_k by other paths adds."""

    generate_vmap_rule = True   # seeds batched by torch.func.vmap (circuits.graph.seeds)

    @staticmethod
    def forward(y_out: Tensor, ports: tuple, *tensors: Tensor) -> Tensor:
        """`ports`: per projection (operator, rule, output shape); `tensors`: the inputs y_k, then the B_k."""
        return y_out.view_as(y_out)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        y_out, ports, *tensors = inputs
        ctx.ports = ports
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, grad: Tensor):
        saved, count = ctx.saved_tensors, len(ctx.ports)
        error = grad.reshape(grad.shape[0], -1)
        sent = []
        for k, (operator, rule, out_shape) in enumerate(ctx.ports):
            y, feedback = saved[k], saved[count + k]
            if not ctx.needs_input_grad[2 + k]:
                sent.append(None)
                continue
            y = y.to(feedback.dtype)
            signal = output_error_to_input(error.to(feedback.dtype), out_shape, y, feedback, operator)
            sent.append(rule.signal(signal).to(saved[k].dtype))
        return (grad, None, *sent, *[None] * count)


class DirectFeedback(nn.Module):
    """A direct feedback projection from δsource to δtarget: B (source units x target units or channels)."""

    weight = None     # no forward weight of its own: rules that need one refuse it

    def __init__(self, source: Population, target: Population, rule: FeedbackRule) -> None:
        super().__init__()
        rule.check("direct feedback projection", has_weight=False)
        self.source, self.target = source.name, target.name
        channels = target.shape[0] if len(target.shape) == 3 else math.prod(target.shape)
        self.feedback_shape = (math.prod(source.shape), channels)
        self.rule = rule
        rule.attach(self)

    @property
    def feedback(self) -> Tensor:
        """B as the rule defines it now, (source units x target units or channels)."""
        return self.rule.feedback(self)

    @feedback.setter
    def feedback(self, value: Tensor) -> None:
        self.rule.set_feedback(self, value)

    def forward(self, a_source: Tensor, y_target: Tensor) -> Tensor:
        """a_source unchanged; in the backward pass y_target receives B^T delta_source."""
        if not torch.is_grad_enabled():
            return a_source
        self.rule.draw(self)
        feedback = self.rule.feedback(self)
        device = a_source.device.type
        if torch.is_autocast_enabled(device):
            feedback = feedback.to(torch.get_autocast_dtype(device))
        return DirectFeedbackPathway.apply(a_source, y_target, feedback, self.rule)

    def extra_repr(self) -> str:
        return f"δ{self.source} -> δ{self.target}, B={self.feedback_shape}, rule={self.rule}"
