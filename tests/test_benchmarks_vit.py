"""benchmarks/throughput.py on transformers: vit_small (models.ViT) timed under each rule against plain torch."""
import torch
from test_benchmarks import throughput
from torch import nn


def test_vit_small_prints_a_ratio_row_per_rule(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = throughput.main(["--smoke", "--arch", "vit_small", "--image-size", "28", "--rules", "fa", "kp",
                                   "wm+mirror"])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("vit_small, batch 2, 28x28, cpu")
    assert [line.split()[0] for line in lines[2:]] == ["torch", "fa", "kp", "wm+mirror"]
    assert all(row.steps_per_s > 0 for row in results["eager"].values())


def test_transformers_convert_with_every_synaptic_layer_under_the_rule():
    model, shape = throughput.architecture("vit_small", 28)
    assert shape == (1, 28, 28)
    net = throughput.build(throughput.Variant("fa", "fa"), model, shape)
    rules = {name: str(s.rule) for name, s in net.projections()}
    assert len(rules) == 10 and set(rules.values()) == {"fa"}
    x = torch.randn(2, *shape)
    assert torch.equal(net(x), model(x)) and type(model.head) is nn.Linear      # the module itself untouched
