"""Peer parity: a rule that carries a peer's name computes what the peer's code computes (float64).

Each peer's update lines are transcribed here, in our own words, from its source:
  BioTorch, jsalbert/biotorch: biotorch/autograd/fa/linear.py (05f81e7e), biotorch/autograd/fa/conv.py (04bca8af),
    biotorch/layers/fa_constructor/conv.py (f1de206b: the uSF, brSF and frSF feedback weights and the scale),
    biotorch/layers/dfa/linear.py and conv.py (05f81e7e: DFA's backward hooks);
  Kunin et al., neuroailab/Neural-Alignment (d4543ca7): Alignments/primitives.py, Alignments/alignment.py;
  Xiao et al., willwx/sign-symmetry (3ed3812a): modules/af_linear_module.py, modules/af_conv2d_module.py.
One small dense net and one conv net with stride 2, padding and a residual skip. Equality is to 1e-12 where the
conventions agree; where they differ by design the measured difference is asserted. (The authors' FCNN classes are
transcribed in tests/test_reproduce.py; the weight mirror against Kunin's {decay, amp} in tests/test_rules.py.)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import circuits
from circuits import rules


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the two nets ------------------------------------------------------------------------------
class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    """conv1 (3x3, stride 2, padding 1), a residual block of two 3x3 convolutions around an identity skip, a
    dense read-out."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv3 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))) + h)
        return self.fc(torch.flatten(h, 1))


NETS = {"dense": (DenseNet, (6,)), "conv": (ConvNet, (2, 7, 7))}


def forward_peer(kind: str, x: Tensor, layer) -> Tensor:
    """The same forward, each synaptic layer applied by `layer(name, input)` (the peer's layer)."""
    if kind == "dense":
        return layer("fc3", torch.tanh(layer("fc2", torch.tanh(layer("fc1", x)))))
    h = torch.relu(layer("conv1", x))
    h = torch.relu(layer("conv3", torch.relu(layer("conv2", h))) + h)
    return layer("fc", torch.flatten(h, 1))


def circuit_run(kind: str, rule, seed: int = 0):
    """The net converted with `rule`, in float64, after one backward of a cross-entropy loss; and its batch."""
    make, shape = NETS[kind]
    torch.manual_seed(seed)
    net = circuits.from_torch(make().double(), rule=rule, input_shape=shape).build()
    data = torch.Generator().manual_seed(seed)      # the same batch whatever the rule drew
    x = torch.randn(5, *shape, dtype=torch.float64, generator=data).requires_grad_()
    target = torch.randint(0, 3, (5,), generator=data)
    return net, x, target


def synapses(net) -> dict[str, nn.Module]:
    return dict(net.projections())


# --- BioTorch's layers, transcribed -------------------------------------------------------------
class PeerLinear(torch.autograd.Function):
    """biotorch/autograd/fa/linear.py: out = x W^T + b; backward: input g B, weight g^T x, bias sum of g."""

    @staticmethod
    def forward(ctx, x, weight, feedback, bias):
        ctx.save_for_backward(x, feedback)
        return x.mm(weight.t()) + bias

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        return g.mm(feedback), g.t().mm(x), None, g.sum(0)


class PeerConv(torch.autograd.Function):
    """biotorch/autograd/fa/conv.py: input by conv2d_input with B, weight by conv2d_weight, bias summed."""

    @staticmethod
    def forward(ctx, x, weight, feedback, bias, stride, padding):
        ctx.save_for_backward(x, weight, feedback)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, weight, feedback = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(x.shape, feedback, g, ctx.stride, ctx.padding)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, g, ctx.stride, ctx.padding)
        return grad_x, grad_w, None, g.sum((0, 2, 3)), None, None


