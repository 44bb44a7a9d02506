"""fx tracing for circuits.from_torch: the workarounds that let torch's attention layers trace.

nn.MultiheadAttention stays one node (its forward branches on its inputs); nn.TransformerEncoderLayer
is traced through with torch's fused fast path off (its checks branch on tensors); nn.TransformerEncoder
without masks is its layers and norm; a bare layer is held by a module so that fx sees it called. A module fx cannot
trace otherwise is traced again with its sizes known (meta tensors of the input shape; the batch's size stays a
node), then with timm's own fx registry, where timm is installed: the functions timm keeps whole
(register_notrace_function) become one call each, and the modules it keeps whole (register_notrace_module) that fx
cannot trace into on their own become one layer call each (circuits.convert.layers: an operation calling the module
where it holds no parameters or buffers, else refused). timm's drop_path is always one call (its mode is the net's).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.experimental.meta_tracer import MetaProxy, MetaTracer

from ..errors import CircuitError
from ..graph.operations import register_function, set_item
from .checks import NEW_TENSORS, is_shape_read
from .layers import LAYERS, is_activation


@dataclass(frozen=True)
class Whole:
    """What tracing keeps whole: module classes (those of them fx cannot trace into) and functions (one call each)."""

    modules: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()


def timm_whole() -> Whole | None:
    """timm's fx registry (timm.layers: register_notrace_module, register_notrace_function), read when tracing: the
    module classes and functions timm keeps whole for fx. None where timm is not installed or registers nothing.
    Each function becomes an operation of its own (circuits.graph.operations.register_function)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return None
    functions = tuple(f for f in get_notrace_functions() if callable(f)) + _timm_padding()
    for f in functions:
        register_function(f)
    modules = tuple(m for m in get_notrace_modules() if isinstance(m, type) and issubclass(m, nn.Module))
    return Whole(modules, functions) if modules or functions else None


def _timm_padding() -> tuple[Callable[..., Any], ...]:
    """timm's dynamic "same" padding (timm.layers.padding.pad_same), kept whole as well: the one call in the forward
    of timm's Conv2dSame, MaxPool2dSame and AvgPool2dSame (registered not traceable) that branches on sizes, so that
    tracing goes into them (the convolution then converts as F.conv2d with the layer's weight, the padding is an
    operation that pads for the input size)."""
    try:
        from timm.layers.padding import pad_same
    except ImportError:
        return ()
    return (pad_same,)


def _timm_drop_path() -> tuple[Callable[..., Any], ...]:
    """timm's drop_path (stochastic depth, timm.layers.drop), where timm is imported: one call, an operation whose
    training flag follows the net's mode, as torchvision's stochastic_depth's does; traced into, its train-mode branch
    would be a graph of its own (refused: circuits.convert.checks.refuse_dropped_branches)."""
    if "timm" not in sys.modules:
        return ()
    try:
        from timm.layers.drop import drop_path
    except ImportError:
        return ()
    register_function(drop_path, training=("training", 2))
    return (drop_path,)


def torchvision_traced_into() -> tuple[Callable[..., Any], ...]:
    """The functions torchvision wraps for fx (torch.fx.wrap) that tracing goes into, where torchvision is imported:
    its Swin's shifted_window_attention (the qkv and projection weights then become F.linear calls, synapses, on
    windows folded into the batch axis), _patch_merging_pad and _get_relative_position_bias. Kept whole, each would be
    one call no circuit part computes. Their bodies branch on sizes, so they trace with sizes known (input_shape)."""
    if "torchvision" not in sys.modules:
        return ()
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:
        return ()
    return swin.shifted_window_attention, swin._patch_merging_pad, swin._get_relative_position_bias


