"""Training throughput of circuits against plain torch backprop, on torchvision's ResNets and ViTs.

Variants: "torch" is the torchvision net trained by plain autograd; every other row is the same net
(same initial weights) converted by circuits.from_torch under one feedback rule, whose backward pass
sends the error through B instead of W^T (circuits.rules.synapse.FeedbackPathway). One training step is

    forward under autocast -> cross-entropy on synthetic labels -> backward -> SGD(momentum 0.9) step

over net.parameters() for every variant (under KP that includes B), on one fixed synthetic batch in
channels_last. "wm+mirror" adds one weight-mirror batch (circuits.mirror_step, paper eq. 7: noise
drives every WM projection and B learns) after every learning step, under the same autocast;
"wm+mirror-beside" runs that batch beside the next step's forward pass (circuits.phases.mirror_stream: a side
stream on CUDA; on a CPU the same work in the same order). "ia-sub" is IA whose primitives read a sampled
quarter of each batch (InformationAlignment.sub_batch; --ia-sub-batch sets how many examples).

Steps per second are timed with time.perf_counter around a block of steps (torch.cuda.synchronize
on GPU), in rounds that interleave the variants so that drift of the machine hits all of them
alike. In each round a variant's ratio is its rate over plain torch's rate in the same round and mode
(eager or torch.compile); a variant's ratio is the median of these paired per-round ratios, printed
with their lowest and highest, and its steps/s the median of its rounds. Each mode's table is
printed as soon as that mode is measured, and with --json every round is written out as it ends, so
a run cut short keeps what it measured. Compiled variants are warmed up one by one after one
torch._dynamo.reset(), with room for each variant's own graphs. Graph breaks that torch.compile meets
while warming up are listed under the table. Needs the project installed (pip install -e .), or the
repository root on PYTHONPATH.

    python benchmarks/throughput.py --arch resnet50 --batch-size 128 --image-size 224   # GPU
    python benchmarks/throughput.py --smoke                                              # CPU, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from tqdm import tqdm

import circuits
import models
from circuits import rules
from circuits.phases.mirror_stream import MirrorStream

BASELINE = "torch"
MIRROR_VARIANT = "wm+mirror"
BESIDE_VARIANT = "wm+mirror-beside"
MIRROR_VARIANTS = (MIRROR_VARIANT, BESIDE_VARIANT)
IA_SUB_VARIANT = "ia-sub"
"""IA whose primitives read a sampled sub-batch (InformationAlignment.sub_batch: --ia-sub-batch, default a quarter)."""
ARCHS = ("resnet18", "resnet50", "vit_b_16", "vit_small")
CLASSES = 1000
LEARNING_RATE = 0.01
MOMENTUM = 0.9

SMOKE = dict(arch="resnet18", batch_size=2, image_size=32, steps=2, warmup=1, rounds=1, device="cpu", modes=["eager"])
"""--smoke: tiny sizes on CPU, eager only; flags given explicitly still win."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: plain torch (rule None) or a circuit under `rule`, optionally with mirror batches."""

    name: str
    rule: str | rules.FeedbackRule | None = None
    mirror: bool = False
    beside: bool = False     # the mirror batch runs beside the next forward (circuits.phases.mirror_stream)


def variants(names: Sequence[str], ia_sub_batch: int = 1) -> list[Variant]:
    """The plain torch baseline, then one variant per requested rule name (or a MIRROR_VARIANTS name, or
    IA_SUB_VARIANT: IA on `ia_sub_batch` examples of each batch)."""
    rows = [Variant(BASELINE)]
    for name in names:
        mirror = name in MIRROR_VARIANTS
        if name == IA_SUB_VARIANT:
            rule = rules.InformationAlignment(sub_batch=ia_sub_batch)
        else:
            rule = "wm" if mirror else rules.get(name).short_name
        rows.append(Variant(name, rule, mirror, name == BESIDE_VARIANT))
    return rows