def peer_layer(net, feedback: dict[str, Tensor]):
    """BioTorch's FA-constructor layer for each synapse of `net`, with W and bias copied (leaves of their own)
    and the feedback weights given."""
    params = {}

    def layer(name: str, x: Tensor) -> Tensor:
        s = synapses(net)[name]
        if name not in params:
            params[name] = (s.weight.detach().clone().requires_grad_(), s.bias.detach().clone().requires_grad_())
        w, b = params[name]
        if s.weight.dim() == 2:
            return PeerLinear.apply(x, w, feedback[name], b)
        return PeerConv.apply(x, w, feedback[name], b, s.operator.stride, s.operator.padding)

    return layer, params


def compare_to_peer(kind: str, net, x: Tensor, target: Tensor, layer, params) -> None:
    """x's error and every W and bias gradient of the circuit equal the peer's to 1e-12."""
    x_peer = x.detach().clone().requires_grad_()
    F.cross_entropy(forward_peer(kind, x_peer, layer), target).backward()
    assert relative(x.grad, x_peer.grad) < 1e-12
    for name, s in synapses(net).items():
        w, b = params[name]
        assert relative(s.weight.grad, w.grad) < 1e-12, name
        assert relative(s.bias.grad, b.grad) < 1e-12, name


def usf_feedback(weight: Tensor) -> Tensor:
    """biotorch/layers/fa_constructor/conv.py: sign(W) times the Xavier std, sqrt(2 / (fan_in + fan_out))."""
    fan_in = weight[0].numel()
    fan_out = weight.shape[0] * weight[0, 0].numel()
    return torch.sign(weight) * math.sqrt(2.0 / (fan_in + fan_out))


def xiao_feedback(weight: Tensor) -> Tensor:
    """willwx/sign-symmetry: sign(W) / sqrt(in) (af_linear_module.py), sign(W) sqrt(2 / (k_h k_w out))
    (af_conv2d_module.py)."""
    if weight.dim() == 2:
        return torch.sign(weight) / math.sqrt(weight.shape[1])
    return torch.sign(weight) * math.sqrt(2 / (weight.shape[2] * weight.shape[3] * weight.shape[0]))


@pytest.mark.parametrize("kind", list(NETS))
@pytest.mark.parametrize("rule", ["fa", "frsf", "brsf", "usf", "ss"])
def test_fa_and_sign_symmetry_equal_their_peers(kind, rule):
    """fa, frsf, brsf (given the B the step used) and usf equal BioTorch's layers; ss equals Xiao et al.'s."""
    net, x, target = circuit_run(kind, rule)
    F.cross_entropy(net(x), target).backward()
    used = {name: s.feedback.detach() for name, s in synapses(net).items()}      # brsf: the M this step drew
    if rule == "usf":
        feedback = {name: usf_feedback(s.weight.detach()) for name, s in synapses(net).items()}
        assert all(torch.equal(feedback[n], used[n]) for n in used)
    elif rule == "ss":
        feedback = {name: xiao_feedback(s.weight.detach()) for name, s in synapses(net).items()}
        assert all(relative(used[n], feedback[n]) < 1e-15 for n in used)
    else:
        feedback = used
        if rule != "fa":        # |M| sign(W), M Xavier-uniform (fa_constructor/conv.py)
            for name, s in synapses(net).items():
                bound = math.sqrt(6 / (s.weight[0].numel() + s.weight.shape[0] * s.weight[0, 0].numel()))
                assert torch.equal(torch.sign(used[name]), torch.sign(s.weight.detach()))
                assert float(used[name].abs().max()) <= bound
    compare_to_peer(kind, net, x, target, *peer_layer(net, feedback))


def test_usf_is_not_xiao_sign_symmetry():
    """usf (BioTorch) and ss (Xiao et al.) differ by design in their scale: on the conv net's layers the ratio
    usf / ss is sqrt(fan_in) sqrt(2 / (fan_in + fan_out)) for dense, sqrt(k_h k_w out / (fan_in + fan_out)) for conv."""
    net, _, _ = circuit_run("conv", "usf")
    ratios = {name: float(usf_feedback(s.weight.detach()).abs().max() / xiao_feedback(s.weight.detach()).abs().max())
              for name, s in synapses(net).items()}
    assert ratios == pytest.approx({"conv1": math.sqrt(27 / 45), "conv2": math.sqrt(27 / 54),
                                    "conv3": math.sqrt(27 / 54), "fc": math.sqrt(48 * 2 / 52)}, rel=1e-12)