class _Tracer(fx.Tracer):
    """fx tracing that keeps nn.MultiheadAttention whole (its forward branches on its inputs) and traces into
    nn.TransformerEncoderLayer; with `buffers`, reads buffers as graph nodes, so that slicing one by a size
    (nanoGPT's causal mask) traces. With `whole`: its functions are one call each, and each of its modules is one
    layer call where fx cannot trace into it on its own (a module of its classes that traces stays traced into:
    timm's BatchNormAct2d). The functions torchvision wraps for fx that torchvision_traced_into names are traced
    into."""

    def __init__(self, buffers: bool, whole: Whole | None = None) -> None:
        super().__init__(autowrap_functions=(whole.functions if whole else ()) + _timm_drop_path())
        self.proxy_buffer_attributes = buffers
        self.whole = whole
        self.untraceable: dict[nn.Module, bool] = {}
        self.traced_into = torchvision_traced_into()      # read before tracing, which patches them
        self.bodies: list[fx.Node] = []

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **more: Any) -> Any:
        """fx's proxy; a call of a function torchvision wraps for fx that tracing goes into (torchvision_traced_into)
        is instead that function run on the proxies, so that its body is traced."""
        if kind == "call_function" and target in self.traced_into:
            made = target(*args, **kwargs)
            self.bodies.append(made.node)
            return made
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """fx's graph; the last node of each body traced into is not marked as a wrapped call (fx marks what the
        wrapper's create_proxy returns)."""
        graph = super().trace(root, concrete_args)
        for node in self.bodies:
            node.meta.pop("is_wrapped", None)
        return graph

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            return False
        if self.whole is not None and isinstance(m, self.whole.modules):
            if m not in self.untraceable:
                self.untraceable[m] = not _traces(m, self.whole)
            if self.untraceable[m]:
                return True
        return isinstance(m, nn.MultiheadAttention) or super().is_leaf_module(m, qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, nn.TransformerEncoder) and len(args) == 1 and not any(kwargs.values()):
            return super().call_module(m, functools.partial(_encoder_layers, m), args, {})
        return super().call_module(m, forward, args, kwargs)


def _traces(module: nn.Module, whole: Whole) -> bool:
    """Whether fx traces into the module on its own (its forward without Python control flow on its inputs)."""
    try:
        fx.Tracer(autowrap_functions=whole.functions).trace(module)
    except Exception:  # noqa: BLE001 - fx raises many kinds
        return False
    return True


def _encoder_layers(encoder: nn.Module, x: Any) -> Any:
    """nn.TransformerEncoder without masks: its layers, then its norm. What its forward computes then, without
    the checks on nested tensors that fx cannot trace."""
    for layer in encoder.layers:
        x = layer(x)
    return encoder.norm(x) if encoder.norm is not None else x


class _Encoder(nn.Module):
    """nn.TransformerEncoder as the module converted: its layers and norm under their own names."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers, self.norm, self.training = encoder.layers, encoder.norm, encoder.training

    def forward(self, x: Tensor) -> Tensor:
        return _encoder_layers(self, x)


class _Layer(nn.Module):
    """A bare layer, held under its class name so that fx sees it called: from_torch(nn.Linear(4, 3))."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.key = type(layer).__name__.lower()
        self.add_module(self.key, layer)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self, self.key)(x)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """The module in eval mode without gradients (batch-norm statistics stay), then each of its modules back in its
    own mode."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextlib.contextmanager
def slow_attention() -> Iterator[None]:
    """Without torch's fused attention fast path, whose checks branch on tensors fx cannot trace."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _fresh(node: fx.Node) -> bool:
    """Whether `node` makes a new tensor, of which no view exists (x.new_zeros(...), x.clone(), set_item's copy)."""
    return node.op == "call_method" and (node.target in NEW_TENSORS or node.target == "clone") \
        or node.target is set_item


