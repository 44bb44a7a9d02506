"""Feedback rules against their equations: direct feedback, the sign-symmetry family, Kunin et al.'s local
rules and their special cases, imperfect feedback, and a user's own rule end to end."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from conftest import ResidualNet, true_float64
from torch import Tensor, nn
from torch.utils.data import DataLoader

import circuits
from analysis import figures, open_run, report
from circuits import rules
from circuits.phases.mirror import correlation
from circuits.recording.alignment import angle
from circuits.recording.recorder import Recorder
from circuits.rules.synapse import ConvOperator, DenseOperator
from models.data import digits
from models.mlp import mlp


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@rules.register
@dataclass(frozen=True)
class PartialTransport(rules.FromWeight):
    """A user's rule, defined outside circuits/: B = c W, a weight transport that loses part of its strength."""

    short_name: ClassVar[str] = "partial"
    strength: float = 0.5

    def feedback(self, host) -> Tensor:
        return self.strength * host.weight.detach()


DIGITS = digits(flat=True, standardize=True)


def train_digits(rule, epochs: int = 2, lr: float = 0.1, sizes=(64, 64, 10)) -> tuple[circuits.CircuitNet, float]:
    """A tanh MLP on scikit-learn's 8x8 digits, SGD with momentum; (net, test accuracy)."""
    torch.manual_seed(0)
    net = mlp(sizes=sizes, activation="tanh", rule=rule).build()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(DIGITS.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    for _ in range(epochs):
        for x, t in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), t).backward()
            optimizer.step()
    x, t = DIGITS.test.tensors
    with torch.no_grad():
        return net, float((net(x).argmax(1) == t).float().mean())


def angles(net: circuits.CircuitNet) -> dict[str, float]:
    return {n: float(angle(s.feedback, s.weight)) for n, s in net.projections() if s.rule is not None}


# --- direct feedback ----------------------------------------------------------------------------
def dfa_circuit(activation: str = "tanh") -> circuits.Circuit:
    """The issue's example: a 3-layer MLP whose hidden populations receive the output error directly."""
    c = circuits.Circuit("dfa-mlp")
    x = c.input("retina", shape=(8,))
    h1 = c.population("h1", shape=(6,), activation=activation)
    h2 = c.population("h2", shape=(5,), activation=activation)
    y = c.population("output", shape=(3,))
    for a, b in [(x, h1), (h1, h2), (h2, y)]:
        c.connect(a, b, circuits.Dense())
    c.feedback(y, h1, rule="dfa")
    c.feedback(y, h2, rule="dfa")
    return c


def test_dfa_hidden_errors_are_phi_prime_times_B_transpose_output_error():
    net = true_float64(dfa_circuit().build())
    trace = {}
    F.cross_entropy(net(torch.randn(7, 8, dtype=torch.float64), monitor=trace), torch.randint(0, 3, (7,))).backward()
    e = trace["output"].a.grad
    targets = []
    for name, projection in net.feedback_projections():
        assert projection.source == "output" and projection.feedback.shape == (3, trace[projection.target].y.shape[1])
        y = trace[projection.target].y.detach()
        expected = (e @ projection.feedback.detach()) * (1 - y * y)          # tanh'(a) = 1 - y^2
        assert relative(trace[projection.target].a.grad, expected) < 1e-15, name
        targets.append(projection.target)
    assert targets == ["h1", "h2"]


def test_direct_feedback_through_the_product_of_downstream_weights_is_backprop():
    """Linear units, B_h1 = W3 W2 and B_h2 = W3 (source x target): delta_h = B^T e is exactly backprop's."""
    dfa = true_float64(dfa_circuit("identity").build())
    bp = true_float64(mlp((8, 6, 5, 3), activation="identity").build())
    for (_, a), (_, b) in zip(dfa.projections(), bp.projections(), strict=True):
        with torch.no_grad():
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
    w2, w3 = bp.projection("fc2").weight.detach(), bp.projection("fc3").weight.detach()
    dfa.projection("δoutput->δh1").feedback = w3 @ w2
    dfa.projection("δoutput->δh2").feedback = w3
    x, t = torch.randn(9, 8, dtype=torch.float64), torch.randint(0, 3, (9,))
    F.cross_entropy(dfa(x), t).backward()
    F.cross_entropy(bp(x), t).backward()
    for (name, a), (_, b) in zip(dfa.projections(), bp.projections(), strict=True):
        assert relative(a.weight.grad, b.weight.grad) < 1e-13, name
        assert relative(a.bias.grad, b.bias.grad) < 1e-13, name


