"""circuits.from_torch against torch: every activation with its settings, bare and N-D layers, junctions, the zoo."""
import math

import pytest
import torch
from conftest import converted, mirror_moves_every_B, true_float64
from torch import nn

import circuits
from circuits.graph import schema as graph

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
    module.zero_grad(set_to_none=True)
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
    bare = f"{type(module).__name__.lower()}." if not list(module.children()) else ""   # a bare layer's name
    for name, p in module.named_parameters():
        mine = converted(grads, bare + name)
        assert len(mine) == 1 and _close(mine[0], p.grad, grad_tol), name
    return net


def _each_rule_learns(module: nn.Module, x: torch.Tensor, labels: list[int], input_shape: tuple[int, ...],
                      weight: str, rules: tuple[str, ...] = ("fa", "kp", "wm", "dfa")) -> None:
    """Under each rule one SGD step on `labels` moves `weight` (a parameter's name in the net), and under wm one
    mirror batch moves every B."""
    for rule in rules:
        net = circuits.from_torch(module, rule=rule, input_shape=input_shape).build()
        before = net.get_parameter(weight).detach().clone()
        torch.nn.functional.cross_entropy(net(x), torch.tensor(labels)).backward()
        torch.optim.SGD(net.parameters(), lr=0.1).step()
        assert not torch.equal(net.get_parameter(weight), before), rule
        if rule == "wm":
            mirror_moves_every_B(net, batch_size=4)


@pytest.mark.parametrize("act", ACTIVATION_MODULES, ids=repr)
def test_every_activation_module_converts_with_its_settings_bit_for_bit(act):
    module = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 3))
    _same_as_torch(module, torch.randn(7, 5) * 3)


@pytest.mark.parametrize("fn", ACTIVATION_CALLS)
def test_every_activation_function_and_method_converts_with_its_arguments(fn):
    _same_as_torch(Call(fn), torch.randn(7, 5) * 3, input_shape=(5,))


@pytest.mark.parametrize("act", [nn.PReLU(3), nn.PReLU(), nn.RReLU(0.1, 0.3)], ids=repr)
def test_activations_with_parameters_or_noise_convert_as_operations(act):
    """PReLU's slopes are parameters (they train, as batch norm's affine map does); RReLU draws its slopes while
    learning and uses their mean in eval mode."""
    module = nn.Sequential(nn.Linear(5, 3), act, nn.Linear(3, 2)).eval()
    net = _same_as_torch(module, torch.randn(7, 5) * 3)
    assert not net.training
    if isinstance(act, nn.RReLU):
        x = -torch.rand(4, 5)
        assert not torch.equal(net.train()(x), net(x))


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
    module = true_float64(Tokens())
    c = circuits.from_torch(module, input_shape=(5, 6))
    assert c["fc"].shape == (5, 8) and c["x"].shape == (5, 6)
    net = c.build()
    assert net.projection("fc").weight.shape == (8, 6) and net.projection("fc").weight.dtype == torch.float64
    _same_as_torch(module, torch.randn(3, 5, 6, dtype=torch.float64), 1e-13, input_shape=(5, 6))


def test_weight_mirror_noise_on_tokens_learns_the_mean_over_positions():
    """On an N-D population the same W acts at every position: the mirror's correlation averages over positions,
    so B -> (eta sigma^2 / lambda) W as for a 1-D population (not T times that)."""
    from circuits.phases import mirror
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
    module = true_float64(Tokens()).eval()
    net = circuits.from_torch(module, input_shape=(5, 6)).build()
    assert not net.training and all(p.dtype == torch.float64 for p in net.parameters())


# --- junctions: populations whose inputs combine by an operation ---------------------------------------------------
class Gate(nn.Module):
    """Products of two populations: a * b, a @ b^T, bmm, and attention with a mask."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x):
        a, b, v = self.a(x), torch.sigmoid(self.b(x)), self.c(x)
        gated = a * b
        scores = gated @ b.transpose(-2, -1) / 2.0
        mixed = torch.bmm(scores.softmax(-1), v)
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        attended = F.scaled_dot_product_attention(mixed, a, v, attn_mask=mask)
        return F.scaled_dot_product_attention(attended, b, v, is_causal=True) - a


def test_junctions_compute_torchs_op_and_pass_its_exact_derivative():
    module = true_float64(Gate())
    c = circuits.from_torch(module, input_shape=(5, 6))
    junction = c["mul"]
    assert junction.junction is not None and junction.junction.op == "operator.mul"
    inputs = sorted((d["projection"].position, u) for u, _, d in c.forward_graph().in_edges("mul", data=True))
    assert inputs == [(0, "a"), (1, "b")]
    assert c.graph.nodes["mul"]["junction"].startswith("Operation(op='operator.mul'")
    for rule in ("bp", "fa"):
        net = _same_as_torch(module, torch.randn(3, 5, 6, dtype=torch.float64), 1e-13, input_shape=(5, 6), rule=rule) \
            if rule == "bp" else circuits.from_torch(module, rule=rule, input_shape=(5, 6)).build()
        assert sorted(name for name, _ in net.projections()) == ["a", "b", "c"]      # only synapses get a B


def test_a_junction_in_a_hand_built_circuit():
    from circuits.graph.operations import Operand, Operation
    c = circuits.Circuit("gate")
    x = c.input("x", shape=(4,))
    a, b = c.population("a", shape=(3,)), c.population("b", shape=(3,), activation="sigmoid")
    c.connect(x, a, circuits.Dense())
    c.connect(x, b, circuits.Dense())
    y = c.junction("y", [a, b], Operation("operator.mul", (Operand(0), Operand(1))), activation="tanh")
    assert y.shape == (3,)
    net = c.build()
    x_in = torch.randn(2, 4)
    pa, pb = net.projection("x->a"), net.projection("x->b")
    expected = torch.tanh((x_in @ pa.weight.T + pa.bias) * torch.sigmoid(x_in @ pb.weight.T + pb.bias))
    assert torch.allclose(net(x_in), expected)
    with pytest.raises(circuits.CircuitError, match=r"junction 'z'.*reads 2 operands"):
        c.junction("z", [a], Operation("operator.mul", (Operand(0), Operand(1))))
    with pytest.raises(circuits.CircuitError, match=r"into population 'w': torch refuses"):
        c.junction("w", [a, x], Operation("torch.matmul", (Operand(0), Operand(1))))


def test_a_parameter_multiplying_a_population_must_be_a_layer():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(circuits.CircuitError, match=r"multiplies by parameters.*nn.Linear"):
        circuits.from_torch(Raw(), input_shape=(4,))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_converts(batch_first, norm_first):
    """float64, eval mode (dropout off, as torch's own layer then); the in-projection's products run with the
    rows in the module's input layout rather than torch's transposed one, hence 1e-12."""
    layer = true_float64(nn.TransformerEncoderLayer(8, 2, 16, batch_first=batch_first, norm_first=norm_first)).eval()
    net = _same_as_torch(layer, torch.randn(3, 5, 8, dtype=torch.float64), 1e-12, 1e-14, input_shape=(5, 8))
    assert sorted(name for name, _ in net.projections()) == [
        "linear1", "linear2", "self_attn.in_proj", "self_attn.out_proj"]
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert not torch.equal(net.train()(x), net.eval()(x))            # dropout, in attention too, while learning


class Classifier(nn.Module):
    """A TransformerEncoder stack inside a module, a linear read-out of the first token."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.encoder, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x)[:, 0])


@pytest.mark.parametrize("nested", [False, True])
def test_transformer_encoder_stack_converts_and_keeps_every_layers_mode(nested):
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    module = Classifier() if nested else nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8),
                                                               enable_nested_tensor=False)
    module = true_float64(module).eval()
    stack = module.encoder if nested else module
    stack.layers[0].train()
    circuits.from_torch(module, input_shape=(5, 8))
    assert [m.training for m in (stack, stack.layers[0], stack.layers[0].dropout, stack.layers[1])] == [
        False, True, True, False]                 # the module is left as it was
    module.eval()
    net = _same_as_torch(module, torch.randn(3, 5, 8, dtype=torch.float64), 1e-12, 1e-14, input_shape=(5, 8))
    prefix = "encoder." if nested else ""
    assert f"{prefix}layers.1.self_attn.in_proj" in dict(net.projections())


