"""Mirror phases against their math: B -> (eta sigma^2 / lambda) W, touching nothing else."""
import copy
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ResidualNet
from torch import nn

import circuits
from circuits import rules


def angle(b: torch.Tensor, w: torch.Tensor) -> float:
    b, w = b.detach().flatten().double(), w.detach().flatten().double()
    return float(torch.rad2deg(torch.arccos((b @ w / (b.norm() * w.norm())).clamp(-1, 1))))


def scale(b: torch.Tensor, w: torch.Tensor) -> float:
    """Least-squares s in B = s W."""
    b, w = b.detach().flatten().double(), w.detach().flatten().double()
    return float(b @ w / (w @ w))


def residual_wm(rule=None):
    return circuits.from_torch(ResidualNet(), rule=rule or rules.WeightMirror(), input_shape=(1, 8, 8)).build()


@pytest.mark.parametrize(
    "rule", [rules.WeightMirror(), rules.WeightMirror(sigma=0.5, eta=0.2, decay=0.02, noise="uniform")]
)
def test_mirror_phases_align_B_with_W_from_random_start(rule):
    net = residual_wm(rule)
    start = {name: angle(s.feedback, s.weight) for name, s in net.projections()}
    assert all(a > 75 for a in start.values()), start              # random B: near 90 degrees
    circuits.Mirror(batches=400, batch_size=64).run(net)             # stated: 400 batches of 64
    for name, s in net.projections():
        assert angle(s.feedback, s.weight) < 5, (name, angle(s.feedback, s.weight))
        assert scale(s.feedback, s.weight) == pytest.approx(rule.target_scale, rel=0.05), name
    assert {type(s.operator).__name__ for _, s in net.projections()} == {"ConvOperator", "DenseOperator"}


def test_padding_correction_makes_every_kernel_tap_unbiased():
    net = residual_wm()
    circuits.Mirror(batches=400, batch_size=64).run(net)
    conv = net.projection("conv1")             # 3x3, padding 1, on 8x8: corner taps see 49 of 64 inputs
    assert conv.positions[0, 0] == 49 and conv.positions[1, 1] == 64
    b, w = conv.feedback.detach().double(), conv.weight.detach().double()
    per_tap = (b * w).sum((0, 1)) / (w * w).sum((0, 1))
    assert torch.allclose(per_tap, torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=0.05), per_tap
    # uncorrected, a corner tap would settle at 49/64 = 0.77 of W


def test_taps_that_never_meet_an_input_only_decay():
    c = circuits.Circuit(rule="wm")              # a 3x3 kernel, padding 1, on a 1x1 map: only the centre tap sees input
    c.connect(c.input("x", shape=(4, 1, 1)), c.population("y", shape=(3, 1, 1)), circuits.Conv2d(3, padding=1))
    net = c.build()
    conv = net.projection("x->y")
    assert int(conv.positions.count_nonzero()) == 1
    corners = conv.feedback.detach()[..., 0, 0].clone()
    circuits.Mirror(batches=300, batch_size=64).run(net)
    b, w = conv.feedback.detach(), conv.weight.detach()
    assert torch.isfinite(b).all()
    assert angle(b[..., 1, 1], w[..., 1, 1]) < 5
    assert torch.allclose(b[..., 0, 0], corners * (1 - conv.rule.decay) ** 300)


def test_mirror_phase_touches_only_B():
    net = residual_wm()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    trainer = circuits.Trainer(net, opt, config=circuits.TrainerConfig(progress=False))
    for _ in range(2):
        trainer.learn(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    before_net = {k: v.clone() for k, v in net.state_dict().items()}
    before_opt = copy.deepcopy(opt.state_dict())
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    circuits.Mirror(batches=3, batch_size=16).run(net)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before_net[k])}
    assert changed == {k for k in before_net if k.endswith(".B")} and changed
    after_opt = opt.state_dict()
    for key, state in before_opt["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after_opt["state"][key][name])
    for n, p in net.named_parameters():
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])


