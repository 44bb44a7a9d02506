"""The zoo's fast subset (benchmarks/zoo.py on timm's tiny test models and a torchvision model) and
`models.imagenet --arch` for any torchvision classification model or timm model."""
import importlib.util
import pathlib
import sys

import pytest
import torch

import circuits
from circuits import rules
from models import imagenet, imagenet_recipe
from models.imagenet_data import synthetic_image_folder

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", _PATH)
zoo = sys.modules["zoo"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("source,name", [("timm", "test_resnet"), ("timm", "test_efficientnet"),
                                         ("timm", "test_convnext"), ("torchvision", "squeezenet1_1")])
def test_the_zoo_converts_exactly_and_every_rule_takes_a_step(source, name):
    """float64 with true float64 weights: forward bit for bit, bp gradients within 1e-9 (zoo.check); one step
    under fa, kp, wm and dfa leaves finite weights that moved, and a mirror batch moves every B."""
    if source == "timm":
        pytest.importorskip("timm")
    row = zoo.Row(source, name, size=32)
    with zoo.float64():
        zoo.check(row, zoo.builder(source, name, row.size))
    assert row.status == "exact", row.detail
    assert row.detail.startswith("forward 0e+00") and row.detail.endswith("fa ok, kp ok, wm ok, dfa ok")


def test_the_zoo_reports_a_refusal_with_its_reason_and_the_in_place_fallback():
    pytest.importorskip("timm")
    row = zoo.Row("timm", "test_nfnet", size=32)
    with zoo.float64():
        zoo.check(row, zoo.builder("timm", "test_nfnet", row.size))
    assert row.status == "in place"
    assert "its weight is not a parameter of the module but computed" in row.detail
    assert row.detail.endswith("(in place: forward 0e+00, fa ok)")
    table = zoo.table([row])
    assert table.startswith("1 in place") and "| timm | test_nfnet | 0.2M | 32 | in place |" in table


def test_imagenet_arch_takes_torchvision_and_timm_models_through_from_torch():
    circuit = imagenet_recipe.architecture("mobilenet_v3_small")(classes=3, input_shape=(3, 32, 32),
                                                                 rule=rules.get("fa"))
    assert circuit.name == "MobileNetV3" and circuit.default_rule == rules.get("fa")
    assert imagenet_recipe.architecture("resnet18") is imagenet_recipe.ARCHS["resnet18"]   # ResNets keep their builders
    if importlib.util.find_spec("timm"):
        circuit = imagenet_recipe.architecture("test_resnet")(classes=3, input_shape=(3, 32, 32), rule=rules.get("bp"))
        assert circuit.build()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(circuits.CircuitError, match=r"unknown arch 'resnet7'; accepted: resnet101, .* any torchvision "
                                                    r"classification model \(alexnet, .*any timm model"):
        imagenet_recipe.architecture("resnet7")


def test_imagenet_trains_a_converted_torchvision_model(tmp_path):
    folder = synthetic_image_folder(tmp_path / "data", classes=3, train_per_class=4, val_per_class=1, size=(40, 40))
    trainer = imagenet.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--workers", "0",
                             "--arch", "squeezenet1_1", "--image-size", "32", "--batch-size", "4", "--lr", "0.01",
                             "--rule", "fa", "--epochs", "1", "--no-progress"])
    assert trainer.progress.step == 3 and trainer.progress.epoch == 1
    assert sorted(name for name, _ in trainer.circuit_net.projections())[:2] == ["classifier.1", "features.0"]