# --- DFA: BioTorch's hooks, transcribed ---------------------------------------------------------
def peer_dfa_layer(net, feedback: dict[str, Tensor]):
    """biotorch/layers/dfa: each layer's input error is replaced, in a backward hook, by its feedback weight
    (output units x in, or x in x k_h x k_w) applied to the loss gradient at the net's output: `e B` for Linear,
    conv2d_input of e repeated over the layer's output map for Conv2d, at the layer's stride and padding; W and
    bias get their ordinary gradients. The loss gradient is caught by a hook on the output (store)."""
    params, store = {}, {}

    class Hooked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, name):
            s = synapses(net)[name]
            ctx.save_for_backward(x, weight)
            ctx.name, ctx.operator = name, s.operator
            out = F.linear(x, weight, bias) if weight.dim() == 2 else s.operator.forward(x, weight, bias)
            ctx.out_shape = out.shape
            return out

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            e, b = store["e"], feedback[ctx.name]
            if weight.dim() == 2:
                return e.mm(b), g.t().mm(x), g.sum(0), None
            spread = e[:, :, None, None].repeat(1, 1, *ctx.out_shape[2:])
            op = ctx.operator
            grad_x = torch.nn.grad.conv2d_input(x.shape, b, spread, op.stride, op.padding)
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, g, op.stride, op.padding)
            return grad_x, grad_w, g.sum((0, 2, 3)), None

    def layer(name: str, x: Tensor) -> Tensor:
        s = synapses(net)[name]
        if name not in params:
            params[name] = (s.weight.detach().clone().requires_grad_(), s.bias.detach().clone().requires_grad_())
        out = Hooked.apply(x, params[name][0], params[name][1], name)
        if name in ("fc3", "fc"):       # the output: its gradient is the loss gradient the hooks read
            out.register_hook(lambda grad: store.__setitem__("e", grad))
        return out

    return layer, params


@pytest.mark.parametrize("kind", list(NETS))
def test_ldfa_equals_biotorch_dfa(kind):
    """ldfa: the input error and every W and bias gradient equal BioTorch's DFA, on the dense net and on the
    conv net (stride 2, padding, a residual skip whose error adds)."""
    net, x, target = circuit_run(kind, "ldfa")
    F.cross_entropy(net(x), target).backward()
    feedback = {name: s.feedback.detach() for name, s in synapses(net).items()}
    assert {n: tuple(b.shape) for n, b in feedback.items()} == (
        {"fc1": (3, 6), "fc2": (3, 5), "fc3": (3, 4)} if kind == "dense" else
        {"conv1": (4, 2, 3, 3), "conv2": (4, 3, 3, 3), "conv3": (4, 3, 3, 3), "fc": (4, 48)})
    compare_to_peer(kind, net, x, target, *peer_dfa_layer(net, feedback))


def set_dfa_feedback(net, feedback: dict[str, Tensor]) -> None:
    """Each population's direct feedback B (output units x units or channels) from the B of the synapse it
    feeds: as it is for a dense layer, summed over the kernel's taps for a convolution (the population form)."""
    pre = {name: pre for name, pre, _, _, _ in net.circuit.projections()}
    for _, direct in net.feedback_projections():
        name = next(n for n, p in pre.items() if p == direct.target and n in feedback)
        b = feedback[name]
        direct.feedback = b if b.dim() == 2 else b.sum((2, 3))