def test_feedback_edges_are_the_graph_as_it_is():
    c = dfa_circuit()
    feedback = {(u, v): d for u, v, d in c.feedback_graph().edges(data=True)}
    # the output error reaches h1 and h2 directly; no layer-local error enters δh1 or δh2
    assert set(feedback) == {("δoutput", "δh1"), ("δoutput", "δh2"), ("δh1", "δretina")}
    assert feedback["δoutput", "δh1"]["direct"] and str(feedback["δoutput", "δh1"]["rule"]) == "dfa"
    net = c.build()
    assert [(n, s.rule) for n, s in net.projections()] == [("retina->h1", rules.Backprop()), ("h1->h2", None),
                                                           ("h2->output", None)]
    assert net.projection("h1->h2").feedback is None


def test_dfa_one_line_forms_wire_every_hidden_population_to_the_output():
    net = mlp((8, 6, 5, 3), rule="dfa").build()
    assert {(p.source, p.target) for _, p in net.feedback_projections()} == {
        ("output", "hidden1"),
        ("output", "hidden2"),
    }
    assert all(s.rule is None for _, s in net.projections())       # no layer-local feedback left
    conv = circuits.from_torch(ResidualNet(), rule="dfa", input_shape=(1, 8, 8)).build()
    shapes = {p.target: p.feedback_shape for _, p in conv.feedback_projections()}
    # every population feeding a synaptic layer (relus folded into bn1 and add), conv populations with a B
    # shared over positions
    assert shapes == {"bn1": (10, 4), "add": (10, 4), "flatten": (10, 8)}
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    F.cross_entropy(conv(x), t).backward()
    assert all(s.weight.grad is not None and s.weight.grad.norm() > 0 for _, s in conv.projections())


def test_direct_feedback_errors_are_clear():
    c = dfa_circuit()
    with pytest.raises(circuits.CircuitError, match="input population"):
        c.feedback("output", "retina")
    with pytest.raises(circuits.CircuitError, match="downstream"):
        c.feedback("h1", "h2")
    with pytest.raises(circuits.CircuitError, match="already projects directly"):
        c.feedback("output", "h1")
    with pytest.raises(circuits.CircuitError, match="needs the forward weight W"):
        c.feedback("h2", "h1", rule="kp")
    with pytest.raises(circuits.CircuitError, match="receives direct feedback"):
        c.connect("h1", c.population("h3", shape=(2,)), circuits.Dense(), rule="fa")
    with pytest.raises(circuits.CircuitError, match="cannot be combined with the direct rule"):
        mlp((4, 3, 2), rule="dfa", rules_by_layer={"fc1": "bp"})


# --- the sign-symmetry family -----------------------------------------------------------------
def test_brsf_redraws_its_magnitudes_once_per_training_forward_and_frsf_keeps_them():
    for name, redraws in (("brsf", True), ("frsf", False)):
        torch.manual_seed(0)
        net = mlp((6, 5, 3), rule=name).build()
        x = torch.randn(4, 6)
        before = [s.feedback for _, s in net.projections()]
        assert all(torch.equal(b, s.feedback) for b, (_, s) in zip(before, net.projections()))   # reading draws none
        with torch.no_grad():
            net(x)                                                   # no error will cross B: nothing drawn
        assert all(torch.equal(b, s.feedback) for b, (_, s) in zip(before, net.projections()))
        net(x).sum().backward()
        for b, (_, s) in zip(before, net.projections()):
            after = s.feedback
            assert torch.equal(torch.sign(after), torch.sign(s.weight.detach()))      # sign-concordant
            assert torch.equal(b, after) != redraws, name
            bound = (6 / (s.weight.shape[0] + s.weight.shape[1])) ** 0.5            # |M| Xavier-uniform
            assert 0.5 * bound < float(after.abs().max()) <= bound


