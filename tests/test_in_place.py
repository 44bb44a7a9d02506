"""circuits.in_place: any module's synaptic layers become Synapses, its own forward kept, every rule trains."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ResidualNet
from torch import nn

import circuits
from circuits import rules
from circuits.recording.alignment import angle
from circuits.recording.recorder import Recorder
from circuits.rules.synapse import EmbeddingOperator, FeedbackPathway

LAYER_LOCAL = [name for name, rule in rules.RULES.items() if not (rule.direct or rule.reads_output_error)]


class Tokens(nn.Module):
    """An embedding, dense layers on (tokens x channels), layer norm, a residual sum, and a grouped strided
    convolution over the tokens' channels (as a 2 x 4 x length image)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=2, groups=2)
        self.head = nn.Linear(4 * 2 * 3, 5)

    def forward(self, idx):
        x = self.embed(idx)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(self.conv(x.transpose(1, 2).unflatten(1, (2, 4))).flatten(1))


def tokens_example():
    return torch.randint(0, 12, (6, 5))


@pytest.mark.parametrize("rule", LAYER_LOCAL)
def test_outputs_equal_the_module_bit_for_bit(rule):
    module, example = Tokens(), tokens_example()
    expected = module(example)
    net = circuits.in_place(copy.deepcopy(module), example, rule)
    assert torch.equal(net(example), expected)
    residual = ResidualNet()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(circuits.in_place(copy.deepcopy(residual), x, rule)(x), residual(x))


