"""Residual circuits: ResNet-18/34/50/101/152 with torchvision's topology and the CIFAR ResNets of
He et al. (2016), e.g. ResNet-20 (0.27M parameters).

A residual block is a population that sums two projections: the block's last batch-normalised
stage and a shortcut (Identity, or a strided 1x1 convolution + batch norm where the shape
changes), and fires relu of the sum. Every convolution is followed by batch norm; the convolution
feeds an identity population, the batch norm a relu population (except the block's last, whose
relu comes after the sum).

Projections carry torchvision's module names (conv1, bn1, maxpool, layer1.0.conv1, ...,
layer2.0.downsample.0, avgpool, fc), so a built net's state_dict matches that of
`circuits.from_torch(torchvision.models.resnet18())`, and `rules_by_layer` uses those names.
Populations carry the same names (the activity after that layer); a block's sum is named after
the block ("layer1.0"); the input is `image`, the flattened features `features`, the logits `output`.

Initialisation follows torchvision: He-normal convolutions (fan_out, relu gain), batch norm
gamma = 1 and beta = 0, torch's default for the dense readout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import circuits
from circuits import rules
from circuits.graph.projections import window_output_size

RESNETS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3)),
}
"""torchvision's depths: block kind and blocks per stage."""

EXPANSION = {"basic": 1, "bottleneck": 4}


class _ChannelPad(nn.Module):
    def __init__(self, stride: int, before: int, after: int) -> None:
        super().__init__()
        self.stride, self.before, self.after = stride, before, after

    def forward(self, y: Tensor) -> Tensor:
        return F.pad(y[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.before, self.after))


@dataclass(frozen=True)
class PaddedShortcut(circuits.Projection):
    """He et al.'s CIFAR shortcut ("option A"), a local operation with no synapses: keep every
    `stride`-th position, y[:, :, ::s, ::s], and pad the new channels with zeros, half before
    and half after the old ones."""

    stride: int = 2

    def output_shape(self, pre: circuits.Population, post: circuits.Population) -> tuple[int, ...]:
        self._require_dims(pre, 3, "input")
        self._require_dims(post, 3, "output")
        if post.shape[0] < pre.shape[0]:
            raise circuits.CircuitError(f"{self}: {post.name!r} has fewer channels than {pre.name!r}; "
                                        f"a padded shortcut only adds channels")
        return (post.shape[0],) + tuple(math.ceil(n / self.stride) for n in pre.shape[1:])

    def _module(self, pre, post, rule) -> nn.Module:
        extra = post.shape[0] - pre.shape[0]
        return _ChannelPad(self.stride, extra // 2, extra - extra // 2)


def _he_normal(shape: tuple[int, ...]) -> dict[str, Tensor]:
    """torchvision's convolution init: N(0, 2 / fan_out), fan_out = out_channels * kh * kw."""
    weight = torch.empty(shape)
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
    return {"weight": weight}


class _ResNetBuilder:
    """Adds convolution + batch-norm units and residual blocks to a circuit."""

    def __init__(self, circuit: circuits.Circuit, layer_rules: circuits.LayerRules) -> None:
        self.c, self.rules = circuit, layer_rules

    def conv_bn(self, pre: circuits.Population, conv: str, bn: str, channels: int, kernel: int,
                stride: int = 1, activation: str = "relu") -> circuits.Population:
        """pre -conv-> population `conv` -bn-> population `bn` firing `activation`."""
        padding = kernel // 2 if kernel > 1 else 0
        _, h, w = pre.shape
        size = tuple(window_output_size(n, kernel, stride, padding) for n in (h, w))
        a = self.c.population(conv, shape=(channels, *size))
        weight = _he_normal((channels, pre.shape[0], kernel, kernel))
        self.c.connect(pre, a, circuits.Conv2d(kernel, stride, padding, bias=False, state=weight),
                       rule=self.rules(conv), name=conv)
        y = self.c.population(bn, shape=a.shape, activation=activation)
        self.c.connect(a, y, circuits.BatchNorm(), name=bn)
        return y

    def block(self, pre: circuits.Population, prefix: str, kind: str, planes: int, stride: int,
              shortcut: str) -> circuits.Population:
        """One residual block: relu(F(pre) + shortcut(pre)), F a basic or bottleneck stack.

        shortcut: "projection" (1x1 conv + batch norm, torchvision's downsample) or "padded"
        (PaddedShortcut) when the shape changes; Identity otherwise.
        """
        out_channels = planes * EXPANSION[kind]
        if kind == "basic":
            y = self.conv_bn(pre, f"{prefix}.conv1", f"{prefix}.bn1", planes, 3, stride)
            y = self.conv_bn(y, f"{prefix}.conv2", f"{prefix}.bn2", planes, 3, activation="identity")
        else:   # torchvision's bottleneck (v1.5): the stride sits on the 3x3 convolution
            y = self.conv_bn(pre, f"{prefix}.conv1", f"{prefix}.bn1", planes, 1)
            y = self.conv_bn(y, f"{prefix}.conv2", f"{prefix}.bn2", planes, 3, stride)
            y = self.conv_bn(y, f"{prefix}.conv3", f"{prefix}.bn3", out_channels, 1, activation="identity")
        total = self.c.population(prefix, shape=y.shape, activation="relu")
        self.c.connect(y, total, circuits.Identity())
        if stride == 1 and pre.shape[0] == out_channels:
            self.c.connect(pre, total, circuits.Identity())
        elif shortcut == "projection":
            down = self.conv_bn(pre, f"{prefix}.downsample.0", f"{prefix}.downsample.1", out_channels, 1, stride,
                                activation="identity")
            self.c.connect(down, total, circuits.Identity())
        else:
            self.c.connect(pre, total, PaddedShortcut(stride))
        return total

    def readout(self, pre: circuits.Population, classes: int) -> None:
        """Global average pooling, flatten, dense projection `fc` onto the logits."""
        pooled = self.c.population("avgpool", shape=(pre.shape[0], 1, 1))
        self.c.connect(pre, pooled, circuits.AdaptiveAvgPool(1), name="avgpool")
        features = self.c.population("features", shape=(pre.shape[0],))
        self.c.connect(pooled, features, circuits.Flatten(), name="flatten")
        output = self.c.population("output", shape=(classes,))
        self.c.connect(features, output, circuits.Dense(), rule=self.rules("fc"), name="fc")


def resnet(depth: int = 18, classes: int = 1000, input_shape: Sequence[int] = (3, 224, 224),
           rule: rules.RuleLike = "bp", rules_by_layer: Mapping[str, rules.RuleLike] | None = None,
           name: str | None = None) -> circuits.Circuit:
    """torchvision's ResNet-`depth` (18, 34, 50, 101 or 152) as a circuit, same parameters and topology.

    Stem: 7x7/2 convolution (64 channels), batch norm, relu, 3x3/2 max pooling; four stages of
    64, 128, 256, 512 planes (stride 1, 2, 2, 2); global average pooling and a dense readout.
    input_shape fixes the populations' sizes (mirror noise is drawn at these sizes).
    """
    if depth not in RESNETS:
        raise circuits.CircuitError(f"no torchvision ResNet-{depth}; depths: {sorted(RESNETS)}")
    kind, blocks = RESNETS[depth]
    layer_rules = circuits.LayerRules(rules_by_layer)
    c = circuits.Circuit(name or f"resnet{depth}", rule=rule)
    wiring = _ResNetBuilder(c, layer_rules)
    y = wiring.conv_bn(c.input("image", shape=tuple(input_shape)), "conv1", "bn1", 64, 7, stride=2)
    _, h, w = y.shape
    pooled = c.population("maxpool", shape=(64, *(window_output_size(n, 3, 2, 1) for n in (h, w))))
    c.connect(y, pooled, circuits.MaxPool(3, 2, 1), name="maxpool")
    y = pooled
    for stage, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True), start=1):
        for b in range(n):
            y = wiring.block(y, f"layer{stage}.{b}", kind, planes, 2 if stage > 1 and b == 0 else 1, "projection")
    wiring.readout(y, classes)
    return layer_rules.finish(c)


