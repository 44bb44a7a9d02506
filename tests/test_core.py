"""The circuit core against its math: backprop equals autograd; each rule's B is what its equation says."""
import copy

import networkx as nx
import pytest
import torch
from conftest import MODELS, true_float64
from torch import nn

import circuits
from circuits import rules
from circuits.graph.network import module_key


def converted(name: str, rule="bp", dtype=torch.float64):
    make, shape = MODELS[name]
    module = make().to(dtype)
    net = circuits.from_torch(module, rule=rule, input_shape=shape).build().to(dtype)
    return module, net, shape


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("name", list(MODELS))
def test_backprop_circuit_equals_autograd(name):
    module, net, shape = converted(name)
    x, target = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 10, (6,))
    out_ref, out = module(x), net(x)
    assert torch.equal(out, out_ref)
    nn.functional.cross_entropy(out_ref, target).backward()
    nn.functional.cross_entropy(out, target).backward()
    ref = dict(module.named_parameters())
    checked = 0
    for layer, synapse in net.projections():
        assert relative(synapse.weight.grad, ref[layer + ".weight"].grad) < 1e-10
        if synapse.bias is not None:
            assert relative(synapse.bias.grad, ref[layer + ".bias"].grad) < 1e-10
        checked += 1
    for pname, p in module.named_parameters():   # batch-norm affine parameters too
        q = net.projection(pname.rsplit(".", 1)[0]).get_parameter(pname.rsplit(".", 1)[1])
        assert relative(q.grad, p.grad) < 1e-10, pname
    assert checked == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules())


def test_hand_built_circuit_equals_functional_math():
    c = circuits.Circuit("mlp")
    x = c.input("retina", shape=(5,))
    h = c.population("hidden", shape=(4,), activation="sigmoid")
    y = c.population("output", shape=(3,))
    c.connect(x, h, circuits.Dense())
    c.connect(h, y, circuits.Dense(bias=False))
    net = true_float64(c.build())
    W1, b1 = net.projection("retina->hidden").weight, net.projection("retina->hidden").bias
    W2 = net.projection("hidden->output").weight
    inp = torch.randn(7, 5, dtype=torch.float64)
    out = net(inp)
    # paper notation: a = W y, y = phi(a); delta_l = phi'(a_l) * (W^T delta_{l+1}); dW = delta y^T
    a1 = inp @ W1.T + b1
    y1 = torch.sigmoid(a1)
    assert torch.allclose(out, y1 @ W2.T, rtol=0, atol=1e-14)
    out.pow(2).sum().div(2).backward()
    delta2 = (y1 @ W2.T).detach()
    delta1 = y1 * (1 - y1) * (delta2 @ W2)
    assert relative(W2.grad, delta2.T @ y1) < 1e-12
    assert relative(W1.grad, delta1.T @ inp) < 1e-12
    assert relative(b1.grad, delta1.sum(0)) < 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_feedback_alignment_with_B_equal_W_reproduces_backprop(name):
    _, bp, shape = converted(name, "bp")
    _, fa = converted(name, "fa")[:2]
    fa.load_state_dict({k: v for k, v in bp.state_dict().items()}, strict=False)
    for (_, s_bp), (_, s_fa) in zip(bp.projections(), fa.projections()):
        assert not torch.equal(s_fa.feedback, s_fa.weight)   # drawn independently
        s_fa.feedback = s_bp.weight.detach()
    x = torch.randn(5, *shape, dtype=torch.float64)
    bp(x).square().sum().backward()
    fa(x).square().sum().backward()
    for (_, s_bp), (_, s_fa) in zip(bp.projections(), fa.projections()):
        assert relative(s_fa.weight.grad, s_bp.weight.grad) < 1e-12


def test_feedback_alignment_sends_error_through_B_not_W():
    _, fa, shape = converted("mlp", "fa")
    _, bp = converted("mlp", "bp")[:2]
    bp.load_state_dict(fa.state_dict(), strict=False)
    x = torch.randn(5, *shape, dtype=torch.float64)
    fa(x).square().sum().backward()
    bp(x).square().sum().backward()
    last = list(fa.projections())[-1][1]
    first_fa, first_bp = list(fa.projections())[0][1], list(bp.projections())[0][1]
    assert relative(last.weight.grad, list(bp.projections())[-1][1].weight.grad) < 1e-12   # same output error
    assert relative(first_fa.weight.grad, first_bp.weight.grad) > 0.1                          # different path back
    assert first_fa.B.grad is None and not first_fa.B.requires_grad