class _SizedProxy(MetaProxy):
    """A proxy that knows its tensor's shape (on the meta device), so that Python branches on sizes trace: its sizes
    are numbers, except the leading axis of a tensor computed from the input where it is a multiple of the batch's
    size (the batch, or windows and tokens folded into it), which stays a graph node (x.size(0)) so that the graph
    serves any batch size."""

    def size(self, dim: int | None = None) -> Any:
        meta = self.__dict__.get("_tensor_meta")
        if not isinstance(meta, Tensor) or meta.dim() == 0:
            return super().size(dim)
        if dim is None:
            return (self._leading(meta), *meta.shape[1:])
        return self._leading(meta) if dim in (0, -meta.dim()) else meta.size(dim)

    @property
    def shape(self) -> Any:
        return self.size()

    def __setitem__(self, key: Any, value: Any) -> None:
        """x[key] = value on a new tensor not read since it was made but for its shape (torchvision Swin's attention
        mask, x.new_zeros(...) set by slices; Swin-V2's qkv bias, a clone of a parameter): recorded as set_item, which
        returns a copy with the item set, and this proxy then stands for that copy. Elsewhere a view of the tensor, or
        the tensor a view was taken of, would change too, which a graph of calls does not show: refused."""
        node = self.node
        if not _fresh(node) or any(not is_shape_read(u) for u in node.users):
            raise TypeError(f"item assignment on {node.format_node()}: only a new tensor (x.new_zeros(...), "
                            f"x.clone()) not read since it was made can be assigned to while tracing")
        made = self.tracer.create_proxy("call_function", set_item, (self, key, value), {})
        self.node, self._tensor_meta = made.node, made.__dict__.get("_tensor_meta")

    def _leading(self, meta: Tensor) -> Any:
        if self.node not in self.tracer.data or meta.shape[0] % self.tracer.batch:
            return meta.shape[0]
        return self.tracer.create_proxy("call_method", "size", (self, 0), {})


class _SizedTracer(_Tracer, MetaTracer):
    """_Tracer with shapes known (torch.fx.experimental.meta_tracer on meta tensors of one example's shape and
    `batch` examples): Python branches on sizes resolve (MobileViT's interpolation check, Twins' window padding),
    the batch's size stays a node."""

    def __init__(self, buffers: bool, whole: Whole | None, batch: int) -> None:
        super().__init__(buffers, whole)
        self.batch = batch
        self.data: set[fx.Node] = set()

    def proxy(self, node: fx.Node) -> MetaProxy:
        return _SizedProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **more: Any) -> MetaProxy:
        """MetaTracer's proxy, its node marked as data where it reads the input (a leading axis a multiple of the
        batch's size then stays a node: the batch, or windows and tokens folded into it)."""
        made = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        if kind == "placeholder" or any(n in self.data for n in made.node.all_input_nodes):
            self.data.add(made.node)
        return made


