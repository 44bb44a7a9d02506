"""How many mirror noise samples keep angle(B, W) under a target, and what they cost.

For each weight-mirror projection of a torchvision ResNet converted to a circuit, prints the noise
samples per mirror batch that let B settle within --angle degrees of W (circuits.phases.mirror.samples_for_angle,
from tan^2 theta = n lambda / (m P (2 - lambda))) and the mirror batch's multiply-adds as a fraction of
one training step's (forward + backward, about 3 forwards, at --batch-size). With --measure it also runs
mirror batches on the CPU and prints the angle each projection settles at, beside the prediction
(over the kernel taps that meet real inputs: on a 1x1 map only a 3x3 kernel's centre does).

    python benchmarks/mirror_noise.py --arch resnet50 --angle 5 --decay 0.02
    python benchmarks/mirror_noise.py --arch resnet18 --image-size 32 --measure 200   # small, CPU
"""
from __future__ import annotations

import argparse
import math

import torch
import torchvision

import circuits
from circuits import rules
from circuits.phases.mirror import mirror_step, samples_for_angle, settled_angle


def angle(b: torch.Tensor, w: torch.Tensor) -> float:
    b, w = b.detach().flatten().double(), w.detach().flatten().double()
    return math.degrees(math.acos(float((b @ w / (b.norm() * w.norm())).clamp(-1, 1))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--angle", type=float, default=5.0, help="target angle(B, W) in degrees")
    p.add_argument("--decay", type=float, default=0.02, help="lambda_B (eta_B = lambda_B / sigma^2, so B -> W)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch the cost is compared with")
    p.add_argument("--measure", type=int, default=0, help="mirror batches to run and measure (0: predict only)")
    args = p.parse_args()

    rule = rules.WeightMirror(eta=args.decay, decay=args.decay)
    net = circuits.from_torch(getattr(torchvision.models, args.arch)(), rule=rule,
                              input_shape=(3, args.image_size, args.image_size)).build()
    sizes, mirror_macs, train_macs = {}, 0, 0
    for name, s in net.projections():
        with torch.no_grad():
            out = s.operator.forward(torch.zeros(1, *s.in_shape), s.weight, None)
        macs = out.numel() * s.weight[0].numel()            # per sample: outputs x inputs per output
        sizes[name] = samples_for_angle(s, args.angle)
        mirror_macs += 2 * sizes[name] * macs               # response + correlation
        train_macs += 3 * args.batch_size * macs            # forward + input and weight gradients
    if args.measure:
        for _, s in net.projections():
            s.feedback = s.weight.detach()
        for _ in range(args.measure):
            mirror_step(net, angle=args.angle)
    print(f"{args.arch} at {args.image_size}px, lambda_B={args.decay}, target {args.angle} deg")
    print(f"{'projection':28s} {'samples':>8s} {'predicted':>10s}" + (f" {'measured':>9s}" if args.measure else ""))
    for name, s in net.projections():
        row = f"{name:28s} {sizes[name]:8d} {settled_angle(s, sizes[name]):10.2f}"
        live = (s.positions > 0).expand_as(s.weight)       # taps that never meet an input carry no signal
        print(row + (f" {angle(s.feedback[live], s.weight[live]):9.2f}" if args.measure else ""))
    print(f"mirror batch / training step (batch {args.batch_size}) multiply-adds: {mirror_macs / train_macs:.3f}")


if __name__ == "__main__":
    main()