def test_mirror_phase_needs_a_weight_mirror_projection():
    net = circuits.from_torch(ResidualNet(), rule="fa", input_shape=(1, 8, 8)).build()
    with pytest.raises(circuits.CircuitError, match="no weight-mirror"):
        circuits.Mirror(batches=2).run(net)
    schedule = circuits.Schedule(circuits.Repeat(circuits.Learn(1), circuits.Mirror(1)))
    with pytest.raises(circuits.CircuitError, match="no weight-mirror"):
        circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), schedule)


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)                                  # same initial W and B on both ranks
    net = residual_wm()
    ddp = nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(100 + rank)                         # but each rank its own data and noise
    schedule = circuits.Schedule(circuits.Mirror(5, 16), circuits.Repeat(circuits.Learn(1), circuits.Mirror(2, 16)))
    trainer = circuits.Trainer(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05), schedule,
                               config=circuits.TrainerConfig(progress=False))
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))) for _ in range(4)]
    start = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.fit(data, epochs=1)
    torch.save({"start": start, "end": net.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_distributed_ranks_end_mirror_phases_with_identical_B():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "state")), nprocs=2)
        r0, r1 = (torch.load(os.path.join(tmp, f"state.{r}")) for r in range(2))
    b_keys = [k for k in r0["end"] if k.endswith(".B")]
    assert b_keys
    for k in r0["end"]:
        if k.endswith(".B") or k.endswith(".weight"):
            assert torch.equal(r0["end"][k], r1["end"][k]), k
    assert all(not torch.equal(r0["end"][k], r0["start"][k]) for k in b_keys)   # B did learn


def test_settled_angle_formula_matches_measurement():
    """tan^2 theta = n lambda / (m P (2 - lambda)) against the angle B actually settles at, per layer."""
    from circuits.phases.mirror import mirror_step, settled_angle
    net = circuits.from_torch(
        ResidualNet(8), rule=rules.WeightMirror(eta=0.05, decay=0.05), input_shape=(1, 8, 8)
    ).build()
    for _, s in net.projections():
        s.feedback = s.weight.detach()
    for _ in range(150):                          # settle: (1 - 0.05)^150 < 1e-3
        mirror_step(net, 8)
    measured = {name: 0.0 for name, _ in net.projections()}
    for _ in range(200):
        mirror_step(net, 8)
        for name, s in net.projections():
            measured[name] += angle(s.feedback, s.weight) / 200
    predicted = {name: settled_angle(s, 8) for name, s in net.projections()}
    for name in measured:
        assert measured[name] == pytest.approx(predicted[name], rel=0.25), (name, measured[name], predicted[name])
    assert max(predicted.values()) > 3 * min(predicted.values())   # layers really differ


def test_mirror_with_target_angle_gives_each_projection_its_own_noise_samples():
    from circuits.phases.mirror import samples_for_angle
    net = residual_wm()
    sizes = {name: samples_for_angle(s, 4.0) for name, s in net.projections()}
    assert sizes["conv1"] < sizes["conv3"] < sizes["fc"]            # resolution helps, width costs
    circuits.Mirror(batches=300, angle=4.0).run(net)
    for name, s in net.projections():
        assert angle(s.feedback, s.weight) < 6.0, (name, angle(s.feedback, s.weight))


def one_layer(rule):
    """12 -> 6 sigmoid units with a bias, every projection under `rule`."""
    c = circuits.Circuit("one-layer", rule=rule)
    c.connect(
        c.input("x", shape=(12,)), c.population("h", shape=(6,), activation="sigmoid"), circuits.Dense(), name="fc1"
    )
    return c.build()


def test_released_variants_sigmoid_response_summed_and_no_decay():
    """decay 0, response sigmoid(W y + b), correlation summed over the batch: B += eta sum_n s_n y_n^T."""
    from circuits.phases.mirror import correlation, mirror_step, samples_for_angle, settled_angle
    rule = rules.WeightMirror(sigma=0.1, eta=0.01, decay=0.0, noise="uniform", response="sigmoid", reduction="sum")
    net = one_layer(rule)
    s = net.projection("fc1")
    g = torch.Generator().manual_seed(3)
    y = rule.mirror_noise((16, 12), s.weight, torch.Generator().manual_seed(3))
    expected = torch.sigmoid(y @ s.weight.detach().T + s.bias.detach()).T @ y
    assert torch.allclose(correlation(s, 16, g), expected, atol=1e-6)
    before = s.feedback.detach().clone()
    torch.manual_seed(5)
    step = correlation(s, 16)
    torch.manual_seed(5)
    mirror_step(net, 16)
    assert torch.allclose(s.feedback, before + 0.01 * step)               # no decay: B accumulates
    with pytest.raises(circuits.CircuitError, match="decay 0"):
        settled_angle(s, 16)
    with pytest.raises(circuits.CircuitError, match="decay 0"):
        samples_for_angle(s, 5.0)
    with pytest.raises(circuits.CircuitError, match="decay 0"):
        circuits.Mirror(batches=1, angle=5.0).run(net)
    with pytest.raises(circuits.CircuitError, match="no fixed point"):
        rule.target_scale
    for bad in ({"response": "relu"}, {"reduction": "max"}, {"decay": -0.1}):
        with pytest.raises(circuits.CircuitError):
            rules.WeightMirror(**bad)


