"""mirrorcircuits: circuits of neuron populations that learn without weight transport.

The package is five subpackages and one module, each a concept of the design, with dependencies one way
(rules <- graph <- convert, phases, recording):

    rules/       feedback rules: how each projection's B is made, crosses the error and learns; the synapse
    graph/       populations, projections, operations, the circuit graph and the built network
    convert/     torch modules into circuits (from_torch, in_place)
    phases/      mirror phases, the phase scheduler, the training loop, divergence
    recording/   alignment metrics, the recorder, and the HDF5 file's layout and reader
    errors.py    CircuitError

Names load lazily (PEP 562), so that the torch-free parts (circuits.recording: the recording file's
layout and reader; circuits.graph.schema: the circuit graph's schema) import without torch, as analysis does.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Circuit": "graph.circuit", "LayerRules": "graph.circuit", "CircuitNet": "graph.network", "Trace": "graph.network",
    "Population": "graph.population", "DirectFeedback": "graph.feedback",
    "Projection": "graph.projections", "Dense": "graph.projections", "Conv2d": "graph.projections",
    "Conv1d": "graph.projections", "ConvTranspose2d": "graph.projections",
    "BatchNorm": "graph.projections", "MaxPool": "graph.projections", "AvgPool": "graph.projections",
    "AdaptiveAvgPool": "graph.projections", "Flatten": "graph.projections", "Identity": "graph.projections",
    "Dropout": "graph.projections", "LayerNorm": "graph.projections", "GroupNorm": "graph.projections",
    "Operation": "graph.operations", "JunctionInput": "graph.operations",
    "Synapse": "rules.synapse",
    "from_torch": "convert.fx", "in_place": "convert.in_place", "InPlaceNet": "convert.in_place",
    "Schedule": "phases.schedule", "Learn": "phases.schedule", "Mirror": "phases.schedule",
    "Repeat": "phases.schedule", "paper_schedule": "phases.schedule", "mirror_step": "phases.mirror",
    "Trainer": "phases.trainer", "TrainerConfig": "phases.trainer", "DivergenceError": "phases.divergence",
    "SeedBatch": "graph.seeds", "SeedLoader": "phases.seeds", "SeedRecorders": "recording.seeds",
    "Recorder": "recording.recorder", "RecordingError": "recording.layout",
    "CircuitError": "errors",
}
__all__ = [*_EXPORTS, "rules"]


def __getattr__(name: str) -> Any:
    if name == "rules":
        return importlib.import_module(".rules", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'circuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