def precision(device: torch.device, requested: str) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None, description): bf16 autocast if requested and it runs a conv here, else float32."""
    if requested == "fp32":
        return None, "float32"
    try:
        conv = nn.Conv2d(3, 4, 3).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = conv(torch.randn(2, 3, 8, 8, device=device))
        out.float().sum().backward()
    except RuntimeError as e:
        return None, f"float32 (bf16 autocast does not run on {device.type}: {e})"
    return torch.bfloat16, "bf16 autocast"


def architecture(name: str, image_size: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The net `name` with CLASSES outputs, and one input's shape: torchvision's nets, and vit_small, models.ViT
    (7 x 7 patches, 2 blocks of width 64; CPU-sized at --image-size 28)."""
    if name == "vit_small":
        model = models.ViT(image_size=image_size, classes=CLASSES)
        return model, model.input_shape
    size = {"image_size": image_size} if name.startswith("vit") else {}
    return getattr(torchvision.models, name)(num_classes=CLASSES, **size), (3, image_size, image_size)


def build(variant: Variant, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The torchvision net itself (a copy) or its circuit under the variant's rule, with the same weights."""
    if variant.rule is None:
        return copy.deepcopy(model)
    return circuits.from_torch(model, rule=variant.rule, input_shape=input_shape).build()


class Trainee:
    """A net, its optimizer and its training step; `model` is the net or its torch.compile wrapper.

    mirror: the mirror phase whose one batch follows every learning step (None: no mirror); with `beside`,
    that batch runs beside the next step's forward pass (as circuits.Trainer does with mirror_beside_learning).
    """

    def __init__(self, net: nn.Module, compile: bool, dtype: torch.dtype | None,
                 mirror: circuits.Mirror | None = None, beside: bool = False) -> None:
        self.net = net
        self.model = torch.compile(net) if compile else net
        self.optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        self.dtype = dtype
        self.mirror = mirror
        self.mirrors = MirrorStream(next(net.parameters()).device, beside)

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self, x: Tensor, target: Tensor) -> Tensor:
        with self.autocast(x.device):
            loss = F.cross_entropy(self.model(x), target)
        self.optimizer.zero_grad(set_to_none=True)
        self.mirrors.join()
        loss.backward()
        self.optimizer.step()
        if self.mirror is not None:
            def batch() -> None:
                with self.autocast(x.device):
                    self.mirror.step(self.net)

            self.mirrors.launch(batch)
        return loss.detach()