def test_backprop_gradients_equal_autograd():
    module, example = Tokens(), tokens_example()
    net = circuits.in_place(copy.deepcopy(module), example, "bp")
    module(example).square().sum().backward()
    net(example).square().sum().backward()
    theirs = dict(net.model.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(theirs[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_report_names_what_was_converted_and_what_was_left():
    net = circuits.in_place(Tokens(), tokens_example(), "kp", rules_by_layer={"head": "fa"})
    report = net.report
    assert report.converted == {"fc1": "kp", "fc2": "kp", "conv": "kp", "head": "fa"}
    assert report.embeddings == ["embed"]
    assert report.left == {"norm": "LayerNorm, local: weight, bias"}
    assert str(report) == ("4 synaptic layers converted (kp, fa), 1 embedding synaptic, no feedback needed (no "
                           "error crosses an index input): embed, 1 module left as it is: norm (LayerNorm, local: "
                           "weight, bias)")
    assert [name for name, _ in net.projections()] == ["embed", "fc1", "fc2", "conv", "head"]
    assert net.projection("embed").rule is None and net.projection("embed").feedback is None
    assert net.projection("fc1").in_shape == (5, 8) and net.projection("conv").in_shape == (2, 4, 5)


class SelfAttention(nn.Module):
    def __init__(self, batch_first=True, need_weights=False):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.fc, self.need_weights = nn.Linear(8, 3), need_weights

    def forward(self, x):
        return self.fc(self.attention(x, x, x, need_weights=self.need_weights)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_converts_its_projections(batch_first):
    module = SelfAttention(batch_first)
    x = torch.randn(2, 4, 8) if batch_first else torch.randn(4, 2, 8)
    expected = module(x)
    net = circuits.in_place(copy.deepcopy(module), x, "fa", rules_by_layer={"attention.out_proj": "kp"})
    assert net.report.converted == {"attention.in_proj": "fa", "attention.out_proj": "kp", "fc": "fa"}
    assert net.report.left == {}
    assert net.projection("attention.in_proj").in_shape == (4, 8)
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)       # bp's gradients too
    net = circuits.in_place(copy.deepcopy(module), x, "bp")
    module(x).square().sum().backward()
    net(x).square().sum().backward()
    torch.testing.assert_close(net.projection("attention.in_proj").weight.grad, module.attention.in_proj_weight.grad)
    torch.testing.assert_close(net.projection("attention.out_proj").weight.grad, module.attention.out_proj.weight.grad)
    with pytest.raises(circuits.CircuitError, match="key and value are not the query"):
        net.model.attention(x, x.clone(), x)


def test_attention_returning_weights_is_left_as_it_is():
    module = SelfAttention(need_weights=True)
    net = circuits.in_place(module, torch.randn(2, 4, 8), "fa")
    assert net.report.converted == {"fc": "fa"}
    assert "called with need_weights=True" in net.report.left["attention"]
    assert "not called as a layer" in net.report.left["attention.out_proj"]
    assert isinstance(module.attention, nn.MultiheadAttention)


def test_shared_layers_stay_shared_and_unknown_overrides_fail():
    shared = nn.Linear(4, 4)
    module = nn.Sequential(shared, nn.Tanh(), shared)
    net = circuits.in_place(module, torch.randn(2, 4), "fa")
    assert module[0] is module[2] and isinstance(module[0], circuits.Synapse)
    with pytest.raises(circuits.CircuitError, match=r"does not have or that were not converted: \['nope'\]"):
        circuits.in_place(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), "fa", rules_by_layer={"nope": "bp"})
    assert [n for n, _ in net.projections()] == ["0"]


def test_direct_feedback_and_population_records_are_refused_clearly(tmp_path):
    with pytest.raises(circuits.CircuitError, match="direct feedback .ldfa. .* use circuits.from_torch"):
        circuits.in_place(nn.Sequential(nn.Linear(3, 2)), torch.randn(1, 3), rule="ldfa")
    with pytest.raises(circuits.CircuitError, match="direct feedback .dfa. .* use circuits.from_torch"):
        circuits.in_place(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), "dfa")
    net = circuits.in_place(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4), "fa")
    with pytest.raises(circuits.CircuitError, match="no population graph"):
        net.circuit
    with pytest.raises(circuits.CircuitError, match="no populations"):
        net(torch.randn(2, 4), monitor={})
    batch = (torch.randn(4, 4), torch.randint(0, 2, (4,)))
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), config=circuits.TrainerConfig(
        progress=False), recorder=Recorder(tmp_path / "run.h5", probe=batch))
    with pytest.raises(circuits.CircuitError, match="no recorder"):
        trainer.fit([batch], 1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rule", LAYER_LOCAL)
def test_every_rule_trains_a_step_with_the_trainer(rule):
    torch.manual_seed(1)
    net = circuits.in_place(Tokens(), tokens_example(), rule)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                               config=circuits.TrainerConfig(progress=False))
    loss = trainer.learn(tokens_example(), torch.randint(0, 5, (6,)))
    assert torch.isfinite(loss)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    weights = {f"model.{n}.weight" for n in ("embed", "fc1", "fc2", "conv", "head")}
    assert weights <= changed, weights - changed
    learned_b = {n for n in changed if n.endswith(".B")}
    if rules.get(rule).learns_by_gradient:
        assert learned_b == {f"model.{n}.B" for n in ("fc1", "fc2", "conv", "head")}
    else:
        assert not learned_b


def test_embedding_gradient_is_the_scatter_add_of_the_error():
    table = nn.Embedding(7, 3, padding_idx=2)
    idx = torch.tensor([[1, 2, 1], [6, 0, 2]])
    delta = torch.randn(2, 3, 3)
    table(idx).backward(delta)
    weight = table.weight.detach().clone().requires_grad_()
    out = FeedbackPathway.apply(idx, weight, None, None, None, EmbeddingOperator(2), rules.Backprop())
    assert torch.equal(out, table(idx))
    out.backward(delta)
    torch.testing.assert_close(weight.grad, table.weight.grad)
    assert weight.grad[2].abs().sum() == 0 and weight.grad[1].abs().sum() > 0
    with pytest.raises(circuits.CircuitError, match="noise cannot drive"):      # no mirror phase for indices
        circuits.Synapse(EmbeddingOperator(), (7, 3), False, rules.WeightMirror(), (3,))
    user_built = circuits.Synapse(EmbeddingOperator(2), (7, 3), False, rules.FeedbackAlignment(), (3,))
    user_built.load_state_dict({"weight": table.weight.detach(), "B": user_built.B.detach()})
    with torch.autocast("cpu", torch.bfloat16):         # the indices stay indices; W's gradient comes back float32
        user_built(idx).backward(delta.bfloat16())
    torch.testing.assert_close(user_built.weight.grad, table.weight.grad, rtol=1e-2, atol=1e-2)


