"""The layer table of circuits.from_torch: which torch layer, function or method becomes which
population activation or projection, with its settings.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CircuitError
from ..graph import projections as P
from ..graph.activations import ACTIVATIONS, settings
from ..graph.operations import Held, Operand, Operation, WhileLearning

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d,
          nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity,
          nn.MultiheadAttention, nn.PReLU, nn.RReLU)
"""Layers that convert on their own (from_torch(nn.Linear(4, 3))), with the activation modules."""

_ACTIVATION_MODULES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.ReLU: ("relu", ()), nn.Sigmoid: ("sigmoid", ()), nn.Tanh: ("tanh", ()),
    nn.GELU: ("gelu", ("approximate",)), nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.ReLU6: ("relu6", ()), nn.SiLU: ("silu", ()), nn.Hardswish: ("hardswish", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()), nn.Mish: ("mish", ()), nn.ELU: ("elu", ("alpha",)),
    nn.CELU: ("celu", ("alpha",)), nn.SELU: ("selu", ()), nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")), nn.Threshold: ("threshold", ("threshold", "value")),
    nn.Hardshrink: ("hardshrink", ("lambd",)), nn.Softshrink: ("softshrink", ("lambd",)),
    nn.LogSigmoid: ("logsigmoid", ()), nn.Softsign: ("softsign", ()), nn.Tanhshrink: ("tanhshrink", ()),
    nn.Softmax: ("softmax", ("dim",)), nn.LogSoftmax: ("log_softmax", ("dim",)), nn.Softmin: ("softmin", ("dim",)),
}
"""Activation modules (exact type: ReLU6 is a Hardtanh) -> (activation, the module attributes that are its settings)."""

_ACTIVATION_FUNCTIONS = {getattr(module, name): name for name in ACTIVATIONS for module in (F, torch)
                         if name != "identity" and hasattr(module, name)}
_ACTIVATION_METHODS = {name for name in ACTIVATIONS if hasattr(torch.Tensor, name)}
_IGNORED = {"inplace", "_stacklevel", "dtype"}
"""Call arguments that do not change the function (in place or not) or that must keep their default (dtype)."""


def is_activation(layer: nn.Module) -> bool:
    """Whether the module is one of the activation modules that convert to a population's activation."""
    return type(layer) in _ACTIVATION_MODULES


def module_activation(layer: nn.Module, name: str) -> str | None:
    """The activation spec of an activation module with its settings (None: not an activation)."""
    found = _ACTIVATION_MODULES.get(type(layer))
    if found is None:
        return None
    act, attributes = found
    given = {a: getattr(layer, a) for a in attributes if getattr(layer, a) is not None}   # Softmax(dim=None): none
    return settings(act, given, f"layer {name!r} ({layer})")


def call_activation(node: fx.Node) -> str | None:
    """The activation spec of an activation function or tensor method call, its arguments mapped to settings by
    torch's positional order (None: not an activation call)."""
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        act = _ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        act = node.target
    else:
        return None
    where = f"node {node.name!r} ({node.format_node()})"
    order = list(ACTIVATIONS[act][1])
    if len(node.args) - 1 > len(order):
        raise CircuitError(f"{where}: activation {act!r} takes settings {order} only; it cannot be converted")
    given: dict[str, Any] = dict(zip(order[:len(node.args) - 1], node.args[1:], strict=True))
    for key, value in node.kwargs.items():
        if key in _IGNORED:
            if key == "dtype" and value is not None:
                raise CircuitError(f"{where}: dtype={value} cannot be converted (a population keeps its dtype)")
        else:
            given[key] = value
    return settings(act, given, where)


def call_projection(node: fx.Node) -> P.Projection | None:
    """The projection of a function or method call that is one (x.flatten(1): Flatten), else None."""
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        dims = dict(zip(("start_dim", "end_dim")[:len(node.args) - 1], node.args[1:], strict=True)) | node.kwargs
        if all(isinstance(v, int) for v in dims.values()):
            return P.Flatten(dims.get("start_dim", 0), dims.get("end_dim", -1))
    return None


