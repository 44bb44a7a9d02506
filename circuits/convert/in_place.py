"""In-place conversion, for what torch.fx cannot trace: any module's synaptic layers become Synapses.

    net = circuits.in_place(torchvision.models.vit_b_16(), torch.zeros(2, 3, 224, 224), "wm",
                            rules_by_layer={"heads.head": "bp"})
    print(net.report)      # 50 synaptic layers converted (wm, bp), 27 modules left as they are: ...

Each nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d and nn.Embedding that the module calls as a layer on
`example` is swapped, where it sits, for a circuits.rules.synapse.Synapse with the same parameters (W and bias, their
values, dtype and device), the same forward result bit for bit, and a feedback projection B under the layer's rule (an
nn.MultiheadAttention called as self-attention becomes a SelfAttention, whose W_qkv and W_o are Synapses,
named <attention>.in_proj and <attention>.out_proj):

    a_{l+1} = W y_l (+ bias),    delta_l = B^T delta_{l+1},    dL/dW = delta_{l+1} y_l^T

as in a circuit (in the style of BioTorch's converter, jsalbert/biotorch). A Linear acts on the last
dimension of inputs of any shape (tokens x channels: W shared over positions; its mirror noise has the
input's real shape). The module keeps its own forward: everything between synaptic layers (layer norm,
attention's products of activities, residual sums, pooling) passes the error back by its own local
derivative, under every rule, as local projections do in a circuit.

An embedding's input is indices: no error crosses it, so it needs no feedback and its B would never be
used. It becomes a Synapse with rule None ("synaptic, no feedback needed"); W learns by delta scattered
onto the rows of the indices seen (circuits.rules.synapse.EmbeddingOperator), under every rule.

Left as they are, and listed in the report: layers never called as a layer on `example` (their parent
reads their weight directly: those synapses keep backprop), an nn.MultiheadAttention called otherwise than
as self-attention without masks or returned weights, subclasses that override forward, a
convolution with non-zero padding modes or string padding, an embedding with max_norm, scale_grad_by_freq or
sparse gradients, a ConvTranspose2d called with output_size, and every other module with parameters of its own
(layer norm, positional embeddings).

What is lost against circuits.from_torch: there is no population graph. The returned InPlaceNet is a
CircuitNet for the trainer, circuits.phases.mirror (mirror_step, mirror phases) and angle(B, W) (`projections()`:
every Synapse by qualified name), but it has no circuit: no recorder (circuits.Recorder needs the graph
to record activity and errors and draw the circuit), no monitor of population activity, and no direct
feedback (dfa needs the populations its output error reaches: a clear CircuitError here).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NoReturn

import torch
from torch import Tensor, nn

from .. import rules
from ..errors import CircuitError
from ..graph.network import CircuitNet
from ..graph.operations import multi_head_attention
from ..rules.synapse import ConvOperator, DenseOperator, EmbeddingOperator, Synapse
from .checks import refuse_tied
from .layers import unconvertible, zero_padding
from .tracing import evaluating

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding, nn.MultiheadAttention)
_ATTENTION_CALL = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class Report:
    """What in_place did: qualified names of the layers converted under a rule, of the embeddings made
    synaptic without feedback, and of the modules left as they are (each with why)."""

    converted: dict[str, str] = field(default_factory=dict)        # name -> rule
    embeddings: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)             # name -> why

    def __str__(self) -> str:
        rule_names = ", ".join(dict.fromkeys(self.converted.values()))
        parts = [_count(len(self.converted), "synaptic layer") + f" converted ({rule_names or 'no rule'})"]
        if self.embeddings:
            parts.append(_count(len(self.embeddings), "embedding") + " synaptic, no feedback needed (no error "
                         f"crosses an index input): {', '.join(self.embeddings)}")
        left = "; ".join(f"{name} ({why})" for name, why in self.left.items())
        parts.append(_count(len(self.left), "module") + " left as " + ("it is" if len(self.left) == 1 else "they are")
                     + (f": {left}" if left else ""))
        return ", ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class InPlaceNet(CircuitNet):
    """A module whose synaptic layers are Synapses, run by its own forward: a CircuitNet without a circuit.

    `model` is the converted module, `report` what in_place did. projections(), backprop_reference() and
    forward_parameters() are CircuitNet's; there are no direct feedback projections and no populations.
    """

    def __init__(self, model: nn.Module, report: Report) -> None:
        nn.Module.__init__(self)        # not CircuitNet's: there is no circuit to build from
        self.model, self.report = model, report
        self._reference = False

    @property
    def circuit(self) -> NoReturn:
        raise CircuitError(f"{type(self.model).__name__} was converted in place (circuits.in_place): it has no "
                           f"population graph, so no recorder, activity monitor or circuit drawing; convert it "
                           f"with circuits.from_torch where torch.fx can trace it")

    def forward(self, *args: Any, monitor: dict | None = None, **kwargs: Any) -> Any:
        if monitor is not None:
            raise CircuitError("a net converted in place has no populations whose activity could be monitored")
        return self.model(*args, **kwargs)

    def projections(self) -> Iterator[tuple[str, Synapse]]:
        """(qualified name in the module, Synapse) for every synaptic layer, embeddings included (rule None)."""
        for name, module in self.model.named_modules():
            if isinstance(module, Synapse):
                yield name, module

    def feedback_projections(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(())

    def projection(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise CircuitError(f"{type(self.model).__name__} has no layer named {name!r}") from None


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's self-attention (key and value are the query) with W_qkv and W_o as Synapses:

        q, k, v = split(W_qkv x + b_qkv),    out = W_o concat_heads(softmax(q k^T / sqrt(d_head)) v) + b_o

    (dropout on the attention weights while training). It returns (out, None), as nn.MultiheadAttention
    does with need_weights=False; other calls (masks, weights, cross-attention) are a CircuitError.
    """

    def __init__(self, in_proj: Synapse, out_proj: Synapse, heads: int, dropout: float, batch_first: bool) -> None:
        super().__init__()
        self.in_proj, self.out_proj = in_proj, out_proj
        self.heads, self.dropout, self.batch_first = heads, dropout, batch_first

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        why = _not_self_attention(key is query and value is query, key_padding_mask, need_weights, attn_mask,
                                  is_causal)
        if why is not None:
            raise CircuitError(f"this attention was converted for self-attention without masks or weights: {why}")
        heads = multi_head_attention(self.in_proj(query), self.heads, self.batch_first, need_weights=False,
                                     dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(heads), None


def _not_self_attention(same: bool, key_padding_mask: Tensor | None, need_weights: bool, attn_mask: Tensor | None,
                        is_causal: bool) -> str | None:
    """Why an nn.MultiheadAttention call is not plain self-attention (None: it is)."""
    for problem, why in ((not same, "key and value are not the query"), (need_weights, "need_weights=True"),
                         (key_padding_mask is not None, "a key_padding_mask"), (attn_mask is not None, "an attn_mask"),
                         (is_causal, "is_causal=True")):
        if problem:
            return why
    return None


def _unconvertible(layer: nn.Module, call: tuple[tuple, dict] | None) -> str | None:
    """Why a layer cannot be swapped for one computing the same (None: it can); `call`: its first call's
    (args, kwargs) on the example, None if it was not called."""
    kind = next(k for k in _LAYERS if isinstance(layer, k))
    if type(layer).forward is not kind.forward:
        return f"{type(layer).__name__} overrides {kind.__name__}.forward"
    if call is None:
        return "not called as a layer: its parent uses its weight directly, which keeps backprop"
    why = unconvertible(layer)
    if why is not None:
        return why
    if isinstance(layer, nn.ConvTranspose2d) and (call[0][1:] or call[1].get("output_size") is not None):
        return "called with output_size: a synapse has one output size, set by output_padding"
    if isinstance(layer, nn.MultiheadAttention):
        bound = _ATTENTION_CALL.bind(layer, *call[0], **call[1])
        bound.apply_defaults()
        a = bound.arguments
        why = _not_self_attention(a["key"] is a["query"] and a["value"] is a["query"], a["key_padding_mask"],
                                  a["need_weights"], a["attn_mask"], a["is_causal"])
        return None if why is None else f"called with {why}: only self-attention without masks or weights converts"
    return None


def _synapse(operator: DenseOperator | ConvOperator | EmbeddingOperator, weight: Tensor, bias: Tensor | None,
             rule: rules.FeedbackRule | None, in_shape: tuple[int, ...]) -> Synapse:
    """The Synapse with W = `weight` and `bias` (their values, dtype and device) under `rule`."""
    state = {"weight": weight.detach()} | ({"bias": bias.detach()} if bias is not None else {})
    with torch.device("meta"):      # only the shapes: the values come from the layer
        synapse = Synapse(operator, tuple(weight.shape), bias is not None, None, in_shape)
    synapse.to_empty(device=weight.device).to(weight.dtype).load_state_dict(state)
    synapse.rule = rule
    if rule is not None:
        rule.attach(synapse)        # B (and what the rule keeps) beside W: then all of it where W is
    return synapse.to(device=weight.device, dtype=weight.dtype)


def _swap(layer: nn.Module, call: tuple[tuple, dict], rule: rules.FeedbackRule | None,
          out_rule: rules.FeedbackRule | None = None) -> nn.Module:
    """The module that replaces `layer`, computing what it computes with Synapses under `rule` (an attention's
    W_o under `out_rule`); `call` is its first call's (args, kwargs)."""
    y = call[0][0] if call[0] else next(iter(call[1].values()))
    if isinstance(layer, nn.MultiheadAttention):
        x = y if layer.batch_first else y.transpose(0, 1)
        in_proj = _synapse(DenseOperator(), layer.in_proj_weight, layer.in_proj_bias, rule, tuple(x.shape[1:]))
        out_shape = (*x.shape[1:-1], layer.embed_dim)
        out_proj = _synapse(DenseOperator(), layer.out_proj.weight, layer.out_proj.bias, out_rule, out_shape)
        return SelfAttention(in_proj, out_proj, layer.num_heads, layer.dropout, layer.batch_first)
    if isinstance(layer, nn.Linear):
        operator = DenseOperator()
    elif isinstance(layer, nn.ConvTranspose2d):
        operator = ConvOperator(layer.stride, layer.padding, layer.dilation, layer.groups, transposed=True,
                                output_padding=layer.output_padding)
    elif isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        operator = ConvOperator(layer.stride, zero_padding(layer.padding, layer.kernel_size, layer.dilation),
                                layer.dilation, layer.groups)
    else:
        operator = EmbeddingOperator(layer.padding_idx)
    synapse = _synapse(operator, layer.weight, getattr(layer, "bias", None), rule, tuple(y.shape[1:]))
    if isinstance(operator, DenseOperator):
        synapse.register_forward_hook(_not_a_view)
    return synapse


def _not_a_view(synapse: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """A Linear's result on more than two axes is a view (of F.linear's flat product), which autograd forbids to
    modify in place when a custom Function returns it; the module's own forward may (torchvision Swin-V2's cpb_mlp:
    Linear, then ReLU(inplace=True)). A copy there, as torch's own Linear gives a result that may be modified."""
    return out.clone() if out._is_view() else out


def _called_layers(module: nn.Module, example: tuple[Any, ...]) -> dict[nn.Module, tuple[tuple, dict]]:
    """The convertible layers called on `example`, each with its first call's (args, kwargs) (run once in
    eval mode without gradients: batch-norm statistics stay)."""
    seen: dict[nn.Module, tuple[tuple, dict]] = {}

    def record(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault(layer, (args, kwargs))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in module.modules() if isinstance(m, _LAYERS)]
    try:
        with evaluating(module):
            module(*example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def in_place(module: nn.Module, example: Tensor | tuple[Any, ...], rule: rules.RuleLike = "bp",
             rules_by_layer: Mapping[str, rules.RuleLike] | None = None) -> InPlaceNet:
    """Swap `module`'s synaptic layers in place for Synapses under `rule` (module docstring) and wrap it.

    example: one batch the module takes (a tensor, or a tuple of its positional arguments), run once to
    find which layers it calls and the input shape of each (mirror noise and padding statistics follow it).
    rule: a FeedbackRule or a registered short name; rules_by_layer overrides it per qualified layer name
    (an attention's by its name, or its projections' names <attention>.in_proj and <attention>.out_proj).
    Direct rules (dfa, ldfa) need a population graph: a CircuitError (use circuits.from_torch).
    Returns an InPlaceNet around `module`; `net.report` says what was converted and what was left.
    """
    default = rules.get(rule)
    overrides = {name: rules.get(r) for name, r in (rules_by_layer or {}).items()}
    direct = [str(r) for r in (default, *overrides.values()) if r.direct or r.reads_output_error]
    if direct:
        local = [n for n, r in rules.RULES.items() if not (r.direct or r.reads_output_error)]
        raise CircuitError(f"direct feedback ({direct[0]}) sends the output error to hidden populations, which a "
                           f"module converted in place does not have: use circuits.from_torch, or a layer-local "
                           f"rule ({', '.join(local)})")
    refuse_tied(module)
    example = example if isinstance(example, tuple) else (example,)
    called = _called_layers(module, example)
    report, swapped, attentions = Report(), {}, []
    for name, layer in module.named_modules():
        if any(name.startswith(f"{n}.") for n in attentions):
            continue                            # inside a converted attention: its out_proj is converted with it
        if isinstance(layer, _LAYERS):
            why = _unconvertible(layer, called.get(layer))
            if why is not None:
                report.left[name] = f"{type(layer).__name__}: {why}"
                continue
            layer_rule = None if isinstance(layer, nn.Embedding) else overrides.pop(name, default)
            if isinstance(layer, nn.MultiheadAttention):      # overrides by the attention's name or its projections'
                attentions.append(name)
                in_rule, out_rule = (overrides.pop(f"{name}.{p}", layer_rule) for p in ("in_proj", "out_proj"))
                swapped[layer] = _swap(layer, called[layer], in_rule, out_rule)
                report.converted |= {f"{name}.in_proj": str(in_rule), f"{name}.out_proj": str(out_rule)}
                continue
            swapped[layer] = _swap(layer, called[layer], layer_rule)
            if layer_rule is None:
                report.embeddings.append(name)
            else:
                report.converted[name] = str(layer_rule)
        elif any(True for _ in layer.parameters(recurse=False)):
            own = ", ".join(n for n, _ in layer.named_parameters(recurse=False))
            report.left[name or type(layer).__name__] = f"{type(layer).__name__}, local: {own}"
    if overrides:
        raise CircuitError(f"rules_by_layer names layers that {type(module).__name__} does not have or that were "
                           f"not converted: {sorted(overrides)}; converted: {list(report.converted)}")
    for parent in module.modules():      # every reference to a swapped layer (shared layers stay shared)
        for child_name, child in list(parent._modules.items()):     # named_children() skips repeats
            if child in swapped:
                setattr(parent, child_name, swapped[child])
    return InPlaceNet(module, report)


__all__ = ["in_place", "InPlaceNet", "Report", "SelfAttention"]