def test_dfa_equals_biotorch_on_a_dense_net():
    """dfa (Nokland's population form) equals BioTorch's DFA on an MLP with a linear output: the W gradients
    agree (dfa sends no error to the input population)."""
    ldfa, x, target = circuit_run("dense", "ldfa")
    F.cross_entropy(ldfa(x), target).backward()
    dfa, x2, _ = circuit_run("dense", "dfa")
    dfa.load_state_dict(ldfa.state_dict(), strict=False)
    set_dfa_feedback(dfa, {name: s.feedback.detach() for name, s in synapses(ldfa).items()})
    F.cross_entropy(dfa(x2), target).backward()
    for name, s in synapses(dfa).items():
        assert relative(s.weight.grad, synapses(ldfa)[name].weight.grad) < 1e-12, name


def test_dfa_differs_from_biotorch_on_convolutions_by_design():
    """Where the conventions differ: with dfa's B the kernel summed over taps, dfa and BioTorch send the same
    error to the interior of a padded map and another one to its border; a stride-2 layer's transposed
    convolution leaves a 2 x 2 pattern that dfa's position-shared B has not; and BioTorch adds the residual
    skip's error where dfa discards it. Measured (this test's random B, drawn in float64): the border signal differs
    by 0.55 of its norm, the two phases of the stride by 2.51, and conv2's and conv1's dW by 50% and 72% (conv1:
    borders and the skip)."""
    ldfa, x, target = circuit_run("conv", "ldfa")
    feedback = {name: s.feedback.detach() for name, s in synapses(ldfa).items()}
    e = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # conv2 (3x3, padding 1, stride 1) on the 4x4 map: its B^T E against dfa's (sum of taps)^T e
    peer = torch.nn.grad.conv2d_input((5, 3, 4, 4), feedback["conv2"], e[:, :, None, None].repeat(1, 1, 4, 4),
                                      1, 1)
    population = (e @ feedback["conv2"].sum((2, 3)))[:, :, None, None].expand(5, 3, 4, 4)
    interior = torch.zeros(4, 4, dtype=torch.bool)
    interior[1:3, 1:3] = True
    assert relative(peer[..., interior], population[..., interior]) < 1e-12
    assert relative(peer[..., ~interior], population[..., ~interior]) == pytest.approx(0.5540, abs=1e-4)
    # conv1 (stride 2, padding 1) on the 7x7 input: the signal repeats with period 2 in the interior
    peer = torch.nn.grad.conv2d_input((5, 2, 7, 7), feedback["conv1"], e[:, :, None, None].repeat(1, 1, 4, 4),
                                      2, 1)
    assert relative(peer[..., 2, 2], peer[..., 4, 4]) < 1e-12          # the same phase
    assert relative(peer[..., 2, 3], peer[..., 2, 2]) == pytest.approx(2.5092, abs=1e-4)    # the other phase
    # the residual block: conv1's dW with dfa's B from the same kernels, against ldfa's (= BioTorch's)
    F.cross_entropy(ldfa(x), target).backward()
    dfa, x2, _ = circuit_run("conv", "dfa")
    dfa.load_state_dict(ldfa.state_dict(), strict=False)
    set_dfa_feedback(dfa, feedback)
    F.cross_entropy(dfa(x2), target).backward()
    measured = {"conv1": 0.7155, "conv2": 0.5040, "conv3": 0.0, "fc": 0.0}   # conv3 and fc: the same error
    for name, s in synapses(dfa).items():
        assert relative(s.weight.grad, synapses(ldfa)[name].weight.grad) == pytest.approx(measured[name], abs=1e-4)