class MaskedLayer(nn.Module):
    """A TransformerEncoderLayer called with a causal mask (and is_causal), inside another module."""

    def __init__(self, is_causal):
        super().__init__()
        self.layer, self.is_causal = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), is_causal
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(5))

    def forward(self, x):
        return self.layer(x, src_mask=self.mask, is_causal=self.is_causal)


class Attention(nn.Module):
    """nn.MultiheadAttention on its own: need_weights=True by default, a sequence-first layout."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.mha(x, x, x)[0]


@pytest.mark.parametrize("module", [MaskedLayer(True), MaskedLayer(False), Attention()], ids=repr)
def test_attention_with_masks_and_weights_converts(module):
    module = true_float64(module).eval()
    _same_as_torch(module, torch.randn(3, 5, 8, dtype=torch.float64), 1e-12, 1e-14, input_shape=(5, 8))


def test_attention_weights_and_cross_attention_are_refused():
    class Weights(Attention):
        def forward(self, x):
            out, weights = self.mha(x, x, x)
            return out * weights.sum()

    class Cross(Attention):
        def forward(self, x):
            return self.mha(x, x * 2, x)[0]

    with pytest.raises(circuits.CircuitError, match=r"node 'getitem_1' reads attention weights"):
        circuits.from_torch(Weights(), input_shape=(5, 8))
    with pytest.raises(circuits.CircuitError, match=r"layer 'mha'.*only self-attention"):
        circuits.from_torch(Cross(), input_shape=(5, 8))


class CausalSelfAttention(nn.Module):
    """nanoGPT's block: LayerNorm, q/k/v split, causal attention (SDPA or masked softmax), GELU MLP, residuals."""

    def __init__(self, n_embd=8, n_head=2, block_size=6, flash=True):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)
        self.gelu, self.n_head, self.n_embd, self.flash = nn.GELU(), n_head, n_embd, flash
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def attend(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def forward(self, x):
        x = x + self.attend(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_block_converts(flash):
    module = true_float64(CausalSelfAttention(flash=flash))
    _same_as_torch(module, torch.randn(2, 6, 8, dtype=torch.float64), 1e-13, input_shape=(6, 8))
    _same_as_torch(module, torch.randn(2, 4, 8, dtype=torch.float64)[:, :4], 1e-13, input_shape=(4, 8))


@pytest.mark.parametrize("rule", list(circuits.rules.RULES))
def test_every_rule_trains_a_converted_transformer_block(rule):
    torch.manual_seed(0)
    module = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    net = circuits.from_torch(module, rule=rule, input_shape=(5, 8)).build()
    x, target = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    loss = F.mse_loss(net(x), target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in net.parameters())
    changed = {name for name, p in net.named_parameters() if not torch.equal(p, before[name])}
    # under direct feedback the error reaches the populations feeding linear1 and the attention's out-projection
    # by B straight from the output; the norms between them pass none back, so only these synapses learn
    learning = ("linear1", "linear2", "self_attn_out_proj") if circuits.rules.get(rule).direct else \
        ("linear1", "linear2", "self_attn_out_proj", "self_attn_in_proj")
    assert {f"proj.{key}.weight" for key in learning} <= changed
    if circuits.rules.get(rule).mirrors:
        mirror_moves_every_B(net, 16)


# --- the torchvision zoo -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", [("squeezenet1_0", 48), ("mobilenet_v2", 32), ("efficientnet_b0", 32),
                                       ("densenet121", 32), ("swin_t", 32), ("swin_v2_t", 32)])
