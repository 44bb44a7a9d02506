"""A small convolutional circuit for MNIST-sized images.

Each stage i: a_i = W_i * y_{i-1} + b_i (k x k convolution, 'same' zero padding), y_i = phi(a_i),
then 2 x 2 max pooling. After the last stage the pooled maps are flattened and a dense projection
drives the linear `output` population (logits). Projections are named conv1, pool1, conv2, pool2,
..., flatten, fc: the names `rules_by_layer` uses (the synaptic ones are conv1, conv2, ..., fc).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import circuits
from circuits import rules


def convnet(input_shape: Sequence[int] = (1, 28, 28), channels: Sequence[int] = (16, 32), kernel_size: int = 5,
            classes: int = 10, activation: str = "relu", rule: rules.RuleLike = "bp",
            rules_by_layer: Mapping[str, rules.RuleLike] | None = None, name: str = "convnet") -> circuits.Circuit:
    """Input population `retina` of `input_shape` (channels, height, width); one conv + pool stage
    per entry of `channels`; a dense readout onto `output` (classes,).

    kernel_size must be odd ('same' padding keeps the map size before each pooling).
    """
    if kernel_size % 2 != 1:
        raise circuits.CircuitError(f"convnet needs an odd kernel_size for 'same' padding, got {kernel_size}")
    c_in, height, width = (int(n) for n in input_shape)
    layer_rules = circuits.LayerRules(rules_by_layer)
    c = circuits.Circuit(name, rule=rule)
    pre = c.input("retina", shape=(c_in, height, width))
    for i, ch in enumerate(channels, start=1):
        conv = c.population(f"conv{i}", shape=(ch, height, width), activation=activation)
        c.connect(pre, conv, circuits.Conv2d(kernel_size, padding=kernel_size // 2, bias=True),
                  rule=layer_rules(f"conv{i}"), name=f"conv{i}")
        height, width = height // 2, width // 2
        if not (height and width):
            raise circuits.CircuitError(
                f"convnet: input {tuple(input_shape)} is too small for {len(channels)} pooling stages"
            )
        pre = c.population(f"pool{i}", shape=(ch, height, width))
        c.connect(conv, pre, circuits.MaxPool(2), name=f"pool{i}")
    features = c.population("features", shape=(math.prod(pre.shape),))
    c.connect(pre, features, circuits.Flatten(), name="flatten")
    output = c.population("output", shape=(classes,))
    c.connect(features, output, circuits.Dense(), rule=layer_rules("fc"), name="fc")
    return layer_rules.finish(c)