def test_ldfa_sends_dL_dy_out_and_dfa_dL_da_out():
    """Through a sigmoid output population, ldfa's error is dL/dy_out (BioTorch's), dfa's dL/da_out (Nokland's)."""
    torch.manual_seed(0)
    errors = {}
    for rule in ("ldfa", "dfa"):
        c = circuits.Circuit(rule=rule)
        x = c.input("x", shape=(6,))
        h = c.population("h", shape=(5,), activation="tanh")
        out = c.population("out", shape=(3,), activation="sigmoid")
        c.connect(x, h, circuits.Dense())
        c.connect(h, out, circuits.Dense())
        layer_rules = circuits.graph.circuit.LayerRules(None)
        net = layer_rules.finish(c).build().double()
        errors[rule] = net
    ldfa, dfa = errors["ldfa"], errors["dfa"]
    dfa.load_state_dict(ldfa.state_dict(), strict=False)
    b = synapses(ldfa)["h->out"].feedback.detach()
    (_, direct), = dfa.feedback_projections()
    direct.feedback = b
    x = torch.randn(4, 6, dtype=torch.float64)
    grad = torch.randn(4, 3, dtype=torch.float64)
    traces = {}
    for rule, net in (("ldfa", ldfa), ("dfa", dfa)):
        trace = {}
        net(x, monitor=trace).backward(grad)
        traces[rule] = trace
    y_out = traces["ldfa"]["out"].y.detach()
    da_out = grad * y_out * (1 - y_out)
    tanh_prime = 1 - traces["ldfa"]["h"].y.detach() ** 2
    assert relative(traces["ldfa"]["h"].a.grad, tanh_prime * (grad @ b)) < 1e-12
    assert relative(traces["dfa"]["h"].a.grad, tanh_prime * (da_out @ b)) < 1e-12


# --- Kunin et al.'s alignment losses, transcribed ------------------------------------------------
def kunin_loss(kind: str, coefficients: dict[str, float], x: Tensor, w: Tensor, b: Tensor, stride, padding,
               center_input=False, normalize_input=False, batch_center_backward_input=False) -> Tensor:
    """Alignments/alignment.py (AlignmentBase.__call__, Information, Symmetric) and primitives.py: the inputs
    standardised as the options say, the projections W x and B x (B x from the backward input), the
    reconstruction B^T W x, and the weighted sum of decay |W|^2 + |B|^2, self -sum(W * B), amp
    -sum(mean over the batch of W x * B x), null sum(mean over the batch of (B^T W x)^2). W and B in torch's
    layout (their fc kernels are W^T; their conv runs NHWC: the same sums)."""
    flat = x.reshape(x.shape[0], -1)
    if center_input:
        flat = flat - flat.mean(1, keepdim=True)
    if normalize_input:
        flat = flat - flat.mean(1, keepdim=True)
        flat = flat / flat.norm(dim=1, keepdim=True)
    forward_input = flat.view_as(x)
    backward_input = forward_input - forward_input.mean(0, keepdim=True) if batch_center_backward_input \
        else forward_input
    if kind == "dense":
        wx, bx = forward_input @ w.t(), backward_input @ b.t()
        reconstruction = wx @ b
    else:
        wx, bx = F.conv2d(forward_input, w, None, stride, padding), F.conv2d(backward_input, b, None, stride, padding)
        reconstruction = torch.nn.grad.conv2d_input(x.shape, b, wx, stride, padding)
    terms = {"decay": w.square().sum() + b.square().sum(), "self": -(w * b).sum(),
             "amp": -(wx * bx).mean(0).sum(), "null": reconstruction.square().mean(0).sum()}
    return sum(c * terms[name] for name, c in coefficients.items())


OPTIONS = [{}, {"center_examples": True}, {"normalize_examples": True}, {"center_feedback_input": True},
           {"center_examples": True, "center_feedback_input": True}]
