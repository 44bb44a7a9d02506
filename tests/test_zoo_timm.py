"""The zoo's fast subset (benchmarks/zoo.py on timm's tiny test models and a torchvision model) and
`models.imagenet --arch` for any torchvision classification model or timm model."""
import importlib.util
import pathlib
import sys

import pytest
import torch
from conftest import converted, true_float64
from torch import nn

import circuits
from circuits import rules
from models import imagenet, imagenet_recipe
from models.imagenet_data import synthetic_image_folder

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
_spec = importlib.util.spec_from_file_location("zoo", _PATH)
zoo = sys.modules["zoo"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)


pytestmark = pytest.mark.usefixtures("one_thread")

try:        # a function timm keeps whole for fx (register_notrace_function): read from this module's globals
    from timm.models.crossvit import scale_image
except ImportError:
    scale_image = None


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


def test_the_zoo_merges_its_rows_into_the_written_table(tmp_path, monkeypatch):
    """--write replaces the rows of the models it ran and keeps the others, in the zoo's order; a skipped row does
    not replace a measured one."""
    page = tmp_path / "conversion.md"
    page.write_text("intro\n<!-- zoo table -->\n1 exact / 1 in place\n\n| source | model | parameters | input | result "
                    "| detail |\n|---|---|---|---|---|---|\n| timm | resnet18 | 11.2M | 32 | exact | forward 0e+00 |\n"
                    "| torchvision | swin_t | 27.5M | 64 | in place | wrapped |\n<!-- end zoo table -->\nafter\n")
    monkeypatch.setattr(zoo, "GUIDE", page)
    zoo.write([zoo.Row("torchvision", "swin_t", 27_500_000, 64, "exact", "forward 0e+00"),
               zoo.Row("timm", "resnet18", 11_200_000, 32, "skipped", "over --max-params 1M"),
               zoo.Row("torchvision", "alexnet", 57_000_000, 32, "skipped", "over --max-params 30M")])
    text = page.read_text()
    assert text.startswith("intro\n<!-- zoo table -->\n2 exact / 1 skipped\n") and text.endswith("-->\nafter\n")
    lines = [line for line in text.splitlines() if line.startswith(("| torchvision", "| timm"))]
    assert lines == ["| torchvision | alexnet | 57.0M | 32 | skipped | over --max-params 30M |",
                     "| torchvision | swin_t | 27.5M | 64 | exact | forward 0e+00 |",
                     "| timm | resnet18 | 11.2M | 32 | exact | forward 0e+00 |"]
    assert [(r.name, r.params, r.size, r.status) for r in zoo.written()][1] == ("swin_t", 27_500_000, 64, "exact")
    printed = zoo.table([zoo.Row("timm", "test_vit", 300_000, 32, "exact", "forward 0e+00", seconds=12.0)])
    assert zoo.rows_of(f"log\n{printed}\n") == [zoo.Row("timm", "test_vit", 300_000, 32, "exact", "forward 0e+00")]


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


def _exact(module: nn.Module, shape: tuple[int, ...]) -> circuits.CircuitNet:
    """from_torch's net: forward bit for bit, bp's input and parameter gradients equal autograd's (1e-13 relative)."""
    net = circuits.from_torch(module, input_shape=shape).build()
    x = torch.randn(3, *shape, dtype=torch.float64)
    x_net, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = net(x_net), module(x_ref)
    assert torch.equal(out, ref)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    grads = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    pairs = [(x_net.grad, x_ref.grad)] + [(converted(grads, name), p.grad) for name, p in module.named_parameters()]
    for mine, theirs in pairs:
        mine = mine[0] if isinstance(mine, list) and len(mine) == 1 else mine
        assert isinstance(mine, torch.Tensor) and (mine - theirs).norm() <= 1e-13 * theirs.norm()
    return net


