"""circuits.from_torch against torch: every activation with its settings, bare and N-D layers, junctions, the zoo."""
import pytest
import torch
from torch import nn

import circuits
from circuits import graph

F = nn.functional

ACTIVATION_MODULES = [
    nn.ReLU(), nn.ReLU6(), nn.Hardswish(), nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Softplus(),
    nn.Softplus(beta=5, threshold=3), nn.LeakyReLU(), nn.LeakyReLU(0.2), nn.ELU(), nn.ELU(alpha=2.5), nn.Sigmoid(),
    nn.Tanh(), nn.Hardsigmoid(), nn.Mish(), nn.CELU(0.7), nn.SELU(), nn.Hardtanh(-2, 3), nn.Threshold(0.1, -4.0),
    nn.Hardshrink(0.3), nn.Softshrink(0.2), nn.LogSigmoid(), nn.Softsign(), nn.Tanhshrink(), nn.Softmax(dim=1),
    nn.Softmax(dim=-1), nn.LogSoftmax(dim=1), nn.Softmin(dim=-1),
]


class Call(nn.Module):
    """fc, then one activation function or tensor method call, then fc2."""

    def __init__(self, fn, width=6):
        super().__init__()
        self.fc, self.fn, self.fc2 = nn.Linear(5, width), fn, nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(self.fn(self.fc(x)))


ACTIVATION_CALLS = [
    lambda a: F.gelu(a, approximate="tanh"), lambda a: F.softplus(a, 5, 3), lambda a: F.softplus(a, beta=0.5),
    lambda a: F.leaky_relu(a, 0.3), lambda a: F.elu(a, alpha=0.5, inplace=False), lambda a: F.relu6(a),
    lambda a: F.hardswish(a), lambda a: F.silu(a), lambda a: F.mish(a), lambda a: F.hardsigmoid(a),
    lambda a: torch.softmax(a, -1), lambda a: F.softmax(a, dim=1), lambda a: a.softmax(-1), lambda a: a.log_softmax(1),
    lambda a: F.log_softmax(a, dim=-1), lambda a: torch.sigmoid(a), lambda a: a.tanh(), lambda a: a.relu(),
    lambda a: F.hardtanh(a, -0.5, 0.5),
]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return torch.equal(a, b) if tol == 0 else bool((a - b).norm() <= tol * b.norm())


def _same_as_torch(module: nn.Module, x: torch.Tensor, grad_tol: float = 0.0, out_tol: float = 0.0,
                   **kwargs) -> circuits.CircuitNet:
    """Outputs equal to torch's (bit for bit unless out_tol), and under the rule (default bp) input and parameter
    gradients equal to torch autograd's (bit for bit, or within grad_tol relative: a synapse's own backward sums
    W's and the input's gradient over positions in another order than autograd's)."""
    net = circuits.from_torch(module, **kwargs).build()
    x_net = x.clone().requires_grad_()
    x = x.clone().requires_grad_()
    out, out_ref = net(x_net), module(x)
    assert out.dtype == out_ref.dtype and _close(out, out_ref, out_tol)
    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert _close(x_net.grad, x.grad, grad_tol)
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    for name, p in module.named_parameters():
        mine = [g for key, g in grads.items() if key.endswith(name.rsplit(".", 1)[-1]) and g.shape == p.shape]
        assert any(_close(g, p.grad, grad_tol) for g in mine), name
    return net


@pytest.mark.parametrize("act", ACTIVATION_MODULES, ids=repr)
def test_every_activation_module_converts_with_its_settings_bit_for_bit(act):
    module = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 3))
    _same_as_torch(module, torch.randn(7, 5) * 3)


@pytest.mark.parametrize("fn", ACTIVATION_CALLS)
def test_every_activation_function_and_method_converts_with_its_arguments(fn):
    _same_as_torch(Call(fn), torch.randn(7, 5) * 3, input_shape=(5,))


def test_activation_settings_are_stored_readably_without_torch():
    c = circuits.from_torch(nn.Sequential(nn.Linear(5, 6), nn.LeakyReLU(0.2), nn.Linear(6, 4), nn.GELU("tanh"),
                                          nn.Linear(4, 3), nn.ELU(), nn.Linear(3, 3), nn.Softmax(-1)))
    specs = [p.activation for p in c.populations()]
    assert specs == ["identity", "leaky_relu(negative_slope=0.2)", "gelu(approximate='tanh')", "elu", "softmax(dim=-1)"]
    assert graph.parse_activation(specs[1]) == ("leaky_relu", {"negative_slope": 0.2})
    assert graph.parse_activation(specs[3]) == ("elu", {})


