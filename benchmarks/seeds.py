"""Seeds batched against seeds one by one: training throughput of the authors' MNIST circuit.

The circuit is the authors' 784-500-10 sigmoid MLP (models.mlp), batch 128, trained by circuits.Trainer under
the authors' cadence for the weight mirror (a mirror batch of 128 noise samples after every learning step), on
random MNIST-shaped data through a shuffling DataLoader per seed, as models.compare feeds it. For S seeds:

  one by one:  S single-seed runs, each its own net, loader and Trainer, one after another;
  batched:     one SeedBatch of the S seeds (circuits.graph.seeds), a SeedLoader of their loaders, one Trainer.

Throughput is training examples per second summed over seeds (S x steps x batch / wall time), after one warm-up
step. The reference row is plain torch: an nn.Sequential of the same shape trained by backprop with autograd, one
seed, the same loader, printed first; every other row is a ratio to it, and each batched row also as a ratio to
the one-by-one row of its S.

    python benchmarks/seeds.py                        # S = 1, 3, 10 on the CPU, one thread
    python benchmarks/seeds.py --seeds 3 --steps 50   # quicker
    python benchmarks/seeds.py --device cuda          # on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import circuits
from circuits import rules
from circuits.graph.seeds import SeedBatch
from circuits.phases.seeds import SeedLoader
from models.mlp import mlp

BATCH = 128
SIZES = (784, 500, 10)


def data(steps: int, device: torch.device) -> TensorDataset:
    """(steps + 1) batches of random MNIST-shaped images and labels (one warm-up batch)."""
    g = torch.Generator().manual_seed(0)
    n = (steps + 1) * BATCH
    return TensorDataset(torch.randn(n, SIZES[0], generator=g).to(device),
                         torch.randint(0, SIZES[-1], (n,), generator=g).to(device))


def loader(dataset: TensorDataset, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))


def make(rule: str, device: torch.device):
    wm = rules.WeightMirror(eta=0.005, decay=0.005)
    return lambda seed: mlp(SIZES, rule=wm if rule == "wm" else rule).build().to(device)


def trained(net: nn.Module, batches, device: torch.device) -> float:
    """Seconds of one pass over `batches` under the authors' cadence, from the end of the first learning step."""
    start = []

    def clock(trainer: circuits.Trainer) -> None:
        if trainer.progress.step == 1:
            _sync(device)
            start.append(time.perf_counter())
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                               circuits.paper_schedule(net, len(batches), BATCH, warmup=0), hooks=[clock],
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit(batches, 1)
    _sync(device)
    return time.perf_counter() - start[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_torch(dataset: TensorDataset, steps: int, device: torch.device) -> float:
    """Examples per second of plain-torch backprop (autograd), one seed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Sigmoid(), nn.Linear(SIZES[1], SIZES[2])).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    start = None
    for i, (x, y) in enumerate(loader(dataset, 0)):
        if i == 1:
            _sync(device)
            start = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def one_by_one(rule: str, seeds: list[int], dataset: TensorDataset, steps: int, device: torch.device) -> float:
    seconds = 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        seconds += trained(make(rule, device)(seed), loader(dataset, seed), device)
    return len(seeds) * steps * BATCH / seconds


def batched(rule: str, seeds: list[int], dataset: TensorDataset, steps: int, device: torch.device) -> float:
    batch = SeedBatch.build(make(rule, device), seeds, device)
    seconds = trained(batch, SeedLoader([loader(dataset, seed) for seed in seeds]), device)
    return len(seeds) * steps * BATCH / seconds


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 10], help="numbers of seeds S")
    p.add_argument("--steps", type=int, default=100, help="timed learning steps per seed")
    p.add_argument("--rules", nargs="+", default=["wm", "bp"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = data(args.steps, device)
    reference = plain_torch(dataset, args.steps, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"784-500-10 sigmoid MLP, batch {BATCH}, {args.steps} steps per seed, {where}; examples/s summed over seeds")
    print(f"{'plain torch backprop, 1 seed':<34} {reference:>9.0f}   1.00x")
    rows = []
    for rule in args.rules:
        for s in args.seeds:
            seeds = list(range(1111, 1111 + s))
            alone, together = (f(rule, seeds, dataset, args.steps, device) for f in (one_by_one, batched))
            rows.append({"rule": rule, "seeds": s, "one_by_one": alone, "batched": together,
                         "speedup": together / alone, "reference": reference})
            print(f"{rule} ({'mirror batch after every step' if rule == 'wm' else 'no mirror'}), S = {s:<3}")
            print(f"  {'one by one':<32} {alone:>9.0f}   {alone / reference:.2f}x")
            print(f"  {'batched':<32} {together:>9.0f}   {together / reference:.2f}x   "
                  f"({together / alone:.2f}x one by one)")
    return rows


if __name__ == "__main__":
    main()
