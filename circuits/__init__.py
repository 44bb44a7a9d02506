"""mirrorcircuits: circuits of neuron populations that learn without weight transport.

Names load lazily (PEP 562), so that the torch-free parts (circuits.recording: the recording file's
layout and reader; circuits.graph: the circuit graph's schema) import without torch, as analysis does.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Circuit": "circuit", "LayerRules": "circuit", "from_torch": "convert", "DirectFeedback": "feedback",
    "CircuitError": "errors", "CircuitNet": "network", "Trace": "network", "mirror_step": "mirror",
    "Population": "population", "Recorder": "recorder", "RecordingError": "recording",
    "Projection": "projections", "Dense": "projections", "Conv2d": "projections", "BatchNorm": "projections",
    "MaxPool": "projections", "AvgPool": "projections", "AdaptiveAvgPool": "projections", "Flatten": "projections",
    "Identity": "projections", "Dropout": "projections", "LayerNorm": "projections", "GroupNorm": "projections",
    "Operation": "operations", "JunctionInput": "operations", "Schedule": "schedule", "Learn": "schedule",
    "Mirror": "schedule", "Repeat": "schedule", "paper_schedule": "schedule", "Synapse": "synapse",
    "Trainer": "trainer", "TrainerConfig": "trainer", "DivergenceError": "divergence", "in_place": "in_place",
    "InPlaceNet": "in_place",
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