def test_brsf_records_the_feedback_its_backward_used():
    """The B read after a backward is the one that backward's error crossed: the input error equals delta B."""
    torch.manual_seed(3)
    net = mlp((6, 5), rule="brsf").build().double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(4, 5, dtype=torch.float64)
    net(x).backward(delta)
    (_, synapse), = net.projections()
    assert relative(x.grad, delta @ synapse.feedback) < 1e-12


def test_reading_brsf_feedback_leaves_the_run_unchanged():
    """Reading B (as a recorder does) draws nothing: a brsf run that reads it every step equals one that does not."""
    runs = []
    for read in (False, True):
        torch.manual_seed(5)
        net = mlp((6, 5, 3), rule="brsf").build().double()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            F.mse_loss(net(torch.randn(4, 6, dtype=torch.float64)), torch.zeros(4, 3, dtype=torch.float64)).backward()
            optimizer.step()
            if read:
                [s.feedback for _, s in net.projections()]
        runs.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_sign_symmetry_scale_follows_the_layer_kind():
    assert rules.sign_symmetry_scale(torch.empty(10, 500)) == pytest.approx(1 / 500 ** 0.5)   # dense: 1/sqrt(fan_in)
    assert rules.sign_symmetry_scale(torch.empty(64, 32, 3, 3)) == pytest.approx((2 / (9 * 64)) ** 0.5)


def test_usf_scale_is_biotorchs_xavier_std():
    """usf: sqrt(2 / (fan_in + fan_out)), torch's fans (BioTorch's uSF); not ss's scale."""
    dense, conv = torch.randn(10, 500), torch.randn(64, 32, 3, 3)
    usf, ss = rules.get("usf"), rules.get("ss")
    host = nn.Module()
    for w, expected, xiao in ((dense, (2 / 510) ** 0.5, 1 / 500 ** 0.5),
                              (conv, (2 / (32 * 9 + 64 * 9)) ** 0.5, (2 / (9 * 64)) ** 0.5)):
        host.weight = nn.Parameter(w)
        assert torch.equal(usf.feedback(host), torch.sign(w) * expected)
        assert torch.equal(ss.feedback(host), torch.sign(w) * xiao)


# --- Kunin et al.'s local rules ------------------------------------------------------------------
def explicit_loss(name: str, y: Tensor, w: Tensor, b: Tensor, op) -> Tensor:
    """Each primitive written out as its loss (neuroailab/Neural-Alignment, Alignments/primitives.py)."""
    n = y.shape[0]
    wy, by = op.forward(y, w, None), op.forward(y, b, None)
    if name == "decay":
        return w.square().sum() + b.square().sum()
    if name == "self":
        return -(w * b).sum()
    if name == "amp":
        return -(wy * by).sum() / n
    if name == "sparse":
        return (wy.square().sum() + by.square().sum()) / n
    reconstruction = torch.func.vjp(lambda v: op.forward(v, b, None), y)[1](wy)[0]     # B^T W y
    return reconstruction.square().sum() / n


@pytest.mark.parametrize("op,y_shape,w_shape", [(DenseOperator(), (7, 5), (4, 5)),
                                                (ConvOperator((2, 2), (1, 1)), (3, 2, 6, 6), (4, 2, 3, 3))])
