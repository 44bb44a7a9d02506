"""Mix feedback rules per layer: which layers of a convnet need feedback that is aligned with W?

    python examples/mix_rules.py              # the convnet on the embedded MNIST subset, 3 epochs each
    python examples/mix_rules.py --smoke      # one epoch on 256 images

Every builder in models/ takes `rule` (all synaptic projections) and `rules_by_layer` (overrides by
projection name), like circuits.from_torch. The same seed gives every variant the same forward weights.
"""
import argparse

import torch
from torch.utils.data import DataLoader, Subset

import circuits
from circuits import rules
from circuits.recording.alignment import angle
from models import data
from models.convnet import convnet

VARIANTS = {
    "FA everywhere": ("fa", {}),
    "FA, backprop readout": ("fa", {"fc": "bp"}),
    "backprop, FA readout": ("bp", {"fc": "fa"}),
    "WM convolutions, KP readout": (rules.WeightMirror(), {"fc": rules.KolenPollack(decay=1e-3)}),
    "backprop everywhere": ("bp", {}),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--smoke", action="store_true", help="one epoch on 256 training images")
    args = p.parse_args(argv)
    split = data.mnist_subset(standardize=True)
    train_set = Subset(split.train, range(256)) if args.smoke else split.train
    epochs = 1 if args.smoke else args.epochs

    for label, (rule, by_layer) in VARIANTS.items():
        torch.manual_seed(0)
        net = convnet(input_shape=split.shape, rule=rule, rules_by_layer=by_layer).build()
        train = DataLoader(train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
        trainer = circuits.Trainer(net, optimizer, circuits.paper_schedule(net, len(train)),
                                   config=circuits.TrainerConfig(progress=False))
        history = trainer.fit(train, epochs, DataLoader(split.test, batch_size=500))
        layers = ", ".join(f"{n} {s.rule} {float(angle(s.feedback, s.weight)):.0f}°" for n, s in net.projections())
        print(f"{label:>28}: test accuracy {100 * history[-1]['top1']:5.1f}%   angle(B, W): {layers}")


if __name__ == "__main__":
    main()