def _sized_trace(root: nn.Module, whole: Whole | None, input_shape: tuple[int, ...]) -> fx.Graph:
    """root's graph traced with its sizes known (_SizedTracer), on 2 and on 3 examples: the same graph both times
    (no size that follows the batch taken as a number), else a CircuitError."""
    graphs = []
    root = copy.deepcopy(root).to("meta")       # its layers then compute their shapes on meta tensors
    dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.get_default_dtype())
    for batch in (2, 3):
        name = next(iter(inspect.signature(root.forward).parameters))
        example = {name: torch.empty(batch, *input_shape, device="meta", dtype=dtype)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")            # the meta tracer warns where it computes no shape
            graphs.append(_SizedTracer(False, whole, batch).trace(root, example))
    two, three = ([(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in g.nodes] for g in graphs)
    if two != three:
        raise CircuitError("traced with its sizes known, its graph differs between 2 and 3 examples (a size that "
                           "follows the batch is taken as a number)")
    return graphs[0]


def _fills_as_copies(graph: fx.Graph) -> fx.Graph:
    """The graph with each x[key].zero_() or x[key].fill_(value) on a new tensor x (a clone, x.new_zeros(...)) as
    set_item(x, key, value), a copy with the item set, read in x's place by every call after it (torchvision
    Swin-V2's qkv_bias.clone()[C:2 * C].zero_()). Only where nothing but shape reads read x before, so that no view
    of x would see the change, and where the key picks a view (integers, slices, None, ...; an index tensor or list
    picks a copy, which torch fills and drops). Any other in-place change stays: checks refuses one on a tensor
    computed from parameters, or one that a later call would not see."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        view = node.args[0] if node.op == "call_method" and node.target in ("zero_", "fill_") else None
        if node.users or not (isinstance(view, fx.Node) and view.target is operator.getitem and len(view.users) == 1
                              and _basic(view.args[1])):
            continue
        whole = view.args[0]
        if not _fresh(whole) or any(order.get(u, len(order)) < order[node] and u is not view and not is_shape_read(u)
                            for u in whole.users):
            continue
        value = 0 if node.target == "zero_" else node.args[1] if len(node.args) > 1 else node.kwargs["value"]
        with graph.inserting_after(node):
            copy = graph.call_function(set_item, (whole, view.args[1], value))
        for user in [u for u in whole.users if order.get(u, -1) > order[node]]:
            user.replace_input_with(whole, copy)
        graph.erase_node(node)
        graph.erase_node(view)
    return graph


def _basic(key: Any) -> bool:
    """Whether an index `key` surely picks a view (basic indexing: integers, slices, None, Ellipsis, or a tuple of
    them); a graph node may be an index tensor, which picks a copy."""
    if isinstance(key, tuple):
        return all(_basic(k) for k in key)
    return key is None or key is Ellipsis or isinstance(key, slice) or type(key) is int


def _ways(input_shape: tuple[int, ...] | None) -> Iterator[tuple[Whole | None, bool]]:
    """How to trace, in order, each as (what is kept whole, whether sizes are known): plain fx first; then, given an
    input shape, with sizes known and timm's functions kept whole (tracing into timm's registered modules); then with
    timm's registry whole, modules included. timm's registry is read only if plain tracing fails."""
    yield None, False
    whole = timm_whole()
    if input_shape is not None:
        yield (Whole((), whole.functions) if whole is not None else None), True
    if whole is not None:
        yield whole, False


def trace(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """fx's graph of the module: traced with buffers as tensors, else as graph nodes, else with its optional
    arguments fixed at their defaults (nn.TransformerEncoderLayer's masks and is_causal); if none traces, given one
    example's `input_shape`, with its sizes known (_sized_trace: Python branches on sizes); then with what timm keeps
    whole (timm_whole), where timm is installed (_ways). The error is plain fx's, and the one tracing with sizes known
    met."""
    root = _Layer(module) if isinstance(module, LAYERS) or is_activation(module) else \
        _Encoder(module) if isinstance(module, nn.TransformerEncoder) else module
    optional = list(inspect.signature(root.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in optional if p.default is not inspect.Parameter.empty}
    errors = []
    sized_error = ""
    ways = ((False, None), (True, None), (False, concrete))
    with slow_attention():
        for whole, sized in _ways(input_shape):
            if sized:
                try:
                    return fx.GraphModule(root, _fills_as_copies(_sized_trace(root, whole, tuple(input_shape))))
                except Exception as e:  # noqa: BLE001 - fx raises many kinds
                    errors.append(e)
                    sized_error = f"; traced with its sizes known: {e}"
                continue
            for buffers, concrete_args in ways:
                try:
                    return fx.GraphModule(root, _fills_as_copies(_Tracer(buffers, whole).trace(
                        root, concrete_args=concrete_args)))
                except Exception as e:  # noqa: BLE001 - fx raises many kinds
                    errors.append(e)
    hint = "" if input_shape is not None else \
        "; given input_shape, it is traced again with its sizes known (Python branches on sizes)"
    raise CircuitError(f"{type(module).__name__} cannot be traced by torch.fx: {errors[0]}{sized_error}{hint}") \
        from errors[0]
