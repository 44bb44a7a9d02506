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


def _same_as_torch(module: nn.Module, x: torch.Tensor, **kwargs) -> None:
    """Bit-equal outputs, and under bp input and parameter gradients equal to torch autograd's."""
    net = circuits.from_torch(module, **kwargs).build()
    x_net = x.clone().requires_grad_()
    x = x.clone().requires_grad_()
    out, out_ref = net(x_net), module(x)
    assert out.dtype == out_ref.dtype and torch.equal(out, out_ref)
    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()
    (out * weights).sum().backward()
    assert torch.equal(x_net.grad, x.grad)
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    for name, p in module.named_parameters():
        mine = [g for key, g in grads.items() if key.endswith(name.rsplit(".", 1)[-1]) and g.shape == p.shape]
        assert any(torch.equal(g, p.grad) for g in mine), name


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