THEIRS = {"center_examples": "center_input", "normalize_examples": "normalize_input",
          "center_feedback_input": "batch_center_backward_input"}


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("options", OPTIONS)
def test_information_alignment_equals_kunin_et_al(kind, options):
    """InformationAlignment.kunin(**options): their default IA (alpha 2e-3 amp, beta 1e-3 null, gamma 1e-3
    decay) with their input options by meaning: B's gradient equals theirs; sa's equals their Symmetric."""
    torch.manual_seed(1)
    if kind == "dense":
        x, w = torch.randn(8, 6, dtype=torch.float64) + 0.5, torch.randn(4, 6, dtype=torch.float64)
        operator, stride, padding = circuits.rules.synapse.DenseOperator(), 1, 0
    else:
        x, w = torch.randn(3, 2, 7, 7, dtype=torch.float64) + 0.5, torch.randn(4, 2, 3, 3, dtype=torch.float64)
        operator, stride, padding = circuits.rules.synapse.ConvOperator((2, 2), (1, 1)), 2, 1
    b = torch.randn_like(w, requires_grad=True)
    rule = rules.InformationAlignment.kunin(**options)
    ours = rule.feedback_gradient(torch.zeros_like(w), x, w, b.detach(), operator)
    loss = kunin_loss(kind, {"amp": 2e-3, "null": 1e-3, "decay": 1e-3}, x, w, b, stride, padding,
                      **{THEIRS[k]: v for k, v in options.items()})
    assert relative(ours, torch.autograd.grad(loss, b)[0]) < 1e-12
    sa = rules.get("sa").feedback_gradient(torch.zeros_like(w), x, w, b.detach(), operator)
    theirs = torch.autograd.grad(kunin_loss(kind, {"decay": 0.5, "self": 1.0}, x, w, b, stride, padding), b)[0]
    assert relative(sa, theirs) < 1e-12
    assert dict(rules.get("sa").terms) == {"decay": 500 * 1e-3, "self": 500 * 2e-3}   # their ratio, 500x their step


def test_the_default_ia_normalisation_is_ours_not_kunins():
    """ia's default (normalize=True: centred over the batch, divided by the batch's rms) is none of their
    options: on an uncentred input its gradient differs from each of theirs."""
    torch.manual_seed(2)
    x, w = torch.randn(8, 6, dtype=torch.float64) * 3 + 1, torch.randn(4, 6, dtype=torch.float64)
    b = torch.randn_like(w)
    operator = circuits.rules.synapse.DenseOperator()
    terms = dict(rules.get("ia").terms)
    ours = rules.get("ia").feedback_gradient(torch.zeros_like(w), x, w, b, operator)
    for options in OPTIONS:
        theirs = rules.LocalAlignment(tuple(terms.items()), normalize=False, **options)
        assert relative(ours, theirs.feedback_gradient(torch.zeros_like(w), x, w, b, operator)) > 0.05, options


def test_normalisations_compute_in_the_inputs_dtype():
    """ia's rms normalisation and Imperfect's noise scale carry no float32 rounding in a float64 run."""
    y = torch.randn(16, 7, dtype=torch.float64) * 3.3 + 0.7
    prepared, _ = rules.get("ia").prepare_input(y)
    assert abs(float(prepared.square().mean()) - 1) < 1e-14
    rule = rules.Imperfect("fa", noise=1.0)
    torch.manual_seed(4)
    noisy = rule.signal(y)
    torch.manual_seed(4)
    rms = y.square().mean().sqrt()
    assert relative(noisy, y + torch.randn_like(y) * rms) < 1e-15


def test_ldfa_on_a_grouped_convolution_reaches_every_input_channel():
    """B (output units x all input channels x k_h x k_w); the input error is its groups-1 transposed convolution
    (BioTorch passes the layer's groups there, which fails for a grouped layer)."""
    module = nn.Sequential(nn.Conv2d(4, 2, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).double()
    net = circuits.from_torch(module, rule="ldfa", input_shape=(4, 5, 5)).build()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 3, dtype=torch.float64)
    net(x).backward(e)
    b = synapses(net)["0"].feedback.detach()
    assert tuple(b.shape) == (3, 4, 3, 3)
    expected = torch.nn.grad.conv2d_input(x.shape, b, e[:, :, None, None].repeat(1, 1, 3, 3), 1, 0)
    assert relative(x.grad, expected) < 1e-12