@pytest.mark.parametrize("lr,decay,weight_decay", [(0.1, 0.05, 0.0), (0.05, 0.0, 0.2), (0.2, 0.01, 0.03)])
def test_kolen_pollack_shrinks_W_minus_B_geometrically(lr, decay, weight_decay):
    _, net, shape = converted("residual", rules.KolenPollack(decay=decay))
    opt = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=weight_decay)
    d0 = [(s.weight - s.B).detach().norm() for _, s in net.projections()]
    steps = 25
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, *shape, dtype=torch.float64) * 3
        nn.functional.cross_entropy(net(x), torch.randint(0, 10, (8,))).backward()
        opt.step()
    rate = 1 - lr * (decay + weight_decay)
    for (name, s), d in zip(net.projections(), d0):
        assert relative((s.weight - s.B).detach().norm(), rate**steps * d) < 1e-6, name
        assert (s.weight - s.B).norm() < d   # and it really moved


def test_kolen_pollack_B_gets_W_gradient():
    _, net, shape = converted("mlp", rules.KolenPollack(decay=0.0))
    net(torch.randn(4, *shape, dtype=torch.float64)).sum().backward()
    for _, s in net.projections():
        assert torch.equal(s.B.grad, s.weight.grad)


def test_sign_symmetry_B_is_sign_of_W_times_scale_after_steps():
    _, net, shape = converted("convnet", "ss")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, *shape, dtype=torch.float64)).square().sum().backward()
        opt.step()
    kinds = set()
    for _, s in net.projections():
        w = s.weight.detach()
        if w.dim() == 4:      # Xiao et al. 2018: a conv layer's He-init std, sqrt(2 / (k_h k_w out))
            scale = (2.0 / (w.shape[0] * w.shape[2] * w.shape[3])) ** 0.5
        else:                 # and a dense layer's, 1 / sqrt(fan_in)
            scale = w.shape[1] ** -0.5
        kinds.add(w.dim())
        assert relative(s.feedback, torch.sign(w) * scale) < 1e-15
    assert kinds == {2, 4}


@pytest.mark.parametrize("rule", [n for n, r in rules.RULES.items() if not r.reads_output_error])   # ldfa: test_peers
@pytest.mark.parametrize(
    "projection,shape", [(circuits.Dense(), (6,)), (circuits.Conv2d(3, stride=2, padding=1), (2, 5, 5))]
)
def test_input_error_is_B_transpose_delta_for_every_rule(rule, projection, shape):
    c = circuits.Circuit(rule=rule)
    x = c.input("x", shape=shape)
    out_shape = (4,) if len(shape) == 1 else (3, 3, 3)
    c.connect(x, c.population("y", shape=out_shape), projection)
    net = true_float64(c.build())
    inp = torch.randn(5, *shape, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, *out_shape, dtype=torch.float64)
    net(inp).backward(delta)
    synapse = net.projection("x->y")
    feedback = synapse.feedback.detach()      # brsf: the M this step drew (reading B draws none)
    # the same map with B in W's place, differentiated by autograd, is B^T delta
    reference = torch.func.vjp(lambda v: synapse.operator.forward(v, feedback, None), inp.detach())[1](delta)[0]
    assert relative(inp.grad, reference) < 1e-12
    weight_ref = torch.func.vjp(lambda w: synapse.operator.forward(inp.detach(), w, None), synapse.weight.detach())[1](
        delta
    )[0]
    if isinstance(synapse.rule, rules.KolenPollack):      # KP decays W (and B) in the backward pass
        weight_ref = weight_ref + synapse.rule.decay * synapse.weight.detach()
    assert relative(synapse.weight.grad, weight_ref) < 1e-12


@pytest.mark.parametrize("name", list(MODELS))
def test_error_reaching_output_is_the_same_for_every_rule(name):
    _, ref, shape = converted(name, "bp")
    x, target = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 10, (6,))
    errors = {}
    for rule in rules.RULES:
        _, net = converted(name, rule)[:2]
        net.load_state_dict(ref.state_dict(), strict=False)
        trace = {}
        nn.functional.cross_entropy(net(x, monitor=trace), target).backward()
        errors[rule] = trace[net.outputs[0]].a.grad
        assert errors[rule] is not None
    for rule, e in errors.items():
        assert torch.equal(e, errors["bp"]), rule
    # while errors deeper in differ between rules (except bp itself)
    assert not torch.equal(errors["bp"], torch.zeros_like(errors["bp"]))


def test_rules_can_be_mixed_per_projection():
    module, _, shape = converted("mlp")
    c = circuits.from_torch(module, rule="fa", input_shape=shape, rules_by_layer={"0": "wm", "4": rules.KolenPollack()})
    net = c.build()
    assert [str(s.rule) for _, s in net.projections()] == ["wm", "fa", "kp"]


