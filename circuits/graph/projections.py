"""Projections: how one population's activity drives another's summed input.

Synaptic projections (Dense, Conv2d, Conv1d, ConvTranspose2d) carry a forward weight W and a feedback weight B, set
by a feedback rule (Embedding a W alone: its index input takes no error). Local projections (BatchNorm, LayerNorm,
GroupNorm, pooling, Dropout, Flatten, Identity, and circuits.graph.operations.Operation) have no synapses: the
error crosses them through their own local derivative, the same under every rule.

A projection is a specification; `build` makes the torch module once the populations are known.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from torch import Tensor, nn

from ..errors import CircuitError
from ..rules import FeedbackRule
from ..rules.synapse import ConvOperator, DenseOperator, EmbeddingOperator, Synapse
from .population import Population


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_window(projection: Projection, **sizes) -> None:
    """Kernel, stride and dilation >= 1, padding >= 0: a clear error naming the projection and the setting."""
    for name, value in sizes.items():
        if value is None:
            continue
        least = 0 if name in ("padding", "output_padding") else 1
        if any(not isinstance(v, int) or isinstance(v, bool) or v < least for v in _pair(value)):
            raise CircuitError(f"{type(projection).__name__}({name}={value!r}): {name} must be "
                               f"{'a non-negative' if least == 0 else 'a positive'} integer or pair of them")


def window_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil: bool = False) -> int:
    """Positions along one axis of a convolution's or pooling window's output (torch's formula)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    return (math.ceil(span / stride) if ceil else span // stride) + 1


@dataclass(frozen=True)
class Projection:
    """Base class: `output_shape` maps the input population's shape to the shape it drives."""

    synaptic: ClassVar[bool] = False
    sends_error: ClassVar[bool] = True
    """The error crosses it back to its input population (not from an index input: Embedding)."""
    state: Mapping[str, Tensor] | None = field(default=None, repr=False, compare=False, kw_only=True)
    """Initial parameters and buffers (a state_dict), e.g. from a converted torch module."""

    def output_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        raise NotImplementedError

    def check(self, pre: Population, post: Population) -> None:
        """Raise a CircuitError naming both populations and shapes if they do not fit."""
        expected = self.output_shape(pre, post)
        if tuple(expected) != post.shape:
            raise CircuitError(
                f"{self} from {pre.name!r} (shape {pre.shape}) to {post.name!r} (shape {post.shape}): "
                f"it maps {pre.shape} to {tuple(expected)}, which does not fit {post.name!r}")

    def _require_dims(self, pop: Population, dims: int, role: str) -> None:
        if len(pop.shape) != dims:
            raise CircuitError(f"{self}: {role} population {pop.name!r} has shape {pop.shape}, "
                               f"but this projection needs a {dims}-D population")

    def build(self, pre: Population, post: Population, rule: FeedbackRule | None) -> nn.Module:
        module = self._module(pre, post, rule)
        if self.state is not None and not self.synaptic:
            module.load_state_dict(self.state)
        return module

    def _module(self, pre: Population, post: Population, rule: FeedbackRule | None) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(Projection):
    """All-to-all synapses along the last axis: a = W y + bias. For 1-D populations the classic layer; for N-D
    ones (tokens x channels) the same W at every position of the leading axes, as nn.Linear acts."""

    synaptic: ClassVar[bool] = True
    bias: bool = True

    def output_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        if len(post.shape) != len(pre.shape):
            self._require_dims(pre, len(post.shape), "input")
        return (*pre.shape[:-1], post.shape[-1])

    def _module(self, pre, post, rule) -> nn.Module:
        return Synapse(DenseOperator(), (post.shape[-1], pre.shape[-1]), self.bias, rule, pre.shape, self.state)


@dataclass(frozen=True)
class Embedding(Projection):
    """a = W[y]: the rows of W (vocabulary x features) that an input population of indices y picks, as
    nn.Embedding does; the dense product W^T e_y with the one-hot code e_y of each index. Synaptic (W learns
    from delta e_y^T), but no error crosses it: an index input has none, so it has no feedback and no rule."""

    synaptic: ClassVar[bool] = True
    sends_error: ClassVar[bool] = False
    vocabulary: int = 2
    padding_idx: int | None = None

    def output_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        if not pre.is_input:
            raise CircuitError(f"{self}: an embedding reads indices, so its input must be an input population; "
                               f"{pre.name!r} is not one")
        return (*pre.shape, post.shape[-1])

    def _module(self, pre, post, rule) -> nn.Module:
        return Synapse(EmbeddingOperator(self.padding_idx), (self.vocabulary, post.shape[-1]), False, None, pre.shape,
                       self.state)


@dataclass(frozen=True)
class Conv2d(Projection):
    """Convolutional synapses with zero padding: a = W * y + bias. Output channels from the target.

    W is (out, in/groups, k_h, k_w). Conv1d and ConvTranspose2d are the same projection with one spatial axis or
    transposed; they share its checks, its operator (circuits.rules.synapse.ConvOperator) and every rule's B.

    `fold` > 1: patches or frames per example folded into the batch axis (TNT's pixel patches, a video's frames):
    both populations have shape (fold, channels, *sizes), and each patch is convolved as an example is."""

    synaptic: ClassVar[bool] = True
    dims: ClassVar[int] = 2
    """Spatial axes: a population of shape (channels, *dims sizes)."""
    transposed: ClassVar[bool] = False
    kernel_size: int | tuple[int, ...] = 3
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    bias: bool = False
    fold: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        _check_window(self, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                      dilation=self.dilation, groups=self.groups, fold=self.fold)
        for name in ("kernel_size", "stride", "padding", "dilation"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(tuple(value)) != self.dims:
                raise CircuitError(f"{type(self).__name__}({name}={value!r}): {name} must be an integer or "
                                   f"{self.dims} of them, one per spatial axis")

    def _axes(self, value: int | tuple[int, ...]) -> tuple[int, ...]:
        return (value,) * self.dims if isinstance(value, int) else tuple(value)

    def operator(self) -> ConvOperator:
        return ConvOperator(self._axes(self.stride), self._axes(self.padding), self._axes(self.dilation), self.groups)

    def _unfolded(self, pop: Population) -> Population:
        """One patch of `pop` (its shape without the leading fold), or `pop` itself where nothing is folded."""
        if self.fold == 1:
            return pop
        if len(pop.shape) != self.dims + 2 or pop.shape[0] != self.fold:
            raise CircuitError(f"{self}: population {pop.name!r} has shape {pop.shape}, but this projection needs "
                               f"({self.fold}, channels, {self.dims} sizes): {self.fold} patches per example")
        return dataclasses.replace(pop, shape=pop.shape[1:])

    def output_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        if self.fold > 1:
            return (self.fold, *dataclasses.replace(self, fold=1).output_shape(self._unfolded(pre),
                                                                                self._unfolded(post)))
        self._require_dims(pre, self.dims + 1, "input")
        self._require_dims(post, self.dims + 1, "output")
        for pop in (pre, post):
            if pop.shape[0] % self.groups:
                raise CircuitError(f"{self}: population {pop.name!r} has {pop.shape[0]} channels, "
                                   f"not divisible by groups={self.groups}")
        k, s, p, d = (self._axes(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        return (post.shape[0],) + tuple(self._size(pre.shape[i + 1], k[i], s[i], p[i], d[i], i)
                                        for i in range(self.dims))

    def _size(self, size: int, kernel: int, stride: int, padding: int, dilation: int, axis: int) -> int:
        return window_output_size(size, kernel, stride, padding, dilation)

    def weight_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        """W's shape: (out, in/groups, k...) (of one patch's populations, where patches are folded)."""
        return (post.shape[0], pre.shape[0] // self.groups, *self._axes(self.kernel_size))

    def _module(self, pre, post, rule) -> nn.Module:
        pre, post = self._unfolded(pre), self._unfolded(post)
        return Synapse(self.operator(), self.weight_shape(pre, post), self.bias, rule, pre.shape, self.state,
                       self.fold)


@dataclass(frozen=True)
class Conv1d(Conv2d):
    """Convolutional synapses along one axis (populations of shape (channels, length)), as nn.Conv1d: W is
    (out, in/groups, k)."""

    dims: ClassVar[int] = 1


@dataclass(frozen=True)
class ConvTranspose2d(Conv2d):
    """The transposed convolution, as nn.ConvTranspose2d: each input position adds its W-weighted kernel to the
    output at stride spacing; padding crops the output, output_padding adds to its size at the far end. W is
    (in, out/groups, k_h, k_w), torch's layout, and so is B; the error crosses B by the ordinary convolution."""

    transposed: ClassVar[bool] = True
    output_padding: int | tuple[int, ...] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window(self, output_padding=self.output_padding)
        if not isinstance(self.output_padding, int) and len(tuple(self.output_padding)) != self.dims:
            raise CircuitError(f"{self}: output_padding must be an integer or {self.dims} of them")
        for op, s, d in zip(self._axes(self.output_padding), self._axes(self.stride), self._axes(self.dilation),
                            strict=True):
            if op >= s and op >= d:
                raise CircuitError(f"{self}: output_padding must be smaller than the stride or the dilation "
                                   f"(torch's rule: it only adds positions a stride step leaves)")

    def operator(self) -> ConvOperator:
        return ConvOperator(self._axes(self.stride), self._axes(self.padding), self._axes(self.dilation), self.groups,
                            transposed=True, output_padding=self._axes(self.output_padding))

    def _size(self, size: int, kernel: int, stride: int, padding: int, dilation: int, axis: int) -> int:
        return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + self._axes(self.output_padding)[axis] + 1

    def weight_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        """W's shape: (in, out/groups, k...), torch's layout of a transposed convolution."""
        return (pre.shape[0], post.shape[0] // self.groups, *self._axes(self.kernel_size))


@dataclass(frozen=True)
class BatchNorm(Projection):
    """Batch normalisation per channel (1-D or 3-D populations), a local operation."""

    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True

    def output_shape(self, pre, post):
        if len(pre.shape) not in (1, 3):
            raise CircuitError(f"{self}: population {pre.name!r} has shape {pre.shape}; batch norm needs 1-D or 3-D")
        return pre.shape

    def _module(self, pre, post, rule):
        cls = nn.BatchNorm1d if len(pre.shape) == 1 else nn.BatchNorm2d
        return cls(pre.shape[0], self.eps, self.momentum, self.affine, self.track_running_stats)


@dataclass(frozen=True)
class LayerNorm(Projection):
    """Layer normalisation over the last len(normalized_shape) axes of each example, a local operation:
    a = (y - mean) / sqrt(var + eps) * weight + bias (torch's nn.LayerNorm; weight and bias train as usual)."""

    normalized_shape: tuple[int, ...] = ()
    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True

    def output_shape(self, pre, post):
        if tuple(pre.shape[len(pre.shape) - len(self.normalized_shape):]) != tuple(self.normalized_shape):
            raise CircuitError(f"{self}: population {pre.name!r} has shape {pre.shape}, which does not end "
                               f"in {tuple(self.normalized_shape)}")
        return pre.shape

    def _module(self, pre, post, rule):
        return nn.LayerNorm(self.normalized_shape, self.eps, self.elementwise_affine, self.bias)


@dataclass(frozen=True)
class GroupNorm(Projection):
    """Group normalisation: channels (the first axis) in num_groups groups, each normalised over its channels
    and positions, then a per-channel affine map (torch's nn.GroupNorm), a local operation."""

    num_groups: int = 1
    eps: float = 1e-5
    affine: bool = True

    def output_shape(self, pre, post):
        if pre.shape[0] % self.num_groups:
            raise CircuitError(f"{self}: population {pre.name!r} has {pre.shape[0]} channels, "
                               f"not divisible into {self.num_groups} groups")
        return pre.shape

    def _module(self, pre, post, rule):
        return nn.GroupNorm(self.num_groups, pre.shape[0], self.eps, self.affine)


@dataclass(frozen=True)
class MaxPool(Projection):
    """Max pooling over 2-D windows."""

    kernel_size: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    ceil_mode: bool = False

    def __post_init__(self) -> None:
        _check_window(
            self, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation
        )

    def output_shape(self, pre, post):
        self._require_dims(pre, 3, "input")
        k, p, d = _pair(self.kernel_size), _pair(self.padding), _pair(self.dilation)
        s = _pair(self.stride) if self.stride is not None else k
        return (pre.shape[0],) + tuple(
            window_output_size(pre.shape[i + 1], k[i], s[i], p[i], d[i], self.ceil_mode) for i in range(2)
        )

    def _module(self, pre, post, rule):
        return nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)


@dataclass(frozen=True)
class AvgPool(Projection):
    """Average pooling over 2-D windows (zero padding counted, as torch's default)."""

    kernel_size: int | tuple[int, int] = 2
    stride: int | tuple[int, int] | None = None
    padding: int | tuple[int, int] = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    def __post_init__(self) -> None:
        _check_window(self, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def output_shape(self, pre, post):
        self._require_dims(pre, 3, "input")
        k, p = _pair(self.kernel_size), _pair(self.padding)
        s = _pair(self.stride) if self.stride is not None else k
        return (pre.shape[0],) + tuple(
            window_output_size(pre.shape[i + 1], k[i], s[i], p[i], 1, self.ceil_mode) for i in range(2)
        )

    def _module(self, pre, post, rule):
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)


@dataclass(frozen=True)
class AdaptiveAvgPool(Projection):
    """Average pooling to a fixed output size, e.g. (1, 1) before a classifier."""

    output_size: int | tuple[int, int] = 1

    def output_shape(self, pre, post):
        self._require_dims(pre, 3, "input")
        return (pre.shape[0], *_pair(self.output_size))

    def _module(self, pre, post, rule):
        return nn.AdaptiveAvgPool2d(self.output_size)


@dataclass(frozen=True)
class Flatten(Projection):
    """Axes start_dim..end_dim into one, counted as torch counts them (the batch is axis 0, which stays):
    by default all axes but the batch."""

    start_dim: int = 1
    end_dim: int = -1

    def output_shape(self, pre, post):
        dims = len(pre.shape) + 1
        start, end = self.start_dim % dims, self.end_dim % dims
        if not 1 <= start <= end:
            raise CircuitError(f"{self} on population {pre.name!r} (shape {pre.shape}): it must keep the batch "
                               f"axis 0 and have start_dim <= end_dim")
        shape = (1, *pre.shape)
        return (*shape[1:start], math.prod(shape[start:end + 1]), *shape[end + 1:])

    def _module(self, pre, post, rule):
        return nn.Flatten(self.start_dim, self.end_dim)


@dataclass(frozen=True)
class Dropout(Projection):
    """Each unit silenced with probability p while learning, the rest scaled by 1 / (1 - p); the identity in eval
    mode (the net's train/eval mode, as torch's nn.Dropout). A local operation: the error crosses the same mask."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:
            raise CircuitError(f"Dropout(p={self.p!r}): p must be in [0, 1)")

    def output_shape(self, pre, post):
        return pre.shape

    def _module(self, pre, post, rule):
        return nn.Dropout(self.p)


@dataclass(frozen=True)
class Identity(Projection):
    """One-to-one: the input population's activity unchanged (residual and skip connections)."""

    def output_shape(self, pre, post):
        return pre.shape

    def _module(self, pre, post, rule):
        return nn.Identity()