@pytest.mark.parametrize("name", list(rules.PRIMITIVES))
def test_each_primitive_is_the_gradient_of_its_loss(name, op, y_shape, w_shape):
    y, w = torch.randn(*y_shape, dtype=torch.float64), torch.randn(*w_shape, dtype=torch.float64)
    b = torch.randn(*w_shape, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad(explicit_loss(name, y, w, b, op), b)[0]
    alone = rules.LocalAlignment(((name, 1.0),), normalize=False)
    assert relative(alone.feedback_gradient(torch.zeros_like(w), y, w, b.detach(), op), expected) < 1e-12


OPERATORS = [(DenseOperator(), (6, 5), (4, 5)), (ConvOperator((2, 2), (1, 1)), (6, 2, 6, 6), (4, 2, 3, 3))]


@pytest.mark.parametrize("op,y_shape,w_shape", OPERATORS)
@pytest.mark.parametrize("rule", [rules.InformationAlignment(sub_batch=2),
                                  rules.LocalAlignment((("amp", 0.3), ("null", 0.2), ("sparse", 0.1), ("decay", 0.4)),
                                                       center_examples=True, center_feedback_input=True, sub_batch=2)])
def test_a_sub_batch_estimates_the_whole_batch_without_bias(rule, op, y_shape, w_shape):
    """sub_batch = 2 of 6 examples: averaged over all 15 draws the rule can make, B's gradient is the whole
    batch's exactly (the batch is prepared whole, normalised by its own mean and rms, before the draw)."""
    y = torch.randn(*y_shape, dtype=torch.float64) * 2 + 0.5
    w, b = torch.randn(*w_shape, dtype=torch.float64), torch.randn(*w_shape, dtype=torch.float64)
    hebbian = torch.randn_like(w)
    by_draw = {}
    for seed in range(200):
        torch.manual_seed(seed)
        grad = rule.feedback_gradient(hebbian, y, w, b, op)
        torch.manual_seed(seed)
        by_draw[frozenset(torch.randperm(6)[:2].tolist())] = grad
    assert len(by_draw) == 15
    whole = dataclasses.replace(rule, sub_batch=None).feedback_gradient(hebbian, y, w, b, op)
    mean = torch.stack(list(by_draw.values())).mean(0)
    assert relative(mean, whole) < 1e-13
    assert min(relative(g, whole) for g in by_draw.values()) > 1e-3        # each draw alone is not the whole batch
    assert rule.draws_while_learning and not dataclasses.replace(rule, sub_batch=None).draws_while_learning
    small = y[:2]       # a batch no larger than sub_batch is used whole, with no draw
    assert relative(rule.feedback_gradient(hebbian, small, w, b, op),
                    dataclasses.replace(rule, sub_batch=None).feedback_gradient(hebbian, small, w, b, op)) < 1e-15


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4"])
def test_a_sub_batch_is_a_whole_number(bad):
    with pytest.raises(circuits.CircuitError, match="sub_batch must be a whole number"):
        rules.InformationAlignment(sub_batch=bad)


def test_ia_computes_three_products_per_projection():
    """IA's B gradient on a convolution: W y once (amp and null share it), B^T W y, and one weight-gradient product
    for amp and null together; decay reads B alone. Counted as aten convolutions."""
    op = ConvOperator((1, 1), (1, 1))
    y, w = torch.randn(4, 3, 8, 8), torch.randn(5, 3, 3, 3)
    seen: list[str] = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "convolution" in func.__name__:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Count():
        rules.InformationAlignment().feedback_gradient(torch.zeros_like(w), y, w, torch.randn_like(w), op)
    assert sorted(seen) == ["convolution.default", "convolution_backward.default", "convolution_backward.default"]


def test_kolen_pollack_is_decay_with_tie():
    """KP's B gradient, delta y^T + lambda B, is Kunin et al.'s {decay: lambda / 2} with the tie."""
    kunin = rules.LocalAlignment((("decay", 0.05),), tie=True, normalize=False)
    grads = []
    for rule in (rules.KolenPollack(decay=0.1), kunin):
        torch.manual_seed(3)
        net = mlp((6, 5, 3), rule=rule).build().double()
        F.cross_entropy(net(torch.randn(4, 6, dtype=torch.float64)), torch.tensor([0, 1, 2, 0])).backward()
        grads.append([s.B.grad for _, s in net.projections()])
    for kp, local in zip(*grads, strict=True):
        assert relative(local, kp) < 1e-14


def saved_during(net: torch.nn.Module, x: Tensor, target: Tensor) -> list[Tensor]:
    """The tensors autograd saves from forward to backward for one bf16-autocast step of `net` (which then runs)."""
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        loss = F.cross_entropy(net(x), target)
    loss.backward()
    return saved


@pytest.mark.parametrize("rule", [rules.FeedbackAlignment(), rules.KolenPollack(decay=1.0), rules.SymmetricAlignment()])
def test_under_autocast_backward_reads_W_and_B_as_stored(rule):
    """Under autocast B is cast in backward, where it is first read, and so is W where the rule reads it (KP's decay,
    SA's self term): of W's shape at most W and B themselves are saved for backward (a B the optimizer steps; a fixed
    or mirrored one is kept unversioned), no cast of either. KP's W gradient is that of KP without decay plus lambda W
    (to bf16 rounding)."""
    x, target = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.manual_seed(3)
    net = mlp((6, 5, 3), rule=rule).build()
    saved = saved_during(net, x, target)
    for _, s in net.projections():
        of_w_shape = [t.data_ptr() for t in saved if t.shape == s.weight.shape]
        assert set(of_w_shape) <= {s.weight.data_ptr(), s.B.data_ptr()}
        assert (s.B.data_ptr() in of_w_shape) == s.B.requires_grad
        assert s.B.grad is None or s.B.grad.dtype == torch.float32
    if isinstance(rule, rules.KolenPollack):
        torch.manual_seed(3)
        undecayed = mlp((6, 5, 3), rule=rules.KolenPollack(decay=0.0)).build()
        saved_during(undecayed, x, target)
        for (_, s), (_, u) in zip(net.projections(), undecayed.projections(), strict=True):
            assert relative(s.weight.grad - u.weight.grad, s.weight.detach()) < 1e-2


@pytest.mark.parametrize(
    "shape,projection", [((6,), circuits.Dense(bias=False)), ((2, 6, 6), circuits.Conv2d(3, padding=1))]
)
def test_a_mirror_batch_is_one_step_of_decay_and_amp_on_white_noise(shape, projection):
    """WM: B += eta_B <y_{l+1} y_l^T> - lambda_B B; Kunin et al.: B -= lr (2 decay B - amp <(W y) y^T>)."""
    c = circuits.Circuit(rule=rules.WeightMirror(eta=0.3, decay=0.1))
    c.connect(c.input("x", shape=shape), c.population("y", shape=(4,) if len(shape) == 1 else (4, 6, 6)), projection)
    synapse = c.build().double().projection("x->y")
    b0 = synapse.B.detach().clone()
    hebbian = correlation(synapse, 16, torch.Generator().manual_seed(5))
    synapse.rule.mirror_update([synapse.B.data], [hebbian])
    y = synapse.rule.mirror_noise((16, *shape), synapse.weight, torch.Generator().manual_seed(5))   # the same noise
    kunin = rules.LocalAlignment((("amp", 0.3), ("decay", 0.05)), normalize=False)
    if len(shape) > 1:      # the mirror averages each kernel tap over its real inputs; Kunin et al. sum over positions
        y_positions = synapse.positions
    else:
        y_positions = torch.ones(())
    step = kunin.feedback_gradient(torch.zeros_like(b0), y, synapse.weight.detach(), b0, synapse.operator)
    amp_part = (step - 2 * 0.05 * b0) / y_positions       # per tap, as the mirror normalises it
    assert relative(synapse.B.detach(), b0 - (2 * 0.05 * b0 + amp_part)) < 1e-12


@pytest.mark.parametrize("rule", ["ia", "sa"])
def test_local_alignment_rules_align_B_with_W_on_digits(rule):
    net, accuracy = train_digits(rule, epochs=3)
    assert accuracy > 0.9
    assert all(a < 60 for a in angles(net).values()), angles(net)      # from 90 degrees at the start
    assert angles(net)["fc2"] < 50


@pytest.mark.parametrize("rule", list(rules.RULES))
def test_every_rule_trains_the_digits_mlp_above_chance(rule):
    _, accuracy = train_digits(rule, epochs=1)
    assert accuracy > 0.6, (rule, accuracy)


# --- imperfect feedback -------------------------------------------------------------------------
def test_sparse_and_dale_feedback_constrain_B():
    torch.manual_seed(1)
    imperfect = rules.Imperfect(rules.KolenPollack(decay=0.0), sparsity=0.3, dale=True)
    net = mlp((40, 30, 20), rule=imperfect).build()
    for _, s in net.projections():
        b = s.feedback.detach()
        assert abs(float(s.feedback_mask.mean()) - 0.7) < 0.05
        assert torch.all(b[s.feedback_mask == 0] == 0)
        assert torch.all(b * s.feedback_sign >= 0)          # each feedback neuron (row) of one sign
        assert s.rule.learns_by_gradient and s.B.requires_grad   # KP underneath still learns


@pytest.mark.parametrize("rule", [rules.KolenPollack(decay=0.0), rules.SymmetricAlignment()])
def test_dale_feedback_keeps_learning_underneath(rule):
    """Entries held at zero by the sign constraint still learn, by the gradient the rule computes with the B that
    is used (before, KP left 67 of 182 such entries of the first layer, where W has the row's sign, unlearned).
    Under SA (-self W for a held entry) those where W has the row's sign reach it and are used."""
    torch.manual_seed(1)
    net = mlp((40, 30, 20), rule=rules.Imperfect(rule, dale=True)).build().double()
    stored = {name: s.B.detach().clone() for name, s in net.projections()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    x, target = torch.randn(64, 40, dtype=torch.float64), torch.randn(64, 20, dtype=torch.float64)
    for _ in range(200):
        optimizer.zero_grad()
        F.mse_loss(net(x), target).backward()
        optimizer.step()
    for name, s in net.projections():
        sign = s.feedback_sign
        held = stored[name] * sign < 0                      # drawn with the row's other sign: used as zero
        can_match = held & (s.weight.detach() * sign > 0)   # where W has the row's sign
        assert int(can_match.sum()) > 20
        assert torch.all(s.B.detach()[held] != stored[name][held]), name      # every held entry learned
        if isinstance(rule, rules.SymmetricAlignment):
            used = s.feedback.detach()[can_match]
            assert float((used != 0).double().mean()) > 0.9, name      # and most now carry W's sign
            assert torch.all(used * s.weight.detach()[can_match] >= 0)


def test_feedback_noise_scales_with_the_signal():
    torch.manual_seed(2)
    c = circuits.Circuit(rule=rules.Imperfect("fa", noise=0.5))
    x = c.input("x", shape=(200,))
    c.connect(x, c.population("y", shape=(100,)), circuits.Dense(bias=False))
    net = c.build().double()
    inp = torch.randn(64, 200, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(64, 100, dtype=torch.float64)
    net(inp).backward(delta)
    clean = delta @ net.projection("x->y").feedback.detach()
    noise = inp.grad - clean
    assert float(noise.std() / clean.std()) == pytest.approx(0.5, rel=0.05)


# --- a user's rule, end to end --------------------------------------------------------------------
def test_a_users_rule_works_with_trainer_recorder_and_report(tmp_path):
    assert rules.get("partial") == PartialTransport()
    net = mlp((64, 16, 10), activation="tanh", rule="partial").build()
    x, t = DIGITS.train.tensors
    recorder = Recorder(tmp_path / "partial.h5", probe=(x[:32], t[:32]), probe_steps=5)
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), recorder=recorder,
                               config=circuits.TrainerConfig(progress=False))
    loader = DataLoader(DIGITS.train, batch_size=64)
    history = trainer.fit(loader, 1, DataLoader(DIGITS.test, batch_size=256))
    assert history[-1]["top1"] > 0.5
    with open_run(tmp_path / "partial.h5") as run:
        assert run.rules == {"fc1": "partial", "fc2": "partial"}
        assert max(run.alignment["fc2"]["angle"]) < 1e-3            # B = W / 2: aligned, half as strong
        assert run.alignment["fc2"]["norm_ratio"][-1] == pytest.approx(0.5, rel=1e-5)
    summary = report([tmp_path / "partial.h5"], tmp_path / "report", progress=False)
    assert "partial" in summary[-1].read_text()


def recorded_direct_run(tmp_path, rule: str):
    """A tanh MLP under a direct-feedback rule, one epoch on the digits, recorded; returns the recording's path."""
    net = mlp((64, 16, 12, 10), activation="tanh", rule=rule).build()
    x, t = DIGITS.train.tensors
    recorder = Recorder(tmp_path / f"{rule}.h5", probe=(x[:32], t[:32]), probe_steps=5)
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), recorder=recorder,
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit(DataLoader(DIGITS.train, batch_size=64), 1, DataLoader(DIGITS.test, batch_size=256))
    return tmp_path / f"{rule}.h5"