# --- Conv1d and ConvTranspose2d (issue 25) ------------------------------------------------------------------------
def test_positions_of_conv1d_and_conv_transpose2d_taps_count_real_pairs():
    """Counted by hand: a tap t pairs input i with output o = s i + t - p (transposed), or reads input s o + t - p."""
    from circuits.rules.synapse import ConvOperator
    conv = ConvOperator((1,), (1,), (1,))             # length 4, kernel 3, padding 1: the end taps miss one input
    assert conv.positions((2, 4), (3, 2, 3)).tolist() == [3, 4, 3]
    strided = ConvOperator((2,), (1,), (1,))          # outputs 0, 1 read inputs 2 o + t - 1: tap 0 meets only 1
    assert strided.positions((2, 4), (3, 2, 3)).tolist() == [1, 2, 2]
    up = ConvOperator((2, 2), (1, 1), (1, 1), transposed=True)      # 2 -> 3 per axis: o = 2 i + t - 1 in [0, 2]
    assert up.positions((2, 2, 2), (2, 3, 3, 3)).tolist() == [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    padded = ConvOperator((2, 2), (1, 1), (1, 1), transposed=True, output_padding=(1, 0))     # 2 -> (4, 3)
    assert padded.positions((2, 2, 2), (2, 3, 3, 3)).tolist() == [[1, 2, 1], [2, 4, 2], [2, 4, 2]]
    c = circuits.Circuit(rule="wm")
    c.connect(c.input("x", shape=(2, 2, 2)), c.population("y", shape=(4, 4, 3)),
              circuits.ConvTranspose2d(3, stride=2, padding=1, output_padding=(1, 0), groups=2))
    assert torch.equal(c.build().projection("x->y").positions, padded.positions((2, 2, 2), (2, 3, 3, 3)))


def _conv1d_and_transposed(rule):
    from circuits.graph.operations import Operand
    c = circuits.Circuit(rule=rule)
    c.connect(c.input("x", shape=(3, 10)), c.population("h", shape=(4, 10), activation="tanh"),
              circuits.Conv1d(3, padding=1, bias=True))
    c.connect("h", c.population("m", shape=(4, 2, 5)), circuits.Operation("torch.unflatten", (Operand(0), 2, (2, 5))))
    c.connect("m", c.population("up", shape=(6, 4, 10)),
              circuits.ConvTranspose2d(3, stride=2, padding=1, output_padding=1, groups=2))
    return c.build().double()


def test_mirror_noise_drives_conv1d_and_conv_transpose2d_at_their_input_shapes_and_B_learns_W():
    from circuits.phases.mirror import noise
    net = _conv1d_and_transposed(rules.WeightMirror(eta=0.1, decay=0.1))
    assert [tuple(noise(s, 5).shape) for _, s in net.projections()] == [(5, 3, 10), (5, 4, 2, 5)]
    start = {name: angle(s.feedback, s.weight) for name, s in net.projections()}
    angles = []
    for _ in range(5):      # a fixed W: B's angle to W falls batch by batch
        circuits.mirror_step(net, batch_size=32)
        angles.append({name: angle(s.feedback, s.weight) for name, s in net.projections()})
    for name in start:
        seen = [start[name]] + [a[name] for a in angles]
        assert all(b < a for a, b in zip(seen, seen[1:])), (name, seen)
    circuits.Mirror(batches=150, batch_size=64).run(net)
    for name, s in net.projections():      # every tap unbiased: padding and the transposed crop corrected
        b, w = s.feedback.detach(), s.weight.detach()
        taps = tuple(range(b.dim() - s.operator.dims))
        per_tap = (b * w).sum(taps) / (w * w).sum(taps)
        assert torch.allclose(per_tap, torch.ones_like(per_tap), rtol=0, atol=0.08), (name, per_tap)