def test_torchvision_zoo_converts_exactly(arch, size):
    """Eval mode (batch-norm running statistics; dropout and stochastic depth off), float64: outputs equal torch's bit
    for bit; under bp input and parameter gradients equal autograd's up to the order of sums in a synapse's own
    backward (1e-10 relative). MobileNet's and DenseNet's concatenations are junctions, EfficientNet's
    squeeze-and-excitation a product junction with a sigmoid population, its stochastic depth an operation; Swin's
    shifted_window_attention (wrapped for fx) is traced into: its qkv and projection weights are synapses on windows
    folded into the batch axis, its shifted windows' attention mask a constant. Swin-V2's relative-position MLP
    (cpb_mlp) on a constant table, computed once for the batch, is a chain of synapses between shared populations
    (each example computes the table's bias), and its qkv bias, a clone with the key part zeroed in place, a copy
    (set_item), added after the synapse's product (torch adds it inside its product: equal to rounding); its biases
    are drawn, so that the zeroed part matters."""
    torchvision = pytest.importorskip("torchvision")
    module = true_float64(getattr(torchvision.models, arch)(num_classes=10)).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("qkv.bias"):
                p.normal_(generator=torch.Generator().manual_seed(1))
    net = _same_as_torch(module, torch.randn(2, 3, size, size, dtype=torch.float64), 1e-10,
                         1e-13 if arch == "swin_v2_t" else 0.0, input_shape=(3, size, size))
    assert sum(p.numel() for p in net.forward_parameters()) == sum(p.numel() for p in module.parameters())
    junctions = [p for p in net.circuit.populations() if p.junction is not None]
    if arch == "efficientnet_b0":
        assert any(p.junction.op == "operator.mul" for p in junctions)
        module.train(), net.train()
        torch.manual_seed(3)
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        assert not torch.equal(net(x), net(x))           # stochastic depth and dropout follow the net's mode
    if arch == "densenet121":
        assert sum(p.junction.op == "torch.cat" for p in junctions) == 58
    if arch == "swin_t":
        synapses = dict(net.projections())
        assert {"features.1.0.attn.qkv", "features.1.0.attn.proj", "features.7.1.attn.qkv"} <= set(synapses)
        assert any(p.shape[0] == 4 for p in net.circuit.populations())     # 4 windows of 7 x 7 per example
    if arch == "swin_v2_t":
        synapses = dict(net.projections())
        assert {"features.1.0.attn.cpb_mlp.0", "features.1.0.attn.cpb_mlp.2", "features.1.0.attn.qkv"} <= set(synapses)
        qkv_bias = net.get_parameter("proj.linear_unbiased->linear.held_features_1_0_attn_qkv_bias")
        assert qkv_bias.grad[96:192].eq(0).all() and qkv_bias.grad[:96].ne(0).any()     # the key part: zeroed


def test_vit_b_16_converts_at_its_224_input():
    """Class token (a parameter expanded over the batch and concatenated), positional embedding (a parameter added by
    an operation), MultiheadAttention, LayerNorm, shapes read with getattr. float32, batch 1 (86M parameters): outputs
    bit for bit; gradients within 1e-4 relative (float32 sums over 197 tokens in a synapse's own order)."""
    torchvision = pytest.importorskip("torchvision")
    module = torchvision.models.vit_b_16(num_classes=10).eval()
    with torch.no_grad():
        module.class_token.normal_()
        module.encoder.pos_embedding.normal_(std=0.1)
    net = _same_as_torch(module, torch.randn(1, 3, 224, 224), 1e-4, input_shape=(3, 224, 224))
    assert sum(p.numel() for p in net.forward_parameters()) == sum(p.numel() for p in module.parameters())


class Bad(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.fc, self.how, self.w = nn.Linear(4, 4), how, nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = self.fc(x)
        if self.how == "batch":
            return h.reshape(x.size(0) * 2, 2)
        if self.how == "axis":
            return h.transpose(0, 1)
        if self.how == "data":
            return h * float(h.sum())
        return h * self.w + torch.sigmoid(h) * self.w


@pytest.mark.parametrize("how,message", [
    ("batch", r"node 'reshape' .* is returned with 2 windows or tokens per example folded into the batch axis"),
    ("axis", r"node 'transpose' .* a population keeps the batch as its first axis"),
    ("data", r"cannot be traced by torch.fx"),
    ("shared", r"parameter 'w' is read by 2 calls \(mul, mul_1\): shared weights. A circuit gives each projection its "
               r"own W and B")])
def test_what_cannot_convert_is_a_clear_error_naming_the_node(how, message):
    with pytest.raises(circuits.CircuitError, match=message):
        circuits.from_torch(Bad(how), input_shape=(4,))


# --- float64, tied weights, layers called twice, functional layers, early refusals (issues 23 and 25) ---------------
def _float64(module: nn.Module) -> nn.Module:
    """The module in float64 with true float64 values (drawn in float64, not float32 values cast)."""
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def test_float64_modules_convert_with_their_float64_values():
    module = _float64(nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 3)))
    net = _same_as_torch(module, torch.randn(3, 5, dtype=torch.float64), 1e-14)
    assert torch.equal(net.projection("0").weight, module[0].weight)       # not rounded to float32


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_tied_weights_are_refused_by_both_conversions():
    message = r"Tied ties weights \('a.weight' = 'b.weight'\).*the tie would break.*Untie them"
    with pytest.raises(circuits.CircuitError, match=message):
        circuits.from_torch(Tied(), input_shape=(4,))
    with pytest.raises(circuits.CircuitError, match=message):
        circuits.in_place(Tied(), torch.zeros(2, 4))


class Twice(nn.Module):
    """Stateless layers (pooling, dropout, identity, an activation) each called twice, as timm's blocks call one
    drop_path; and the module's own parameters through functions: F.layer_norm, F.group_norm, F.batch_norm,
    F.instance_norm, F.linear and F.conv2d (a weight used once is a synapse with a B)."""

    def __init__(self):
        super().__init__()
        self.conv, self.gn, self.bn = nn.Conv2d(2, 4, 3, padding="same"), nn.GroupNorm(2, 4), nn.BatchNorm2d(4)
        self.inorm, self.ln, self.fc = nn.InstanceNorm2d(4, affine=True), nn.LayerNorm(64), nn.Linear(64, 3)
        self.pool, self.drop, self.skip, self.act = nn.MaxPool2d(2), nn.Dropout(0.2), nn.Identity(), nn.GELU()

    def forward(self, x):
        h = F.conv2d(x, self.conv.weight, self.conv.bias, padding="same")
        h = F.group_norm(h, 2, self.gn.weight, self.gn.bias, self.gn.eps)
        h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, self.training)
        h = self.act(F.instance_norm(h, weight=self.inorm.weight, bias=self.inorm.bias))
        h = self.pool(self.drop(h)) + self.skip(self.pool(self.drop(self.act(h))))
        h = F.layer_norm(self.skip(h.flatten(1)), (64,), self.ln.weight, self.ln.bias)
        return F.linear(h, self.fc.weight, self.fc.bias)