def test_graph_pairs_every_population_and_projection_with_feedback():
    c = circuits.from_torch(MODELS["residual"][0](), input_shape=(1, 8, 8))
    g = c.graph
    forward = [n for n, d in g.nodes(data=True) if d["pathway"] == "forward"]
    for n in forward:
        assert g.nodes["δ" + n]["partner"] == n
    for name, pre, post, projection, rule in c.projections():
        back = g.edges["δ" + post, "δ" + pre]
        assert back["name"] == name
        assert back["carries"] == ("B" if projection.synaptic else "local derivative")
        assert (rule is not None) == projection.synaptic
    assert nx.is_directed_acyclic_graph(c.forward_graph())
    assert nx.is_directed_acyclic_graph(c.feedback_graph())
    # residual sum: one population with two incoming projections
    assert any(c.forward_graph().in_degree(n) == 2 for n in forward)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_from_torch_resnets_match_torchvision_exactly(arch):
    torchvision = pytest.importorskip("torchvision")
    module = getattr(torchvision.models, arch)(num_classes=10)
    net = circuits.from_torch(module, rule="kp", input_shape=(3, 32, 32)).build()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(module(x), net(x))
    module.eval(), net.eval()
    assert torch.equal(module(x), net(x))
    assert sum(p.numel() for p in net.forward_parameters()) == sum(p.numel() for p in module.parameters())


def test_from_torch_asks_a_convnet_for_its_input_shape():
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(circuits.CircuitError, match=r"pass input_shape=\(3, height, width\)"):
        circuits.from_torch(torchvision.models.resnet18())
    c = circuits.from_torch(torchvision.models.resnet18(), input_shape=(3, 32, 32))
    assert c["x"].shape == (3, 32, 32) and c["fc"].shape == (1000,)
    assert circuits.from_torch(nn.Sequential(nn.Linear(5, 3)))["input_1"].shape == (5,)   # a Linear says its own


# --- bad input -------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_populations_and_shapes():
    c = circuits.Circuit()
    x = c.input("retina", shape=(1, 8, 8))
    h = c.population("v1", shape=(4, 7, 7))
    with pytest.raises(circuits.CircuitError) as e:
        c.connect(x, h, circuits.Conv2d(kernel_size=3, padding=1))
    msg = str(e.value)
    assert "'retina'" in msg and "(1, 8, 8)" in msg and "'v1'" in msg and "(4, 7, 7)" in msg and "(4, 8, 8)" in msg
    with pytest.raises(circuits.CircuitError, match=r"'retina'.*\(1, 8, 8\).*1-D"):
        c.connect(x, c.population("out", shape=(10,)), circuits.Dense())


def test_cycle_is_reported_at_build_time():
    c = circuits.Circuit("loop")
    x = c.input("x", shape=(3,))
    a, b = c.population("a", shape=(3,)), c.population("b", shape=(3,))
    c.connect(x, a, circuits.Dense())
    c.connect(a, b, circuits.Dense())
    c.connect(b, a, circuits.Dense())
    with pytest.raises(circuits.CircuitError, match=r"cycle.*a -> b -> a|cycle.*b -> a -> b"):
        c.build()


def test_unknown_rule_and_activation_are_clear_errors():
    with pytest.raises(circuits.CircuitError, match="unknown feedback rule 'hebb'.*bp, fa, dfa, ldfa, ss, .*kp, wm"):
        circuits.Circuit(rule="hebb")
    c = circuits.Circuit()
    with pytest.raises(circuits.CircuitError, match="unknown activation 'swishy'"):
        c.population("h", shape=(3,), activation="swishy")
    x, h = c.input("x", shape=(3,)), c.population("h", shape=(3,))
    with pytest.raises(circuits.CircuitError, match="unknown feedback rule"):
        c.connect(x, h, circuits.Dense(), rule="transport")
    with pytest.raises(circuits.CircuitError, match="local operation"):
        c.connect(x, h, circuits.Identity(), rule="fa")


def test_unconvertible_layer_is_named():
    module = nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(), nn.Linear(4, 2))
    with pytest.raises(circuits.CircuitError, match=r"layer '1' \(AlphaDropout\)"):
        circuits.from_torch(module)
    class Reshape(nn.Module):
        def forward(self, x):
            return x.cumsum(1)
    with pytest.raises(circuits.CircuitError, match="node 'cumsum'"):
        circuits.from_torch(Reshape(), input_shape=(4,))


def test_state_dict_round_trip_keeps_B():
    _, net, shape = converted("mlp", "wm")
    copy_net = copy.deepcopy(net)
    for _, s in copy_net.projections():
        s.feedback = torch.zeros_like(s.weight)
    copy_net.load_state_dict(net.state_dict())
    for (_, a), (_, b) in zip(net.projections(), copy_net.projections()):
        assert torch.equal(a.feedback, b.feedback)


