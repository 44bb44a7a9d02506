"""Operations: torch's own functions between populations, where no synapse is involved.

An `Operation` computes y = op(args) with torch's function `op` (named in OPS). Its arguments are a
template whose leaves are `Operand(i)` (the activity of the i-th input population), `BATCH` (the
batch size), `Held(key)` (a tensor the operation holds: a buffer, or a parameter that learns by its
gradient) and `Call` (a nested call), or plain values. With one input population it is a local
projection (reshape, permute, x / 4, x + c, getitem, ...). With several it is a **junction**: a
population whose inputs combine by the operation instead of summing (a * b, matmul, attention);
its incoming projections are `JunctionInput(position)` edges that give the argument order.

Neither has synapses: the error crosses an operation through its exact local derivative (torch
autograd of `op`), the same under every rule. Only synaptic projections get a B.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CircuitError
from .population import Population
from .projections import Projection


@dataclass(frozen=True)
class Operand:
    """The activity of the operation's input population number `position` (edge order of a junction)."""

    position: int


@dataclass(frozen=True)
class Held:
    """A tensor the operation holds under `key`: a constant buffer, or a parameter (Operation.learned)."""

    key: str


@dataclass(frozen=True)
class Batch:
    """The batch size of the operands (x.size(0) where the module reads it); with `factor` k, k times it (the
    leading size of windows or tokens folded into the batch axis: Swin's B_ = B * windows)."""

    factor: int = 1

    def __repr__(self) -> str:
        return "BATCH" if self.factor == 1 else f"BATCH*{self.factor}"


BATCH = Batch()


@dataclass(frozen=True)
class WhileLearning:
    """`value` while the net learns (train mode), else `otherwise`: a dropout rate, or a function's training flag."""

    value: Any
    otherwise: Any = 0.0


