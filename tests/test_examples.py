"""Every example script runs to the end at a tiny size (--smoke) and prints what it promises."""
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECTED = {
    "hand_circuit.py": ["feedback δv2 -> δv1: carries B (wm)", "test accuracy after 1 epochs", "skip (ss)"],
    "convert_torchvision.py": ["same outputs as torchvision: True", "as models.resnet.resnet18: True", "fc (bp)"],
    "mix_rules.py": ["FA everywhere: test accuracy", "WM convolutions, KP readout", "fc kp"],
    "watch_alignment.py": ["writer: python -m models.compare", "angle(B, W) fc1"],
    "sleep.py": ["awake", "after sleep 2", "predicted floor"],
    "imagenet.py": ["torchrun --nproc_per_node=8 -m models.imagenet", "wm: 3 learning steps done"],
    "vit_rules.py": ["python examples/vit_rules.py --smoke: ViT on the MNIST subset (256 training",
                     "| angle(B, W) blocks.1.fc2 (°) |", "- undecided: KP: angle(B, W) below 10° in every projection"],
}
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_example_runs_with_smoke_flag(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), "--smoke"])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    for text in EXPECTED[name]:
        assert text in out, f"{name} --smoke did not print {text!r}:\n{out}"