def test_stateless_layers_called_twice_and_functional_layers_convert_exactly():
    module = _float64(Twice()).eval()
    with torch.no_grad():
        module.bn.running_var.uniform_(0.5, 2)
    net = _same_as_torch(module, torch.randn(3, 2, 8, 8, dtype=torch.float64), 1e-13, input_shape=(2, 8, 8))
    assert sorted(name for name, _ in net.projections()) == ["conv", "fc"]       # only the synapses get a B
    assert sum(p.numel() for p in net.forward_parameters()) == sum(p.numel() for p in module.parameters())
    net.train()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    net(x)                                       # batch norm learns its statistics in train mode, as torch's
    assert not torch.equal(net.projection(_norm_of(net, "batch_norm")).held_bn_running_mean, module.bn.running_mean)


def _norm_of(net: circuits.CircuitNet, op: str) -> str:
    return next(name for name, _, _, p, _ in net.circuit.projections() if getattr(p, "op", None) == f"F.{op}")


class Counted(nn.Module):
    """Counts its runs; `how` picks what from_torch must refuse."""

    def __init__(self, how):
        super().__init__()
        self.fc, self.fc2, self.how, self.runs = nn.Linear(4, 4), nn.Linear(4, 4), how, 0
        self.fc.register_forward_pre_hook(lambda *_: setattr(self, "runs", self.runs + 1))

    def forward(self, x):
        h = self.fc(x)
        if self.how == "function":
            return torch.cumsum(h, 1)
        if self.how == "layer":
            return self.fc2(self.fc2(h))
        if self.how == "computed":
            return F.linear(h, self.fc2.weight * 2)
        return nn.functional.conv1d(h.unsqueeze(1), self.fc2.weight.unsqueeze(1)[:1])


@pytest.mark.parametrize("how,message", [
    ("function", r"node 'cumsum' .* calls torch.cumsum, which no circuit part computes: operations call only the torch "
                 r"functions listed in circuits.graph.operations.OPS.*circuits.in_place.*docs/conversion.md"),
    ("layer", r"layer 'fc2' \(Linear\) is called more than once and holds parameters or buffers: shared weights"),
    ("computed", r"node 'linear' .* its weight is not a parameter of the module but computed \(mul\)")])
def test_refusals_say_why_and_what_to_do_before_running_the_module(how, message):
    module = Counted(how)
    with pytest.raises(circuits.CircuitError, match=message):
        circuits.from_torch(module, input_shape=(4,))
    assert module.runs == (2 if how == "computed" else 0)     # a computed weight shows only in the runs


class TimmAttention(nn.Module):
    """timm's attention: q, k, v from one reshape moved to (3, batch, heads, tokens, dim) and unbound; a class token
    expanded over the batch that two calls read (CaiT's class-attention blocks)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.cls = nn.Linear(8, 24), nn.Linear(8, 8), nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        cls = self.cls.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), 1)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)[:, 0] + cls[:, 0]


def test_operations_that_move_the_batch_axis_and_a_class_token_read_twice_convert_exactly():
    module = _float64(TimmAttention())
    net = _same_as_torch(module, torch.randn(3, 5, 8, dtype=torch.float64), 1e-13, input_shape=(5, 8))
    assert sorted(name for name, _ in net.projections()) == ["proj", "qkv"]
    assert all(p.shape[0] != 3 for p in net.circuit.populations())      # (3, batch, ...) made no population


class Outputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return {"hidden": h, "heads": (self.b(h), [x, torch.tanh(h)])}


def test_several_outputs_convert_in_the_structure_torch_returns():
    module = _float64(Outputs())
    x = torch.randn(3, 4, dtype=torch.float64)
    out, ref = circuits.from_torch(module, input_shape=(4,)).build()(x), module(x)
    assert list(out) == ["hidden", "heads"] and type(out["heads"]) is tuple and type(out["heads"][1]) is list
    assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(out),
                                                 torch.utils._pytree.tree_leaves(ref), strict=True))


def test_a_branch_only_train_mode_computes_is_not_dropped_silently():
    """GoogLeNet's auxiliary heads: refused in eval mode (it says why), converted in train mode as its named tuple."""
    torchvision = pytest.importorskip("torchvision")
    module = true_float64(torchvision.models.googlenet(num_classes=10, init_weights=False)).eval()
    with pytest.raises(circuits.CircuitError, match=r"GoogLeNet computes more in train mode than in eval mode "
                                                    r"\(.*aux1_conv_bn.*Call module.train\(\) before from_torch"):
        circuits.from_torch(module, input_shape=(3, 32, 32))
    net = circuits.from_torch(module.train(), input_shape=(3, 32, 32)).build()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, ref = net.eval()(x), module.eval()(x)
    assert type(out).__name__ == "GoogLeNetOutputs" and torch.equal(out.logits, ref)


@pytest.mark.parametrize("layers,shape", [
    ((nn.Conv2d(2, 4, 3), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Flatten(), nn.Linear(576, 2)), (2, 8, 8)),
    ((nn.Conv2d(2, 4, 3), nn.Upsample(size=(5, 7)), nn.Flatten(), nn.Linear(140, 2)), (2, 8, 8)),
    ((nn.Conv2d(2, 8, 3), nn.PixelShuffle(2), nn.PixelUnshuffle(2), nn.AdaptiveMaxPool2d(2), nn.Flatten(),
      nn.Linear(32, 2)), (2, 8, 8)),
    ((nn.Linear(8, 8), nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveMaxPool1d(3), nn.AdaptiveAvgPool1d(2),
      nn.Flatten(), nn.Linear(8, 2)), (4, 8)),
    ((nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.ZeroPad2d(1),
      nn.ReflectionPad2d((1, 0, 2, 1)), nn.ConstantPad2d(1, 0.5), nn.ReplicationPad2d(1), nn.Flatten(),
      nn.Linear(780, 2)), (2, 8, 8)),
    ((nn.Conv2d(2, 4, 3), nn.Unfold(2, stride=2), nn.Fold((6, 6), 2, stride=2), nn.Unfold((2, 3), 2, 1, (1, 2)),
      nn.Flatten(), nn.Linear(288, 2)), (2, 8, 8))])