@dataclass(frozen=True)
class Call:
    """A nested call op(*args, **kwargs) inside a template."""

    op: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def multi_head_attention(qkv: Tensor, num_heads: int, batch_first: bool, need_weights: bool,
                         attn_mask: Tensor | None = None, is_causal: bool = False, dropout_p: float = 0.0) -> Tensor:
    """nn.MultiheadAttention's self-attention between its packed in-projection qkv = [q k v] (layout of the
    module's input) and its out-projection: softmax(q k^T / sqrt(d) + mask) v per head, heads concatenated.
    torch's own steps (F.multi_head_attention_forward), so the result is torch's."""
    if batch_first:
        qkv = qkv.transpose(1, 0)
    tgt_len, bsz, embed_dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = embed_dim // num_heads
    proj = qkv.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (t.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1) for t in (proj[0], proj[1], proj[2]))
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if need_weights:
        weights = torch.bmm(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1)) if attn_mask is None else \
            torch.baddbmm(attn_mask, q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else \
                attn_mask.view(bsz, num_heads, -1, tgt_len)
        q, k, v = (t.view(bsz, num_heads, tgt_len, head_dim) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = out.view(tgt_len, bsz, embed_dim)
    return out.transpose(1, 0) if batch_first else out


def set_item(tensor: Tensor, key: Any, value: Any) -> Tensor:
    """A copy of `tensor` with tensor[key] = value: item assignment as a call (torchvision Swin's attention mask set
    slice by slice; Swin-V2's qkv bias with its key part zeroed)."""
    copied = tensor.clone()
    copied[key] = value
    return copied


def batch_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout with one mask for the whole batch: what torch draws for a tensor it computes once for the batch, which
    a shared population holds per example (fx's constant_layer: dropout in Swin-V2-CR's meta MLP)."""
    return x * F.dropout(torch.ones_like(x[:1]), p, training)


def call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A module without parameters or buffers that tracing kept whole (timm's MaxPool2dSame), called: its own
    forward, in the operation's train/eval mode."""
    return module(*args, **kwargs)


def _method(name: str) -> Callable[..., Any]:
    def call(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        return getattr(tensor, name)(*args, **kwargs)
    call.__name__ = name
    return call


_TORCH = ("cat", "stack", "reshape", "permute", "transpose", "flatten", "split", "chunk", "matmul", "bmm", "mul", "add",
          "sub", "div", "neg", "unsqueeze", "squeeze", "narrow", "masked_fill", "where", "tril", "triu", "exp", "log",
          "sqrt", "rsqrt", "mean", "sum", "pow", "abs", "clamp", "erf", "movedim", "swapaxes", "einsum", "ones",
          "zeros", "full", "arange", "unflatten", "outer", "roll", "baddbmm", "amax", "amin", "maximum", "minimum",
          "zeros_like", "ones_like", "flip", "unbind", "addcmul", "addcdiv", "lerp", "square", "sigmoid", "tanh")
_METHODS = ("view", "reshape", "permute", "transpose", "flatten", "contiguous", "expand", "expand_as", "unsqueeze",
            "squeeze", "split", "chunk", "masked_fill", "mean", "sum", "pow", "sqrt", "exp", "mul",
            "add", "div", "sub", "neg", "matmul", "unflatten", "swapaxes", "movedim", "narrow", "repeat", "clone",
            "view_as", "reshape_as", "tril", "triu", "eq", "ne", "lt", "gt", "logical_not", "bool", "float", "type_as",
            "to", "__getitem__", "t", "abs", "clamp", "amax", "amin", "rsqrt", "square",
            "var", "std", "norm", "roll", "flip", "index_select", "new_zeros", "new_ones", "repeat_interleave",
            "clamp_min", "clamp_max", "unbind")
_FUNCTIONAL = ("scaled_dot_product_attention", "dropout", "pad", "glu", "normalize", "adaptive_avg_pool2d",
               "avg_pool2d", "max_pool2d", "interpolate", "prelu", "rrelu", "layer_norm", "group_norm", "batch_norm",
               "instance_norm", "rms_norm", "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool1d", "avg_pool1d",
               "adaptive_avg_pool1d", "pixel_shuffle", "pixel_unshuffle", "dropout1d", "dropout2d", "unfold", "fold")
_OPERATOR = ("add", "sub", "mul", "truediv", "floordiv", "neg", "pos", "pow", "matmul", "getitem", "eq", "ne", "lt",
             "gt", "le", "ge", "invert", "and_", "or_")
OPS: dict[str, Callable[..., Any]] = {
    **{f"torch.{n}": getattr(torch, n) for n in _TORCH}, **{f"F.{n}": getattr(F, n) for n in _FUNCTIONAL},
    **{f"operator.{n}": getattr(operator, n) for n in _OPERATOR}, **{f".{n}": _method(n) for n in _METHODS},
    "multi_head_attention": multi_head_attention, "module": call_module, "set_item": set_item,
    "batch_dropout": batch_dropout,
}
"""The functions an operation may call, by name: torch.*, F.*, operator.* and tensor methods (".name"), and
torchvision's stochastic depth where torchvision is installed."""
with contextlib.suppress(ImportError):
    from torchvision.ops import stochastic_depth
    OPS["torchvision.stochastic_depth"] = stochastic_depth
SYNAPTIC_OPS = {"torch.matmul", "torch.bmm", "torch.einsum", "torch.outer", "torch.baddbmm", "operator.matmul",
                ".matmul"}
"""Products that would make a held parameter a synaptic weight without a B: refused with a parameter."""
_NAMES = {fn: name for name, fn in OPS.items() if not name.startswith(".")}


def register_function(fn: Callable[..., Any], training: tuple[str, int] | None = None) -> str:
    """A function that tracing keeps whole (timm's register_notrace_function: scale_image, window_reverse) as an
    operation, named by its module and name ("timm.models.crossvit.scale_image"); its name. Its error crosses by
    autograd, as every operation's does. `training`: its training flag (name, position), which then follows the
    operation's mode (TRAINING_FLAG: timm's drop_path)."""
    name = _NAMES.get(fn) or f"{fn.__module__}.{fn.__qualname__}"
    OPS.setdefault(name, fn)
    _NAMES.setdefault(fn, name)
    if training is not None:
        TRAINING_FLAG.setdefault(name, training)
    return name


def _registered(op: str) -> bool:
    """Whether `op` is in OPS, registering a timm function named by its module (register_function's names) on the
    way: a circuit built in another process, before that function was traced."""
    if op in OPS:
        return True
    module, _, name = op.rpartition(".")
    if not module.startswith("timm.") or "<" in name:
        return False
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    if not callable(fn) or register_function(fn) != op:
        return False
    return True
TRAINING_FLAG = {"F.dropout": ("training", 2), "batch_dropout": ("training", 2),
                 "torchvision.stochastic_depth": ("training", 3),
                 "F.rrelu": ("training", 3), "F.batch_norm": ("training", 5), "F.dropout1d": ("training", 2),
                 "F.dropout2d": ("training", 2)}
"""Functions with a `training` flag (name, position), which modules pass as self.training: the operation's own
train/eval mode decides it (WhileLearning), as the module's did."""


def follows_mode(op: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """args and kwargs of `op` with its training flag, if it has one, replaced by the operation's mode."""
    if op not in TRAINING_FLAG:
        return args, kwargs
    name, position = TRAINING_FLAG[op]
    flag = WhileLearning(True, False)
    if len(args) > position:
        return (*args[:position], flag, *args[position + 1:]), kwargs
    return args, {**kwargs, name: flag}


def op_name(target: Any) -> str | None:
    """The OPS name of an fx call target (a function, or a method name), None if operations cannot call it."""
    if isinstance(target, str):
        return f".{target}" if f".{target}" in OPS else None
    try:
        return _NAMES.get(target)
    except TypeError:    # unhashable
        return None


@dataclass(frozen=True)
class Operation(Projection):
    """y = op(*args, **kwargs) of torch's function `op` (OPS), on templates; `state` holds the Held tensors and
    `learned` names those that are parameters. A local projection with one input population, a junction's
    combination with several (Population.junction).

    `folds` (one per operand) and `fold`: torch's module computed on windows or tokens folded into the batch axis
    (a (batch * k, ...) tensor), which a population holds as (batch, k, ...): an operand folded by k > 1 is flattened
    back to torch's (batch * k, ...) before the call, and a result folded by `fold` > 1 is unflattened to
    (batch, fold, ...). The call is then torch's, on torch's tensors.

    `shared` (operand positions): populations holding, per example, the whole tensor torch computes once for the
    batch (a layer on a constant: Swin-V2's relative-position MLP). Each largest part of the template that reads only
    them (PerExample) is computed per example as torch computes it once (torch.vmap); its result, a tensor with a
    leading axis of 1 in torch, is repeated for each of the example's windows or tokens, as torch broadcasts it over
    the batch."""

    op: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    learned: tuple[str, ...] = ()
    folds: tuple[int, ...] = ()
    fold: int = 1
    shared: tuple[int, ...] = ()
    synaptic: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not _registered(self.op):
            raise CircuitError(f"Operation({self.op!r}): unknown operation; known: {', '.join(sorted(OPS))}")

    @property
    def operands(self) -> int:
        """How many input populations the operation reads (1 + the largest Operand position)."""
        positions = [-1]
        _walk((self.args, self.kwargs),
              lambda leaf: positions.append(leaf.position) if isinstance(leaf, Operand) else None)
        return max(positions) + 1

    def output_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        return self.shape_of([pre], post.name)

    def shape_of(self, operands: list[Population], name: str) -> tuple[int, ...]:
        """One example's output shape on `operands`, computed on meta tensors (no data); a CircuitError naming
        population `name` if torch's function refuses them."""
        module = self.build(None, None, None).to("meta")
        floats = [t.dtype for t in (self.state or {}).values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.get_default_dtype()
        try:
            out = module(*[torch.empty(2, *p.shape, device="meta", dtype=dtype) for p in operands])
        except Exception as e:  # noqa: BLE001 - torch raises many kinds
            raise CircuitError(f"{self} into population {name!r}: torch refuses operands of shapes "
                               f"{[p.shape for p in operands]}: {e}") from e
        return tuple(out.shape[1:])

    def build(self, pre: Population | None, post: Population | None, rule: None) -> nn.Module:
        return OperationModule(self)


class OperationModule(nn.Module):
    """A built Operation: its held tensors as buffers and parameters (`held_<key>`)."""

    def __init__(self, spec: Operation) -> None:
        super().__init__()
        self.spec, self.call = spec, _per_example(Call(spec.op, spec.args, spec.kwargs), set(spec.shared))
        for key, value in (spec.state or {}).items():
            if key in spec.learned:
                self.register_parameter(f"held_{key}", nn.Parameter(value.detach().clone()))
            else:
                self.register_buffer(f"held_{key}", value.detach().clone())

    def forward(self, *operands: Tensor) -> Tensor:
        folds, fold = self.spec.folds, self.spec.fold
        batch = operands[0].shape[0]
        if folds:
            operands = tuple(x.flatten(0, 1) if k > 1 else x for x, k in zip(operands, folds, strict=True))
        out = self._evaluate(self.call, operands, batch)
        return out.unflatten(0, (batch, fold)) if fold > 1 else out

    def _evaluate(self, item: Any, operands: tuple[Tensor, ...], batch: int) -> Any:
        if isinstance(item, Operand):
            return operands[item.position]
        if isinstance(item, PerExample):
            return self._broadcast(item, operands, batch)
        if isinstance(item, Batch):
            return batch * item.factor
        if isinstance(item, Held):
            return getattr(self, f"held_{item.key}")
        if isinstance(item, WhileLearning):
            return item.value if self.training else item.otherwise
        if isinstance(item, Call):
            args = [self._evaluate(a, operands, batch) for a in item.args]
            return OPS[item.op](*args, **{k: self._evaluate(v, operands, batch) for k, v in item.kwargs.items()})
        if isinstance(item, nn.Module):        # a stateless module kept whole ("module"): in the operation's mode
            return item.train(self.training)
        if isinstance(item, (tuple, list)):
            return type(item)(self._evaluate(a, operands, batch) for a in item)
        if isinstance(item, slice):
            return slice(*(self._evaluate(a, operands, batch) for a in (item.start, item.stop, item.step)))
        return item

    def _broadcast(self, item: PerExample, operands: tuple[Tensor, ...], batch: int) -> Tensor:
        """`item` computed per example on the shared operands, each example's as torch's tensor, then its result
        (with a leading axis of 1, as torch broadcasts it) repeated for each of the example's windows or tokens:
        (batch * k, ...), as torch broadcasts its one row over its (batch * k, ...) operands."""
        shared = self.spec.shared

        def one(*tensors: Tensor) -> Tensor:
            local = list(operands)
            for position, tensor in zip(shared, tensors, strict=True):
                local[position] = tensor
            return self._evaluate(item.item, tuple(local), batch)

        out = torch.vmap(one)(*(operands[p] for p in shared))
        rank = max(x.dim() for i, x in enumerate(operands) if i not in shared)     # torch's data tensors' axes
        if out.dim() <= rank:                   # torch broadcasts it with a leading axis of 1 as its first
            out = out.reshape(batch, *(1,) * (rank + 1 - out.dim()), *out.shape[1:])
        if out.dim() != rank + 1 or out.shape[1] != 1:
            raise CircuitError(f"{self.spec}: what it computes from shared operands {list(shared)} has shape "
                               f"{tuple(out.shape[1:])} per example, which torch does not broadcast over its batch "
                               f"as one row")
        windows = max(self.spec.folds, default=1)
        return out.expand(batch, windows, *out.shape[2:]).flatten(0, 1)

    def extra_repr(self) -> str:
        return repr(self.spec)


@dataclass(frozen=True)
class PerExample:
    """A part of a template that reads only shared operands (Operation.shared): computed per example."""

    item: Any


def _positions(item: Any) -> set[int]:
    """The operand positions a template reads."""
    positions: set[int] = set()
    _walk(item, lambda leaf: positions.add(leaf.position) if isinstance(leaf, Operand) else None)
    return positions


def _per_example(item: Any, shared: set[int]) -> Any:
    """The template with each largest part that reads shared operands alone marked PerExample."""
    if not shared:
        return item
    positions = _positions(item)
    if positions and positions <= shared:
        return PerExample(item)
    if isinstance(item, Call):
        return Call(item.op, _per_example(item.args, shared),
                    {k: _per_example(v, shared) for k, v in item.kwargs.items()})
    if isinstance(item, (tuple, list)):
        return type(item)(_per_example(a, shared) for a in item)
    if isinstance(item, dict):
        return {k: _per_example(v, shared) for k, v in item.items()}
    return item


def _walk(item: Any, visit: Callable[[Any], Any]) -> None:
    """Call `visit` on every leaf of a template."""
    if isinstance(item, Call):
        _walk((item.args, item.kwargs), visit)
    elif isinstance(item, (tuple, list)):
        for a in item:
            _walk(a, visit)
    elif isinstance(item, dict):
        for a in item.values():
            _walk(a, visit)
    elif isinstance(item, slice):
        _walk((item.start, item.stop, item.step), visit)
    else:
        visit(item)


@dataclass(frozen=True)
class JunctionInput(Projection):
    """An input of a junction population: operand number `position` of the population's Operation, unchanged."""

    position: int = 0

    def output_shape(self, pre: Population, post: Population) -> tuple[int, ...]:
        if post.junction is None:
            raise CircuitError(f"{self}: population {post.name!r} is not a junction (give it an Operation)")
        return post.shape

    def _module(self, pre, post, rule) -> nn.Module:
        return nn.Identity()