def profile(trainee: Trainee, x: Tensor, target: Tensor, steps: int, path: Path) -> str:
    """Profile one block of `steps` steps; write the busiest kernels (ops on CPU) to `path`, and return a
    summary: wall time, device time summed over kernels and kernels launched, each per step.

    Wall time well above kernel time means the host's launches, not the kernels, set the pace."""
    from torch.profiler import ProfilerActivity
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(x.device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainee.step(x, target)
        synchronize(x.device)
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(events.table(sort_by=sort, row_limit=25, max_name_column_width=90))
    if not cuda:
        return f"wall {wall * 1e3:.2f} ms/step"
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
    launched = sum(e.count for e in kernels) / steps
    return f"wall {wall * 1e3:.2f} ms/step, kernels {busy:.2f} ms/step, {launched:.0f} kernels/step"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(trainee: Trainee, x: Tensor, target: Tensor, steps: int) -> float:
    """Training steps per second over one block of `steps` steps."""
    synchronize(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainee.step(x, target)
    synchronize(x.device)
    return steps / (time.perf_counter() - start)


def graph_breaks() -> Counter:
    """torch.compile's graph breaks so far in this process, by reason."""
    return Counter(torch._dynamo.utils.counters["graph_break"])


def allow_recompiles(variants: int) -> None:
    """Every compiled variant compiles the same forward code: let each keep its own compiled graphs
    (a torch._dynamo.reset() between variants would throw away those already warmed up)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 8 * variants))


def warm_up(trainees: dict[str, Trainee], x: Tensor, target: Tensor, warmup: int, label: str) -> dict[str, Counter]:
    """`warmup` untimed steps each (compilation happens here); the graph breaks each one met, by reason."""
    breaks = {}
    if any(t.model is not t.net for t in trainees.values()):
        torch._dynamo.reset()       # once, before the first compiled variant: no earlier run's graphs or counts
        allow_recompiles(len(trainees))
    for name, trainee in tqdm(trainees.items(), desc=f"{label} warmup", leave=False, file=sys.stderr):
        before = graph_breaks()
        for _ in range(warmup):
            loss = trainee.step(x, target)
        breaks[name] = graph_breaks() - before
        if warmup and not torch.isfinite(loss):
            print(f"warning: {name} ({label}) has a non-finite loss after warmup", file=sys.stderr)
    return breaks


@dataclass(frozen=True)
class Row:
    """One variant in one mode: median steps/s over rounds, and the median, lowest and highest of its
    paired per-round ratios to plain torch."""

    steps_per_s: float
    ratio: float
    lowest: float
    highest: float


def summarize(rates: dict[str, list[float]]) -> dict[str, Row]:
    """Rows from each variant's per-round rates (rounds paired by position with the baseline's)."""
    rows = {}
    for name, r in rates.items():
        ratios = [v / b for v, b in zip(r, rates[BASELINE], strict=True)]
        rows[name] = Row(statistics.median(r), statistics.median(ratios), min(ratios), max(ratios))
    return rows


def measure(trainees: dict[str, Trainee], x: Tensor, target: Tensor, steps: int, rounds: int,
            label: str, on_round=None) -> dict[str, Row]:
    """Each trainee's row over `rounds` interleaved blocks of `steps` steps; on_round(rows) after every round."""
    rates: dict[str, list[float]] = {name: [] for name in trainees}
    for _ in tqdm(range(rounds), desc=f"{label} rounds", leave=False, file=sys.stderr):
        for name, trainee in trainees.items():
            rates[name].append(rate(trainee, x, target, steps))
        if on_round is not None:
            on_round(summarize(rates))
    return summarize(rates)


def table(mode: str, rows: dict[str, Row]) -> str:
    """One line per variant: median steps/s, median ratio to plain torch, lowest and highest round ratio."""
    width = max(11, *(len(name) + 1 for name in rows))
    lines = [f"{'variant':<{width}}{mode + ' steps/s':>18}{'ratio':>8}{'lowest':>8}{'highest':>8}"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}{row.steps_per_s:>18.3f}{row.ratio:>8.3f}{row.lowest:>8.3f}{row.highest:>8.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=ARCHS, default="resnet18", help="torchvision model, or vit_small (models.ViT)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per learning step")
    p.add_argument("--image-size", type=int, default=224, help="synthetic images are 3 x size x size")
    p.add_argument("--steps", type=int, default=20, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant and mode (compilation included)")
    p.add_argument(
        "--rounds", type=int, default=5, help="timed blocks per variant, interleaved; ratios are paired per round"
    )
    variants = [*rules.RULES, *MIRROR_VARIANTS, IA_SUB_VARIANT]
    p.add_argument("--rules", nargs="+", choices=variants, default=variants,
                   help="circuit variants, each timed against plain torch")
    p.add_argument("--mirror-batch-size", type=int, default=None,
                   help=f"noise samples per projection in the mirror batch of {' and '.join(MIRROR_VARIANTS)} "
                        "(default: the training batch size, as models.imagenet runs it)")
    p.add_argument("--mirror-angle", type=float, default=None,
                   help="instead, each projection draws the noise samples that settle B within this angle of W "
                        "(circuits.phases.mirror.samples_for_angle)")
    p.add_argument("--ia-sub-batch", type=int, default=None,
                   help=f"examples of each batch that {IA_SUB_VARIANT}'s primitives read (default: a quarter of "
                        f"the batch)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast (falls back to float32 where it does not run) or float32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="memory format")
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=None,
                   help="eager and/or torch.compile'd nets (default: on CUDA both, on CPU eager)")
    p.add_argument("--compile-rules", nargs="+", default=None,
                   help="the variants (of --rules) timed compiled, beside plain torch (default: all of --rules)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here after every round")
    p.add_argument("--profile", type=Path, default=None,
                   help="after timing, profile one block of each variant (torch.profiler): a summary line each, "
                        "and each one's busiest kernels (ops on CPU) in this folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="initial weights and synthetic batch")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, eager only, quick: " + ", ".join(
        f"{k}={v}" for k, v in SMOKE.items()))
    return p


def mirror_samples(args: argparse.Namespace) -> str:
    if args.mirror_angle is None:
        return f"{args.mirror_batch_size} noise samples per projection"
    return f"per projection the noise samples that settle B within {args.mirror_angle} degrees of W"


def parse_with_smoke(p: argparse.ArgumentParser, argv: Sequence[str] | None, smoke: dict,
                     positive: Sequence[str]) -> argparse.Namespace:
    """Parse argv; --smoke turns `smoke` into defaults (flags given explicitly still win); every option
    named in `positive` must be >= 1; --device resolves to cuda when there is one, else cpu."""
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke)
        args = p.parse_args(argv)
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = parse_with_smoke(p, argv, SMOKE, ("batch_size", "image_size", "steps", "rounds"))
    if args.mirror_batch_size is None:
        args.mirror_batch_size = args.batch_size
    elif args.mirror_batch_size < 1:
        p.error(f"--mirror-batch-size must be >= 1, got {args.mirror_batch_size}")
    if args.modes is None:
        args.modes = ["eager", "compiled"] if args.device.type == "cuda" else ["eager"]
    if args.compile_rules is None:
        args.compile_rules = args.rules
    elif not set(args.compile_rules) <= set(args.rules):
        p.error(f"--compile-rules {args.compile_rules} must be among --rules {args.rules}")
    compiled = "compiled" in args.modes
    if args.warmup < (1 if compiled else 0):
        p.error(f"--warmup must be >= {1 if compiled else 0} (compilation must not be timed), got {args.warmup}")
    return args


@dataclass
class Workload:
    """The seeded torchvision net and one synthetic batch, on the device and in the memory format asked."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    x: Tensor
    target: Tensor
    dtype: torch.dtype | None
    described: str        # precision, in words
    device_name: str
    memory_format: torch.memory_format

    def place(self, net: nn.Module) -> nn.Module:
        return net.to(device=self.x.device, memory_format=self.memory_format)


def workload(args: argparse.Namespace) -> Workload:
    device = args.device
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype, described = precision(device, args.precision)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model, input_shape = architecture(args.arch, args.image_size)
    x = torch.randn(args.batch_size, *input_shape, device=device).contiguous(memory_format=memory_format)
    target = torch.randint(0, CLASSES, (args.batch_size,), device=device)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, torch threads={torch.get_num_threads()}"
    )
    return Workload(model, input_shape, x, target, dtype, described, name, memory_format)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Row]]:
    """Run the benchmark, print each mode's table as it is measured, return {mode: {variant: Row}}."""
    args = parse(argv)
    work = workload(args)
    x, target, dtype, described, name = work.x, work.target, work.dtype, work.described, work.device_name
    rows = variants(args.rules, args.ia_sub_batch or max(1, args.batch_size // 4))
    nets = {v.name: work.place(build(v, work.model, work.input_shape)) for v in rows}
    header = (f"{args.arch}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {name}, {described}, "
              f"{'channels_last' if args.channels_last else 'contiguous'}, torch {torch.__version__}; "
              f"median of {args.rounds} rounds of {args.steps} steps after {args.warmup} warmup steps"
              + (f"; mirror batch: {mirror_samples(args)}" if any(v.mirror for v in rows) else ""))
    print(header, flush=True)
    results: dict[str, dict[str, Row]] = {}

    def save(mode: str, measured: dict[str, Row]) -> None:
        results[mode] = measured
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"setting": header, "modes": {
                m: {v: vars(row) for v, row in r.items()} for m, r in results.items()}}, indent=1))

    for mode in args.modes:
        compiled = mode == "compiled"
        timed = [v for v in rows if not compiled or v.rule is None or v.name in args.compile_rules]
        mirror = circuits.Mirror(1, args.mirror_batch_size, args.mirror_angle)
        trainees = {v.name: Trainee(nets[v.name], compiled, dtype, mirror if v.mirror else None, v.beside)
                    for v in timed}
        breaks = warm_up(trainees, x, target, args.warmup, mode)
        save(mode, measure(trainees, x, target, args.steps, args.rounds, mode, lambda r, m=mode: save(m, r)))
        print(table(mode, results[mode]), flush=True)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for variant, trainee in trainees.items():
                path = args.profile / f"{mode}_{variant}.txt"
                summary = profile(trainee, x, target, args.steps, path)
                print(f"profile, {mode} {variant}: {summary} ({path})", flush=True)
        for variant, reasons in breaks.items():
            if reasons:
                listed = "; ".join(f"{n}x {reason.splitlines()[0]}" for reason, n in reasons.most_common())
                print(f"graph breaks under torch.compile, {variant}: {listed}", flush=True)
    return results


if __name__ == "__main__":
    main()
