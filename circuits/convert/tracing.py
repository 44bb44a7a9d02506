"""fx tracing for circuits.from_torch: the workarounds that let torch's attention layers trace.

nn.MultiheadAttention stays one node (its forward branches on its inputs); nn.TransformerEncoderLayer
is traced through with torch's fused fast path off (its checks branch on tensors); nn.TransformerEncoder
without masks is its layers and norm; a bare layer is held by a module so that fx sees it called.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import CircuitError
from .layers import LAYERS, is_activation


class _Tracer(fx.Tracer):
    """fx tracing that keeps nn.MultiheadAttention whole (its forward branches on its inputs) and traces into
    nn.TransformerEncoderLayer; with `buffers`, reads buffers as graph nodes, so that slicing one by a size
    (nanoGPT's causal mask) traces."""

    def __init__(self, buffers: bool) -> None:
        super().__init__()
        self.proxy_buffer_attributes = buffers

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            return False
        return isinstance(m, nn.MultiheadAttention) or super().is_leaf_module(m, qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(m, nn.TransformerEncoder) and len(args) == 1 and not any(kwargs.values()):
            return super().call_module(m, functools.partial(_encoder_layers, m), args, {})
        return super().call_module(m, forward, args, kwargs)


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


def trace(module: nn.Module) -> fx.GraphModule:
    """fx's graph of the module: traced with buffers as tensors, else as graph nodes, else with its optional
    arguments fixed at their defaults (nn.TransformerEncoderLayer's masks and is_causal)."""
    root = _Layer(module) if isinstance(module, LAYERS) or is_activation(module) else \
        _Encoder(module) if isinstance(module, nn.TransformerEncoder) else module
    optional = list(inspect.signature(root.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in optional if p.default is not inspect.Parameter.empty}
    errors = []
    with slow_attention():
        for buffers, concrete_args in ((False, None), (True, None), (False, concrete)):
            try:
                return fx.GraphModule(root, _Tracer(buffers).trace(root, concrete_args=concrete_args))
            except Exception as e:  # noqa: BLE001 - fx raises many kinds
                errors.append(e)
    raise CircuitError(f"{type(module).__name__} cannot be traced by torch.fx: {errors[0]}") from errors[0]
