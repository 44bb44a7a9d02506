"""Data for seeds batched (circuits.graph.seeds.SeedBatch): each seed its own data order."""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..errors import CircuitError
from .checks import length


class SeedLoader:
    """Batch b of every seed's loader, stacked along a leading seed axis: inputs (S x batch x ...) and targets
    (S x batch ...). Loader s is seed s's (its own shuffling generator), so each copy sees the data in the order
    its single-seed run would; an epoch is as long as the shortest loader."""

    def __init__(self, loaders: Sequence[Iterable]) -> None:
        if not loaders:
            raise CircuitError("SeedLoader needs one loader per seed, got none")
        for s, loader in enumerate(loaders):
            if isinstance(loader, DataLoader) and loader.generator is None:
                raise CircuitError(f"loader {s} of this SeedLoader has no generator of its own: a DataLoader without "
                                   f"one draws from torch's global generator at every pass, which a seed's run alone "
                                   f"would then share with its mirror noise, and its copy in a SeedBatch would not; "
                                   f"give each loader one (DataLoader(..., generator=torch.Generator()))")
        self.loaders = list(loaders)

    def __len__(self) -> int:
        lengths = [length(loader) for loader in self.loaders]
        if None in lengths:
            raise TypeError("a loader of this SeedLoader has no length")
        return min(lengths)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batches in zip(*self.loaders):
            sizes = {len(batch[0]) for batch in batches}
            if len(sizes) > 1:
                raise CircuitError(f"the seeds' loaders gave batches of sizes {sorted(sizes)} at once: seeds batched "
                                   f"need equal batch sizes (the same data set and batch size for every seed)")
            yield tuple(torch.stack(parts) for parts in zip(*batches, strict=True))