def test_activations_that_cannot_be_converted_are_clear_errors():
    with pytest.warns(UserWarning, match="Implicit dimension"), pytest.raises(
            circuits.CircuitError, match=r"layer '1' \(Softmax\(dim=None\)\).*needs dim"):
        circuits.from_torch(nn.Sequential(nn.Linear(5, 6), nn.Softmax()))
    with pytest.raises(circuits.CircuitError, match=r"node 'softmax'.*dtype=torch.float64"):
        circuits.from_torch(Call(lambda a: F.softmax(a, -1, dtype=torch.float64).float()), input_shape=(5,))
    required = circuits.from_torch(nn.Sequential(nn.Linear(5, 6), nn.Threshold(0.1, 2)))
    assert required.populations()[-1].activation == "threshold(threshold=0.1, value=2)"


# --- bare layers, N-D populations, shapes and constants ------------------------------------------------------------
def test_a_bare_layer_converts():
    layer = nn.Linear(4, 3)
    net = circuits.from_torch(layer, rule="fa").build()
    assert [name for name, _ in net.projections()] == ["linear"]
    _same_as_torch(layer, torch.randn(5, 4))
    _same_as_torch(nn.LayerNorm(6), torch.randn(5, 6), input_shape=(6,))


class Tokens(nn.Module):
    """Tokens x channels: Linear on the last axis, LayerNorm, GroupNorm, and the shape and arithmetic ops."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 4)
        self.group = nn.GroupNorm(2, 4)

    def forward(self, x):
        b, t, c = x.size()
        h = self.norm(self.fc(x)) / 4.0
        h = -(h * 2 + 1.5) - 0.25
        h = h.view(b, t, 2, 4).permute(0, 2, 1, 3).contiguous().transpose(1, 2).reshape(b, t * 8)
        h = h.reshape(x.shape[0], t, 8)
        first, second = h.split(4, dim=-1)
        h = torch.cat([second, first], dim=-1) + torch.stack(h.chunk(2, dim=-1), dim=2).flatten(2)
        h = self.fc2(h)[:, 1:]
        return self.group(h.transpose(1, 2)).flatten(1)


def test_tokens_by_channels_convert_exactly_with_shape_ops_and_norms():
    module = Tokens().double()
    c = circuits.from_torch(module, input_shape=(5, 6))
    assert c["fc"].shape == (5, 8) and c["x"].shape == (5, 6)
    net = c.build()
    assert net.projection("fc").weight.shape == (8, 6) and net.projection("fc").weight.dtype == torch.float64
    _same_as_torch(module, torch.randn(3, 5, 6, dtype=torch.float64), 1e-13, input_shape=(5, 6))


def test_weight_mirror_noise_on_tokens_learns_the_mean_over_positions():
    """On an N-D population the same W acts at every position: the mirror's correlation averages over positions,
    so B -> (eta sigma^2 / lambda) W as for a 1-D population (not T times that)."""
    from circuits import mirror
    net = circuits.from_torch(nn.Linear(6, 4), rule="wm", input_shape=(10, 6)).build()
    synapse = net.projection("linear")
    assert synapse.in_shape == (10, 6) and float(synapse.positions) == 10
    c = mirror.correlation(synapse, 4000, torch.Generator().manual_seed(0))
    sigma2 = synapse.rule.sigma ** 2
    assert torch.allclose(c, sigma2 * synapse.weight.detach(), atol=0.02)


def test_a_model_without_an_input_shape_is_asked_for_one():
    with pytest.raises(circuits.CircuitError, match=r"pass input_shape=\(\.\.\.\) to from_torch"):
        circuits.from_torch(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(circuits.CircuitError, match=r"does not run on examples of shape \(5,\)"):
        circuits.from_torch(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 2)), input_shape=(5,))


def test_conversion_keeps_dtype_and_mode():
    module = Tokens().double().eval()
    net = circuits.from_torch(module, input_shape=(5, 6)).build()
    assert not net.training and all(p.dtype == torch.float64 for p in net.parameters())
