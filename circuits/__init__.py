"""mirrorcircuits: circuits of neuron populations that learn without weight transport."""
from . import rules
from .circuit import Circuit, LayerRules
from .convert import from_torch
from .feedback import DirectFeedback
from .errors import CircuitError
from .network import CircuitNet, Trace
from .mirror import mirror_step
from .population import Population
from .recorder import Recorder, RecordingError
from .projections import (AdaptiveAvgPool, AvgPool, BatchNorm, Conv2d, Dense, Flatten, Identity,
                          MaxPool, Projection)
from .schedule import Learn, Mirror, Repeat, Schedule, paper_schedule
from .synapse import Synapse
from .trainer import DivergenceError, Trainer, TrainerConfig

__all__ = [
    "Circuit", "LayerRules", "DirectFeedback", "from_torch", "CircuitNet", "CircuitError", "Population", "Trace", "Synapse", "rules",
    "Projection", "Dense", "Conv2d", "BatchNorm", "MaxPool", "AvgPool", "AdaptiveAvgPool",
    "Flatten", "Identity", "Schedule", "Learn", "Mirror", "Repeat", "paper_schedule", "mirror_step",
    "Trainer", "TrainerConfig", "DivergenceError", "Recorder", "RecordingError",
]
