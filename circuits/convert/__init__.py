"""Converting torch modules into circuits.

`fx` (from_torch: the fx walk that turns a module's graph into populations and projections), `nodes` (what each
traced node is, from two runs of the module), `tracing` (what fx cannot trace alone), `layers` (torch layers and
activations as projections), `checks` (what from_torch refuses before running the module, and why) and `in_place`
(the fallback that swaps every synaptic layer for a Synapse inside the module, as BioTorch's converter does).
docs/conversion.md says what converts.
"""
from .fx import from_torch
from .in_place import InPlaceNet, in_place

__all__ = ["from_torch", "in_place", "InPlaceNet"]
