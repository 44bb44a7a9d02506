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
