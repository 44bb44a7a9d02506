"""models.transformer: the small ViT and character transformer, traceable, trained under the paper's rules."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import converted, true_float64

import circuits
import models
from circuits import rules
from circuits.recording.alignment import angle
from models import data
from models.transformer import CharTransformer, ViT, lm_loss

TINY = dict(dim=16, depth=1, heads=2, mlp_dim=32)
RULES = ("bp", "fa", "kp", "wm")


@pytest.fixture(scope="module")
def mnist():
    split = data.mnist_subset(standardize=True)
    images, labels = split.train.tensors
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1024]
    return images[order], labels[order]


@pytest.fixture(scope="module")
def text():
    return data.python_source(context=16)


def test_modules_trace_with_fx_and_compute_the_same():
    vit, lm = ViT(**TINY), CharTransformer(20, context=8, **TINY)
    x, idx = torch.randn(3, 1, 28, 28), torch.randint(0, 20, (3, 8))
    assert torch.equal(fx.symbolic_trace(vit)(x), vit(x))
    assert torch.equal(fx.symbolic_trace(lm)(idx), lm(idx))
    assert lm(idx).shape == (3, 8, 20) and vit(x).shape == (3, 10)


def test_the_language_model_is_causal():
    lm = CharTransformer(20, context=8, **TINY)
    idx = torch.randint(0, 20, (1, 8))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 20
    torch.testing.assert_close(lm(changed)[:, :5], lm(idx)[:, :5])
    assert not torch.allclose(lm(changed)[:, 5:], lm(idx)[:, 5:])


def test_builders_convert_every_synaptic_layer():
    net = models.vit("kp", rules_by_layer={"head": "bp"}, **TINY)
    assert {name: str(s.rule) for name, s in net.projections()} == {
        "patch": "kp", "blocks.0.attention.qkv": "kp", "blocks.0.attention.proj": "kp", "blocks.0.fc1": "kp",
        "blocks.0.fc2": "kp", "head": "bp"}
    lm = models.transformer_lm("fa", vocab=20, context=8, **TINY)
    assert lm.projection("token").rule is None and lm.projection("head").in_shape == (8, 16)
    assert [n for n, _ in lm.projections() if _.rule is None] == ["token"]      # an index input takes no error


@pytest.mark.parametrize("which", ["vit", "lm"])
def test_the_circuits_compute_what_the_modules_compute_and_backprop_their_gradients(which):
    torch.manual_seed(0)
    if which == "vit":
        module, x = true_float64(ViT(**TINY)), torch.randn(3, 1, 28, 28, dtype=torch.float64)
        target, loss_fn, shape = torch.randint(0, 10, (3,)), F.cross_entropy, (1, 28, 28)
    else:
        module, x = true_float64(CharTransformer(20, context=8, **TINY)), torch.randint(0, 20, (3, 8))
        target, loss_fn, shape = torch.randint(0, 20, (3, 8)), lm_loss, (8,)
    net = circuits.from_torch(module, "bp", shape).build()
    out = net(x)
    assert torch.equal(out, module(x))
    named = dict(net.named_parameters())
    ours = dict(zip(named, torch.autograd.grad(loss_fn(out, target), list(named.values()), allow_unused=True),
                    strict=True))
    theirs = dict(zip([n for n, _ in module.named_parameters()],
                      torch.autograd.grad(loss_fn(module(x), target), list(module.parameters())), strict=True))
    assert sum(g is not None for g in ours.values()) == len(theirs)
    for name, t in theirs.items():     # each parameter's gradient, found under its converted name
        mine = converted(ours, name)
        assert len(mine) == 1 and float((mine[0] - t).abs().max()) < 1e-12, name


def _loss(net, x, y, loss_fn):
    with torch.no_grad():
        return float(loss_fn(net(x), y))


def _train(net, batches, rule, loss_fn, lr, epochs=1):
    """SGD with momentum, `epochs` passes over `batches`; under wm mirror phases first, then one mirror batch
    per learning step."""
    learn = circuits.Repeat(circuits.Learn(1), circuits.Mirror(1, 64)) if rule == "wm" else circuits.Repeat(
        circuits.Learn(1))
    if rule == "wm":
        circuits.Mirror(100, 64).run(net)
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9), circuits.Schedule(learn),
                               loss_fn=loss_fn, config=circuits.TrainerConfig(progress=False))
    trainer.fit(batches, epochs)


@pytest.mark.parametrize("rule", RULES)
def test_vit_learns_under_each_rule(rule, mnist):
    images, labels = mnist
    torch.manual_seed(0)
    net = models.vit(rules.get(rule, {"wm": {"eta": 0.1, "decay": 0.1}}), **TINY)
    before = _loss(net, images[:256], labels[:256], F.cross_entropy)
    _train(net, list(zip(images.split(32), labels.split(32), strict=True)), rule, F.cross_entropy, lr=0.05, epochs=2)
    after = _loss(net, images[:256], labels[:256], F.cross_entropy)
    assert after < before - 0.3, (before, after)      # from chance, log 10 = 2.30


@pytest.mark.parametrize("rule", RULES)
def test_language_model_learns_under_each_rule(rule, text):
    x, y = text.train.tensors
    torch.manual_seed(0)
    net = models.transformer_lm(rules.get(rule, {"wm": {"eta": 0.1, "decay": 0.1}}), vocab=len(text.vocab),
                                context=text.context, **TINY)
    before = _loss(net, x[:256], y[:256], lm_loss)
    _train(net, list(zip(x[:1024].split(32), y[:1024].split(32), strict=True)), rule, lm_loss, lr=0.1)
    after = _loss(net, x[:256], y[:256], lm_loss)
    assert after < before - 1.0, (before, after)


def test_mirror_phases_align_every_projection_of_a_small_vit():
    net = models.vit(rules.WeightMirror(eta=0.1, decay=0.1), **TINY)
    start = {name: float(angle(s.feedback, s.weight)) for name, s in net.projections()}
    assert min(start.values()) > 60, start
    circuits.Mirror(100, angle=5).run(net)        # each projection its own noise batch: B settles near 5 degrees
    end = {name: float(angle(s.feedback, s.weight)) for name, s in net.projections()}
    assert max(end.values()) < 10, end
    assert len(end) == 6


def test_python_source_is_deterministic_text_in_shifted_windows(text):
    again = data.python_source(context=16)
    assert again.vocab == text.vocab and torch.equal(again.train.tensors[0], text.train.tensors[0])
    x, y = text.train.tensors
    assert x.shape[1] == 16 and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    assert "".join(text.vocab[i] for i in x[0]) == '"""Text wrapping'
    assert len(text.train) > 5000 and len(text.test) == round(0.1 * (len(text.train) + len(text.test)))
    with pytest.raises(FileNotFoundError, match="no source of"):
        data.python_source(("no_such_module",))


def test_a_vit_run_is_recorded_and_reported_with_its_junctions(tmp_path, mnist):
    from analysis import open_run
    from analysis.__main__ import main as analysis_main
    from circuits.recording.recorder import Recorder

    torch.manual_seed(0)
    net = models.vit("wm", **TINY)
    images, labels = mnist
    batches = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 128, 32)]
    recorder = Recorder(tmp_path / "vit.h5", probe=batches[0], probe_steps=2)
    schedule = circuits.paper_schedule(net, len(batches), batch_size=32, warmup=2)
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.05), schedule, recorder=recorder,
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit(batches, 1, batches[:1])
    with open_run(tmp_path / "vit.h5") as run:
        graph = run.circuit
        junctions = {n: d["junction"] for n, d in graph.nodes(data=True) if "junction" in d}
        assert any("scaled_dot_product_attention" in j for j in junctions.values()), junctions
        assert len(run.file["steps/tick"]) == trainer.progress.tick and set(run.file["alignment"]) == {
            circuits.recording.key(n) for n, _ in net.projections()}
    assert analysis_main(["report", str(tmp_path / "vit.h5"), "-o", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "summary.md").exists()
