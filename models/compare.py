"""The main job: one circuit trained under every feedback rule on the embedded MNIST subset, on CPU.

    python -m models.compare                        # BP, FA, DFA, SS, KP, WM x seeds 0 1 2: 300 s of one core
    python -m models.compare --rules bp ia sa       # any registered rule
    python -m models.compare --smoke               # the reduced run CI makes

Every (rule, seed) run starts from the same data split and, per seed, the same forward weights;
only the feedback rule differs. The circuit is the authors' sigmoid MLP, 784-500-10 (or --model
convnet), trained by plain SGD with a cosine learning-rate schedule on 4,000 images (pixels
standardised), tested on 1,000.
The rules' own settings: Kolen-Pollack decay lambda (W and B both decay, so W - B shrinks by
(1 - eta lambda) per step); weight mirror eta_B = lambda_B (so B -> W) with the authors' cadence,
one epoch's worth of mirror batches before any data, then one mirror batch after every learning step.

Written to --out: runs/<rule>-seed<seed>.h5 (circuits.recording.recorder.Recorder: every step's angle(B, W), loss,
probes of the errors against backprop) and .json (the run's result, written as it ends), results.json (strict
JSON: every run's test accuracy and angle(B, W) per projection after every epoch, the statistics across seeds and
the provenance), results.md (per rule, test accuracy after the last epoch and as the mean of the last 3, the paired
difference to BP and each projection's final angle, each as mean ± SD [95% t-interval] over seeds, beside the
authors' numbers; the paper's claims judged on the intervals as holds / fails / undecided; a run that diverged has
a row of its own with its step and last finite numbers; the provenance: commit, versions, hardware, training time,
command), both rewritten after every run, and report/ (`python -m analysis report`
of the first seed's runs: alignment and learning-curve figures). Running it again skips the runs already done
(models.runs: an interrupted job goes on where it stopped, a run stopped mid-way from its last whole epoch); runs
of other rules or seeds with the same settings
in --out join the table; other settings are refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

import circuits
from analysis import report, stats
from analysis.stats import ALIGNED_DEGREES
from circuits import rules
from circuits.graph.seeds import SeedBatch
from circuits.phases.seeds import SeedLoader
from circuits.recording.alignment import angle
from circuits.recording.recorder import Recorder
from circuits.recording.seeds import SeedRecorders

from . import data, provenance
from .cli import NON_NEGATIVE, POSITIVE, POSITIVE_INT, option, parse, within
from .convnet import convnet
from .data import write_whole
from .mlp import mlp
from .runs import (
    RunFolder,
    RunResult,
    across_seeds,
    diverged_rows,
    pending_note,
    shared_settings,
    tail_epochs,
    torch_threads,
    write_json,
)
from .transformer import vit

RULES = ("bp", "fa", "dfa", "ss", "kp", "wm")
MODELS = ("mlp", "convnet")
PAPER_MNIST = {"bp": (98.50, None), "fa": (97.80, "~40"), "kp": (98.45, "19.7 -> 3.6"), "wm": (98.49, "61 -> 3.8")}
"""The authors' MNIST results (full MNIST, 784-500-10 sigmoid MLP, 400 epochs; Akrout et al. 2019 and
makrout/Deep-Learning-without-Weight-Transport): test accuracy (%) and angle(B, W) of the last layer
in degrees. Sign symmetry and DFA were not in that code."""
ACCURACY_POINTS = 1.5
"""The claim checked: WM and KP test accuracy (the mean of the last stats.LAST_EVALUATIONS epochs) within this many
points of BP's, the paired difference's 95% interval wholly inside +-ACCURACY_POINTS."""
MLP_THREADS = 1
"""torch's CPU threads for the MLP by default: its matrix products (batch 64 x 784 x 500) are too small to gain
from more, and on a busy machine each extra thread waits for a core. On a 2-core machine under a load average of
about 9, `--seeds 0 --epochs 2 --no-report` took 45-64 s with one thread and 333 s with two (torch's default)."""
BOOKKEEPING = ("rules", "seeds", "out", "overwrite", "report", "progress")
"""The configuration fields that do not change how a run trains: runs made with the other fields equal share
a folder (models.runs.RunFolder)."""
BATCH_SEEDS_HELP = ("train each rule's seeds together, as one circuit with a seed axis "
                    "(circuits.graph.seeds.SeedBatch): the same runs as one by one up to float rounding; faster on a "
                    "GPU, slower on a CPU (benchmarks/seeds.py)")


@dataclass
class CompareConfig:
    """One comparison: which circuit, rules, seeds, and how each run trains."""

    model: str = option("mlp", "mlp: the authors' 784-500-10 sigmoid MLP", choices=MODELS)
    rules: tuple[str, ...] = option(RULES, "any registered feedback rule (circuits.rules.RULES; your own: --import)",
                                    choices=lambda: list(rules.RULES))
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = option(20, type=POSITIVE_INT)
    batch_size: int = option(64, type=POSITIVE_INT)
    lr: float | None = option(None, "SGD learning rate (default 1.0 for mlp, 0.02 for convnet)", type=POSITIVE)
    kp_decay: float = option(0.005, "Kolen-Pollack lambda", type=NON_NEGATIVE)
    wm_decay: float = option(0.005, "weight mirror lambda_B = eta_B (so B -> W)", type=within(0, 1))
    mirror_batch: int = option(128, "noise samples per mirror batch", type=POSITIVE_INT)
    train_examples: int | None = option(None, cli=False)     # only the first n training images (the smoke run)
    out: str = option("runs/compare", "folder for recordings, results and report")
    overwrite: bool = option(False, "delete the runs and results in --out first (else runs done are kept and "
                                     "skipped, and runs of other settings refused)")
    report: bool = option(True, "the figures of python -m analysis report")
    batch_seeds: bool = option(False, BATCH_SEEDS_HELP)
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"mlp": 1.0, "convnet": 0.02, "vit": 0.05}[self.model]

    def reduce_to_smoke(self) -> None:
        """The reduced run CI makes (--smoke): seed 0, 1 epoch on 256 training images."""
        self.seeds, self.epochs, self.train_examples = self.seeds[:1], 1, 256


