"""Transformers: a small vision transformer for 28x28 images and a small character language model.

Plain torch modules, fx-traceable (no data-dependent Python control flow), and their circuit builders:

    net = models.vit(rule="wm")                  # ViT on (1, 28, 28) images, 10 classes
    net = models.transformer_lm(rule="kp", vocab=96, context=64)

A block is pre-LN, as in ViT (Dosovitskiy et al. 2021) and nanoGPT:

    x <- x + W_o attention(LN(x) W_qkv),    attention = softmax(q k^T / sqrt(d_head) [+ causal mask]) v
    x <- x + W_2 gelu(W_1 LN(x))

Synaptic projections (W with a feedback B under the rule): the patch embedding, W_qkv, W_o, W_1, W_2 and the
readout (and the token embedding, which needs no feedback: no error crosses an index input). Layer norm,
the attention products of activities q k^T and (softmax) v, and the residual sums are local: the error
crosses them by their own derivative under every rule (no weight is transported there).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import circuits
from circuits import rules


class Attention(nn.Module):
    """Multi-head self-attention: q, k, v = split(W_qkv x), heads attend (causally if asked), W_o mixes them."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(0, 2, 3, 1, 4)   # batch x 3 x heads x n x d
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)          # batch x heads x n x d
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """A pre-LN transformer block: attention, then a GELU MLP, each added to its input."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, causal: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A vision transformer: patches embedded by a strided convolution (one Dense per patch, shared),
    learned position embeddings, `depth` pre-LN blocks, layer norm, mean pooling over patches, a readout."""

    def __init__(self, image_size: int = 28, patch_size: int = 7, channels: int = 1, classes: int = 10,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.input_shape = (channels, image_size, image_size)
        self.patch = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.randn((image_size // patch_size) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2) + self.position      # batch x patches x dim
        return self.head(self.norm(self.blocks(x)).mean(1))


class CharTransformer(nn.Module):
    """A decoder-only character language model (nanoGPT-style): token and position embeddings, `depth`
    causal pre-LN blocks, layer norm, a readout to next-character logits (batch x length x vocab)."""

    def __init__(self, vocab: int, context: int = 64, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_dim: int = 256) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.token(idx) + self.position[: idx.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def lm_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Next-character cross-entropy, averaged over every position: logits (batch x length x vocab),
    target (batch x length) the characters that follow."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _convert(module: nn.Module, example: Tensor, rule: rules.RuleLike,
             rules_by_layer: Mapping[str, rules.RuleLike] | None) -> circuits.CircuitNet:
    return circuits.from_torch(module, rule, tuple(example.shape[1:]), rules_by_layer).build()


def vit(rule: rules.RuleLike = "bp", rules_by_layer: Mapping[str, rules.RuleLike] | None = None,
        **sizes: int) -> circuits.CircuitNet:
    """ViT(**sizes) as a circuit net under `rule` (per layer: rules_by_layer, by qualified name)."""
    module = ViT(**sizes)
    return _convert(module, torch.zeros(2, *module.input_shape), rule, rules_by_layer)


def transformer_lm(rule: rules.RuleLike = "bp", rules_by_layer: Mapping[str, rules.RuleLike] | None = None,
                   vocab: int = 96, **sizes: int) -> circuits.CircuitNet:
    """CharTransformer(vocab, **sizes) as a circuit net under `rule`; it takes (batch x context) indices."""
    module = CharTransformer(vocab, **sizes)
    return _convert(module, torch.zeros(2, module.context, dtype=torch.long), rule, rules_by_layer)