def test_resampling_pooling_padding_and_instance_norm_layers_convert_exactly(layers, shape):
    module = _float64(nn.Sequential(*layers)).eval()
    _same_as_torch(module, torch.randn(3, *shape, dtype=torch.float64), 1e-13, input_shape=shape)


class Patches(nn.Module):
    """TNT's pixel embedding: F.unfold into patches, patches as tokens, a Linear on each."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(12, 5)

    def forward(self, x):
        patches = F.unfold(self.conv(x), kernel_size=2, stride=2)       # (batch, 3 * 2 * 2, 16)
        return self.fc(patches.transpose(1, 2))


def test_unfold_converts_as_an_operation_with_its_exact_derivative():
    module = true_float64(Patches()).eval()
    net = _same_as_torch(module, torch.randn(3, 2, 8, 8, dtype=torch.float64), 1e-13, input_shape=(2, 8, 8))
    assert any(getattr(m, "spec", None) is not None and m.spec.op == "F.unfold" for m in net.modules())


class Windows(nn.Module):
    """Swin's window attention and LeViT's batch norm on a small scale: 16 tokens folded into the batch axis as 4
    windows of 4 (B * 4, 4, C) before a LayerNorm, the qkv Linear, attention and the projection, then unfolded; and
    the tokens folded as (B * 16, C) for a BatchNorm1d over batch and tokens."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.qkv, self.proj = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 24), nn.Linear(8, 8)
        self.bn, self.head = nn.BatchNorm1d(8), nn.Linear(16 * 8, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))                                   # (B, 16, 8)
        windows = self.norm(h.view(-1, 4, 8))                        # (B * 4, 4, 8)
        b_ = windows.shape[0]
        q, k, v = self.qkv(windows).reshape(b_, 4, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attended = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        y = torch.nn.functional.gelu(self.proj(attended.transpose(1, 2).reshape(b_, 4, 8)))
        h = h + y.view(-1, 16, 8)                                    # unfolded: (B, 16, 8)
        h = self.bn(h.flatten(0, 1)).reshape(x.shape[0], 16, 8)
        return self.head(h.flatten(1))


def test_windows_and_tokens_folded_into_the_batch_axis_convert_exactly_under_every_rule():
    """A population holds torch's (B * k, ...) as (B, k, ...); operations flatten it back before torch's call."""
    module = true_float64(Windows())
    x = torch.randn(3, 16, 6, dtype=torch.float64)
    for mode in (module.eval, module.train):
        mode()
        net = _same_as_torch(module, x, 1e-13, input_shape=(16, 6))
        assert net.training == module.training
    folds = {m.spec.fold for m in net.modules() if getattr(m, "spec", None) is not None and hasattr(m.spec, "fold")}
    assert folds == {1, 4, 16}           # 4 windows, 16 tokens per example
    assert torch.allclose(net.eval()(x), module.eval()(x), rtol=0, atol=0)
    for rule in ("fa", "kp", "wm", "dfa"):
        net = circuits.from_torch(module.train(), rule=rule, input_shape=(16, 6)).build()
        before = {k: p.detach().clone() for k, p in net.named_parameters()}
        torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 2, 1])).backward()
        torch.optim.SGD(net.parameters(), lr=0.1).step()
        moved = {k for k, p in net.named_parameters() if not torch.equal(p, before[k])}
        assert {"proj.qkv.weight", "proj.proj.weight"} <= moved, rule
        assert all(torch.isfinite(p).all() for p in net.parameters())
        if rule == "wm":
            mirror_moves_every_B(net, batch_size=4)


