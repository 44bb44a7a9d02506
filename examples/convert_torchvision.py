"""Convert a torchvision model into a circuit, check it computes the same function, train it under KP.

    python examples/convert_torchvision.py                 # ResNet-18 at 64 x 64, 20 steps on random images
    python examples/convert_torchvision.py --smoke         # 32 x 32, 2 steps

circuits.from_torch traces the module with torch.fx: every traced value becomes a population, every
layer a projection carrying the layer's current weights, every addition a population with several
incoming projections (the residual sums), and activations fold into the population they act on.
models.resnet.resnet18 builds the same circuit (same populations, projections, names and shapes)
without a torchvision model.
"""
import argparse

import torch
import torchvision

import circuits
from circuits.recording.alignment import angle
from models.resnet import resnet18


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rule", default="kp", help="feedback rule of every synaptic projection")
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    size, steps = (32, 2) if args.smoke else (args.size, args.steps)
    torch.manual_seed(0)

    model = torchvision.models.resnet18(num_classes=10).eval()
    by_layer = {"fc": "bp"}                                             # per-layer overrides by module name
    circuit = circuits.from_torch(model, rule=args.rule, input_shape=(3, size, size), rules_by_layer=by_layer)
    net = circuit.build().eval()
    synaptic = [name for name, _ in net.projections()]
    print(f"{circuit}: {len(synaptic)} synaptic projections, each with its own B; "
          f"{circuit.feedback_graph().number_of_edges()} feedback projections in all")
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        print("same outputs as torchvision:", torch.equal(net(x), model(x)))
    builder = resnet18(classes=10, input_shape=(3, size, size), rule=args.rule, rules_by_layer=by_layer).build()
    print("same W, B and batch-norm state, by name and shape, as models.resnet.resnet18:",
          {k: v.shape for k, v in builder.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()})

    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)   # B too, under KP
    trainer = circuits.Trainer(net, optimizer, config=circuits.TrainerConfig(progress=False))
    shown = [synaptic[0], synaptic[len(synaptic) // 2], synaptic[-2], synaptic[-1]]
    before = {n: float(angle(net.projection(n).feedback, net.projection(n).weight)) for n in shown}
    images, labels = torch.randn(16, 3, size, size), torch.randint(0, 10, (16,))
    for _ in range(steps):
        loss = trainer.learn(images, labels)
    print(f"after {steps} steps on one random batch: loss {float(loss):.3f}")
    for n in shown:
        s = net.projection(n)
        print(f"  {n:>22} ({s.rule}): angle(B, W) {before[n]:5.1f}° -> {float(angle(s.feedback, s.weight)):5.1f}°")


if __name__ == "__main__":
    main()
