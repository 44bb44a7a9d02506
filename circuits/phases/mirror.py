"""The weight mirror: noise-driven phases in which each feedback projection B learns W.

In a mirror phase there is no sensory input. Each synaptic projection's input population fires its
own independent zero-mean noise y_l (variance sigma^2 per unit, the shape the population has when
learning), the projection responds linearly, y_{l+1} = W y_l, and B learns by the Hebbian rule of
the paper's eq. 7 with decay:

    dB = eta_B <y_{l+1} y_l^T> - lambda_B B        (<.> averages over the noise batch)
    E[dB] = eta_B sigma^2 W - lambda_B B    =>    E[B] -> (eta_B sigma^2 / lambda_B) W

For a convolution <y_{l+1} y_l^T> is the weight-gradient correlation of noise and response, one
term per output position and kernel tap; zero padding gives border taps fewer real inputs, so each
tap is divided by its own count of (input, output) pairs (circuits.rules.weight_mirror.attach_statistics) to
stay unbiased.
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

from ..errors import CircuitError
from ..graph.network import unwrap
from ..graph.seeds import SeedSynapse
from ..rules.synapse import ConvOperator, DenseOperator, Synapse


def mirrored(net: nn.Module) -> list[tuple[str, Synapse]]:
    """The projections whose rule learns B in mirror phases (the weight mirror)."""
    return [(name, s) for name, s in unwrap(net).projections() if s.rule is not None and s.rule.mirrors]


def require_mirrored(net: nn.Module, what: str = "a mirror phase") -> list[tuple[str, Synapse]]:
    """mirrored(net), or a CircuitError if there are none: `what` would do nothing."""
    found = mirrored(net)
    if not found:
        raise CircuitError(f"this circuit has no weight-mirror (wm) projection: {what} would do nothing")
    return found


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
    contiguous in both formats (and channels_last noise for it crashes torch's CPU convolution backward).
    Reads only shapes and strides: no tensor op."""
    kernels = [s.weight for _, s in unwrap(net).projections()
               if s.weight.dim() == 4 and math.prod(s.weight.shape[2:]) > 1]
    return any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in kernels)


def noise(synapse: Synapse, batch_size: int, generator: torch.Generator | None = None,
          channels_last: bool = False, like: Tensor | None = None) -> Tensor:
    """The rule's zero-mean noise (variance sigma^2 per unit), shaped like the input population's activity,
    drawn directly in `like`'s dtype and device (default: W's) and, for a 4-D batch with `channels_last`, in that
    memory format (drawn as (batch, H, W, C) and viewed as (batch, C, H, W): no copy)."""
    like = synapse.weight if like is None else like
    if isinstance(synapse, SeedSynapse):       # seeds batched: each seed's noise from its own stream
        return torch.stack([noise(copy, batch_size, g, channels_last, like)
                            for copy, g in zip(synapse.copies, synapse.generators, strict=True)])
    if len(synapse.in_shape) == 3 and channels_last:
        c, h, w = synapse.in_shape
        return synapse.rule.mirror_noise((batch_size, h, w, c), like, generator).permute(0, 3, 1, 2)
    return synapse.rule.mirror_noise((batch_size, *synapse.in_shape), like, generator)


NOISE_ELEMENTS = 1 << 26
"""At most this many noise values (256 MB in float32) at once: a larger mirror batch is drawn in chunks."""


