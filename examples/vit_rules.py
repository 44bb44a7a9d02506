"""A vision transformer learning without weight transport: the small ViT under BP, FA, KP and WM on MNIST.

    python examples/vit_rules.py                          # 4 rules x seed 0, 10 epochs: under 2 minutes (below)
    python examples/vit_rules.py --seeds 0 1 2
    python examples/vit_rules.py --smoke                  # 256 training images, 1 epoch: CI

On a CPU shared with other work, run it with OMP_NUM_THREADS=1: OpenMP threads spinning on busy cores slow
these small steps about tenfold (5 epochs: 49 s with one thread, 13 minutes with two, on 2 cores shared by 4 jobs;
the default 10 epochs: 102 s with one thread on 2 cores shared with other work).

models.vit (28x28 images in 7x7 patches, 2 pre-LN blocks of width 64, 4 heads) on the embedded MNIST subset
(4,000 training and 1,000 test images, standardised). Every run is set up and trained as models.compare does
(compare.setup, compare.fit): per seed the same forward weights and data order under every rule, the weight
mirror on the authors' cadence (one epoch's worth of mirror batches before any data, then one after every
learning step); here with SGD momentum 0.9 and a cosine learning-rate schedule. Printed: each rule's test
accuracy and each projection's angle(B, W) at the start and the end (mean ± SD [95% t-interval] over seeds), and
the paper's claims judged on the intervals (holds, fails, undecided: one seed decides nothing).
The ViT is circuits.from_torch's conversion of models.transformer.ViT; the runs are not recorded (to record
one, give compare.fit a recording path, as models.compare does).
"""
import argparse
import sys
from dataclasses import dataclass

import torch

from analysis import stats
from circuits import rules
from models import compare
from models.cli import NON_NEGATIVE, POSITIVE, POSITIVE_INT, option, parse
from models.compare import CompareConfig
from models.runs import across_seeds


@dataclass
class ViTConfig(CompareConfig):
    """models.compare's settings with the ViT's defaults; its runs are not recorded (no --out)."""

    model: str = option("vit", cli=False)
    rules: tuple[str, ...] = option(("bp", "fa", "kp", "wm"), choices=lambda: list(rules.RULES))
    seeds: tuple[int, ...] = (0,)
    epochs: int = option(10, type=POSITIVE_INT)
    lr: float | None = option(None, "SGD learning rate (default 0.05; momentum 0.9, cosine schedule)", type=POSITIVE)
    kp_decay: float = option(0.02, "Kolen-Pollack lambda: with momentum 0.9, W - B shrinks by about 10 lr lambda "
                                   "per step", type=NON_NEGATIVE)
    wm_decay: float = option(0.05, "weight mirror lambda_B = eta_B (B -> W)", type=NON_NEGATIVE)
    out: str = option("runs/compare", cli=False)
    overwrite: bool = option(False, cli=False)
    report: bool = option(False, cli=False)
    progress: bool = False


def table(summaries: list[stats.SeedSummary], start: dict[str, dict[str, float | None]]) -> str:
    """Test accuracy per rule (last epoch), then one row per projection: angle(B, W) at the start (mean over
    seeds) -> the end, each end as mean ± SD [95% t-interval] over seeds."""
    lines = ["| | " + " | ".join(s.rule.upper() for s in summaries) + " |", "|---|" + "---:|" * len(summaries),
             "| test accuracy (%) | " + " | ".join(s.accuracy(tail=False).cell() for s in summaries) + " |"]
    for p in start[summaries[0].rule]:
        cells = [f"{start[s.rule][p]:.1f} -> {s.angle(p).cell('.1f')}" if p in s.angles else "–" for s in summaries]
        lines.append(f"| angle(B, W) {p} (°) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, stats.SeedSummary]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 epoch on 256 training images, seed 0")
    config, args = parse(ViTConfig, argv, p)
    if args.smoke:
        config.reduce_to_smoke()
    split = compare.load_data(config)

    def train_one(rule: str, seed: int) -> compare.RunResult:
        net, loader = compare.setup(rule, seed, config, split)
        optimizer = torch.optim.SGD(net.parameters(), lr=config.learning_rate, momentum=0.9)
        result, = compare.fit(rule, (seed,), net, optimizer, loader, split, config.epochs, None,
                              mirror_batch=config.mirror_batch,
                              lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs))
        print(f"{rule:>2} seed {seed}: {result.describe()}")
        return result

    results = [train_one(rule, seed) for seed in config.seeds for rule in config.rules]
    finished = [r for r in results if r.diverged_step is None]
    summaries = across_seeds(finished)
    command = "python examples/vit_rules.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{command.strip()}: ViT on the MNIST subset ({len(split.train):,} training, {len(split.test):,} test "
          f"images), {config.epochs} epochs, batch {config.batch_size}, SGD lr {config.learning_rate:g} momentum 0.9, "
          f"cosine; "
          f"KP lambda {config.kp_decay:g}, WM eta_B = lambda_B = {config.wm_decay:g}, {config.mirror_batch} noise "
          f"samples per mirror batch; seeds {', '.join(map(str, config.seeds))}\n")
    print(table(summaries, compare.start_angles(finished)))
    print("\n" + "\n".join(stats.claim_lines(stats.claims(summaries, compare.ACCURACY_POINTS))))
    return {s.rule: s for s in summaries}


if __name__ == "__main__":
    main()
