"""Alignment metrics on the device: the angle between two tensors, and B against W for every synapse.

For flattened tensors u and v:

    angle(u, v) = arccos(<u, v> / (|u| |v|)),  computed as 2 arcsin(|u/|u| - v/|v|| / 2)
                  (exact 0 for u = v, accurate near 0 where arccos of a rounded cosine is not)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .synapse import Synapse


def _norms(u: Tensor | None, v: Tensor | None) -> Tensor:
    """(|u|, |v|, |u |v| - v |u||) of two flattened tensors; NaN where either is missing."""
    if u is None or v is None:
        return torch.full((3,), float("nan"))
    u, v = u.detach().flatten(), v.detach().flatten()
    nu, nv = torch.linalg.vector_norm(u), torch.linalg.vector_norm(v)
    return torch.stack([nu, nv, torch.linalg.vector_norm(u * nv - v * nu)])


def _angles(norms: Tensor) -> Tensor:
    """Rows (|u|, |v|, |u |v| - v |u||) -> rows (angle(u, v) in degrees, |u| / |v|).

    The chord between u/|u| and v/|v| is c = |u |v| - v |u|| / (|u| |v|), and angle = 2 arcsin(c / 2).
    """
    nu, nv, chord = norms.float().unbind(-1)
    return torch.stack([torch.rad2deg(2 * torch.asin((chord / (2 * nu * nv)).clamp(max=1))), nu / nv], dim=-1)


def angle(u: Tensor, v: Tensor) -> Tensor:
    """Angle between two tensors, flattened, in degrees (exactly 0 for equal tensors, NaN for a zero tensor)."""
    return _angles(_norms(u, v))[0]


@torch.no_grad()
def alignment(synapses: Sequence[Synapse]) -> Tensor:
    """Rows (angle(B, W) in degrees, |B| / |W|, fraction of synapses with sign(B) = sign(W)), one per synapse.

    A few reductions per synapse and one batch of scalar arithmetic for all: no host synchronisation.
    """
    if not synapses:
        return torch.empty(0, 3)
    norms, signs = [], []
    for s in synapses:
        w, b = s.weight.detach(), s.feedback.detach()
        norms.append(_norms(b, w))
        signs.append(torch.count_nonzero(torch.eq(torch.sign(b), torch.sign(w))) / w.numel())
    return torch.cat([_angles(torch.stack(norms)), torch.stack(signs).float()[:, None]], dim=1)
