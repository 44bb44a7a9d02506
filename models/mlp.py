"""The authors' fully connected circuits: sigmoid multilayer perceptrons (784-500-10 for MNIST).

Layer l+1 sums W_{l+1} y_l + b_{l+1} and fires y_{l+1} = sigmoid(a_{l+1}); the output population
fires its summed input (logits for a softmax cross-entropy loss), or with output_activation="sigmoid"
y_L = sigmoid(a_L), the authors' released output (trained with binary cross-entropy summed over the
classes, models.released.summed_bce). Projections are named fc1, fc2, ... in order, the names
`rules_by_layer` uses (circuits.LayerRules, as every builder here).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import circuits
from circuits import rules


def mlp(sizes: Sequence[int] = (784, 500, 10), activation: str = "sigmoid", rule: rules.RuleLike = "bp",
        rules_by_layer: Mapping[str, rules.RuleLike] | None = None, name: str = "mlp",
        output_activation: str = "identity") -> circuits.Circuit:
    """A fully connected circuit: input population `retina` (sizes[0],), hidden populations
    hidden1, hidden2, ... firing `activation`, and an `output` population (sizes[-1],) firing
    `output_activation` (default linear).

    rule: the feedback rule of every projection; rules_by_layer: overrides by projection name
    ("fc1", "fc2", ...). A direct rule ("dfa") sends the output error straight to every hidden
    population instead. The default is the authors' MNIST network, 784-500-10 with sigmoid units.
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2:
        raise circuits.CircuitError(f"mlp needs at least an input and an output size, got sizes={sizes}")
    layer_rules = circuits.LayerRules(rules_by_layer)
    c = circuits.Circuit(name, rule=rule)
    pre = c.input("retina", shape=(sizes[0],))
    for layer, n in enumerate(sizes[1:], start=1):
        last = layer == len(sizes) - 1
        post = c.population(
            "output" if last else f"hidden{layer}", shape=(n,), activation=output_activation if last else activation
        )
        c.connect(pre, post, circuits.Dense(), rule=layer_rules(f"fc{layer}"), name=f"fc{layer}")
        pre = post
    return layer_rules.finish(c)
