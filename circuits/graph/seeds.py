"""Seeds as a tensor axis: S copies of one circuit, each built under its own seed, run as one.

A SeedBatch holds every parameter and buffer of a built circuit once per seed, stacked along a leading
seed axis: W of a dense projection is (S x out x in), a convolution's kernel (S x out x in x k_h x k_w).
torch.func.vmap runs the circuit over that axis, so each product is one batched product (a dense
projection's W y is one bmm, a convolution one batched convolution) and each rule's backward
(circuits.rules.synapse.FeedbackPathway: B^T delta, delta y^T, B's own gradient) runs per seed as written:

    a^(s)_{l+1} = W^(s) y^(s)_l,      delta^(s)_l = B^(s)T delta^(s)_{l+1},      s = 1 .. S

The copies share nothing: the loss is the sum of the seeds' losses, so each W^(s) and B^(s) gets exactly the
gradient of its own run, and mirror phases (circuits.phases.mirror) drive each copy with its own noise.

`nets[s]` is seed s as a CircuitNet of its own, whose parameters and buffers are views of the stacked ones: it
changes as the batch learns, and everything that reads a single net (evaluation, angle(B, W), a Recorder,
circuits.recording.seeds.SeedRecorders) reads it. `generators[s]` is seed s's random stream: built by
SeedBatch.build, it continues the global generator from where seed s's own run would have it after building,
so mirror noise, and with it the whole run, is that of the single-seed run (tests/test_seeds.py compares them in
float64 to 1e-12).

Inputs: a batch with a seed axis, (S x batch x ...), gives each copy its own examples (each seed its own data
order: circuits.phases.seeds.SeedLoader); a batch without one, (batch x ...), is shown to every copy
(evaluation on a common test set). Outputs always have the seed axis first.

A rule that draws at random in a learning step (brsf; ia with a sub_batch), and a circuit with Dropout, would draw
one stream for all seeds: they are refused.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..errors import CircuitError
from ..rules import FeedbackRule
from ..rules.synapse import Synapse
from .network import CircuitNet, unwrap


class SeedOperator:
    """A synapse's operator (forward, backward) over a leading seed axis of y, W and B: torch.func.vmap of it."""

    def __init__(self, operator: Any) -> None:
        self.operator = operator

    def forward(self, y: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return vmap(self.operator.forward, in_dims=(0, 0, None if bias is None else 0))(y, weight, bias)

    def backward(self, delta: Tensor, y: Tensor, feedback: Tensor, mask: tuple[bool, bool, bool]):
        wanted = [i for i, m in enumerate(mask) if m]      # vmap returns tensors only: the outputs asked for
        outputs = vmap(lambda d, x, b: tuple(self.operator.backward(d, x, b, mask)[i] for i in wanted))(
            delta, y, feedback)
        return tuple(outputs[wanted.index(i)] if m else None for i, m in enumerate(mask))

    def __repr__(self) -> str:
        return f"SeedOperator({self.operator})"


class SeedSynapse:
    """One synaptic projection of a SeedBatch: `weight`, `bias` and `B` stacked over seeds (the parameters the
    optimizer steps), `copies[s]` seed s's Synapse (views of them), and what the mirror phases read of a synapse:
    the rule, the operator (over the seed axis), the input shape and the noise statistics (the same per seed)."""

    def __init__(self, copies: Sequence[Synapse], stacked: dict[str, Tensor], generators: Sequence[torch.Generator]):
        first = copies[0]
        self.copies, self.generators = tuple(copies), tuple(generators)
        self.weight, self.bias, self.B = stacked["weight"], stacked.get("bias"), stacked.get("B")
        self.rule, self.in_shape = first.rule, first.in_shape
        self.operator = SeedOperator(first.operator)

    def __getattr__(self, name: str) -> Any:
        """What a weight-mirror projection keeps for its noise (positions, live_fan_in, live_positions): the same
        for every seed, read from seed 0's copy as it is now (it follows the copies to another device)."""
        if name in ("positions", "live_fan_in", "live_positions"):
            return getattr(self.copies[0], name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def feedback(self) -> Tensor | None:
        """B of every seed, stacked, in W's layout (None: no feedback of its own)."""
        if self.rule is None:
            return None
        return torch.stack([c.feedback for c in self.copies])


class SeedBatch(nn.Module):
    """S copies of one built circuit, one per seed, trained as one (module docstring). `net(x)` returns the
    output with a leading seed axis."""

    is_seed_batch = True       # circuits.graph.network.unwrap returns it as it returns a CircuitNet

    def __init__(self, nets: Sequence[CircuitNet], seeds: Sequence[int],
                 generators: Sequence[torch.Generator] | None = None) -> None:
        """`nets`: one built net per seed, the same circuit; `generators`: each seed's random stream (default: a
        generator seeded with the seed). The nets' parameters and buffers become views of the stacked ones."""
        super().__init__()
        nets = [unwrap(n) for n in nets]
        if len(nets) < 1 or len(nets) != len(seeds):
            raise CircuitError(f"SeedBatch needs one net per seed, got {len(nets)} nets for seeds {list(seeds)}")
        _check_alike(nets)
        self.seeds = tuple(int(s) for s in seeds)
        self.generators = (list(generators) if generators is not None
                           else [torch.Generator().manual_seed(s) for s in self.seeds])
        if len(self.generators) != len(nets):
            raise CircuitError(f"SeedBatch needs one generator per seed, got {len(self.generators)} for "
                               f"{len(nets)} seeds")
        self.circuit = nets[0].circuit
        self.nets = tuple(nets)     # not submodules: their parameters and buffers are views of this module's own
        self.stacked = nn.ParameterDict()      # the template's dotted names, '.' as '/'
        for name, p in nets[0].named_parameters():
            self.stacked[_key(name)] = nn.Parameter(torch.stack([n.get_parameter(name).detach() for n in nets]),
                                                    p.requires_grad)
        self._buffer_names = [name for name, _ in nets[0].named_buffers()]
        for name in self._buffer_names:
            self.register_buffer(_key(name), torch.stack([n.get_buffer(name) for n in nets]))
        self._views()
        self._synapses = None

    def _views(self) -> None:
        """Point every copy's parameters and buffers at its slice of the stacked ones."""
        for name, stacked in self.stacked.items():
            name = name.replace("/", ".")
            for s, net in enumerate(self.nets):
                module, attr = _owner(net, name)
                setattr(module, attr, nn.Parameter(stacked.data[s], stacked.requires_grad))
        for name in self._buffer_names:
            stacked = self.get_buffer(_key(name))
            for s, net in enumerate(self.nets):
                module, attr = _owner(net, name)
                module._buffers[attr] = stacked[s]

    def _apply(self, fn: Callable, recurse: bool = True) -> SeedBatch:
        """.to(), .double(), ... move the stacked tensors; the copies' views follow."""
        super()._apply(fn, recurse)
        self._views()
        return self

    def train(self, mode: bool = True) -> SeedBatch:
        """Learning or evaluation mode, for every copy (batch norm, dropout)."""
        super().train(mode)
        for net in self.nets:
            net.train(mode)
        return self

    @classmethod
    def build(cls, make: Callable[[int], CircuitNet], seeds: Sequence[int],
              device: torch.device | str | None = None) -> SeedBatch:
        """make(seed) under torch.manual_seed(seed) for every seed, as a single-seed run builds its net; seed s's
        generator then continues torch's global generator (on `device`, default the CPU) from where make left it,
        so that what the run draws later (mirror noise) is what the single-seed run would draw."""
        nets, generators = [], []
        device = torch.device(device or "cpu")
        for seed in seeds:
            torch.manual_seed(seed)
            nets.append(make(seed))
            state = torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
            generators.append(torch.Generator(device).set_state(state))
        return cls(nets, seeds, generators)

    def __len__(self) -> int:
        return len(self.seeds)

    def forward(self, x: Tensor) -> Any:
        """The circuit on every copy at once: x (S x batch x ...) gives each its own examples, x (batch x ...)
        the same to all; the output has the seed axis first."""
        declared = len(next(iter(self.nets[0].input_shapes.values())))
        if x.dim() == declared + 2:
            if x.shape[0] != len(self):
                raise CircuitError(f"a batch with a seed axis needs one slice per seed ({len(self)}: seeds "
                                   f"{list(self.seeds)}), got shape {tuple(x.shape)}")
            in_dim = 0
        else:
            in_dim = None
        params = {key.replace("/", "."): p for key, p in self.stacked.items()}
        buffers = {name: self.get_buffer(_key(name)) for name in self._buffer_names}
        template = self.nets[0]

        def one(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor) -> Any:
            return functional_call(template, (p, b), (inputs,), strict=True)
        return vmap(one, in_dims=(0, 0, in_dim))(params, buffers, x)

    def losses(self, loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, target: Tensor) -> Tensor:
        """loss_fn per seed, (S,): copy s's output against its own targets (target with the seed axis first)."""
        if target.shape[0] != len(self):
            raise CircuitError(f"the targets need a seed axis first ({len(self)} seeds), got shape "
                               f"{tuple(target.shape)}")
        return torch.stack([loss_fn(o, t) for o, t in zip(out, target, strict=True)])

    def projections(self) -> Iterator[tuple[str, SeedSynapse]]:
        """(name, SeedSynapse) for every synaptic projection, as CircuitNet.projections() gives Synapses."""
        if self._synapses is None:
            names = {id(m): k for k, m in self.nets[0].named_modules()}
            per_seed = [dict(n.projections()) for n in self.nets]
            self._synapses = []
            for name, first in self.nets[0].projections():
                prefix = names[id(first)]
                stacked = {attr: self.stacked[_key(f"{prefix}.{attr}")] for attr in ("weight", "bias", "B")
                           if _key(f"{prefix}.{attr}") in self.stacked}
                self._synapses.append((name, SeedSynapse([p[name] for p in per_seed], stacked, self.generators)))
        yield from self._synapses

    def get_extra_state(self) -> dict[str, Any]:
        """The seeds and their generators' states, kept in state_dict() (a checkpoint resumes each stream)."""
        return {"seeds": list(self.seeds), "generators": [g.get_state() for g in self.generators]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if list(state["seeds"]) != list(self.seeds):
            raise CircuitError(f"this state is of seeds {state['seeds']}, not {list(self.seeds)}")
        for g, s in zip(self.generators, state["generators"], strict=True):
            g.set_state(s)

    def extra_repr(self) -> str:
        return f"seeds={list(self.seeds)}, circuit={self.circuit.name!r}"


def _key(name: str) -> str:
    return name.replace(".", "/")


def _owner(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (net.get_submodule(path) if path else net), attr


def _check_alike(nets: Sequence[CircuitNet]) -> None:
    """One circuit in every copy: the same parameters and buffers, shapes and rules; nothing drawn per forward."""
    first = nets[0]
    shapes = {n: tuple(t.shape) for n, t in [*first.named_parameters(), *first.named_buffers()]}
    for s, net in enumerate(nets[1:], start=1):
        other = {n: tuple(t.shape) for n, t in [*net.named_parameters(), *net.named_buffers()]}
        if other != shapes:
            differ = sorted(set(other.items()) ^ set(shapes.items()))[:3]
            raise CircuitError(f"SeedBatch: copy {s} is not the circuit of copy 0 (parameters and buffers differ: "
                               f"{differ}): build one circuit per seed")
        if [repr(m.rule) for _, m in net.projections()] != [repr(m.rule) for _, m in first.projections()]:
            raise CircuitError(f"SeedBatch: copy {s} has other rules than copy 0: build one circuit per seed")
    for name, module in first.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            raise CircuitError(f"SeedBatch: {name!r} is Dropout, which would draw one stream of masks for every "
                               f"seed; run these seeds one by one")
        rule = getattr(module, "rule", None)
        if isinstance(rule, FeedbackRule) and rule.draws_while_learning:
            raise CircuitError(f"SeedBatch: rule {rule} of {name!r} draws at random in every learning step, which "
                               f"would be one stream for every seed; run these seeds one by one")