@pytest.mark.parametrize("rule", [*rules.RULES, pytest.param(rules.InformationAlignment(sub_batch=2), id="ia-sub")])
def test_torch_compile_traces_one_graph_with_the_same_gradients(rule):
    """fullgraph=True fails on any graph break (bp once broke on W passed twice as W and B)."""
    torch._dynamo.reset()       # every rule compiles the same forward: keep clear of the recompile limit
    make, shape = MODELS["residual"]
    net = circuits.from_torch(make(), rule=rule, input_shape=shape).build()
    twin = copy.deepcopy(net)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x, target = torch.randn(4, *shape), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(net(x), target).backward()
    nn.functional.cross_entropy(compiled(x), target).backward()
    last = module_key(list(net.projections())[-1][0])
    for (name, a), (_, b) in zip(net.named_parameters(), twin.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        # brsf redraws |M| at every batch, and compiled code draws other numbers: only the output layer,
        # whose error crosses no B, is comparable there; ia-sub draws its sample: only B's gradient differs
        drawn = isinstance(rule, rules.LocalAlignment) and name.endswith(".B")
        if a.grad is not None and (rule != "brsf" or name.startswith(f"proj.{last}.")) and not drawn:
            assert relative(b.grad, a.grad) < 1e-5, name


def test_bf16_autocast_and_channels_last_follow_torch():
    """Under bf16 autocast with channels_last tensors, backprop through the circuit tracks torch's own
    mixed-precision autograd (both round to bf16; float32 master weights keep their dtype)."""
    make, shape = MODELS["residual"]
    module = make().to(memory_format=torch.channels_last)
    net = circuits.from_torch(module, rule="bp", input_shape=shape).build().to(memory_format=torch.channels_last)
    x = torch.randn(8, *shape).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, out = module(x), net(x)
        assert out.dtype == out_ref.dtype == torch.bfloat16
        nn.functional.cross_entropy(out_ref, target).backward()
        nn.functional.cross_entropy(out, target).backward()
    ref = dict(module.named_parameters())
    for layer, synapse in net.projections():
        assert synapse.weight.grad.dtype == torch.float32
        assert (
            relative(synapse.weight.grad, ref[layer + ".weight"].grad) < 1e-6
        ), layer  # equal on CPU: the same bf16 kernels


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_error_reaches_cudnn_in_the_layout_of_the_input(layout):
    """convolution_backward gets delta in y's memory format whatever delta's own strides: an error arriving in
    another layout (as a compiled graph's may) would be copied inside cuDNN at every projection."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Layouts(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                self.seen.append(args[0].is_contiguous(memory_format=layout))
            return func(*args, **(kwargs or {}))

    c = circuits.Circuit(rule="fa")
    c.connect(c.input("x", shape=(4, 6, 6)), c.population("y", shape=(5, 6, 6)), circuits.Conv2d(3, padding=1))
    net = c.build().to(memory_format=torch.channels_last)
    y = torch.randn(2, 4, 6, 6).contiguous(memory_format=layout).requires_grad_()
    other = torch.contiguous_format if layout == torch.channels_last else torch.channels_last
    delta = torch.randn(2, 5, 6, 6).contiguous(memory_format=other)
    out = net(y)
    with Layouts():
        out.backward(delta)
    assert Layouts.seen == [True]


@pytest.mark.parametrize("arch,size", [("alexnet", 64), ("vgg11", 32)])
def test_torchvision_nets_with_dropout_convert_exactly(arch, size):
    """Dropout is a local projection: the same outputs as torch in eval mode, and in train mode under the same
    random draws; backprop through the circuit equals torch autograd (float32: the same kernels, so equal but for
    the order of a few sums; vgg11's 133M parameters in float64 would take 8 GB)."""
    torchvision = pytest.importorskip("torchvision")
    module = getattr(torchvision.models, arch)(num_classes=10)
    net = circuits.from_torch(module, input_shape=(3, size, size)).build()
    x, target = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    torch.manual_seed(5)
    out_ref = module(x)
    torch.manual_seed(5)
    out = net(x)
    assert torch.equal(out, out_ref)                 # train mode: the same dropout masks
    nn.functional.cross_entropy(out_ref, target).backward()
    nn.functional.cross_entropy(out, target).backward()
    reference = dict(module.named_parameters())
    for layer, synapse in net.projections():
        assert relative(synapse.weight.grad, reference[layer + ".weight"].grad) < 1e-5, layer
    module.eval(), net.eval()
    assert torch.equal(net(x), module(x))