def _hebbian_sum(synapse: Synapse, batch_size: int, generator: torch.Generator | None,
                 channels_last: bool) -> Tensor:
    """sum over the batch of y_{l+1} y_l^T (per kernel tap summed over positions), in the dtype it is computed in.

    y_{l+1} is the rule's mirror_response to its drive W y_l (+ b where the response uses the bias). Under
    autocast W is cast to its dtype; the sums of several chunks are added in float32 at least.
    """
    rule, w = synapse.rule, synapse.weight
    if getattr(rule, "wishart", False) and _wishart_inputs(synapse, batch_size):
        return _wishart_sum(synapse, batch_size, generator)
    bias = synapse.bias if rule.response_uses_bias else None
    if torch.is_autocast_enabled(w.device.type):
        dtype = torch.get_autocast_dtype(w.device.type)
        w, bias = w.to(dtype), bias.to(dtype) if bias is not None else None
    chunk = max(1, NOISE_ELEMENTS // math.prod(synapse.in_shape))
    total = None
    for start in range(0, batch_size, chunk):
        y = noise(synapse, min(chunk, batch_size - start), generator, channels_last, like=w)
        response = rule.mirror_response(synapse.operator.forward(y, w, bias))
        c = synapse.operator.backward(response, y, w, (False, True, False))[1]
        if batch_size > chunk:      # bf16 sums added in float32 at least
            c = c.to(_accumulation_dtype(c.dtype))
            total = c if total is None else total.add_(c)
        else:
            total = c
    return total


def _wishart_inputs(synapse: Synapse, batch_size: int) -> bool:
    """Whether the Wishart draw applies: a dense projection or a 1x1 (or 1-D 1) convolution (groups 1, not
    transposed) whose noise gives at least as many independent input vectors (samples x output positions) as it
    has inputs."""
    if isinstance(synapse, SeedSynapse):
        synapse = synapse.copies[0]
    operator, shape = synapse.operator, synapse.weight.shape
    if isinstance(operator, ConvOperator):
        if any(k != 1 for k in shape[2:]) or operator.groups != 1 or operator.transposed:
            return False
    elif not (isinstance(operator, DenseOperator) and len(synapse.in_shape) == 1):
        return False
    return batch_size * round(synapse.live_positions) >= shape[1]


def _wishart_sum(synapse: Synapse, batch_size: int, generator: torch.Generator | None) -> Tensor:
    """sum_t (W y_t) y_t^T = W S with S = sum_t y_t y_t^T ~ Wishart_n(sigma^2 I, k) drawn directly (Bartlett
    decomposition: S = sigma^2 A A^T, A lower triangular, A_ii = sqrt(chi^2(k - i + 1)), A_ij ~ N(0, 1) for i > j),
    k = batch_size x output positions; in float32 at least, outside autocast. The neurons are not simulated.
    Seeds batched: each seed's S from its own stream."""
    if isinstance(synapse, SeedSynapse):
        return torch.stack([_wishart_sum(copy, batch_size, g)
                            for copy, g in zip(synapse.copies, synapse.generators, strict=True)])
    w = synapse.weight
    dtype, n = _accumulation_dtype(w.dtype), w.shape[1]
    k = batch_size * round(synapse.live_positions)
    with torch.autocast(w.device.type, enabled=False):
        a = torch.randn(n, n, dtype=dtype, device=w.device, generator=generator).tril_(-1)
        dof = torch.arange(k, k - n, -1, dtype=dtype, device=w.device)
        a.diagonal().copy_(torch._standard_gamma(dof / 2, generator=generator).mul_(2).sqrt_())
        second_moment = (a @ a.T).mul_(synapse.rule.sigma ** 2)
        return (w.reshape(w.shape[0], n).to(dtype) @ second_moment).view(w.shape)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision dtype, else the dtype itself (torch.promote_types(dtype, float32),
    without dispatching an op)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _divisor(synapse: Synapse, batch_size: int) -> Tensor:
    """positions.clamp_min(1) * rule.mirror_count(batch_size), in float32 at least: what the batch's summed
    correlation is divided by, per kernel tap. Cached on the synapse per count; made again when `positions` has
    moved to another device or dtype."""
    count, positions = synapse.rule.mirror_count(batch_size), synapse.positions
    dtype = _accumulation_dtype(positions.dtype)
    cache: dict[int, Tensor] = synapse.__dict__.setdefault("_mirror_divisors", {})
    cached = cache.get(count)
    if cached is None or cached.device != positions.device or cached.dtype != dtype:
        cached = cache[count] = positions.clamp_min(1).to(dtype) * count
    return cached


def _normalised(synapses: list[Synapse], sizes: list[int], sums: list[Tensor]) -> list[Tensor]:
    """<y_{l+1} y_l^T> = sum / (positions.clamp_min(1) * mirror_count(batch)) for every synapse in one foreach
    division, in float32 at least (the float32 divisor promotes a bf16 sum), then in B's dtype. `sums` are the
    batch's own (nothing else holds them): a float32 sum is divided in place, without a new tensor."""
    divisors = [_divisor(s, m) for s, m in zip(synapses, sizes, strict=True)]
    if all(t.dtype == d.dtype for t, d in zip(sums, divisors, strict=True)):
        torch._foreach_div_(sums, divisors)     # the sums are this batch's own: divided where they lie
        correlations = sums
    else:
        correlations = torch._foreach_div(sums, divisors)
    return [c if c.dtype == s.B.dtype else c.to(s.B.dtype) for c, s in zip(correlations, synapses, strict=True)]


@torch.no_grad()
def correlation(synapse: Synapse, batch_size: int, generator: torch.Generator | None = None,
                channels_last: bool = False) -> Tensor:
    """<y_{l+1} y_l^T> on one batch of noise y_l, per kernel tap averaged over its real inputs; W's layout.

    y_{l+1} is the rule's mirror_response to its drive W y_l (+ b where the response uses the bias);
    <.> averages over the batch, or sums over it where the rule's reduction is "sum".
    """
    return _normalised([synapse], [batch_size], [_hebbian_sum(synapse, batch_size, generator, channels_last)])[0]


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

    Seeds batched (circuits.graph.seeds.SeedBatch): every copy is driven by its own noise, from its seed's
    generator (`generator` must then be None), and its B learns from its own correlation.
    """
    synapses = [s for _, s in require_mirrored(net)]
    if generator is not None and isinstance(synapses[0], SeedSynapse):
        raise CircuitError("seeds batched draw mirror noise from each seed's own generator (SeedBatch.generators): "
                           "pass no generator")
    sizes = [samples_for_angle(s, angle) if angle is not None else batch_size for s in synapses]
    channels_last = runs_channels_last(net)
    sums = [_hebbian_sum(s, m, generator, channels_last) for s, m in zip(synapses, sizes, strict=True)]
    hebbian = _normalised(synapses, sizes, sums)
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