class KeepingTrainer(circuits.Trainer):
    """circuits.Trainer keeping each epoch's evaluation as it comes, so that a run that diverges keeps them, and
    calling `keep` after each (models.compare.fit saves its checkpoint there)."""

    def __init__(self, *args: Any, keep: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.evaluations: list[Any] = []       # per epoch: the metrics (seeds batched: a list, one per seed)
        self.keep = keep

    def epoch_done(self, metrics: Any) -> None:
        self.evaluations.append(metrics)
        if self.keep is not None:
            self.keep()


def feedback_rule(short_name: str, config: CompareConfig) -> rules.FeedbackRule:
    """The rule `short_name` with this comparison's settings for KP and WM (eta_B = lambda_B: B -> W)."""
    return rules.get(short_name, {"kp": {"decay": config.kp_decay},
                                  "wm": {"sigma": 1.0, "eta": config.wm_decay, "decay": config.wm_decay}})


def load_data(config: CompareConfig) -> data.DataSplit:
    """The embedded MNIST subset, standardised; flat for the MLP; optionally fewer training images."""
    split = data.mnist_subset(flat=config.model == "mlp", standardize=True)
    if config.train_examples is not None:
        images, labels = split.train.tensors
        split.train = torch.utils.data.TensorDataset(images[:config.train_examples], labels[:config.train_examples])
    return split


def build(config: CompareConfig, rule: rules.FeedbackRule, shape: tuple[int, ...]) -> circuits.CircuitNet:
    """The comparison's circuit under `rule`; "vit" is models.vit's small ViT (examples/vit_rules.py trains it
    with its own optimizer and schedule, so the command line offers only MODELS)."""
    if config.model == "mlp":
        return mlp(sizes=(shape[0], 500, 10), rule=rule).build()
    if config.model == "vit":
        return vit(rule)
    return convnet(input_shape=shape, rule=rule).build()


def angles(net: circuits.CircuitNet) -> dict[str, float | None]:
    """angle(B, W) in degrees of every synaptic projection, B and W flattened; None where the projection
    has no B of its own (its input population gets direct feedback, as under DFA)."""
    return {name: float(angle(s.feedback, s.weight)) if s.rule is not None else None for name, s in net.projections()}


def setup(
    rule_name: str, seed: int, config: CompareConfig, split: data.DataSplit
) -> tuple[circuits.CircuitNet, DataLoader]:
    """The circuit under the rule with the seed's forward weights (the same for every rule), and the
    training data reshuffled every epoch by a generator of its own, seeded with `seed`."""
    return build_net(rule_name, seed, config, split), shuffled(split.train, config.batch_size, seed)


def build_net(rule_name: str, seed: int, config: CompareConfig, split: data.DataSplit) -> circuits.CircuitNet:
    """The circuit under the rule, from torch.manual_seed(seed): the seed's forward weights, whatever the rule
    draws for B (so every rule of a seed starts from the same W)."""
    torch.manual_seed(seed)
    forward = build(config, rules.Backprop(), split.shape).state_dict()
    net = build(config, feedback_rule(rule_name, config), split.shape)
    net.load_state_dict(forward, strict=False)
    return net


def shuffled(dataset: torch.utils.data.Dataset, batch_size: int, seed: int) -> DataLoader:
    """The data reshuffled every epoch by a generator of its own, seeded with `seed`: the seed's data order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def together(seeds: Sequence[int], make_net: Callable[[int], circuits.CircuitNet],
             make_loader: Callable[[int], Any]) -> tuple[torch.nn.Module, Any]:
    """The net and loader of one seed's run; of several seeds a SeedBatch of their nets (each made by
    make_net(seed), which seeds torch itself) and a SeedLoader of their loaders: copy s is seed s's run."""
    if len(seeds) == 1:
        return make_net(seeds[0]), make_loader(seeds[0])
    return SeedBatch.build(make_net, seeds), SeedLoader([make_loader(seed) for seed in seeds])


