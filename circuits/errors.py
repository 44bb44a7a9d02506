"""The one exception type users see for a circuit that cannot be built or run."""


class CircuitError(ValueError):
    """A circuit, projection, rule or schedule that does not make sense, with the reason."""
