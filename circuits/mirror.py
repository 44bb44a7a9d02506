"""The weight mirror: noise-driven phases in which each feedback projection B learns W.

In a mirror phase there is no sensory input. Each synaptic projection's input population fires its
own independent zero-mean noise y_l (variance sigma^2 per unit, the shape the population has when
learning), the projection responds linearly, y_{l+1} = W y_l, and B learns by the Hebbian rule of
the paper's eq. 7 with decay:

    dB = eta_B <y_{l+1} y_l^T> - lambda_B B        (<.> averages over the noise batch)
    E[dB] = eta_B sigma^2 W - lambda_B B    =>    E[B] -> (eta_B sigma^2 / lambda_B) W

For a convolution <y_{l+1} y_l^T> is the weight-gradient correlation of noise and response, one
term per output position and kernel tap; zero padding gives border taps fewer real inputs, so each
tap is divided by its own count of (input, output) pairs (attach_statistics) to stay unbiased.
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
from .network import unwrap
from .synapse import Synapse


def mirrored(net: nn.Module) -> list[tuple[str, Synapse]]:
    """The projections whose rule learns B in mirror phases (the weight mirror)."""
    return [(name, s) for name, s in unwrap(net).projections() if s.rule is not None and s.rule.mirrors]


def require_mirrored(net: nn.Module, what: str = "a mirror phase") -> list[tuple[str, Synapse]]:
    """mirrored(net), or a CircuitError if there are none: `what` would do nothing."""
    found = mirrored(net)
    if not found:
        raise CircuitError(f"this circuit has no weight-mirror (wm) projection: {what} would do nothing")
    return found


def attach_statistics(synapse: Synapse) -> None:
    """What a weight-mirror projection's mirror phases need, kept on it (weight-mirror rules call this
    when they attach): `positions`, per kernel tap the (input, output) position pairs a weight entry
    connects (1 for dense), and as host numbers `live_fan_in`, the inputs of a row at taps that meet real
    inputs, and `live_positions`, the harmonic mean of those taps' positions."""
    positions = synapse.operator.positions(synapse.in_shape, tuple(synapse.weight.shape))
    synapse.register_buffer("positions", positions.to(synapse.weight.device), persistent=False)
    live = positions[positions > 0].double()    # taps that meet real inputs (all, unless a map is tiny)
    synapse.live_fan_in = math.prod(synapse.weight.shape[1:]) * live.numel() / positions.numel()
    synapse.live_positions = float(live.numel() / live.reciprocal().sum())


def _samples_times_tan2(synapse: Synapse) -> float:
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
    return math.degrees(math.atan(math.sqrt(_samples_times_tan2(synapse) / batch_size)))


def samples_for_angle(synapse: Synapse, angle: float) -> int:
    """Noise samples per mirror batch that let B settle within `angle` degrees of W (at least 1)."""
    return max(1, math.ceil(_samples_times_tan2(synapse) / math.tan(math.radians(angle)) ** 2))


def runs_channels_last(net: nn.Module) -> bool:
    """Whether the net's conv weights are channels_last. Only a kernel wider than 1x1 can tell: a 1x1 kernel is
    contiguous in both formats (and channels_last noise for it crashes torch's CPU convolution backward)."""
    kernels = [s.weight for _, s in unwrap(net).projections() if s.weight.dim() == 4 and s.weight[0, 0].numel() > 1]
    return any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kernels)


def noise(synapse: Synapse, batch_size: int, generator: torch.Generator | None = None,
          channels_last: bool = False, like: Tensor | None = None) -> Tensor:
    """The rule's zero-mean noise (variance sigma^2 per unit), shaped like the input population's activity,
    drawn directly in `like`'s dtype and device (default: W's)."""
    y = synapse.rule.mirror_noise((batch_size, *synapse.in_shape), synapse.weight if like is None else like, generator)
    if y.dim() == 4 and channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y


NOISE_ELEMENTS = 1 << 26
"""At most this many noise values (256 MB in float32) at once: a larger mirror batch is drawn in chunks."""


def correlation(synapse: Synapse, batch_size: int, generator: torch.Generator | None = None,
                channels_last: bool = False) -> Tensor:
    """<y_{l+1} y_l^T> on one batch of noise y_l, per kernel tap averaged over its real inputs; W's layout.

    y_{l+1} is the rule's mirror_response to its drive W y_l (+ b where the response uses the bias);
    <.> averages over the batch, or sums over it where the rule's reduction is "sum".
    """
    rule = synapse.rule
    w = synapse.weight.detach()
    bias = synapse.bias.detach() if rule.response_uses_bias and synapse.bias is not None else None
    if torch.is_autocast_enabled(w.device.type):
        dtype = torch.get_autocast_dtype(w.device.type)
        w, bias = w.to(dtype), bias.to(dtype) if bias is not None else None
    chunk = max(1, NOISE_ELEMENTS // math.prod(synapse.in_shape))
    total = None
    for start in range(0, batch_size, chunk):
        y = noise(synapse, min(chunk, batch_size - start), generator, channels_last, like=w)
        response = rule.mirror_response(synapse.operator.forward(y, w, bias))
        c = synapse.operator.backward(response, y, w, (False, True, False))[1]
        c = c.to(torch.promote_types(c.dtype, torch.float32))       # bf16 sums added and divided in float32 at least
        total = c if total is None else total.add_(c)
    return total.div_(synapse.positions.clamp_min(1) * rule.mirror_count(batch_size)).to(synapse.B.dtype)


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
    synapses = [s for _, s in require_mirrored(net)]
    sizes = [samples_for_angle(s, angle) if angle is not None else batch_size for s in synapses]
    channels_last = runs_channels_last(net)
    hebbian = [correlation(s, m, generator, channels_last) for s, m in zip(synapses, sizes, strict=True)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([c.reshape(-1) for c in hebbian])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        hebbian = [part.view_as(c) for part, c in zip(flat.split([c.numel() for c in hebbian]), hebbian, strict=True)]
    by_rule: dict = {}         # projections of one rule update together: B += eta_B <y_{l+1} y_l^T> - lambda_B B
    for s, c in zip(synapses, hebbian, strict=True):
        group = by_rule.setdefault(s.rule, ([], []))
        group[0].append(s.B)
        group[1].append(c)
    for rule, (feedback, correlations) in by_rule.items():
        rule.mirror_update(feedback, correlations)