def test_a_dfa_run_records_error_angles_and_draws_skip_edges(tmp_path):
    with open_run(recorded_direct_run(tmp_path, "dfa")) as run:
        assert run.rule == "dfa" and set(run.rules) == {"δoutput->δhidden1", "δoutput->δhidden2"}
        assert run.alignment == {}        # angle(B, W) is not defined anywhere in a DFA circuit
        errors = run.errors
        assert {"hidden1", "hidden2"} <= set(errors)
        assert 0 < errors["hidden1"]["angle"][-1] < 120          # measured against backprop, never a crash
        graph = run.circuit
        assert graph.edges["δoutput", "δhidden1"]["direct"] and graph.edges["δoutput", "δhidden1"]["rule"] == "dfa"
        assert not graph.has_edge("δhidden2", "δhidden1")
        figures.circuit(run)
    summary = report([tmp_path / "dfa.h5"], tmp_path / "report", progress=False)
    assert "dfa" in summary[-1].read_text()


def test_an_ldfa_run_records_error_angles_and_no_alignment(tmp_path):
    """ldfa's B (output units x in) is not in W's layout: no angle(B, W) is recorded, the error angles are."""
    with open_run(recorded_direct_run(tmp_path, "ldfa")) as run:
        assert run.rule == "ldfa" and run.alignment == {}
        assert 0 < run.errors["hidden1"]["angle"][-1] < 120