class ComputedBias(nn.Module):
    """EVA's and BEiT's qkv bias: cat(q_bias, zeros, v_bias), computed from parameters and a buffer, in F.linear."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(4, 12, bias=False), nn.Linear(12, 2)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("k_bias", torch.zeros(4), persistent=False)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.head(torch.tanh(F.linear(x, self.qkv.weight, bias)))


def test_a_bias_computed_from_parameters_is_an_operation_after_the_synapse():
    module = true_float64(ComputedBias())
    net = _same_as_torch(module, torch.randn(3, 5, 4, dtype=torch.float64), 1e-13, 1e-15, input_shape=(5, 4))
    assert "qkv" in dict(net.projections())
    net = circuits.from_torch(module, rule="fa", input_shape=(5, 4)).build()
    net(torch.randn(3, 5, 4, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for k, p in net.named_parameters() if k.endswith(("q_bias", "v_bias")))


class Padded(nn.Module):
    """Twins' and MobileViT's Python branches on sizes: pad to whole windows if needed, windows folded into the
    batch axis (their count read as b_ = windows.shape[0]), a Linear on each, unfolded."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 3), nn.Linear(3 * 8 * 8, 2)

    def forward(self, x):
        h = self.conv(x)
        b, c, height, width = h.shape
        if height % 4 or width % 4:
            h = F.pad(h, (0, -width % 4, 0, -height % 4))
        windows = h.reshape(b, c, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(-1, 16, c)
        b_ = windows.shape[0]
        return self.head(torch.relu(self.fc(windows)).reshape(b_ // 4, -1))


def test_python_branches_on_sizes_trace_with_the_input_shape_known():
    module = true_float64(Padded())
    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(module)
    _same_as_torch(module, torch.randn(3, 2, 6, 6, dtype=torch.float64), 1e-13, input_shape=(2, 6, 6))
    with pytest.raises(circuits.CircuitError, match="cannot be traced by torch.fx: .*control flow; given input_shape, "
                                                    "it is traced again with its sizes known"):
        circuits.from_torch(module)


class Masked(nn.Module):
    """torchvision Swin's attention mask: x.new_zeros(...) set slice by slice, under a branch on sizes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        scores = self.fc(x) @ x.transpose(1, 2)
        n = x.shape[1]
        if n > 2:
            mask = x.new_zeros((n, n))
            mask[:2, 2:] = -100.0
            mask[2:, :2] = -100.0
            scores = scores + mask
        return torch.softmax(scores, -1).flatten(1)


def test_item_assignment_on_a_new_tensor_traces_as_a_constant():
    module = true_float64(Masked())
    net = _same_as_torch(module, torch.randn(3, 5, 4, dtype=torch.float64), 1e-13, input_shape=(5, 4))
    held = [t for n, t in net.named_buffers() if "set_item" in n]      # the mask, held by the operation adding it
    assert len(held) == 1 and held[0].shape == (5, 5) and held[0][0, 3] == -100.0 and held[0][3, 3] == 0.0


def test_item_assignment_seen_by_a_view_and_in_place_changes_of_parameters_are_refused():
    class Viewed(Masked):
        def forward(self, x):
            n = x.shape[1]
            if n > 2:
                mask = x.new_zeros((n, n))
                flat = mask.view(-1)
                mask[:2, 2:] = -100.0          # flat changes too, which a graph of calls would not show
                x = x + flat[:4]
            return self.fc(x)

    class Zeroed(Masked):
        def forward(self, x):
            bias = self.fc.bias.clone()
            seen = bias.view(-1)                # a view taken before: it would change too
            bias[1:2].zero_()
            return F.linear(x, self.fc.weight, bias) + seen[0]

    with pytest.raises(circuits.CircuitError, match=r"cannot be traced by torch.fx: .*control flow; traced with its "
                                                    r"sizes known: item assignment on .*new_zeros.*: only a new "
                                                    r"tensor \(x.new_zeros\(...\), x.clone\(\)\) not read since it "
                                                    r"was made"):
        circuits.from_torch(Viewed(), input_shape=(5, 4))
    with pytest.raises(circuits.CircuitError, match=r"node 'zero_' .* changes 'getitem' in place, and later calls "
                                                    r"read it or what it views \(getitem_1, linear\).*in_place"):
        circuits.from_torch(Zeroed(), input_shape=(5, 4))


class Fourier(nn.Module):
    """XCiT's and EdgeNeXt's positional encodings: a 1x1 convolution on a constant table of sines and cosines, its
    result repeated over the batch (XCiT) or on the batch's rows of the table (EdgeNeXt), added to the data."""

    def __init__(self, rows: bool):
        super().__init__()
        self.rows, self.conv = rows, nn.Conv2d(2, 3, 1)
        self.proj, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(48, 2)

    def forward(self, x):
        b = x.shape[0]
        grid = torch.arange(16, device=self.conv.weight.device).to(x.dtype).reshape(1, 1, 4, 4)
        table = torch.cat((grid.sin(), grid.cos()), 1)
        pos = self.conv(table.repeat(b, 1, 1, 1)) if self.rows else self.conv(table).repeat(b, 1, 1, 1)
        return self.head(torch.relu(self.proj(x) + pos).flatten(1))


class Zeroed(nn.Module):
    """torchvision Swin-V2's qkv bias: a clone of the layer's bias with a part zeroed in place, twice."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        bias = self.fc.bias.clone()
        bias[1:3].zero_()
        bias[4:5].fill_(2.0)
        return F.linear(x, self.fc.weight, bias)


def test_an_item_of_a_clone_filled_in_place_traces_as_a_copy():
    module = true_float64(Zeroed())
    x = torch.randn(3, 4, dtype=torch.float64)
    net = _same_as_torch(module, x, 1e-15, 1e-15, input_shape=(4,))
    grad = net.get_parameter("proj.linear_unbiased->linear.held_fc_bias").grad
    assert grad[[1, 2, 4]].eq(0).all() and grad[[0, 3, 5]].ne(0).all()     # the filled items reach no parameter
    calls = [n.target for n in circuits.convert.tracing.trace(module).graph.nodes if n.op != "placeholder"]
    assert "zero_" not in calls and "fill_" not in calls and calls.count(circuits.graph.operations.set_item) == 2


def test_fills_that_would_not_be_views_or_are_read_before_are_refused_and_a_value_may_be_a_keyword():
    class Advanced(Zeroed):
        def forward(self, x):
            bias = self.fc.bias.clone()
            bias[[0, 2]].zero_()                # an index list picks a copy: torch's bias stays as it is
            return F.linear(x, self.fc.weight, bias)

    class ReadBefore(Zeroed):
        def forward(self, x):
            m = x.new_zeros(x.shape)
            t = m + x                           # reads m before the fill
            m[:, 0].fill_(1.0)
            return self.fc(t + m)

    class ReluReadAfter(Zeroed):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.fc(x)
            return self.relu(h) + h             # torch's h is relu(h) by then

    class Keyword(Zeroed):
        def forward(self, x):
            bias = self.fc.bias.clone()
            bias[0:1].fill_(value=3.0)
            return F.linear(x, self.fc.weight, bias)

    with pytest.raises(circuits.CircuitError, match=r"node 'zero_' .* changes 'getitem' in place, and later calls "
                                                    r"read it or what it views \(linear\)"):
        circuits.from_torch(Advanced(), input_shape=(4,))
    for module in (ReadBefore(), ReluReadAfter()):
        with pytest.raises(circuits.CircuitError, match=r"changes '\w+' in place, and later calls read it or what it "
                                                        r"views .*out of place.*circuits.in_place"):
            circuits.from_torch(module, input_shape=(4,))
    _same_as_torch(true_float64(Keyword()), torch.randn(3, 4, dtype=torch.float64), 1e-15, 1e-15, input_shape=(4,))


class RelativeBias(nn.Module):
    """Swin-V2's attention in miniature: 2 windows of 3 tokens per example folded into the batch axis, 2 heads, and
    an MLP on a constant table computed once for the batch whose result, a bias per head and pair of tokens, is added
    to every window's attention scores: torchvision's table of shape (1, 3, 3, 2) and its (1, heads, 3, 3) bias, or
    timm's Swin-V2-CR table of shape (9, 2) and its (heads, 3, 3) bias, which torch broadcasts as (1, heads, 3, 3)."""

    def __init__(self, leading_one: bool):
        super().__init__()
        self.leading_one = leading_one
        self.register_buffer("table", torch.randn(1, 3, 3, 2) if leading_one else torch.randn(9, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(inplace=True), nn.Linear(8, 2))
        self.qkv, self.head = nn.Linear(4, 12), nn.Linear(24, 3)

    def forward(self, x):
        q, k, v = self.qkv(x.reshape(-1, 3, 4)).reshape(-1, 3, 3, 2, 2).permute(2, 0, 3, 1, 4)
        bias = self.mlp(self.table)
        bias = bias.permute(0, 3, 1, 2) if self.leading_one else bias.transpose(0, 1).reshape(2, 3, 3)
        scores = q @ k.transpose(-2, -1) + 16 * torch.sigmoid(bias)
        out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(-1, 3, 4)
        return self.head(out.reshape(x.shape[0], 24))


@pytest.mark.parametrize("leading_one", [True, False])
def test_a_layer_on_a_constant_computed_once_for_the_batch_is_a_synapse_between_shared_populations(leading_one):
    """Each example computes the MLP on the table in a shared population of its own, and the bias is repeated over
    its windows: equal to torch, whose gradient to the MLP sums over every window of every example; each rule's
    step moves the MLP's weights, and a mirror batch its Bs."""
    module = true_float64(RelativeBias(leading_one))
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    net = _same_as_torch(module, x, 1e-13, 1e-15, input_shape=(6, 4))
    shared = [p for p in net.circuit.populations() if p.name.startswith("mlp")]
    assert sorted(p.shape for p in shared) == sorted([(1, 3, 3, 8), (1, 3, 3, 2)] if leading_one else [(9, 8), (9, 2)])
    assert {"mlp.0", "mlp.2"} <= set(dict(net.projections()))
    _each_rule_learns(module, x, [0, 1, 2], (6, 4), "proj.mlp_0.weight")


def test_dropout_on_a_shared_population_draws_one_mask_for_the_batch_as_torch():
    """torch drops units of its one tensor, the same for every example; so does the circuit in train mode."""
    module = RelativeBias(True)
    module.mlp.insert(2, nn.Dropout(0.5))
    net = circuits.from_torch(module.double(), input_shape=(6, 4)).build().train()
    masks = [m for m in net.modules() if getattr(m, "spec", None) is not None and m.spec.op == "batch_dropout"]
    assert len(masks) == 1
    seen = {}
    masks[0].register_forward_hook(lambda mod, args, out: seen.update(out=out, into=args[0]))
    net(torch.randn(5, 6, 4, dtype=torch.float64))
    kept = seen["out"] != 0
    assert torch.equal(kept, kept[:1].expand_as(kept)) and 0 < kept.double().mean() < 1      # one mask, some dropped
    assert torch.equal(seen["out"][kept], 2 * seen["into"][kept])


@pytest.mark.parametrize("use", ["bias", "expanded"])
def test_what_layers_on_a_constant_compute_is_refused_where_parameters_alone_are_expected(use):
    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(1, 5, 4))
            self.mlp, self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(20, 2)

        def forward(self, x):
            t = self.mlp(self.table)
            if use == "bias":                   # a computed bias, which converts from parameters alone
                return self.head(F.linear(x, self.fc.weight, t[0, 0] * 2).flatten(1))
            e = t.expand(x.shape[0], -1, -1)    # read twice: a class token's population, driven from the input
            return self.head((self.fc(x) * e + e + t).flatten(1))

    with pytest.raises(circuits.CircuitError, match=r"computes from parameters and from what layers on a constant "
                                                    r"compute \(mlp\).*circuits.in_place"):
        circuits.from_torch(Reader(), input_shape=(5, 4))


def test_a_layer_on_a_parameter_is_refused_before_any_run():
    class OnParameter(nn.Module):
        def __init__(self):
            super().__init__()
            self.table, self.fc, self.head = nn.Parameter(torch.randn(1, 4)), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x + self.fc(self.table))

    with pytest.raises(circuits.CircuitError, match=r"layer 'fc' \(Linear\) computes from parameters and constants "
                                                    r"alone .*no population to learn from.*circuits.in_place"):
        circuits.from_torch(OnParameter(), input_shape=(4,))


@pytest.mark.parametrize("rows", [False, True])
def test_a_layer_on_a_constant_read_per_example_is_a_synapse_from_it(rows):
    module = true_float64(Fourier(rows))
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    net = _same_as_torch(module, x, 1e-13, input_shape=(3, 4, 4))
    assert "conv" in dict(net.projections())            # a synapse with its B, from the table's population
    _each_rule_learns(module, x, [0, 1, 1], (3, 4, 4), "proj.conv.weight", ("fa", "wm", "dfa"))


class PixelPatches(nn.Module):
    """TNT's pixel embedding in miniature: each example's 4 x 4 image cut into 4 patches of 2 x 2 (nn.Unfold), folded
    into the batch axis, a convolution on each patch (a layer, or F.conv2d with its weight), a learned position added,
    then the patches back per example; or, `conv1d`, a Conv1d on windows of a Linear's result folded so."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.unfold = how, nn.Unfold(2, stride=2)
        if how == "conv1d":
            self.fc, self.conv, self.head = nn.Linear(4, 4), nn.Conv1d(4, 3, 1), nn.Linear(12, 2)
        else:
            self.conv, self.head = nn.Conv2d(2, 3, 2, padding=1), nn.Linear(108, 2)
            self.pos = nn.Parameter(torch.randn(1, 3, 3, 3))

    def forward(self, x):
        if self.how == "conv1d":
            return self.head(torch.tanh(self.conv(self.fc(x).reshape(-1, 4, 2))).reshape(x.shape[0], -1))
        patches = self.unfold(x).transpose(1, 2).reshape(-1, 2, 2, 2)          # (batch * 4, 2, 2, 2)
        made = self.conv(patches) if self.how == "layer" else F.conv2d(patches, self.conv.weight, self.conv.bias,
                                                                         padding=1)
        return self.head(torch.relu(made + self.pos).reshape(x.shape[0], -1))


@pytest.mark.parametrize("how", ["layer", "function", "conv1d"])
def test_a_convolution_on_patches_folded_into_the_batch_axis_is_a_synapse_on_each_patch(how):
    """The population holds (patches, channels, ...) per example and the synapse convolves each patch as torch does
    its (batch * patches, ...) tensor: exact under bp; each rule's step moves W, a mirror batch every B."""
    module = true_float64(PixelPatches(how))
    shape = (4, 4) if how == "conv1d" else (2, 4, 4)
    x = torch.randn(3, *shape, dtype=torch.float64)
    net = _same_as_torch(module, x, 1e-13, input_shape=shape)
    synapse = dict(net.projections())["conv"]
    assert synapse.fold == (2 if how == "conv1d" else 4) and synapse.in_shape == ((4, 2) if how == "conv1d" else
                                                                                 (2, 2, 2))
    _each_rule_learns(module, x, [0, 1, 1], shape, "proj.conv.weight")


def test_ldfa_on_a_convolution_on_folded_patches_is_refused():
    with pytest.raises(circuits.CircuitError, match=r"rule ldfa sends the output error through B to this "
                                                    r"convolution's input, which holds 4 patches .*rules_by_layer"):
        circuits.from_torch(PixelPatches("layer"), rule="ldfa", input_shape=(2, 4, 4)).build()


def test_a_pooling_layer_on_folded_windows_is_refused():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.pool = nn.Linear(4, 4), nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.fc(x).reshape(-1, 1, 2, 4)).reshape(x.shape[0], -1)

    with pytest.raises(circuits.CircuitError, match=r"layer MaxPool2d reads or makes windows or tokens folded into "
                                                    r"the batch axis.*circuits.in_place"):
        circuits.from_torch(Pool(), input_shape=(4, 4))


def test_a_layer_without_a_projection_says_what_to_do():
    with pytest.raises(circuits.CircuitError, match=r"layer .1. \(Conv3d\) has no circuit projection .*in_place"):
        circuits.from_torch(nn.Sequential(nn.Linear(4, 4), nn.Conv3d(1, 2, 3)), input_shape=(1, 4))


def test_same_padding_converts_in_place_too():
    module = _float64(nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.Tanh(), nn.Conv2d(4, 3, (1, 5),
                                                                                             padding="same")))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    expected = module(x)
    net = circuits.in_place(module, x, "fa")
    assert torch.equal(net(x), expected)
    x_grad = x.clone().requires_grad_()
    net(x_grad).sum().backward()          # B's transposed convolution pads as the forward did
    assert x_grad.grad.shape == x.shape and torch.isfinite(x_grad.grad).all()
    assert [s.operator.padding for _, s in net.projections()] == [(1, 1), (0, 2)]