def train(rule_name: str, seeds: Sequence[int], config: CompareConfig, split: data.DataSplit,
          recordings: Sequence[Path], checkpoint: Path | None = None) -> list[RunResult]:
    """Train the runs of `seeds` together (plain SGD, cosine learning-rate schedule), recorded to `recordings`."""
    net, loader = together(seeds, lambda seed: build_net(rule_name, seed, config, split),
                           lambda seed: shuffled(split.train, config.batch_size, seed))
    optimizer = torch.optim.SGD(net.parameters(), lr=config.learning_rate)
    return fit(rule_name, seeds, net, optimizer, loader, split, config.epochs, recordings,
               mirror_batch=config.mirror_batch,
               lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs),
               extra={"compare": asdict(config)}, checkpoint=checkpoint)


def fit(rule_name: str, seeds: Sequence[int], net: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
        split: data.DataSplit, epochs: int, recordings: Sequence[Path] | None, *, mirror_batch: int = 128,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, extra: dict | None = None,
        checkpoint: Path | None = None) -> list[RunResult]:
    """Train a built `net` (one seed's CircuitNet, or a SeedBatch of `seeds`, with a SeedLoader) for `epochs`
    passes of `loader` under the authors' cadence (circuits.paper_schedule: with weight-mirror projections, one
    epoch's worth of mirror batches of `mirror_batch` noise samples first, then one after every learning step),
    testing on split.test after every epoch; seed s recorded to recordings[s] (probe: the first 256 training
    images, 20 times a run), or nothing recorded if it is None. angle(B, W) is taken before, after the last
    learning step of every epoch, and at the end. Returns one RunResult per seed.

    With `checkpoint`, the state after every whole epoch (trainer, recorders, the loaders' shuffling generators,
    the results so far) is written there, and a checkpoint found there is loaded first: the run goes on from it.

    A run that diverges (circuits.DivergenceError) ends there: its result has the step and its last finite
    numbers (RunResult). Seeds batched, only the seeds whose parameters are not finite get a result; the others
    must train again (models.runs.RunFolder does)."""
    seeded = isinstance(net, SeedBatch)
    copies = list(net.nets) if seeded else [net]
    test_loader = DataLoader(split.test, batch_size=1000)
    steps = epochs * len(loader)
    probe = split.train[:min(256, len(split.train))]
    recorder = None
    if recordings is not None:
        each = [Recorder(path, probe=probe, probe_steps=max(1, steps // 20), loss=loss_fn, seeds={"seed": seed})
                for path, seed in zip(recordings, seeds, strict=True)]
        recorder = SeedRecorders(each) if seeded else each[0]
    shuffling = [d.generator for d in (loader.loaders if seeded else [loader]) if d.generator is not None]
    run = {"initial": [angles(c) for c in copies], "epoch_angles": [], "seconds": 0.0}

    def epoch_end(trainer: circuits.Trainer) -> None:
        if trainer.progress.batch_in_epoch == len(loader):
            run["epoch_angles"].append([angles(c) for c in copies])

    def keep() -> None:
        now = time.perf_counter()
        run["seconds"] += now - clock[0]
        clock[0] = now
        state = {"trainer": trainer.state_dict(), "evaluations": trainer.evaluations, "run": run,
                 "shuffling": [g.get_state() for g in shuffling]}
        write_whole(checkpoint, lambda out: torch.save(state, out))

    trainer = KeepingTrainer(
        net, optimizer, circuits.paper_schedule(net, len(loader), mirror_batch), loss_fn=loss_fn,
        lr_scheduler=lr_scheduler, recorder=recorder, hooks=[epoch_end], keep=keep if checkpoint else None,
        config=circuits.TrainerConfig(progress=False, extra=extra or {}))
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        trainer.load_state_dict(state["trainer"])
        trainer.evaluations, run = state["evaluations"], state["run"]
        if len(state["shuffling"]) != len(shuffling):
            raise ValueError(f"{checkpoint} holds {len(state['shuffling'])} loaders' generator states, this run has "
                             f"{len(shuffling)}: it was written by another version of this job; delete it to train "
                             f"the run again from the start")
        for g, kept in zip(shuffling, state["shuffling"], strict=True):
            g.set_state(kept)
    clock = [time.perf_counter()]     # training time since the run's last checkpoint
    diverged = None
    try:
        trainer.fit(loader, epochs, test_loader)
    except circuits.DivergenceError as e:
        diverged = e.step if e.step is not None else trainer.progress.step
    seconds = run["seconds"] + time.perf_counter() - clock[0]
    results = []
    for s, (seed, copy) in enumerate(zip(seeds, copies, strict=True)):
        history = [100 * (h[s] if seeded else h)["top1"] for h in trainer.evaluations]   # epochs checked finite
        failed = diverged is not None and not all(bool(torch.isfinite(t).all()) for t in copy.state_dict().values()
                                                  if isinstance(t, Tensor) and t.is_floating_point())
        if diverged is not None and seeded and not failed:
            continue        # cut short by another seed: trained again
        epoch_angles = [a[s] for a in run["epoch_angles"]]
        final = (angles(copy) if diverged is None else epoch_angles[len(history) - 1] if history
                 else run["initial"][s])
        results.append(RunResult(rule_name, seed, history[-1] if history else None, run["initial"][s], final,
                                 seconds, None if recordings is None else str(recordings[s]), history,
                                 epoch_angles[:len(history)], diverged if failed or not seeded else None))
    return results


def mean_spread(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for a single value); None if a value is not defined."""
    if None in values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def start_angles(results: Sequence[RunResult]) -> dict[str, dict[str, float | None]]:
    """Per rule: each projection's angle(B, W) before training, the mean over the rule's runs (None where the
    projection has no B of its own)."""
    out = {}
    for rule in dict.fromkeys(r.rule for r in results):
        runs = [r for r in results if r.rule == rule]
        out[rule] = {p: (m[0] if (m := mean_spread([r.initial_angles[p] for r in runs])) else None)
                     for p in runs[0].initial_angles}
    return out


def markdown(summaries: Sequence[stats.SeedSummary], config: CompareConfig, commands: Sequence[str],
             split: data.DataSplit, record: dict, results: Sequence[RunResult] = ()) -> str:
    """The results table (per rule over seeds, of the runs that finished: test accuracy after the last epoch and
    as the mean of the last stats.LAST_EVALUATIONS, the paired difference to BP, each projection's angle(B, W)
    at the start -> the end, each as mean ± SD [95% t-interval]; a row of its own for each run of `results` that
    diverged), the authors' numbers beside, the claims judged on the intervals (holds, fails, undecided) and the
    provenance `record`. `commands`: those that made the runs."""
    finished = [r for r in results if r.diverged_step is None]
    projections = list(results[0].initial_angles) if results else []
    seeds = sorted({r.seed for r in results}) if results else list(config.seeds)
    start, epochs = start_angles(finished), config.epochs
    tail = tail_epochs(epochs)
    lines = [f"Measured with {', '.join(f'`{c}`' for c in commands)} ({config.model}, epochs: {epochs}, "
             f"batch {config.batch_size}, "
             f"SGD lr {config.learning_rate:g} with cosine schedule, KP lambda {config.kp_decay:g}, WM "
             f"eta_B = lambda_B = {config.wm_decay:g} with {config.mirror_batch} noise samples per mirror batch; "
             f"mean ± sample standard deviation [{stats.CONFIDENCE:.0%} t-interval] over seeds "
             f"{', '.join(map(str, seeds))}, the difference to BP paired over the matched seeds (same data order and "
             f"forward weights); embedded MNIST subset, {len(split.train):,} training and {len(split.test):,} test "
             f"images).", "",
             f"| rule | test accuracy (%), epoch {epochs} | test accuracy (%), mean of {tail} | difference to BP "
             f"(points), mean of {tail} | " + " | ".join(f"angle(B, W) {p} (°): start -> end" for p in projections)
             + " | paper: accuracy (%) | paper: angle last layer (°) |",
             "|---|---:|---:|---:|" + "---:|" * len(projections) + "---:|---:|"]
    for s in summaries:
        paper = PAPER_MNIST.get(s.rule, (None, None))
        cells = [f"{start[s.rule][p]:.1f} -> {s.angle(p).cell()}" if p in s.angles else "– (direct feedback)"
                 for p in projections]
        label = s.rule.upper() + (f" (seeds {', '.join(map(str, s.seeds))})" if s.seeds != seeds else "")
        difference = "–" if s.difference is None else s.difference.cell("+.2f")
        lines.append(f"| {label} | {s.accuracy(tail=False).cell()} | {s.accuracy().cell()} | {difference} | "
                     + " | ".join(cells) + f" | {paper[0] if paper[0] is not None else '–'} | {paper[1] or '–'} |")
    lines += diverged_rows(results, projections, 4 + len(projections) + 2, skip=2)
    lines += ["", "Authors' numbers: full MNIST (60,000 images), 400 epochs, their own learning rates per rule "
              "(Akrout et al. 2019; makrout/Deep-Learning-without-Weight-Transport); not the same setting.", ""]
    lines += stats.claim_lines(stats.claims(summaries, ACCURACY_POINTS)) + ["", provenance.describe(record)]
    return "\n".join(lines) + "\n"


def write_results(folder: RunFolder, plan: Sequence[tuple[str, int]], config: CompareConfig, split: data.DataSplit,
                  record: dict) -> tuple[list[stats.SeedSummary], str]:
    """results.json (strict JSON: an undefined interval bound is null) and results.md of every run done in the
    folder (this job's `plan` and earlier ones with the same settings), the runs of `plan` still to come named
    first; returns the statistics across seeds and the table. `record`: the provenance, to which the runs'
    training time is added."""
    results = folder.results()
    summaries = across_seeds([r for r in results if r.diverged_step is None])
    record = {**record, "seconds": sum(r.seconds for r in results)}
    pending = folder.pending(plan)
    write_json(folder.out / "results.json",
               {"config": asdict(config), "command": record["command"], "commands": folder.commands(),
                "provenance": record, "pending": pending, "runs": [asdict(r) for r in results],
                "across_seeds": [asdict(s) for s in summaries],
                "intervals": {s.rule: s.intervals() for s in summaries}})
    table = pending_note(pending, len(plan), record["command"]) + markdown(summaries, config, folder.commands(),
                                                                           split, record, results)
    (folder.out / "results.md").write_text(table)
    return summaries, table


def write_report(recordings: Sequence[str], out: Path, seed: int, progress: bool = True) -> None:
    """`python -m analysis report` of `recordings` (one seed's runs) into out/report, replacing what was there."""
    shutil.rmtree(out / "report", ignore_errors=True)
    report(list(recordings), out / "report", threshold=ALIGNED_DEGREES, progress=progress)
    print(f"report of seed {seed}'s runs: {out / 'report' / 'summary.md'}")


def run(config: CompareConfig, command: str = "python -m models.compare") -> dict[str, stats.SeedSummary]:
    """Every (rule, seed) run not done yet in --out, results.json and results.md after each, then the report;
    returns the statistics across seeds by rule."""
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; models: {', '.join(MODELS)}")
    unknown = [r for r in config.rules if r not in rules.RULES]
    if unknown:
        raise ValueError(f"unknown rules {unknown}; rules: {', '.join(rules.RULES)}")
    folder = RunFolder(Path(config.out), shared_settings(config, BOOKKEEPING), overwrite=config.overwrite)
    split = load_data(config)
    plan = [(r, s) for s in config.seeds for r in config.rules]
    record = provenance.provenance(command, packages=("mlxtend",))
    for _ in folder.train(plan, lambda rule, seeds, paths, checkpoint: train(rule, seeds, config, split, paths,
                                                                              checkpoint),
                          command, config.progress, batched=config.batch_seeds):
        write_results(folder, plan, config, split, record)
    summaries, table = write_results(folder, plan, config, split, record)
    print(table)
    if config.report:
        seed = config.seeds[0]
        write_report([r.recording for r in folder.results() if r.seed == seed], folder.out, seed, config.progress)
    return {s.rule: s for s in summaries}


def main(argv: Sequence[str] | None = None, prog: str = "python -m models.compare") -> int:
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train one circuit under every feedback rule on the embedded MNIST "
                                            "subset; record each run; compare accuracy and angle(B, W).")
    p.add_argument("--smoke", action="store_true", help="a reduced run for CI: seed 0, 1 epoch on 256 training images")
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help=f"torch's CPU threads (None: {MLP_THREADS} for the mlp, torch's default for the convnet)")
    config, args = parse(CompareConfig, argv, p)
    if args.smoke:
        config.reduce_to_smoke()
    command = (f"{prog} " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    threads = args.threads or (MLP_THREADS if config.model == "mlp" else torch.get_num_threads())
    try:
        with torch_threads(threads):
            run(config, command)
    except (OSError, ImportError, ValueError) as e:     # a folder that cannot be written among them
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"python -m models.compare: interrupted; the runs done are kept in {config.out} (results.md tables "
              f"them): run `{command}` again to train the others", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
