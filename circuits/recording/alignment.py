"""Alignment metrics on the device: the angle between two tensors, and B against W for every synapse.

For flattened tensors u and v:

    angle(u, v) = arccos(<u, v> / (|u| |v|)),  computed as 2 arcsin(|u/|u| - v/|v|| / 2)
                  (exact 0 for u = v, accurate near 0 where arccos of a rounded cosine is not)

Every metric of a list of pairs is computed by a fixed handful of foreach ops per wave of pairs
(torch._foreach_norm and friends: one op for many pairs), not by ops per pair; alignment(..., compiled=True)
instead writes the synapses' metrics pair by pair for torch.compile to fuse (one pass over B and W, float64
sums: the device must have float64, as CUDA devices and CPUs do).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..rules.synapse import Synapse


@torch.no_grad()
def _pair_norms(pairs: Sequence[tuple[Tensor | None, Tensor | None]], device: torch.device | None = None) -> Tensor:
    """Rows (|u|, |v|, |u |v| - v |u||) in float32, one per pair of tensors (each flattened, u and v of one
    shape); NaN where either is missing."""
    present = [i for i, (u, v) in enumerate(pairs) if u is not None and v is not None]
    n = len(present)
    if n == 0:
        return torch.full((len(pairs), 3), float("nan"), device=device)
    nu, nv, chord = _norm_terms([pairs[i][0] for i in present], [pairs[i][1] for i in present])
    rows = torch.stack(nu + nv + chord).float().view(3, n).t()
    if n == len(pairs):
        return rows if device is None else rows.to(device)
    full = torch.full((len(pairs), 3), float("nan"), device=rows.device if device is None else device)
    full[present] = rows.to(full.device)
    return full


def _norm_terms(us: list[Tensor], vs: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Lists of |u|, |v| and |u |v| - v |u|| (scalar tensors), one entry per pair: five foreach ops for all pairs
    (the norms, u |v|, v |u|, their difference, its norm)."""
    n = len(us)
    norms = torch._foreach_norm(us + vs)
    nu, nv = norms[:n], norms[n:]
    difference = torch._foreach_mul(us, nv)
    torch._foreach_sub_(difference, torch._foreach_mul(vs, nu))     # u |v| - v |u| (no fused multiply-add: 0 for u = v)
    return list(nu), list(nv), list(torch._foreach_norm(difference))


def _angles(norms: Tensor) -> Tensor:
    """Rows (|u|, |v|, |u |v| - v |u||) -> rows (angle(u, v) in degrees, |u| / |v|).

    The chord between u/|u| and v/|v| is c = |u |v| - v |u|| / (|u| |v|), and angle = 2 arcsin(c / 2).
    """
    nu, nv, chord = norms.to(torch.promote_types(norms.dtype, torch.float32)).unbind(-1)   # float64 kept
    return torch.stack([torch.rad2deg(2 * torch.asin((chord / (2 * nu * nv)).clamp(max=1))), nu / nv], dim=-1)


@torch.no_grad()
def angle(u: Tensor, v: Tensor) -> Tensor:
    """Angle between two tensors, flattened, in degrees (exactly 0 for equal tensors, NaN for a zero tensor);
    float64 if they are, else float32."""
    return _angles(torch.stack(sum(_norm_terms([u], [v]), [])))[0]


WAVE = 1 << 22
"""Entries of W per wave: alignment() works through consecutive projections in waves of about this many, so
that its temporaries stay small (cache-resident and reused on a CPU) while a wave costs a fixed number of ops."""