def resnet18(**kwargs) -> circuits.Circuit:
    """torchvision's ResNet-18 (11.7M parameters at 1000 classes); keywords as `resnet`."""
    return resnet(18, **kwargs)


def resnet50(**kwargs) -> circuits.Circuit:
    """torchvision's ResNet-50 (25.6M parameters at 1000 classes); keywords as `resnet`."""
    return resnet(50, **kwargs)


def cifar_resnet(depth: int = 20, classes: int = 10, input_shape: Sequence[int] = (3, 32, 32),
                 rule: rules.RuleLike = "bp", rules_by_layer: Mapping[str, rules.RuleLike] | None = None,
                 shortcut: str = "padded", name: str | None = None) -> circuits.Circuit:
    """He et al.'s CIFAR ResNet-`depth`, depth = 6n + 2 (20, 32, 44, 56, 110): a 3x3 convolution
    (16 channels), three stages of n basic blocks with 16, 32, 64 channels (stride 1, 2, 2), global
    average pooling and a dense readout. shortcut "padded" is the paper's parameter-free option A
    (ResNet-20: 269,722 parameters); "projection" uses torchvision's 1x1 convolution + batch norm.
    """
    if depth < 8 or (depth - 2) % 6:
        raise circuits.CircuitError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    if shortcut not in ("padded", "projection"):
        raise circuits.CircuitError(f"shortcut must be 'padded' or 'projection', got {shortcut!r}")
    layer_rules = circuits.LayerRules(rules_by_layer)
    c = circuits.Circuit(name or f"resnet{depth}", rule=rule)
    wiring = _ResNetBuilder(c, layer_rules)
    y = wiring.conv_bn(c.input("image", shape=tuple(input_shape)), "conv1", "bn1", 16, 3)
    for stage, planes in enumerate((16, 32, 64), start=1):
        for b in range((depth - 2) // 6):
            y = wiring.block(y, f"layer{stage}.{b}", "basic", planes, 2 if stage > 1 and b == 0 else 1, shortcut)
    wiring.readout(y, classes)
    return layer_rules.finish(c)


def resnet20(**kwargs) -> circuits.Circuit:
    """He et al.'s CIFAR ResNet-20 (0.27M parameters); keywords as `cifar_resnet`."""
    return cifar_resnet(20, **kwargs)
