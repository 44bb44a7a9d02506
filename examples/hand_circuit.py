"""Define a circuit by hand: populations, projections, a feedback rule per projection; train it.

    python examples/hand_circuit.py              # scikit-learn's 8x8 digits, 30 epochs: 8.5 s (below)
    python examples/hand_circuit.py --smoke      # one epoch

Run it with OMP_NUM_THREADS=1: OpenMP threads spinning on busy cores slow these small steps manyfold (30 epochs on
2 CPU cores: 8.5 s with one thread while the cores were idle; while about ten other jobs shared them, 140 s with one
thread and 265 s with two).

The circuit: a retina of 64 pixels drives v1 (tanh), v1 drives v2 (relu), and both v2 and v1 (a skip
projection) drive the output population, whose summed input is the logits. Each synaptic projection
has its own feedback projection B; its rule says how B is set:

    retina -> v1   Kolen-Pollack (the circuit's default rule)
    v1 -> v2       weight mirror: B learns from noise in mirror phases
    v2 -> output   feedback alignment: B fixed and random
    v1 -> output   sign symmetry
"""
import argparse

import torch
from torch.utils.data import DataLoader

import circuits
from circuits import rules
from circuits.recording.alignment import angle
from models import data


def build() -> circuits.Circuit:
    c = circuits.Circuit("digits", rule="kp")
    retina = c.input("retina", shape=(64,))
    v1 = c.population("v1", shape=(128,), activation="tanh")
    v2 = c.population("v2", shape=(64,), activation="relu")
    output = c.population("output", shape=(10,))
    c.connect(retina, v1, circuits.Dense())                                  # the circuit's rule: kp
    c.connect(v1, v2, circuits.Dense(), rule=rules.WeightMirror(eta=0.01, decay=0.01))
    c.connect(v2, output, circuits.Dense(), rule="fa")
    c.connect(v1, output, circuits.Dense(bias=False), rule="ss", name="skip")   # sums with v2 -> output
    return c


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="one epoch")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    circuit = build()
    print(circuit)
    for u, v, d in circuit.feedback_graph().edges(data=True):     # the feedback pathway, as a graph
        print(f"  feedback {u} -> {v}: carries {d['carries']}" + (f" ({d['rule']})" if d["rule"] else ""))

    net = circuit.build()
    split = data.digits(flat=True, standardize=True)
    train = DataLoader(split.train, batch_size=32, shuffle=True)
    test = DataLoader(split.test, batch_size=len(split.test))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    schedule = circuits.paper_schedule(net, len(train))          # mirror phases for the weight-mirror projection
    trainer = circuits.Trainer(net, optimizer, schedule, config=circuits.TrainerConfig(progress=False))
    before = {name: float(angle(s.feedback, s.weight)) for name, s in net.projections()}
    history = trainer.fit(train, 1 if args.smoke else args.epochs, test)

    print(f"test accuracy after {len(history)} epochs: {100 * history[-1]['top1']:.1f}%")
    for name, s in net.projections():
        print(
            f"  {name:>14} ({s.rule}): angle(B, W) {before[name]:5.1f}° -> {float(angle(s.feedback, s.weight)):5.1f}°"
        )


if __name__ == "__main__":
    main()