def unconvertible(layer: nn.Module) -> str | None:
    """Why a synaptic layer's settings cannot be converted (None: they can): the checks both conversions share."""
    if isinstance(layer, nn.MultiheadAttention) and (
            not layer._qkv_same_embed_dim or layer.bias_k is not None or layer.add_zero_attn):
        return "separate key and value sizes, bias_k/bias_v or add_zero_attn do not convert"
    if isinstance(layer, CONVOLUTIONS) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}: only zero padding converts"
    if isinstance(layer, CONVOLUTIONS) and isinstance(layer.padding, str) and not _symmetric(layer.padding,
                                                                                             layer.kernel_size,
                                                                                             layer.dilation):
        return "padding='same' with an even kernel pads one side more than the other, which does not convert"
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse):
        return "max_norm, scale_grad_by_freq and sparse embeddings do not convert (W's update would differ)"
    return None


def projection(module: nn.Module, name: str) -> P.Projection:
    """The circuit projection equivalent to one torch layer, carrying its parameters (a CircuitError naming the
    layer if there is none)."""
    if not type(module).__module__.startswith(("torch.nn.", "torch.ao.nn.")):
        return _kept_whole(module, name)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if isinstance(module, nn.Linear):
        return P.Dense(bias=module.bias is not None, state=state)
    why = unconvertible(module)
    if why is not None:
        raise CircuitError(f"layer {name!r} ({module}): {why}")
    if isinstance(module, nn.ConvTranspose2d):
        return P.ConvTranspose2d(module.kernel_size, module.stride, module.padding, module.dilation, module.groups,
                                 module.bias is not None, module.output_padding, state=state)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        padding = zero_padding(module.padding, module.kernel_size, module.dilation)
        spec = P.Conv1d if isinstance(module, nn.Conv1d) else P.Conv2d
        return spec(module.kernel_size, module.stride, padding, module.dilation, module.groups,
                    module.bias is not None, state=state)
    if isinstance(module, nn.Embedding):
        return P.Embedding(module.num_embeddings, module.padding_idx, state=state)
    if isinstance(module, nn.LayerNorm):
        return P.LayerNorm(tuple(module.normalized_shape), module.eps, module.elementwise_affine,
                           module.bias is not None, state=state)
    if isinstance(module, nn.GroupNorm):
        return P.GroupNorm(module.num_groups, module.eps, module.affine, state=state)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return P.BatchNorm(module.eps, module.momentum, module.affine, module.track_running_stats, state=state)
    if isinstance(module, nn.MaxPool2d) and not module.return_indices:
        return P.MaxPool(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if isinstance(module, nn.AvgPool2d) and module.divisor_override is None:
        return P.AvgPool(module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return P.AdaptiveAvgPool(module.output_size)
    if isinstance(module, nn.Flatten):
        return P.Flatten(module.start_dim, module.end_dim)
    if isinstance(module, nn.Dropout):
        return P.Dropout(module.p)
    if isinstance(module, nn.Identity):
        return P.Identity()
    if isinstance(module, nn.PReLU):      # a learned slope per channel: an operation whose parameter trains
        return Operation("F.prelu", (Operand(0), Held("weight")), learned=("weight",), state=state)
    if isinstance(module, nn.RReLU):      # a random slope while learning, the mean slope in eval mode
        return Operation("F.rrelu", (Operand(0), module.lower, module.upper, WhileLearning(True, False)))
    functional = _functional(module)
    if functional is not None:
        return functional
    raise CircuitError(f"layer {name!r} ({type(module).__name__}) has no circuit projection (synaptic: Linear, Conv1d, "
                       f"Conv2d, ConvTranspose2d, Embedding, MultiheadAttention; Conv3d, ConvTranspose1d/3d and "
                       f"recurrent layers have none yet); convert the module with circuits.in_place, where it keeps "
                       f"backprop (see docs/conversion.md)")


def batch_norm_operation(module: nn.BatchNorm1d | nn.BatchNorm2d, name: str) -> Operation:
    """A batch norm as the operation F.batch_norm holding its parameters (learned by their gradient, named after
    the layer) and running statistics (which follow the net's mode): where it reads windows or tokens folded into the
    batch axis (LeViT's BatchNorm1d over batch * tokens), its statistics are over the folded axis, which the
    operation computes on torch's (batch * k, ...) tensor."""
    if module.momentum is None:
        raise CircuitError(f"layer {name!r} ({module}): momentum=None (a cumulative average) on windows or tokens "
                           f"folded into the batch axis does not convert")
    prefix = name.replace(".", "_")
    state = {f"{prefix}_{k}": v.detach().clone() for k, v in module.state_dict().items() if k != "num_batches_tracked"}
    held = [Held(f"{prefix}_{k}") if f"{prefix}_{k}" in state else None
            for k in ("running_mean", "running_var", "weight", "bias")]
    stats = WhileLearning(True, False) if module.track_running_stats else True      # batch statistics or running
    return Operation("F.batch_norm", (Operand(0), *held, stats, module.momentum, module.eps),
                     learned=tuple(f"{prefix}_{k}" for k in ("weight", "bias") if f"{prefix}_{k}" in state),
                     state=state or None)


def _kept_whole(module: nn.Module, name: str) -> Operation:
    """A module that tracing kept whole as one call (timm's register_notrace_module classes that fx cannot trace
    into): without parameters or buffers, an operation that calls it (its own forward; its error crosses by autograd);
    with them, refused, as its synapses are inside a forward no circuit part sees."""
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        raise CircuitError(f"layer {name!r} ({type(module).__name__}) is kept whole by tracing (timm registers it as "
                           f"not traceable: its forward branches on sizes or inputs) and holds parameters or buffers, "
                           f"which would learn inside a forward no circuit part sees; convert the module with "
                           f"circuits.in_place (see docs/conversion.md)")
    return Operation("module", (copy.deepcopy(module), Operand(0)))


def _symmetric(padding: str, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    return padding == "valid" or all(d * (k - 1) % 2 == 0 for k, d in zip(kernel, dilation, strict=True))


def zero_padding(padding: str | int | tuple[int, ...], kernel: tuple[int, ...],
                 dilation: tuple[int, ...]) -> tuple[int, ...]:
    """A convolution's padding as numbers per axis: 'valid' is 0, 'same' d (k - 1) / 2 (even only: torch pads
    an odd total more on one side)."""
    if not isinstance(padding, str):
        return (padding,) * len(kernel) if isinstance(padding, int) else tuple(padding)
    if padding == "valid":
        return (0,) * len(kernel)
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
"""The convolution layers that become a synaptic projection (P.Conv1d, P.Conv2d, P.ConvTranspose2d)."""
CALL_SETTINGS = {"F.conv1d": ("stride", "padding", "dilation", "groups"),
                 "F.conv2d": ("stride", "padding", "dilation", "groups"),
                 "F.conv_transpose2d": ("stride", "padding", "output_padding", "groups", "dilation")}
"""Each synaptic convolution function's settings after input, weight and bias, in torch's positional order."""


def synaptic_call(function: str, state: dict[str, Tensor], settings: dict[str, Any], where: str) -> P.Projection:
    """The synaptic projection of F.linear / F.conv1d / F.conv2d / F.conv_transpose2d on a module's own weight and
    bias (`state`), with the call's settings (stride, padding, dilation, groups; output_padding)."""
    if function == "F.linear":
        return P.Dense(bias="bias" in state, state=state)
    kernel = tuple(state["weight"].shape[2:])
    pairs = {k: (v,) * len(kernel) if isinstance(v, int) else tuple(v) for k, v in settings.items()
             if k in ("stride", "dilation", "output_padding")}
    stride, dilation = pairs.get("stride", (1,) * len(kernel)), pairs.get("dilation", (1,) * len(kernel))
    padding = settings.get("padding", 0)
    if function == "F.conv_transpose2d":
        return P.ConvTranspose2d(kernel, stride, padding, dilation, settings.get("groups", 1), "bias" in state,
                                 pairs.get("output_padding", (0,) * len(kernel)), state=state)
    if isinstance(padding, str) and not _symmetric(padding, kernel, dilation):
        raise CircuitError(f"{where}: padding='same' with an even kernel pads one side more, which does not convert")
    padding = zero_padding(padding, kernel, dilation)
    if function in ("F.conv1d", "F.conv2d"):
        spec = P.Conv1d if function == "F.conv1d" else P.Conv2d
        return spec(kernel, stride, padding, dilation, settings.get("groups", 1), "bias" in state, state=state)
    raise CircuitError(f"{where}: {function} with a module's weight does not convert yet (see docs/conversion.md)")


_PADS = {nn.modules.padding._ConstantPadNd: "constant", nn.modules.padding._ReflectionPadNd: "reflect",
         nn.modules.padding._ReplicationPadNd: "replicate", nn.modules.padding._CircularPadNd: "circular"}


def _functional(module: nn.Module) -> Operation | None:
    """A layer without synapses as the operation of the function its forward calls (None: not one of them):
    resampling, pixel shuffles, unfold and fold (sliding blocks), 1-D and max pools, padding, instance norm (its
    affine parameters learn by their gradient, its running statistics follow the net's mode)."""
    x = Operand(0)
    if isinstance(module, nn.Upsample):
        return Operation("F.interpolate", (x, module.size, module.scale_factor, module.mode, module.align_corners),
                         {"recompute_scale_factor": module.recompute_scale_factor})
    if isinstance(module, nn.PixelShuffle):
        return Operation("F.pixel_shuffle", (x, module.upscale_factor))
    if isinstance(module, nn.PixelUnshuffle):
        return Operation("F.pixel_unshuffle", (x, module.downscale_factor))
    if isinstance(module, nn.Unfold):
        return Operation("F.unfold", (x, module.kernel_size, module.dilation, module.padding, module.stride))
    if isinstance(module, nn.Fold):
        return Operation("F.fold", (x, module.output_size, module.kernel_size, module.dilation, module.padding,
                                    module.stride))
    if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)) and not module.return_indices:
        return Operation(f"F.adaptive_max_pool{1 if isinstance(module, nn.AdaptiveMaxPool1d) else 2}d",
                         (x, module.output_size))
    if isinstance(module, nn.AdaptiveAvgPool1d):
        return Operation("F.adaptive_avg_pool1d", (x, module.output_size))
    if isinstance(module, nn.MaxPool1d) and not module.return_indices:
        return Operation("F.max_pool1d", (x, module.kernel_size, module.stride, module.padding, module.dilation),
                         {"ceil_mode": module.ceil_mode})
    if isinstance(module, nn.AvgPool1d):
        return Operation("F.avg_pool1d", (x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                          module.count_include_pad))
    mode = next((m for kind, m in _PADS.items() if isinstance(module, kind)), None)
    if mode is not None:
        return Operation("F.pad", (x, tuple(module.padding), mode, getattr(module, "value", None)))
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        state = {k: v.detach().clone() for k, v in module.state_dict().items() if k != "num_batches_tracked"}
        stats = WhileLearning(True, False) if module.track_running_stats else True     # batch statistics or running
        held = [Held(k) if k in state else None for k in ("running_mean", "running_var", "weight", "bias")]
        return Operation("F.instance_norm", (x, *held, stats, module.momentum or 0.0, module.eps),
                         learned=tuple(k for k in ("weight", "bias") if k in state), state=state or None)
    return None


def attention(layer: nn.MultiheadAttention, name: str, kwargs: dict[str, Any]) -> tuple[P.Dense, Operation, P.Dense]:
    """nn.MultiheadAttention's self-attention y -> out(attend(W_in y)) as circuit parts: the in-projection
    [q k v] = W_in y + b_in (synaptic), the attention of each head softmax(q k^T / sqrt(d) + mask) v (an
    operation: no synapses, its error crosses by its exact derivative) and the out-projection (synaptic).
    `kwargs`: the call's keyword arguments, already values (masks constant tensors)."""
    where = f"layer {name!r} ({type(layer).__name__})"
    why = unconvertible(layer)
    if why is not None:
        raise CircuitError(f"{where}: {why}")
    if kwargs.get("key_padding_mask") is not None:
        raise CircuitError(f"{where}: a key_padding_mask depends on each example; it cannot be converted")
    need_weights, is_causal = kwargs.get("need_weights", True), kwargs.get("is_causal", False)
    mask = kwargs.get("attn_mask")
    if is_causal and mask is None:
        raise CircuitError(f"{where}: is_causal needs attn_mask, as torch's MultiheadAttention does")
    if is_causal and not need_weights:
        mask = None       # torch then lets scaled_dot_product_attention make the causal mask
    else:
        is_causal = False
        mask = F._canonical_mask(mask=mask, mask_name="attn_mask", other_type=None, other_name="",
                                 target_type=layer.in_proj_weight.dtype, check_other=False)
    in_proj = {"weight": layer.in_proj_weight.detach().clone()}
    if layer.in_proj_bias is not None:
        in_proj["bias"] = layer.in_proj_bias.detach().clone()
    heads = Operation("multi_head_attention", (Operand(0), layer.num_heads, layer.batch_first, need_weights),
                      {"attn_mask": Held("attn_mask") if mask is not None else None, "is_causal": is_causal,
                       "dropout_p": WhileLearning(layer.dropout)},
                      state={"attn_mask": mask} if mask is not None else None)
    return P.Dense(bias="bias" in in_proj, state=in_proj), heads, projection(layer.out_proj, f"{name}.out_proj")