def test_kolen_pollack_per_step_form_shrinks_W_minus_B_by_one_minus_lambda_each_step():
    net = mlp((6, 5, 3), rule=rules.KolenPollack.per_step(0.2, lr=0.5)).build().double()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    before = [(s.weight - s.B).detach().clone() for _, s in net.projections()]
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(torch.randn(4, 6, dtype=torch.float64)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
    for (_, s), d in zip(net.projections(), before, strict=True):
        assert relative((s.weight - s.B).detach(), 0.8 ** 3 * d) < 1e-12


# --- Conv1d and ConvTranspose2d (issue 25) ------------------------------------------------------------------------
def _one_projection(shape_in, shape_out, projection, rule):
    c = circuits.Circuit(rule=rule)
    c.connect(c.input("x", shape=shape_in), c.population("y", shape=shape_out), projection)
    return c.build().double()


@pytest.mark.parametrize("shape_in,shape_out,projection,hand", [
    ((4, 12), (6, 6), circuits.Conv1d(3, stride=2, padding=1, groups=2, bias=True),
     lambda d, b: F.conv_transpose1d(d, b, None, 2, 1, 1, 2)),        # output_padding 1: back to length 12
    ((4, 3, 5), (6, 6, 11), circuits.ConvTranspose2d((3, 2), stride=(2, 2), padding=(1, 0), dilation=(1, 2),
                                                   groups=2, bias=True, output_padding=(1, 0)),
     lambda d, b: F.conv2d(d, b, None, (2, 2), (1, 0), (1, 2), 2))])
def test_fa_error_crosses_B_by_the_transposed_operation_and_W_learns_as_torch(shape_in, shape_out, projection, hand):
    net = _one_projection(shape_in, shape_out, projection, "fa")
    s = net.projection("x->y")
    assert s.feedback.shape == s.weight.shape and not torch.equal(s.feedback, s.weight)
    x = torch.randn(3, *shape_in, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(3, *shape_out, dtype=torch.float64)
    out = net(x)
    assert torch.equal(out, s.operator.forward(x, s.weight, s.bias))
    (out * delta).sum().backward()
    assert relative(x.grad, hand(delta, s.feedback.detach())) < 1e-14     # B^T delta, by torch's own convolution
    w = s.weight.detach().clone().requires_grad_()
    bias = s.bias.detach().clone().requires_grad_()
    (s.operator.forward(x.detach(), w, bias) * delta).sum().backward()
    assert relative(s.weight.grad, w.grad) < 1e-14 and relative(s.bias.grad, bias.grad) < 1e-14


def test_ldfa_sends_the_output_error_through_a_transposed_convolutions_B():
    c = circuits.Circuit(rule="ldfa")
    c.connect(c.input("x", shape=(4, 3, 3)), c.population("h", shape=(6, 6, 6), activation="tanh"),
              circuits.ConvTranspose2d(3, stride=2, padding=1, output_padding=1, groups=2))
    c.connect("h", c.population("flat", shape=(216,)), circuits.Flatten())
    c.connect("flat", c.population("o", shape=(5,)), circuits.Dense(), rule="bp")
    net = c.build().double()
    s = net.projection("x->h")
    assert s.feedback.shape == (4, 5, 3, 3)          # (in, output units, k, k): torch's transposed layout
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 5, dtype=torch.float64)
    (net(x) * e).sum().backward()
    spread = e.view(2, 5, 1, 1).expand(2, 5, 6, 6)
    assert relative(x.grad, F.conv2d(spread, s.feedback.detach(), None, 2, 1)) < 1e-14


def test_sign_symmetry_scales_of_a_transposed_convolution_are_the_ordinary_layers():
    """A ConvTranspose2d from 32 to 64 channels (W: 32 x 64/groups x 3 x 3) has ss's sqrt(2 / (9 out)) and usf's
    fans of the convolution from 32 to 64 channels: fan_in 32/groups 9, fan_out 64 9."""
    for groups in (1, 2):
        for rule, expected in (("ss", (2 / (9 * 64)) ** 0.5), ("usf", (2 / (32 // groups * 9 + 64 * 9)) ** 0.5)):
            s = _one_projection((32, 4, 4), (64, 6, 6), circuits.ConvTranspose2d(3, groups=groups), rule
                                ).projection("x->y")
            assert s.weight.shape == (32, 64 // groups, 3, 3)
            assert torch.allclose(s.feedback, torch.sign(s.weight) * expected, rtol=1e-15, atol=0)
    conv1d = _one_projection((8, 10), (16, 8), circuits.Conv1d(3), "ss").projection("x->y")
    assert torch.allclose(conv1d.feedback, torch.sign(conv1d.weight) * (2 / (3 * 16)) ** 0.5, rtol=1e-15, atol=0)


def test_dale_feedback_of_a_grouped_transposed_convolution_has_one_sign_per_output_channel():
    torch.manual_seed(2)
    net = _one_projection((4, 3, 3), (6, 5, 5), circuits.ConvTranspose2d(3, groups=2),
                          rules.Imperfect(rules.KolenPollack(decay=0.0), dale=True))
    s = net.projection("x->y")
    b, sign = s.feedback.detach(), s.feedback_sign
    assert torch.all(b * sign >= 0)
    units = s.operator.output_units(tuple(b.shape))     # W[i, j]: output channel (i // 2) * 3 + j
    assert torch.equal(units[:, :, 0, 0], torch.tensor([[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]))
    for u in range(6):
        assert len(set(sign.expand_as(b)[units.expand_as(b) == u].tolist())) == 1


@pytest.mark.parametrize("projection,message", [
    (lambda: circuits.Conv1d((3, 3)), r"Conv1d\(kernel_size=\(3, 3\)\): kernel_size must be an integer or 1 of them"),
    (lambda: circuits.ConvTranspose2d(3, stride=2, output_padding=2),
     r"output_padding must be smaller than the stride"),
    (lambda: circuits.ConvTranspose2d(3, output_padding=-1), r"output_padding must be a non-negative integer")])
def test_conv1d_and_conv_transpose2d_settings_are_checked(projection, message):
    with pytest.raises(circuits.CircuitError, match=message):
        projection()


def test_conv1d_and_conv_transpose2d_need_populations_of_their_dimensionality():
    c = circuits.Circuit()
    with pytest.raises(circuits.CircuitError, match=r"input population 'x' has shape \(2, 4, 4\), but this projection "
                                                    r"needs a 2-D population"):
        c.connect(c.input("x", shape=(2, 4, 4)), c.population("y", shape=(3, 2)), circuits.Conv1d(3))
    with pytest.raises(circuits.CircuitError, match=r"maps \(2, 4, 4\) to \(3, 9, 9\), which does not fit 'z'"):
        c.connect("x", c.population("z", shape=(3, 8, 8)), circuits.ConvTranspose2d(3, stride=2))
