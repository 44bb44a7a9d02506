"""benchmarks/throughput.py: it runs at tiny size, prints one ratio row per rule, and times what it names."""
import importlib.util
import json
import pathlib
import sys

import h5py
import pytest
import torch
import torch.nn.functional as F
from conftest import ResidualNet

import circuits
from circuits import rules

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
_spec = importlib.util.spec_from_file_location("throughput", _PATH)
throughput = sys.modules["throughput"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)

ROWS = ["torch", "bp", "fa", "dfa", "ss", "kp", "ia", "ia-sub", "wm", "wm+mirror"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_prints_a_ratio_row_per_rule(capsys):
    results = throughput.main(["--smoke"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet18, batch 2, 32x32, cpu, torch threads=1")
    assert "bf16 autocast" in lines[0] or "float32" in lines[0]
    assert lines[1].split() == ["variant", "eager", "steps/s", "ratio", "lowest", "highest"]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[2:]}
    assert list(rows) == ["torch", *rules.RULES, *throughput.MIRROR_VARIANTS, throughput.IA_SUB_VARIANT]
    assert list(results) == ["eager"]
    for name, (steps_per_s, ratio, lowest, highest) in rows.items():
        row = results["eager"][name]
        assert steps_per_s > 0
        assert steps_per_s == pytest.approx(row.steps_per_s, abs=5e-4)
        # one round: the paired ratio is the rate over the baseline's, and lowest = median = highest
        assert ratio == pytest.approx(row.steps_per_s / results["eager"]["torch"].steps_per_s, abs=5e-4)
        assert lowest == ratio == highest
    assert rows["torch"][1:] == [1.0, 1.0, 1.0]


def test_ratios_are_medians_of_rounds_paired_with_the_baseline():
    rows = throughput.summarize({"torch": [10.0, 20.0, 10.0], "fa": [9.0, 10.0, 8.0]})
    assert rows["fa"].ratio == pytest.approx(0.8)          # median of 0.9, 0.5, 0.8
    assert (rows["fa"].lowest, rows["fa"].highest) == (pytest.approx(0.5), pytest.approx(0.9))
    assert rows["fa"].steps_per_s == 9.0
    assert rows["torch"].ratio == 1.0


def test_json_is_written_as_rounds_end(tmp_path):
    out = tmp_path / "t.json"
    throughput.main(["--smoke", "--rules", "fa", "--rounds", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["modes"]["eager"]) == {"torch", "fa"}
    assert saved["modes"]["eager"]["torch"]["ratio"] == 1.0


def test_profile_writes_each_variants_busiest_ops(tmp_path, capsys):
    throughput.main(["--smoke", "--rules", "fa", "--profile", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("profile, ")]
    assert [line.split(":")[0] for line in lines] == ["profile, eager torch", "profile, eager fa"]
    assert float(lines[1].split("wall ")[1].split(" ms/step")[0]) > 0
    table = (tmp_path / "eager_fa.txt").read_text()
    assert "FeedbackPathwayBackward" in table and "aten::convolution_backward" in table
    assert "FeedbackPathway" not in (tmp_path / "eager_torch.txt").read_text()


def test_variants_start_from_the_same_weights_and_train_what_they_name():
    model = ResidualNet()
    nets = {v.name: throughput.build(v, model, (1, 8, 8)) for v in throughput.variants(ROWS[1:])}
    x, target = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    reference = model(x)
    for name, net in nets.items():
        assert torch.equal(net(x), reference), name
    nets["torch"] = throughput.build(throughput.Variant("torch"), model, (1, 8, 8))
    for name, net in nets.items():
        before = {k: p.detach().clone() for k, p in net.named_parameters()}
        mirror = circuits.Mirror(1, batch_size=3) if name == "wm+mirror" else None
        trainee = throughput.Trainee(net, compile=False, dtype=None, mirror=mirror)
        loss = trainee.step(x, target)
        assert loss == pytest.approx(float(F.cross_entropy(reference.detach(), target)), rel=1e-6), name
        changed = {k for k, p in net.named_parameters() if not torch.equal(p, before[k])}
        weights = {k for k in before if k.endswith("weight")}
        feedback = {k for k in before if k.endswith(".B")}
        assert weights <= changed, name                       # every W and batch-norm scale learned
        stores_b = ("fa", "dfa", "kp", "ia", "ia-sub", "wm", "wm+mirror")
        assert bool(feedback) == (name in stores_b), name
        # B learns by the optimizer under KP and IA, by the mirror batch under wm+mirror, never otherwise
        assert feedback & changed == (feedback if name in ("kp", "ia", "ia-sub", "wm+mirror") else set()), name


def test_the_mirror_beside_learning_trains_as_the_serial_mirror():
    """wm+mirror-beside holds each mirror batch until the next backward (on a CPU): after 3 steps B still waits for the
    last one, and once it ran every parameter is wm+mirror's, bit for bit."""
    model = ResidualNet()
    x, target = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    trainees = {}
    for variant in throughput.variants(throughput.MIRROR_VARIANTS):
        if variant.mirror:
            torch.manual_seed(0)        # the same noise
            net = throughput.build(variant, model, (1, 8, 8))
            mirror = circuits.Mirror(1, batch_size=3)
            trainees[variant.name] = throughput.Trainee(net, False, None, mirror, variant.beside)
            for _ in range(3):
                trainees[variant.name].step(x, target)
    serial, beside = (trainees[name] for name in throughput.MIRROR_VARIANTS)
    beside_parameters = dict(beside.net.named_parameters())
    waiting = [k for k, p in serial.net.named_parameters() if not torch.equal(p, beside_parameters[k])]
    assert waiting and all(k.endswith(".B") for k in waiting)
    beside.mirrors.join()
    for k, p in serial.net.named_parameters():
        assert torch.equal(p, dict(beside.net.named_parameters())[k]), k


@pytest.mark.parametrize("argv", [["--rules", "xx"], ["--smoke", "--steps", "0"], ["--warmup", "-1"],
                                  ["--smoke", "--modes", "compiled", "--warmup", "0"],
                                  ["--smoke", "--rules", "fa", "--compile-rules", "kp"],
                                  ["--smoke", "--mirror-batch-size", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        throughput.parse(argv)
    assert "error" in capsys.readouterr().err


def test_recording_benchmark_times_every_variant_and_the_metrics(tmp_path, capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "recording.py"
    spec = importlib.util.spec_from_file_location("recording_benchmark", path)
    recording = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recording)
    rates = recording.main(["--smoke", "--rule", "wm", "--out", str(tmp_path)])
    assert list(rates) == ["off", "record", "record+probe", "compiled"] and all(r > 0 for r in rates.values())
    out = capsys.readouterr().out
    assert "the metrics of every projection (circuits.recording.alignment.alignment)" in out and "%), compiled " in out
    with h5py.File(tmp_path / "record.h5") as eager, h5py.File(tmp_path / "compiled.h5") as compiled:
        assert list(eager["alignment"]) == list(compiled["alignment"])     # every projection, both ways
        assert len(compiled["steps/tick"]) == len(eager["steps/tick"]) > 0


def test_seeds_benchmark_times_both_ways_and_prints_ratios(capsys):
    """benchmarks/seeds.py at 2 steps: a plain-torch reference row, then per S one-by-one and batched rows, each a
    ratio to the reference, the batched row also to one by one; the batched run trains a SeedBatch."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "seeds.py"
    spec = importlib.util.spec_from_file_location("seeds_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    built, real = [], bench.SeedBatch.__dict__["build"]      # the classmethod itself, restored as it was
    bench.SeedBatch.build = classmethod(lambda cls, *a, **k: built.append(real.__func__(cls, *a, **k)) or built[-1])
    try:
        rows = bench.main(["--seeds", "1", "2", "--steps", "2", "--rules", "wm"])
    finally:
        bench.SeedBatch.build = real
    assert [len(b) for b in built] == [1, 2]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("784-500-10 sigmoid MLP, batch 128, 2 steps per seed, CPU, 1 thread(s)")
    assert out[1].split()[-1] == "1.00x"
    assert [(r["rule"], r["seeds"]) for r in rows] == [("wm", 1), ("wm", 2)]
    for row in rows:
        assert row["one_by_one"] > 0 and row["batched"] > 0
        assert row["speedup"] == pytest.approx(row["batched"] / row["one_by_one"])
    assert f"({rows[1]['speedup']:.2f}x one by one)" in "\n".join(out)
