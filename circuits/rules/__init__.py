"""Feedback rules: how a feedback projection's B is made, how the error crosses it, and how B learns.

A rule is one small object beside its equation. The same rule serves a layer-local feedback
projection (B in its forward projection W's layout, out x in or a conv kernel, so B == W is
perfect alignment) and, where it needs no W, a direct feedback projection (circuits.graph.feedback:
B of shape (source units x target units), delta_target = phi'(a_target) * (B^T delta_source)).
Every rule shares the forward pass a = W y and the weight update dW = -eta delta_{l+1} y_l^T.

A rule answers, for the projection ("host") it is attached to:
  attach(host)             the state it keeps there: a stored B, a mask, fixed magnitudes
  draw(host)               what it redraws once per training forward (brSF's M), before B is read for it
  feedback(host)           B as the error crosses it now (reading B draws nothing)
  signal(error)            what arrives on the far side of B (imperfections add noise here)
  learns_by_gradient       B is a parameter the optimizer steps, with feedback_gradient(...) as its gradient
  mirrors                  B learns in mirror phases, by mirror_update([B], [correlation]) (circuits.phases.mirror)

`register` adds a user's rule to the short names that circuits, models and command lines accept:

    @circuits.rules.register
    @dataclass(frozen=True)
    class Scaled(circuits.rules.FeedbackRule):
        short_name: ClassVar[str] = "scaled"
        ...

The package holds one module per family, beside its equations: `base` (FeedbackRule, the registry, FromWeight),
`fixed` (bp, fa, dfa, ldfa), `sign_symmetry` (ss, usf, brsf, frsf), `kolen_pollack` (kp), `weight_mirror` (wm),
`local_alignment` (Kunin et al.'s primitives, ia, sa), `imperfect` (noisy, sparse, Dale feedback), and `synapse`,
the one autograd function through B that every rule uses. Importing the package registers every family, in the
order rules are listed.
"""
from .base import RULES, FeedbackHost, FeedbackRule, FromWeight, RuleLike, get, register
from .fixed import Backprop, DirectFeedbackAlignment, FeedbackAlignment, LayerwiseDirectFeedbackAlignment
from .sign_symmetry import (BatchRandomSignSymmetry, FixedRandomSignSymmetry, SignSymmetry, UniformSignSymmetry,
                            sign_symmetry_scale)
from .kolen_pollack import KolenPollack
from .weight_mirror import WeightMirror
from .local_alignment import INPUT_PRIMITIVES, PRIMITIVES, InformationAlignment, LocalAlignment, SymmetricAlignment
from .imperfect import Imperfect

__all__ = ["FeedbackRule", "FromWeight", "FeedbackHost", "RULES", "RuleLike", "register", "get", "sign_symmetry_scale",
           "Backprop", "FeedbackAlignment", "DirectFeedbackAlignment",
           "LayerwiseDirectFeedbackAlignment", "SignSymmetry", "UniformSignSymmetry",
           "BatchRandomSignSymmetry", "FixedRandomSignSymmetry", "KolenPollack", "WeightMirror", "LocalAlignment",
           "InformationAlignment", "SymmetricAlignment", "PRIMITIVES", "INPUT_PRIMITIVES", "Imperfect"]
