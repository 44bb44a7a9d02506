"""mirrorcircuits: circuits of neuron populations that learn without weight transport."""
from . import rules
from .circuit import Circuit
from .convert import from_torch
from .errors import CircuitError
from .network import CircuitNet, Trace
from .population import Population
from .projections import (AdaptiveAvgPool, AvgPool, BatchNorm, Conv2d, Dense, Flatten, Identity,
                          MaxPool, Projection)
from .synapse import Synapse

__all__ = [
    "Circuit", "from_torch", "CircuitNet", "CircuitError", "Population", "Trace", "Synapse", "rules",
    "Projection", "Dense", "Conv2d", "BatchNorm", "MaxPool", "AvgPool", "AdaptiveAvgPool",
    "Flatten", "Identity",
]