@torch.no_grad()
def alignment(synapses: Sequence[Synapse], compiled: bool = False) -> Tensor:
    """Rows (angle(B, W) in degrees, |B| / |W|, fraction of synapses with sign(B) = sign(W)), one per synapse.

    The sign mismatches are counted as sum min(|sign(B) - sign(W)|, 1). No host synchronisation.
    Eager (compiled False): a fixed number of foreach ops per wave of projections (WAVE entries), about a dozen
    passes over B and W, summing in W's dtype (float32 norms of millions of entries drift on a CPU: by 2e-4 of
    |B| / |W| for a million-entry sign-symmetry B; mismatch counts exact up to 2^24 entries).
    compiled True: the same terms written pair by pair (_pair_terms) and compiled by torch.compile into one
    pass over B and W, summing in float64 (compiled once per set of shapes, at the first call).
    """
    if not synapses:
        return torch.empty(0, 3)
    feedback, weights = [s.feedback for s in synapses], [s.weight for s in synapses]
    terms = _compiled_pair_terms()(feedback, weights) if compiled else _foreach_terms(feedback, weights)
    nb, nw, chord, mismatched = terms.float()
    return torch.cat([_angles(torch.stack([nb, nw, chord], dim=1)), (1 - mismatched)[:, None]], dim=1)


def _foreach_terms(feedback: list[Tensor], weights: list[Tensor]) -> Tensor:
    """Rows |B|, |W|, |B |W| - W |B||, sign mismatches / size, one column per pair: foreach ops, wave by wave."""
    count = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32   # never narrowing
    terms: tuple[list[Tensor], ...] = ([], [], [], [])
    for wave in _waves([w.numel() for w in weights]):
        b, w = feedback[wave], weights[wave]
        for kept, new in zip(terms[:3], _norm_terms(b, w), strict=True):
            kept += new
        differences = torch._foreach_sign(b)
        torch._foreach_sub_(differences, torch._foreach_sign(w))
        torch._foreach_abs_(differences)
        torch._foreach_clamp_max_(differences, 1)
        terms[3].extend(torch._foreach_norm(differences, 1, dtype=count))
    terms[3][:] = torch._foreach_div(terms[3], [float(w.numel()) for w in weights])   # sizes as scalars: no copy
    return torch.stack(sum(terms, [])).view(4, -1)


def _pair_terms(feedback: list[Tensor], weights: list[Tensor]) -> Tensor:
    """The rows of _foreach_terms in float64, pair by pair, in the form torch.compile fuses into one pass over B
    and W: the sums |B|^2, |W|^2 and |B - W|^2 (products of float32 entries are exact in float64) and the sign
    mismatches (an entry's sign, 0 included, differs). The chord comes from them without cancelling near 0:

        |B |W| - W |B||^2 = |B| |W| (|B - W|^2 - (|B| - |W|)^2)

    (|B - W|^2 = |B|^2 + |W|^2 - 2 <B, W>), exactly 0 for B = W. On a million float32 entries it is within 1e-7
    degrees of a float64 reference while |B| / |W| is within 0.5 to 2 (where KP's and WM's B settle), within about
    1e-5 degrees at |B| / |W| = 10 (small angles there cancel against (|B| - |W|)^2)."""
    columns = []
    for b, w in zip(feedback, weights, strict=True):
        mismatched = (((b > 0) != (w > 0)) | ((b < 0) != (w < 0))).sum(dtype=torch.float64) / b.numel()
        b, w = b.double(), w.double()
        nb, nw = torch.linalg.vector_norm(b), torch.linalg.vector_norm(w)
        distance2 = (b - w).square().sum()
        chord = ((distance2 - (nb - nw).square()).clamp(min=0) * nb * nw).sqrt()
        columns.append(torch.stack([nb, nw, chord, mismatched]))
    return torch.stack(columns, dim=1)


@functools.cache
def _compiled_pair_terms() -> Callable[[list[Tensor], list[Tensor]], Tensor]:
    return torch.compile(_pair_terms, fullgraph=True, dynamic=False)


def _waves(sizes: Sequence[int]) -> list[slice]:
    """Consecutive runs of projections with at most WAVE entries in all (a larger projection alone)."""
    waves, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if total and total + size > WAVE:
            waves.append(slice(start, i))
            start, total = i, 0
        total += size
    return waves + [slice(start, len(sizes))]