class Unused(nn.Module):
    """Res2Net's unused split piece and DLA's unused projection: computed by torch, read by nothing."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 6), nn.Linear(3, 2), nn.Linear(6, 5)

    def forward(self, x):
        h = self.a(x)
        self.unused(h)
        first, _ = h.split(3, dim=1)
        return self.b(torch.tanh(first))


def test_what_the_output_does_not_depend_on_is_left_out_so_direct_feedback_has_one_output():
    module = _float64(Unused())
    net = circuits.from_torch(module, input_shape=(4,)).build()
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(net(x), module(x))
    assert sorted(name for name, _ in net.projections()) == ["a", "b"] and net.outputs == ["b"]
    net = circuits.from_torch(module, rule="dfa", input_shape=(4,)).build()
    assert [(p.source, p.target) for _, p in net.feedback_projections()] == [("b", "getitem")]


# --- Conv1d and ConvTranspose2d (issue 25) ---------------------------------------------------------------------------
class Upsampling(nn.Module):
    """Conv1d and ConvTranspose2d as layers (strided, dilated, grouped, with output_padding) and as F.conv1d /
    F.conv_transpose2d calls on a module's own weight, used once (settings by position and by keyword)."""

    def __init__(self):
        super().__init__()
        self.f1 = nn.Conv1d(2, 2, 1)
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up2 = nn.ConvTranspose2d(6, 2, (2, 3), stride=(1, 2), padding=(0, 1), dilation=(2, 1))
        self.f2 = nn.ConvTranspose2d(2, 2, 2)
        self.fc = nn.Linear(2 * 11 * 29, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(F.conv1d(x, self.f1.weight, self.f1.bias, padding=0)))     # (4, 16)
        h = torch.relu(self.c2(h))                                                          # (4, 8)
        h = torch.tanh(self.up(h.reshape(h.shape[0], 4, 2, 4)))                             # (6, 4, 8)
        h = torch.sigmoid(self.up2(h))                                                      # (2, 6, 15)
        h = F.conv_transpose2d(h, self.f2.weight, self.f2.bias, 2, 1, 1)                    # (2, 11, 29)
        return self.fc(h.flatten(1))


