"""Alignment metrics on the device: the angle between two tensors, and B against W for every synapse.

For flattened tensors u and v:

    angle(u, v) = arccos(<u, v> / (|u| |v|)),  computed as 2 arcsin(|u/|u| - v/|v|| / 2)
                  (exact 0 for u = v, accurate near 0 where arccos of a rounded cosine is not)

Every metric of a list of pairs is computed by a fixed handful of foreach ops (torch._foreach_norm and
friends: one op for all pairs, whatever their number), not by ops per pair.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .synapse import Synapse


@torch.no_grad()
def _pair_norms(pairs: Sequence[tuple[Tensor | None, Tensor | None]], device: torch.device | None = None) -> Tensor:
    """Rows (|u|, |v|, |u |v| - v |u||) in float32, one per pair of tensors (each flattened, u and v of one
    shape); NaN where either is missing. Five foreach ops for all pairs: the norms, u |v|, v |u|, their difference, its norm."""
    present = [i for i, (u, v) in enumerate(pairs) if u is not None and v is not None]
    n = len(present)
    if n == 0:
        return torch.full((len(pairs), 3), float("nan"), device=device)
    us, vs = [pairs[i][0] for i in present], [pairs[i][1] for i in present]
    norms = torch._foreach_norm(us + vs)
    nu, nv = norms[:n], norms[n:]
    difference = torch._foreach_mul(us, nv)
    torch._foreach_sub_(difference, torch._foreach_mul(vs, nu))     # u |v| - v |u| (no fused multiply-add: 0 for u = v)
    rows = torch.stack([*nu, *nv, *torch._foreach_norm(difference)]).float().view(3, n).t()
    if n == len(pairs):
        return rows if device is None else rows.to(device)
    full = torch.full((len(pairs), 3), float("nan"), device=rows.device if device is None else device)
    full[present] = rows.to(full.device)
    return full


def _angles(norms: Tensor) -> Tensor:
    """Rows (|u|, |v|, |u |v| - v |u||) -> rows (angle(u, v) in degrees, |u| / |v|).

    The chord between u/|u| and v/|v| is c = |u |v| - v |u|| / (|u| |v|), and angle = 2 arcsin(c / 2).
    """
    nu, nv, chord = norms.float().unbind(-1)
    return torch.stack([torch.rad2deg(2 * torch.asin((chord / (2 * nu * nv)).clamp(max=1))), nu / nv], dim=-1)


def angle(u: Tensor, v: Tensor) -> Tensor:
    """Angle between two tensors, flattened, in degrees (exactly 0 for equal tensors, NaN for a zero tensor)."""
    return _angles(_pair_norms([(u, v)]))[0, 0]


@torch.no_grad()
def alignment(synapses: Sequence[Synapse]) -> Tensor:
    """Rows (angle(B, W) in degrees, |B| / |W|, fraction of synapses with sign(B) = sign(W)), one per synapse.

    A fixed number of foreach ops for all synapses and one batch of scalar arithmetic: no host synchronisation.
    The sign mismatches are counted as the nonzero entries of sign(B) - sign(W) (counted in float32, or float64
    for float64 weights: exact up to 2^24 entries per projection in float32, within 1e-7 of the fraction beyond).
    """
    if not synapses:
        return torch.empty(0, 3)
    feedback, weights = [s.feedback for s in synapses], [s.weight for s in synapses]
    norms = _pair_norms(list(zip(feedback, weights, strict=True)))
    differences = torch._foreach_sign(feedback)
    torch._foreach_sub_(differences, torch._foreach_sign(weights))
    count = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32   # never narrowing
    mismatched = torch.stack(torch._foreach_norm(differences, 0, dtype=count)).float()
    sizes = torch.tensor([w.numel() for w in weights], dtype=torch.float32, device=mismatched.device)
    return torch.cat([_angles(norms), ((sizes - mismatched) / sizes)[:, None]], dim=1)
