"""What recording costs: training steps per second with and without circuits.Recorder, in one run.

One net (torchvision's ResNet converted by circuits.from_torch under one feedback rule) and one
training step (benchmarks/throughput.py's Trainee: forward under autocast, cross-entropy, backward,
SGD with momentum) are timed in three variants, in interleaved rounds so that drift of the machine
hits all of them alike:

    off           no recorder
    record        recorder.step after every step: loss, lr, phase, examples, wall time, and
                  angle(B, W), |B| / |W| and sign agreement of every projection, computed on the
                  device, copied to the host once per block of rows, written to HDF5 in blocks
    record+probe  the same, plus the probe every --probe-steps steps: errors and weight updates
                  on a fixed probe batch under the circuit's rules and under backprop
    compiled      record, with the metrics compiled (Recorder(compiled=True): one fused pass over
                  B and W; compiled in the warmup)

A variant's rate is its steps over its time summed over all rounds (so block writes and probes
count in proportion); its overhead is 1 - rate / rate(off). Beside it, the overhead paired per round
(1 - time(off) / time(variant) in the same round: robust to a machine whose load drifts), its median,
lowest and highest. Last, what the metrics alone cost per step, eager and compiled, against their
floor: one pass that only reads every B and W.

    python benchmarks/recording.py --batch-size 256 --image-size 224          # GPU
    python benchmarks/recording.py --smoke                                    # CPU, seconds
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from throughput import Trainee, parse_with_smoke, synchronize, workload
from tqdm import tqdm

import circuits
from circuits import rules
from circuits.recording.alignment import alignment
from circuits.recording.recorder import Recorder

SMOKE = dict(batch_size=2, image_size=32, steps=4, warmup=1, rounds=2, probe_steps=2, device="cpu")
"""--smoke: tiny sizes on CPU; flags given explicitly still win."""


class Recorded:
    """A Trainee whose steps are recorded (or not: recorder None), with the trainer's tick and step counts;
    learning steps count from `first_step`."""

    def __init__(self, trainee: Trainee, recorder: Recorder | None, first_step: int = 1) -> None:
        self.trainee, self.recorder = trainee, recorder
        self.tick, self.first_step = 0, first_step
        if recorder is not None:
            recorder.begin(trainee.net, {"benchmark": "recording"})

    def step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        loss = self.trainee.step(x, target)
        if self.recorder is not None:
            step = self.first_step + self.tick
            self.recorder.step(self.tick, step=step, phase="learn", loss=loss,
                               lr=self.trainee.optimizer.param_groups[0]["lr"], examples=len(target) * step,
                               net=self.trainee.net)
        self.tick += 1


def seconds(variant: Recorded, x: torch.Tensor, target: torch.Tensor, steps: int) -> float:
    """Wall time of `steps` steps, the device synchronized at both ends."""
    synchronize(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        variant.step(x, target)
    synchronize(x.device)
    return time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--arch", choices=("resnet18", "resnet50"), default="resnet18")
    p.add_argument("--rule", choices=list(rules.RULES), default="kp", help="feedback rule of every projection")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (the first of record+probe probes)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--probe-steps", type=int, default=100, help="record+probe probes every this many steps")
    p.add_argument("--probe-batch", type=int, default=64, help="examples in the probe batch (at most --batch-size)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="folder for the recordings (default: a temporary one, deleted)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on CPU: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
    )
    return p


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = parse_with_smoke(
        p, argv, SMOKE, ("batch_size", "image_size", "steps", "rounds", "probe_steps", "probe_batch")
    )
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print the table, return {variant: steps/s}."""
    args = parse(argv)
    work = workload(args)
    x, target, dtype, described, name = work.x, work.target, work.dtype, work.described, work.device_name
    net = work.place(circuits.from_torch(work.model, rule=args.rule, input_shape=work.input_shape).build())
    probe = (x[:args.probe_batch], target[:args.probe_batch])
    trainee = Trainee(net, compile=False, dtype=dtype)    # one net for all variants: recording does not change it

    print(f"{args.arch} under {args.rule}, batch {args.batch_size}, {args.image_size}x{args.image_size}, {name}, "
          f"{described}, torch {torch.__version__}; {args.rounds} rounds of {args.steps} steps after {args.warmup} "
          f"warmup steps; probe of {len(probe[1])} examples every {args.probe_steps} steps")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.out or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        variants = {"off": Recorded(trainee, None),
                    "record": Recorded(trainee, Recorder(folder / "record.h5")),
                    "record+probe": Recorded(trainee, Recorder(folder / "record+probe.h5", probe=probe,
                                                               probe_steps=args.probe_steps),
                                             first_step=args.probe_steps),    # the first warmup step probes
                    "compiled": Recorded(trainee, Recorder(folder / "compiled.h5", compiled=True))}
        for variant in tqdm(variants.values(), desc="warmup", leave=False):
            for _ in range(args.warmup):
                variant.step(x, target)
        elapsed: dict[str, list[float]] = {key: [] for key in variants}
        for _ in tqdm(range(args.rounds), desc="rounds", leave=False):
            for key, variant in variants.items():
                elapsed[key].append(seconds(variant, x, target, args.steps))
        for variant in variants.values():
            if variant.recorder is not None:
                variant.recorder.close()
        sizes = {key: (folder / f"{key}.h5").stat().st_size for key in variants if key != "off"}
    rates = {key: args.rounds * args.steps / sum(t) for key, t in elapsed.items()}
    print(f"{'variant':<14}{'steps/s':>12}{'overhead':>10}{'paired':>9}{'lowest':>9}{'highest':>9}{'file (bytes)':>14}")
    for key, rate in rates.items():
        paired = [1 - off / t for t, off in zip(elapsed[key], elapsed["off"], strict=True)]
        print(f"{key:<14}{rate:>12.3f}{1 - rate / rates['off']:>10.2%}{statistics.median(paired):>9.2%}"
              f"{min(paired):>9.2%}{max(paired):>9.2%}{sizes.get(key, 0):>14}")
    eager, compiled, floor = metric_seconds(net, x.device)
    step = sum(elapsed["off"]) / (args.rounds * args.steps)
    print(f"per step: unrecorded {step * 1e3:.1f} ms; the metrics of every projection "
          f"(circuits.recording.alignment.alignment) "
          f"{eager * 1e3:.1f} ms ({eager / step:.1%}), compiled {compiled * 1e3:.1f} ms ({compiled / step:.1%}); "
          f"reading B and W once (one torch._foreach_norm, the floor of any exact metric) {floor * 1e3:.1f} ms "
          f"({floor / step:.1%})")
    return rates


def metric_seconds(net: torch.nn.Module, device: torch.device, repeats: int = 5) -> tuple[float, float, float]:
    """Seconds per call of the recorder's alignment metrics, eager and compiled, and of one pass that only reads
    every B and W (the least any exact metric of them costs), each the median of `repeats` calls."""
    synapses = [s for _, s in net.projections() if s.rule is not None]
    with torch.no_grad():
        tensors = [t for s in synapses for t in (s.feedback, s.weight)]

    def timed(work) -> float:
        times = []
        for _ in range(repeats + 1):
            synchronize(device)
            start = time.perf_counter()
            work()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    return (timed(lambda: alignment(synapses)), timed(lambda: alignment(synapses, compiled=True)),
            timed(lambda: torch._foreach_norm(tensors)))


if __name__ == "__main__":
    main()
