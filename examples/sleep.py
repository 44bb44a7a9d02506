"""Sleep: a mirror-only experiment. No data, no learning of W: B aligns with W from a random start.

    python examples/sleep.py              # ResNet-20 at CIFAR size, 10 mirror phases of 25 batches
    python examples/sleep.py --smoke      # 8 x 8 images, 2 phases of 5 batches

Every weight-mirror projection's input population fires its own zero-mean noise y_l; the projection
responds linearly, y_{l+1} = W y_l; B learns by dB = eta_B y_{l+1} y_l^T - lambda_B B (the paper's
eq. 7), so E[B] -> (eta_B sigma^2 / lambda_B) W. From a random B (about 90 degrees from W) the angle
falls and settles where the noise of the estimate balances the decay; circuits.phases.mirror.settled_angle
predicts that floor from the fan-in, the kernel positions, the batch size and lambda_B.
"""
import argparse

import torch

import circuits
from circuits.phases.mirror import settled_angle
from circuits.recording.alignment import angle
from models.resnet import resnet20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", type=int, default=10, help="mirror phases (sleep periods)")
    p.add_argument("--batches", type=int, default=25, help="mirror batches per phase")
    p.add_argument("--batch-size", type=int, default=32, help="noise samples per mirror batch")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    size = 8 if args.smoke else 32
    phases, batches = (2, 5) if args.smoke else (args.phases, args.batches)
    net = resnet20(rule="wm", input_shape=(3, size, size)).build()      # B drawn at random, independent of W
    shown = [name for name, _ in net.projections()][::6] + ["fc"]      # a few layers, first to last

    def row(label: str) -> None:
        print(f"{label:>14} " + " ".join(f"{float(angle(net.projection(n).feedback, net.projection(n).weight)):>16.1f}"
                                      for n in shown))

    print(f"{'angle(B, W)':>14} " + " ".join(f"{n:>16}" for n in shown))
    row("awake")
    sleep = circuits.Mirror(batches=batches, batch_size=args.batch_size)
    for phase in range(1, phases + 1):
        sleep.run(net)
        row(f"after sleep {phase}")
    print(f"{'predicted floor':>14} " + " ".join(f"{settled_angle(net.projection(n), args.batch_size):>16.1f}"
                                                for n in shown))


if __name__ == "__main__":
    main()