class Rescaled(nn.Module):
    """CrossViT's step: an image scaled by timm's scale_image, whose Python branch on sizes fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(scale_image(self.conv(x), (6, 6)).flatten(1))


class SamePadded(nn.Module):
    """TF's dynamic "same" padding (tf_efficientnet_*): timm's Conv2dSame and MaxPool2dSame, which timm registers
    as not traceable."""

    def __init__(self):
        super().__init__()
        import timm.layers

        self.conv = timm.layers.create_conv2d(2, 4, 3, stride=2, padding="same")
        self.pool = timm.layers.create_pool2d("max", 3, stride=2, padding="same")
        self.fc = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def test_what_timm_keeps_whole_for_fx_traces_and_converts_exactly():
    """A model fx cannot trace is traced with timm's registry: a function it keeps whole (scale_image) is an
    operation, timm's dynamic same padding one too, its convolution a synapse; forward and bp gradients as torch's."""
    pytest.importorskip("timm")
    import timm.layers

    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(Rescaled())
    net = _exact(true_float64(Rescaled()).eval(), (2, 8, 8))
    assert any(getattr(m, "spec", None) is not None and m.spec.op == "timm.models.crossvit.scale_image"
               for m in net.modules())
    module = true_float64(SamePadded()).eval()
    assert isinstance(module.conv, timm.layers.Conv2dSame) and type(module.pool).__name__ == "MaxPool2dSame"
    net = _exact(module, (2, 11, 11))          # odd sizes: pads one side more
    assert {name for name, _ in net.projections()} >= {"conv", "fc"}
    for rule in ("fa", "wm"):
        assert circuits.from_torch(module, rule=rule, input_shape=(2, 11, 11)).build()(
            torch.randn(2, 2, 11, 11, dtype=torch.float64)).shape == (2, 4)


class Crop(nn.Module):
    """A module without parameters whose forward branches on sizes (registered not traceable below)."""

    def forward(self, x):
        return x[..., :4, :4] if x.shape[-1] > 4 else x


class Gate(nn.Module):
    """A module with parameters whose forward branches on sizes (registered not traceable below)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.shape[-1] == 4 else x


class Cropped(nn.Module):
    """A Linear, a reshape, Crop (kept whole below), a head: its input shape is the first Linear's."""

    def __init__(self):
        super().__init__()
        self.fc, self.crop, self.head = nn.Linear(5, 36), Crop(), nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.crop(self.fc(x).view(-1, 6, 6)).flatten(1))


def test_a_module_timm_keeps_whole_is_an_operation_without_parameters_and_refused_with_them():
    """Without an input shape (no sizes to trace with), what timm registers as not traceable is one call: an
    operation calling the module where it holds nothing, refused where it holds parameters."""
    pytest.importorskip("timm")
    from timm.layers import register_notrace_module

    register_notrace_module(Crop)
    register_notrace_module(Gate)
    module = true_float64(Cropped()).eval()
    net = circuits.from_torch(module).build()
    assert any(getattr(m, "spec", None) is not None and m.spec.op == "module" for m in net.modules())
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(net(x), module(x))
    with pytest.raises(circuits.CircuitError, match=r"layer '1' \(Gate\) is kept whole by tracing .* holds "
                                                    r"parameters .*circuits.in_place"):
        circuits.from_torch(nn.Sequential(nn.Linear(3, 4), Gate()))
    _exact(true_float64(nn.Sequential(nn.Linear(3, 4), Gate())).eval(), (3,))    # with sizes known: traced into


def test_float_buffers_built_in_float32_follow_the_float64_default():
    """torchvision Swin-V2 makes relative_coords_table in float32 whatever the default dtype: the zoo's builder casts
    it to the parameters' float64, or torch's own forward fails."""
    with zoo.float64(), torch.device("meta"):
        module = zoo.builder("torchvision", "swin_v2_t", 64)()
    floats = {t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()}
    assert floats == {torch.float64}


def test_a_small_timm_swin_converts_exactly_windows_folded_and_drop_path_following_the_mode():
    """timm's Swin on a small scale: windows folded into the batch axis before the attention's Linear layers, its
    shifted windows' mask, drop_path (timm's stochastic depth: an operation whose training flag follows the net's
    mode): exact as zoo.check measures it, every rule takes a step and a mirror batch moves every B."""
    pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    def make():
        return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                               num_heads=(1, 2), num_classes=10, drop_path_rate=0.2)

    row = zoo.Row("timm", "small swin", size=32)
    with zoo.float64():
        zoo.check(row, make)
    assert row.status == "exact", row.detail


class SmallMobileViT(nn.Module):
    """A stem, one MobileViT block (timm registers it as not traceable: its forward branches on sizes; it folds
    patches into the batch axis around a transformer) and a head."""

    def __init__(self):
        super().__init__()
        from timm.models.mobilevit import MobileVitBlock

        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = MobileVitBlock(8, 8, transformer_dim=16, transformer_depth=1, patch_size=2, num_heads=2)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_module_timm_keeps_whole_with_parameters_is_traced_into_with_its_sizes_known():
    """With the input shape known, tracing knows every size but the batch's (meta tensors): the block's branches on
    sizes resolve, its patches folded into the batch axis stay BATCH*k, and the model converts exactly."""
    pytest.importorskip("timm")
    row = zoo.Row("timm", "small mobilevit", size=16)
    with zoo.float64():
        zoo.check(row, SmallMobileViT)
    assert row.status == "exact", row.detail
    with pytest.raises(circuits.CircuitError, match=r"\(MobileVitBlock\) is kept whole by tracing"):
        circuits.from_torch(SmallMobileViT().eval())      # no input shape: no sizes to trace with
