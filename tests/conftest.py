import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ResidualNet(nn.Module):
    """A small residual convnet with batch norm, the shape of a CIFAR ResNet block."""

    def __init__(self, channels: int = 4, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)) + h)
        h = self.relu(self.bn3(self.conv3(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, groups=2, stride=1, padding=1), nn.Sigmoid(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


MODELS = {"mlp": (mlp, (64,)), "convnet": (convnet, (1, 8, 8)), "residual": (ResidualNet, (1, 8, 8))}


def converted(named: dict, torch_name: str) -> list:
    """The entries of `named` (a converted net's parameters or their gradients, by name) that hold the torch
    module's parameter `torch_name`: fc.weight is proj.fc.weight, blocks.0.fc.weight proj.blocks_0_fc.weight,
    a parameter an operation holds proj.<operation>.held_<name>."""
    flat = torch_name.replace(".", "_")
    return [v for key, v in named.items()
            if key.replace(".", "_").replace("held_", "") == f"proj_{flat}"
            or key.replace(".", "_").endswith(f"_held_{flat}")]


def mirror_moves_every_B(net, batch_size: int) -> None:
    """One mirror batch changes the B of every projection whose rule learns in mirror phases, to finite values."""
    import circuits

    before = {n: s.feedback.detach().clone() for n, s in net.projections() if s.rule is not None and s.rule.mirrors}
    assert before, "no projection learns in mirror phases"
    circuits.mirror_step(net, batch_size=batch_size)
    after = {n: s.feedback.detach() for n, s in net.projections() if n in before}
    moved = [n for n in before if torch.isfinite(after[n]).all() and not torch.equal(after[n], before[n])]
    assert moved == list(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine, spinning OpenMP threads slow small models ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def without_data_packages(monkeypatch):
    """models.data as it runs where mlxtend and scikit-learn are not installed."""
    from models import data

    real = data.importlib.import_module

    def without(name, *args):
        if name.startswith(("mlxtend", "sklearn")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(data.importlib, "import_module", without)


def true_float64(module: nn.Module) -> nn.Module:
    """`module` in float64 with values float32 cannot hold: cast, then each parameter and batch-norm statistic
    moved by a relative 1e-7 of float64 noise (signs and scales kept), so that an exactness test meets float64's
    rounding, not float32 values in float64 clothing."""
    module = module.double()
    generator = torch.Generator().manual_seed(0)
    statistics = (b for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var")))
    values = [*module.parameters(), *statistics]
    with torch.no_grad():
        for t in values:
            t.mul_(1 + 1e-7 * torch.randn(t.shape, dtype=t.dtype, generator=generator))
    return module
