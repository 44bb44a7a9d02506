"""Every feedback rule trains a step on every converted torchvision model (small inputs; exactness is
tests/test_convert.py's and tests/test_core.py's; AlexNet's and VGG's classifiers narrowed here): the loss and every
parameter stay finite, every synaptic W learns (under direct
feedback at least the readout), and a weight-mirror net takes a mirror batch."""
import pytest
import torch
import torch.nn.functional as F
from conftest import mirror_moves_every_B

import circuits

torchvision = pytest.importorskip("torchvision")
ZOO = {"alexnet": (64, {}), "vgg11": (32, {}), "squeezenet1_0": (48, {}), "mobilenet_v2": (32, {}),
       "efficientnet_b0": (32, {}), "densenet121": (32, {}), "vit_b_16": (32, {"image_size": 32})}


@pytest.mark.parametrize("arch", list(ZOO))
def test_every_rule_trains_a_step_on_each_converted_model(arch):
    size, settings = ZOO[arch]
    torch.manual_seed(0)
    module = getattr(torchvision.models, arch)(num_classes=5, **settings)
    for m in module.modules():              # no residual block dropped at random (EfficientNet's stochastic depth)
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.0
    if arch == "vit_b_16":                  # its head starts at zero, which sends no error back at the first step
        torch.nn.init.normal_(module.heads.head.weight, std=0.02)
    if arch in ("alexnet", "vgg11"):        # their 4096-wide classifiers, narrowed to keep 11 rules quick
        wide = [i for i, m in enumerate(module.classifier) if isinstance(m, torch.nn.Linear)]
        sizes = [module.classifier[wide[0]].in_features, 64, 64, 5]
        for i, n_in, n_out in zip(wide, sizes[:-1], sizes[1:], strict=True):
            module.classifier[i] = torch.nn.Linear(n_in, n_out)
    x, target = torch.randn(2, 3, size, size), torch.tensor([1, 3])
    for rule in circuits.rules.RULES:
        net = circuits.from_torch(module, rule=rule, input_shape=(3, size, size)).build()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        before = {name: s.weight.detach().clone() for name, s in net.projections()}
        loss = F.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in net.parameters()), (arch, rule)
        learned = [name for name, s in net.projections() if not torch.equal(s.weight, before[name])]
        if circuits.rules.get(rule).direct:     # the readout, and what the output's error reaches directly
            assert list(before)[-1] in learned, (arch, rule)
        else:                                   # the error reaches every synapse
            assert learned == list(before), (arch, rule, sorted(set(before) - set(learned)))
        if circuits.rules.get(rule).mirrors:
            mirror_moves_every_B(net, 2)


def _transformers():
    from test_convert import CausalSelfAttention

    from models.transformer import CharTransformer, ViT, lm_loss

    tiny = dict(dim=16, depth=1, heads=2, mlp_dim=32)
    yield "vit", ViT(**tiny), (1, 28, 28), torch.randn(2, 1, 28, 28), torch.tensor([1, 3]), F.cross_entropy
    yield ("transformer_lm", CharTransformer(20, context=8, **tiny), (8,), torch.randint(0, 20, (2, 8)),
           torch.randint(0, 20, (2, 8)), lm_loss)
    yield "nanogpt_block", CausalSelfAttention(), (6, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8), F.mse_loss


@pytest.mark.parametrize("name", ["vit", "transformer_lm", "nanogpt_block"])
def test_every_rule_trains_a_step_on_each_transformer(name):
    torch.manual_seed(0)
    _, module, shape, x, target, loss_fn = next(t for t in _transformers() if t[0] == name)
    for rule in circuits.rules.RULES:
        net = circuits.from_torch(module, rule=rule, input_shape=shape).build()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        before = {n: s.weight.detach().clone() for n, s in net.projections()}
        loss = loss_fn(net(x), target)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in net.parameters()), (name, rule)
        learned = [n for n, s in net.projections() if not torch.equal(s.weight, before[n])]
        assert list(before)[-1] in learned and (circuits.rules.get(rule).direct or learned == list(before)), \
            (name, rule, sorted(set(before) - set(learned)))
        if circuits.rules.get(rule).mirrors:
            mirror_moves_every_B(net, 4)
