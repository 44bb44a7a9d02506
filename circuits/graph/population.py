"""Populations: groups of neurons with a shape and an activation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CircuitError
from .activations import activation as _activation
from .schema import ERROR_PREFIX, error_name


@dataclass(frozen=True)
class Population:
    """A forward population of neurons.

    shape: the activity of one example, without the batch dimension, e.g. (500,) or (64, 56, 56).
    activation: the nonlinearity phi applied to the summed synaptic input, as a spec: a name and any settings
        that differ from torch's defaults, e.g. "relu" or "leaky_relu(negative_slope=0.2)" (circuits.graph.activations).
    is_input: an input (sensory) population, driven by data rather than by projections.
    junction: for a junction, the Operation (circuits.graph.operations) that combines its inputs instead of their sum
        (a * b, a @ b, attention); its incoming projections are JunctionInput(position) edges in argument order.
    """

    name: str
    shape: tuple[int, ...]
    activation: str = "identity"
    is_input: bool = False
    junction: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name.startswith(ERROR_PREFIX):
            raise CircuitError(
                f"population name {self.name!r} must be a non-empty string not starting with {ERROR_PREFIX!r}"
            )
        shape = tuple(self.shape)
        if not shape or any(not isinstance(n, int) or n <= 0 for n in shape):
            raise CircuitError(f"population {self.name!r}: shape {self.shape!r} must be a tuple of positive ints")
        object.__setattr__(self, "shape", shape)
        _activation(self.activation)  # fails early on an unknown name or setting

    @property
    def error_name(self) -> str:
        """Name of the partner feedback population that carries this population's error."""
        return error_name(self.name)