def test_conv1d_and_conv_transpose2d_convert_exactly_as_layers_and_calls():
    module = true_float64(Upsampling())
    net = _same_as_torch(module, torch.randn(3, 2, 16, dtype=torch.float64), 1e-13, input_shape=(2, 16))
    kinds = {name: type(p).__name__ for name, _, _, p, _ in net.circuit.projections() if p.synaptic}
    assert kinds == {"f1": "Conv1d", "c1": "Conv1d", "c2": "Conv1d", "up": "ConvTranspose2d",
                     "up2": "ConvTranspose2d", "f2": "ConvTranspose2d", "fc": "Dense"}
    up = net.projection("up")
    assert up.operator.transposed and up.operator.output_padding == (1, 1) and up.feedback.shape == (4, 3, 3, 3)
    f2 = net.projection("f2").operator
    assert (f2.stride, f2.padding, f2.output_padding, f2.dilation) == ((2, 2), (1, 1), (1, 1), (1, 1))
    assert sum(p.numel() for p in net.forward_parameters()) == sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("rule", list(circuits.rules.RULES))
def test_every_rule_trains_conv1d_and_conv_transpose2d(rule):
    """One SGD step changes every W (and B learns where the rule learns it); wm's mirror batch moves every B."""
    module = true_float64(Upsampling())
    net = circuits.from_torch(module, rule=rule, input_shape=(2, 16)).build()
    before = {name: s.weight.detach().clone() for name, s in net.projections()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(torch.randn(4, 2, 16, dtype=torch.float64)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for name, s in net.projections():
        assert torch.isfinite(s.weight).all() and not torch.equal(s.weight, before[name]), (rule, name)
    if net.projection("up").rule is not None and net.projection("up").rule.mirrors:
        mirror_moves_every_B(net, batch_size=4)


def test_conv_transpose2d_called_with_output_size_is_refused():
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x):
            return self.up(x, output_size=(10, 10))

    with pytest.raises(circuits.CircuitError, match=r"layer 'up' \(ConvTranspose2d\) is called with output_size"):
        circuits.from_torch(Sized(), input_shape=(2, 4, 4))
    with pytest.raises(circuits.CircuitError, match=r"pass input_shape=\(2, length\)"):
        circuits.from_torch(nn.Sequential(nn.Conv1d(2, 3, 3)))