def test_mirror_phases_align_B_with_W_on_token_inputs():
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    net = circuits.in_place(module, torch.randn(2, 10, 8), rules.WeightMirror(eta=0.1, decay=0.1))
    assert [s.positions.item() for _, s in net.projections()] == [10.0, 10.0]
    start = {n: float(angle(s.feedback, s.weight)) for n, s in net.projections()}
    assert all(a > 60 for a in start.values()), start
    schedule = circuits.Schedule(circuits.Repeat(circuits.Learn(1), circuits.Mirror(3, 64)))
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.01), schedule,
                               loss_fn=lambda out, target: F.cross_entropy(out.flatten(0, 1), target.flatten()),
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit([(torch.randn(8, 10, 8), torch.randint(0, 4, (8, 10))) for _ in range(60)], 1)
    for name, s in net.projections():
        b, w = s.feedback.detach().flatten().double(), s.weight.detach().flatten().double()
        assert float(angle(b, w)) < 10, name
        assert float(b @ w / (w @ w)) == pytest.approx(1.0, rel=0.1), name     # B -> W: noise over 10 positions


def test_torchvision_vision_transformer_converts_every_synaptic_layer():
    from torchvision.models.vision_transformer import VisionTransformer

    module = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                               num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    expected = module(x)
    net = circuits.in_place(copy.deepcopy(module), x, "kp")
    assert torch.equal(net(x), expected)
    layers = [f"encoder.layers.encoder_layer_{i}.{p}" for i in range(2)
              for p in ("self_attention.in_proj", "self_attention.out_proj", "mlp.0", "mlp.3")]
    assert list(net.report.converted) == ["conv_proj", *layers, "heads.head"]
    assert sorted(net.report.left) == ["VisionTransformer", "encoder", "encoder.layers.encoder_layer_0.ln_1",
                                       "encoder.layers.encoder_layer_0.ln_2", "encoder.layers.encoder_layer_1.ln_1",
                                       "encoder.layers.encoder_layer_1.ln_2", "encoder.ln"]


class Sized(nn.Module):
    """A ConvTranspose2d called with output_size: left as it is (its output size would follow each call)."""

    def __init__(self):
        super().__init__()
        self.c, self.up, self.sized = nn.Conv1d(2, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 3, stride=2), \
            nn.ConvTranspose2d(2, 2, 3, stride=2)

    def forward(self, x):
        h = torch.tanh(self.up(torch.tanh(self.c(x)).unflatten(2, (2, 4))))
        return self.sized(h, output_size=(12, 20))


def test_conv1d_and_conv_transpose2d_convert_in_place():
    module = Sized().double()
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    expected = module(x)
    net = circuits.in_place(module, x, "fa")
    assert torch.equal(net(x), expected)
    assert sorted(name for name, _ in net.projections()) == ["c", "up"]
    assert "sized (ConvTranspose2d: called with output_size" in str(net.report)
    up = net.projection("up")
    assert up.operator.transposed and up.feedback.shape == up.weight.shape == (4, 2, 3, 3)
    x_grad = x.clone().requires_grad_()
    net(x_grad).sum().backward()
    assert x_grad.grad.shape == x.shape and torch.isfinite(x_grad.grad).all()


def test_a_linear_result_on_tokens_may_be_modified_in_place_by_the_modules_forward():
    """torchvision Swin-V2's cpb_mlp: a Linear on more than two axes (a view of F.linear's product), then
    ReLU(inplace=True): the module's own forward runs, forward and gradients as torch's."""
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    expected = module(x)
    x_ref = x.clone().requires_grad_()
    module(x_ref).sum().backward()
    for rule in ("bp", "fa"):
        net = circuits.in_place(copy.deepcopy(module), x, rule)
        x_net = x.clone().requires_grad_()
        out = net(x_net)
        assert torch.equal(out, expected)
        out.sum().backward()
        assert torch.isfinite(x_net.grad).all()
        if rule == "bp":
            assert torch.allclose(x_net.grad, x_ref.grad, rtol=1e-12, atol=0)
