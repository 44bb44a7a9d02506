"""The core's guarantees against bad input: shapes the circuit was not told, impossible settings, objects of
another circuit, oversized mirror batches, the mirror on CPU nets with 1x1 convolutions."""
import pytest
import torch
from torch import nn

import circuits
from circuits import rules
from circuits.graph.projections import Embedding
from circuits.phases import mirror
from models.mlp import mlp


def test_data_of_another_shape_than_declared_is_a_clear_error():
    module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    net = circuits.from_torch(module, input_shape=(3, 12, 12)).build()
    assert net(torch.randn(2, 3, 12, 12)).shape == (2, 10)
    with pytest.raises(
        circuits.CircuitError, match=r"'input_1' was declared with shape \(3, 12, 12\).*\(2, 3, 32, 32\)"
    ):
        net(torch.randn(2, 3, 32, 32))


def test_from_torch_keeps_the_modules_dtype_and_mode():
    module = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double().eval()
    net = circuits.from_torch(module).build()
    assert not net.training and all(p.dtype == torch.float64 for p in net.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(net(x), module(x))          # eval mode: running statistics, as the module
    assert circuits.from_torch(module.train()).build().training


@pytest.mark.parametrize(
    "projection",
    [
        lambda: circuits.Conv2d(3, stride=0),
        lambda: circuits.Conv2d(3, padding=-1),
        lambda: circuits.Conv2d(0),
        lambda: circuits.MaxPool(2, stride=0),
        lambda: circuits.AvgPool(2, padding=-2),
        lambda: circuits.Conv2d(3, dilation=0),
    ],
)
def test_impossible_window_settings_are_refused(projection):
    with pytest.raises(circuits.CircuitError, match="must be a (positive|non-negative) integer"):
        projection()


@pytest.mark.parametrize(
    "make",
    [
        lambda: rules.KolenPollack(decay=float("nan")),
        lambda: rules.WeightMirror(eta=float("inf")),
        lambda: rules.WeightMirror(sigma=float("nan")),
        lambda: rules.KolenPollack(decay=-1.0),
        lambda: rules.Imperfect("fa", noise=float("nan")),
    ],
)
def test_non_finite_rule_settings_are_refused(make):
    with pytest.raises(circuits.CircuitError):
        make()


def test_a_population_of_another_circuit_is_refused_not_resolved_by_name():
    a, b = circuits.Circuit("a"), circuits.Circuit("b")
    xa, ha = a.input("x", shape=(3,)), a.population("h", shape=(2,))
    b.input("x", shape=(3,)), b.population("h", shape=(2,))
    with pytest.raises(circuits.CircuitError, match="made by another circuit"):
        b.connect(xa, ha, circuits.Dense())
    b.connect("x", "h", circuits.Dense())     # names still work


def test_the_mirror_on_a_cpu_net_with_a_1x1_stride_2_convolution():
    """channels_last noise for a 1x1 kernel (contiguous in both formats) made torch's CPU convolution backward
    corrupt memory (free(): invalid next size): the format now follows how the net runs."""
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1, stride=2))
    net = circuits.from_torch(module, rule="wm", input_shape=(3, 64, 64)).build()
    assert not mirror.runs_channels_last(net)
    circuits.Mirror(batches=10).run(net)
    assert all(torch.isfinite(s.B).all() for _, s in net.projections())
    assert mirror.runs_channels_last(net.to(memory_format=torch.channels_last))


def test_a_huge_mirror_batch_is_drawn_in_chunks(monkeypatch):
    """Mirror(angle=0.05) on a 784-500 layer once asked for 32.6 GB of noise at once."""
    net = mlp((30, 4), rule=rules.WeightMirror(eta=0.1, decay=0.1)).build().double()
    synapse = net.projection("fc1")
    whole = mirror.correlation(synapse, 1000, torch.Generator().manual_seed(0))
    monkeypatch.setattr(mirror, "NOISE_ELEMENTS", 30 * 64)     # chunks of 64 samples
    drawn = []
    original = mirror.noise
    monkeypatch.setattr(mirror, "noise", lambda s, m, *a, **k: drawn.append(m) or original(s, m, *a, **k))
    chunked = mirror.correlation(synapse, 1000, torch.Generator().manual_seed(0))
    assert max(drawn) == 64 and sum(drawn) == 1000
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-15)      # the same noise, summed in pieces


def test_a_batch_of_another_dtype_names_both_dtypes():
    """Issue 23: torch's "mat1 and mat2 must have the same dtype" from deep inside a projection, before."""
    net = mlp((6, 5, 4)).build()
    with pytest.raises(circuits.CircuitError, match=r"input population 'retina' got a batch of dtype torch.float64, "
                                                    r"but circuit 'mlp' runs in torch.float32: convert the data "
                                                    r"\(x.to\(torch.float32\)\) or the net "
                                                    r"\(net.to\(torch.float64\)\)"):
        net(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(circuits.CircuitError, match=r"got a batch of dtype torch.int64, but circuit 'mlp' runs in "
                                                    r"torch.float32: convert the data \(x.to\(torch.float32\)\)$"):
        net(torch.ones(2, 6, dtype=torch.int64))
    assert net.double()(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64


def test_an_index_input_takes_integers():
    circuit = circuits.Circuit("tokens")
    circuit.input("ids", shape=(3,))
    circuit.population("h", shape=(3, 4))
    circuit.connect("ids", "h", Embedding(vocabulary=5))
    net = circuit.build()
    assert net(torch.tensor([[0, 1, 4]])).shape == (1, 3, 4)
    with pytest.raises(circuits.CircuitError, match=r"'ids' holds indices \(read by an embedding\), but got a batch "
                                                    r"of dtype torch.float32; pass integer indices"):
        net(torch.zeros(1, 3))


@pytest.mark.parametrize("settings, shown", [
    ({"decay": 1.5}, "decay=1.5"),
    ({"sigma": -1.0, "eta": 0.0}, "sigma=-1.0, eta=0.0"),
    ({"wishart": True, "noise": "uniform"}, "noise='uniform', response='linear'"),
])
def test_weight_mirror_range_errors_show_the_bad_values(settings, shown):
    """Issue 23: they ended with "got wm" (the rule's name), not the value."""
    with pytest.raises(circuits.CircuitError, match=rf"got {shown}$"):
        rules.WeightMirror(**settings)
