"""The weight mirror: noise-driven phases in which each feedback projection B learns W.

In a mirror phase there is no sensory input. Each synaptic projection's input population fires its
own independent zero-mean noise y_l (variance sigma^2 per unit, the shape the population has when
learning), the projection responds linearly, y_{l+1} = W y_l, and B learns by the Hebbian rule of
the paper's eq. 7 with decay:

    dB = eta_B <y_{l+1} y_l^T> - lambda_B B        (<.> averages over the noise batch)
    E[dB] = eta_B sigma^2 W - lambda_B B    =>    E[B] -> (eta_B sigma^2 / lambda_B) W

For a convolution <y_{l+1} y_l^T> is the weight-gradient correlation of noise and response, one
term per output position and kernel tap; zero padding gives border taps fewer real inputs, so each
tap is divided by its own count of (input, output) pairs (Synapse.positions) to stay unbiased.
A tap that never meets a real input (a 3x3 kernel on a 1x1 map) carries no signal either way; its
correlation is 0, and its B only decays.

Noise makes B's estimate scatter around its target. With n inputs per output unit (W's row
length), P (input, output) position pairs per weight entry, m noise samples per batch and decay
lambda, B settles at an angle theta to W with (fixed W, independent products)

    tan^2 theta = n lambda / (m P (2 - lambda))

so a conv layer at high resolution (large P) needs few samples and a wide dense layer many.
`samples_for_angle` inverts this to give each projection its own noise batch.

A rule may choose the authors' released variants (circuits.rules.WeightMirror): decay 0 (B
accumulates and never settles: settled_angle and samples_for_angle refuse it), the response
sigmoid(W y_l + b) instead of W y_l, and <.> summed over the noise batch instead of averaged.

Only B changes: W, batch-norm statistics and the optimizer never see a mirror phase.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import CircuitError
from .network import CircuitNet
from .synapse import Synapse


def unwrap(net: nn.Module) -> CircuitNet:
    """The CircuitNet inside DistributedDataParallel and torch.compile wrappers."""
    while not isinstance(net, CircuitNet):
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if inner is None:
            raise CircuitError(f"{type(net).__name__} is not a built circuit (CircuitNet)")
        net = inner
    return net


def mirrored(net: nn.Module) -> list[tuple[str, Synapse]]:
    """The projections whose rule learns B in mirror phases (the weight mirror)."""
    return [(name, s) for name, s in unwrap(net).projections() if s.rule is not None and s.rule.mirrors]


def _spread(synapse: Synapse) -> float:
    """m tan^2 theta = n lambda / (P (2 - lambda)), over the kernel taps that meet real inputs: n counts
    the live inputs of a row, P is the harmonic mean of their positions (an entry's variance goes as 1 / P).
    The formula is for the linear response; without decay B never settles, so there is no such angle."""
    lam = synapse.rule.decay
    if not lam:
        raise CircuitError(f"{synapse.rule!r} has decay 0: B accumulates every mirror batch and its angle to W "
                           f"never settles, so there is no settled angle to aim at; give the mirror phase a "
                           f"batch_size instead of angle=")
    return synapse.live_fan_in * lam / (synapse.live_positions * (2 - lam))


def settled_angle(synapse: Synapse, batch_size: int) -> float:
    """Expected angle(B, W) in degrees once B has settled under a fixed W, with `batch_size` samples."""
    return math.degrees(math.atan(math.sqrt(_spread(synapse) / batch_size)))


def samples_for_angle(synapse: Synapse, angle: float) -> int:
    """Noise samples per mirror batch that let B settle within `angle` degrees of W (at least 1)."""
    return max(1, math.ceil(_spread(synapse) / math.tan(math.radians(angle)) ** 2))


def noise(synapse: Synapse, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """The rule's zero-mean noise (variance sigma^2 per unit), shaped like the input population's activity."""
    w = synapse.weight
    y = synapse.rule.mirror_noise((batch_size, *synapse.in_shape), w, generator)
    if y.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def correlation(synapse: Synapse, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """<y_{l+1} y_l^T> on one batch of noise y_l, per kernel tap averaged over its real inputs; W's layout.

    y_{l+1} = W y_l, or sigmoid(W y_l + b) for the rule's response "sigmoid"; <.> averages over the
    batch, or sums over it for the rule's reduction "sum".
    """
    sigmoid = getattr(synapse.rule, "response", "linear") == "sigmoid"      # a user's mirror rule may lack both
    summed = getattr(synapse.rule, "reduction", "mean") == "sum"
    y = noise(synapse, batch_size, generator)
    w = synapse.weight.detach()
    bias = synapse.bias.detach() if sigmoid and synapse.bias is not None else None
    if torch.is_autocast_enabled(w.device.type):
        dtype = torch.get_autocast_dtype(w.device.type)
        y, w = y.to(dtype), w.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    response = synapse.operator.forward(y, w, bias)
    if sigmoid:
        response = torch.sigmoid(response)
    c = synapse.operator.backward(response, y, w, (False, True, False))[1]
    c = c.to(torch.promote_types(c.dtype, torch.float32))       # bf16 sums divided in float32 at least
    count = synapse.positions.clamp_min(1) * (1 if summed else batch_size)
    return c.div_(count).to(synapse.B.dtype)


@torch.no_grad()
def mirror_step(net: nn.Module, batch_size: int | None = 128, angle: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """One mirror batch: every weight-mirror projection is driven by its own noise, and B learns.

    Each projection gets `batch_size` noise samples, or with `angle` its own samples_for_angle.

    Under torch.distributed each rank draws its own noise and the correlations are averaged with
    one all-reduce before B changes. Sharing a noise seed instead would cost no communication,
    but every rank would compute the same samples, and nondeterministic kernels could still let
    the copies of B drift apart; the all-reduce makes B bit-identical on every rank and turns
    world_size x batch_size noise samples into one update, at the cost of one all-reduce of B's size.
    """
    synapses = [s for _, s in mirrored(net)]
    if not synapses:
        raise CircuitError("this circuit has no weight-mirror projection: a mirror phase would do nothing")
    sizes = [samples_for_angle(s, angle) if angle is not None else batch_size for s in synapses]
    hebbian = [correlation(s, m, generator) for s, m in zip(synapses, sizes)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([c.reshape(-1) for c in hebbian])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        hebbian = [part.view_as(c) for part, c in zip(flat.split([c.numel() for c in hebbian]), hebbian)]
    for s, c in zip(synapses, hebbian, strict=True):
        s.rule.mirror_update(s.B, c)          # B += eta_B <y_{l+1} y_l^T> - lambda_B B
