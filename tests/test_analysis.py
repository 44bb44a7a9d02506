"""Analysis of recordings: statistics against known answers, figures and the report from real short runs."""
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import circuits
from analysis import figures, open_run, report, stats
from analysis.__main__ import main
from circuits.recording import RecordingError
from circuits.recording.recorder import Recorder
from models.data import digits
from models.mlp import mlp

ROOT = Path(__file__).resolve().parents[1]


def set_angle(synapse: circuits.Synapse, degrees: float) -> None:
    """B = cos(theta) W/|W| + sin(theta) R, R a unit tensor orthogonal to W: angle(B, W) = theta, |B| = 1."""
    w = synapse.weight.detach().flatten().double()
    w = w / w.norm()
    r = torch.randn_like(w)
    r -= (r @ w) * w
    theta = math.radians(degrees)
    b = math.cos(theta) * w + math.sin(theta) * r / r.norm()
    synapse.feedback = b.reshape(synapse.weight.shape).to(synapse.weight.dtype)


ANGLES = {"fc1": [80, 60, 40, 20, 10], "fc2": [90, 90, 50, 30, 30]}
TOP1 = [0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """A recording whose angles and accuracies are set by hand: fc1 (fa) and fc2 (wm), five learning steps."""
    path = tmp_path_factory.mktemp("known") / "known.h5"
    net = mlp((6, 5, 4), rule="fa", rules_by_layer={"fc2": "wm"}).build().double()
    rec = Recorder(path, block=2)
    rec.begin(net, {"note": "angles set by hand"})
    for tick in range(5):
        for name, angles in ANGLES.items():
            set_angle(net.projection(name), angles[tick])
        rec.step(
            tick,
            step=tick + 1,
            phase="learn",
            loss=torch.tensor(2.0 - tick / 4),
            lr=0.1,
            examples=8 * (tick + 1),
            net=net,
        )
        if tick in (1, 3, 4):
            rec.evaluate(tick + 1, {"loss": 1.0, "top1": TOP1[(1, 3, 4).index(tick)], "top5": 1.0})
    rec.close()
    return path, {name: float(net.projection(name).weight.detach().norm()) for name in ANGLES}


def test_statistics_of_a_recording_with_known_angles(known):
    path, norms = known                                  # |B| = 1, so |B| / |W| = 1 / |W|
    with open_run(path) as run:
        assert run.rules == {"fc1": "fa", "fc2": "wm"} and run.rule == "fa+wm" and run.depth == {"fc1": 1, "fc2": 2}
        np.testing.assert_allclose(run.alignment["fc1"]["angle"], ANGLES["fc1"], rtol=1e-5)
        assert list(run.alignment["fc2"].step) == [1, 2, 3, 4, 5]
        assert stats.first_below(run.alignment, 45) == {"fc1": 3, "fc2": 4}
        assert stats.first_below(run.alignment, 5) == {"fc1": None, "fc2": None}
        assert stats.first_below(run.alignment, 55) == {"fc1": 3, "fc2": 3}
        assert stats.final(run.alignment) == pytest.approx({"fc1": 10, "fc2": 30}, rel=1e-5)
        assert stats.mean(run.alignment) == pytest.approx({"fc1": 42, "fc2": 58}, rel=1e-5)
        assert stats.final(run.alignment, "norm_ratio") == pytest.approx({n: 1 / w for n, w in norms.items()}, rel=1e-5)
        fa, wm = stats.summarize(run, threshold=55)
        assert (fa.rule, fa.projections, fa.steps, fa.top1, fa.aligned_at) == ("fa", ("fc1",), 5, 0.75, 3)
        assert (fa.final_angle, fa.mean_angle) == pytest.approx((10, 42), rel=1e-5)
        assert (wm.rule, wm.final_angle, wm.mean_angle, wm.aligned_at) == (
            "wm",
            pytest.approx(30, rel=1e-5),
            pytest.approx(58, rel=1e-5),
            3,
        )
        assert fa.error_angle is None                        # no probe batch was recorded
        table = stats.markdown(stats.compare([run, run], threshold=55), threshold=55).splitlines()
        assert len(table) == 2 + 4
        assert table[2].split("|")[1:-1] == [
            " known ",
            " fa ",
            " 1 ",
            " 5 ",
            " 75.00 ",
            " 100.00 ",
            " 10.00 ",
            " 42.00 ",
            " 3 ",
            " – ",
        ]
        assert table[3].split("|")[1:-1] == [
            " known ",
            " wm ",
            " 1 ",
            " 5 ",
            " 75.00 ",
            " 100.00 ",
            " 30.00 ",
            " 58.00 ",
            " 3 ",
            " – ",
        ]


def test_the_view_holds_the_circuit_config_and_a_growing_live_file(tmp_path):
    net = mlp((6, 5, 4), activation="relu", rule="kp").build()
    rec = Recorder(tmp_path / "live.h5", block=3)
    rec.begin(net, {"lr": 0.3})
    with open_run(tmp_path / "live.h5") as run:            # the writer still has it open
        assert run.config == {"lr": 0.3} and len(run.steps) == 0
        for tick in range(3):
            rec.step(tick, step=tick + 1, phase="learn", loss=torch.tensor(1.0), lr=0.3, examples=4, net=net)
        assert len(run.steps) == 3 and list(run.steps["phase"]) == ["learn"] * 3 and len(run.alignment["fc1"]) == 3
        graph = run.circuit
        assert set(graph.nodes) == set(net.circuit.graph.nodes)
        assert {(u, v, d["pathway"]) for u, v, d in graph.edges(data=True)} == \
               {(u, v, d["pathway"]) for u, v, d in net.circuit.graph.edges(data=True)}
        assert graph.nodes["hidden1"]["shape"] == (5,) and graph.edges["δoutput", "δhidden1"]["carries"] == "B"
        assert (
            graph.edges["retina", "hidden1"]["weight_shape"] == (5, 6)
            and graph.edges["retina", "hidden1"]["rule"] == "kp"
        )
    rec.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real short runs on scikit-learn's 8x8 digits: backprop and the weight mirror (paper's schedule)."""
    folder = tmp_path_factory.mktemp("runs")
    data = digits(flat=True)
    train = DataLoader(data.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    test = DataLoader(data.test, batch_size=512)
    probe = next(iter(DataLoader(data.test, batch_size=64)))
    paths = []
    for rule in ("bp", "wm"):
        torch.manual_seed(0)
        net = mlp((64, 32, 16, 10), activation="tanh", rule=rule).build()
        rec = Recorder(folder / f"{rule}.h5", probe=probe, probe_steps=4)
        trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
                                   circuits.paper_schedule(net, 8, batch_size=64), recorder=rec,
                                   config=circuits.TrainerConfig(progress=False))
        trainer.fit(train, epochs=2, val_loader=test)
        paths.append(folder / f"{rule}.h5")
    return paths


def non_trivial_png(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300, image.shape
    pixels = image[..., :3].reshape(-1, 3)
    assert (pixels < 0.9).any(axis=1).mean() > 0.01                  # more than a blank canvas
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 20   # lines in several colours, text
    return image


def test_each_figure_renders_what_the_runs_recorded(runs, tmp_path):
    bp, wm = (open_run(p) for p in runs)
    with bp, wm:
        assert len(wm.evaluations) == 2 and wm.evaluations["top1"][-1] > 0.5       # it learned
        assert stats.final(bp.alignment) == {"fc1": 0, "fc2": 0, "fc3": 0}
        assert all(a < 30 for a in stats.final(wm.alignment).values())             # the mirror aligned B
        fig = figures.alignment([bp, wm])
        lines = fig.axes[1].lines[:3]
        assert [line.get_label() for line in lines] == ["fc1", "fc2", "fc3"]
        np.testing.assert_array_equal(lines[0].get_ydata(), wm.alignment["fc1"]["angle"])
        assert len({line.get_color() for line in lines}) == 3                     # depth as colour
        error = figures.error_angles([bp, wm])
        np.testing.assert_array_equal(error.axes[1].lines[0].get_ydata(), wm.errors["hidden1"]["angle"])
        curves = figures.curves([bp, wm])
        np.testing.assert_allclose(curves.axes[1].lines[1].get_ydata(), 100 * (1 - wm.evaluations["top1"]))
        circuit = figures.circuit(wm)
        for name, f in (("alignment", fig), ("errors", error), ("curves", curves), ("circuit", circuit)):
            non_trivial_png(figures.save(f, tmp_path / f"{name}.png"))


def test_the_report_command_summarizes_two_runs(runs, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "analysis", "report", *map(str, runs), "-o", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = {"alignment.png", "errors.png", "curves.png", "bp-circuit.png", "wm-circuit.png", "summary.md"}
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(Path(line).name for line in done.stdout.split()) == sorted(expected)
    for png in expected - {"summary.md"}:
        non_trivial_png(out / png)
    summary = (out / "summary.md").read_text()
    rows = {cells[1]: cells for line in summary.splitlines() if line.startswith("| bp |") or line.startswith("| wm |")
            for cells in [[c.strip() for c in line.split("|")]] if cells[2] in ("bp", "wm")}
    for path in runs:
        with open_run(path) as run:
            cells = rows[run.name]
            assert cells[5] == f"{100 * run.evaluations['top1'][-1]:.2f}"
            assert cells[7] == f"{np.mean(list(stats.final(run.alignment).values())):.2f}"
            assert cells[8] == f"{np.mean(list(stats.mean(run.alignment).values())):.2f}"
    assert rows["bp"][7] == "0.00" and "![alignment](alignment.png)" in summary


def test_truncated_and_foreign_files_give_clear_errors(runs, tmp_path, capsys):
    head = tmp_path / "head.h5"
    head.write_bytes(runs[0].read_bytes()[:2000])
    with pytest.raises(RecordingError, match="truncated or damaged"):
        open_run(head)
    truncated = tmp_path / "truncated.h5"               # cut short: it opens, and what lies in it reads
    truncated.write_bytes(runs[0].read_bytes()[: runs[0].stat().st_size // 2])
    with open_run(truncated) as cut, open_run(runs[0]) as whole:
        unreadable = []
        for table in ("steps", "evaluations", "probe"):
            try:
                part, full = getattr(cut, table), getattr(whole, table)
            except RecordingError as e:
                assert f"table /{table} cannot be read; the file is cut short (" in str(e)
                unreadable.append(table)
                continue
            assert np.array_equal(part.tick, full.tick[:len(part)]) and np.array_equal(part.step, full.step[:len(part)])
        assert unreadable                                # half a file: some table lies past its end
    foreign = tmp_path / "foreign.h5"
    foreign.write_text(json.dumps({"not": "hdf5"}))
    assert main(["report", str(runs[0]), str(foreign), "-o", str(tmp_path / "out")]) == 1
    assert f"{foreign} is not an HDF5 file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "out")]) == 1
    assert "no recording at" in capsys.readouterr().err


def test_analysis_imports_without_torch():
    code = "import sys, analysis; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_report_runs_where_torch_is_not_installed(runs, tmp_path):
    """A meta-path blocker makes `import torch` fail, as on a laptop without it."""
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from analysis.__main__ import main\n"
            f"sys.exit(main(['report', {str(runs[0])!r}, '-o', {str(tmp_path / 'out')!r}, '--no-progress']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "summary.md").exists()


T_975 = {2: 4.302652729749464, 3: 3.182446305284263}
"""Student's t quantile 0.975 for 2 and 3 degrees of freedom (tables; e.g. R's qt(0.975, 2))."""


def test_t_intervals_paired_differences_and_verdicts_against_hand_computed_values():
    found = stats.interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)                                # squares about 2.5: 2.25 + 0.25 + 0.25 + 2.25 = 5, / 3
    half = T_975[3] * sd / 2
    assert (found.n, found.mean) == (4, 2.5)
    assert found.sd == pytest.approx(sd, rel=1e-14)
    assert (found.low, found.high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-14)
    assert found.cell() == "2.50 ± 1.29 [0.45, 4.55]"
    # matched seeds: differences 0.2, -0.1, 0.5 (seed 4 has no partner); mean 0.2, SD 0.3
    d = stats.paired_difference({1: 97.2, 2: 96.9, 3: 97.5, 4: 90.0}, {1: 97.0, 2: 97.0, 3: 97.0})
    half = T_975[2] * 0.3 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(0.2, abs=1e-13) and d.sd == pytest.approx(0.3, rel=1e-12)
    assert (d.low, d.high) == pytest.approx((0.2 - half, 0.2 + half), rel=1e-12)     # [-0.545, 0.945]
    assert stats.verdict(d, -0.5, 0.5) == "undecided"          # straddles -0.5 and +0.5
    assert stats.verdict(d, -1.0, 1.0) == "holds"
    assert stats.verdict(d, 1.0, 2.0) == "fails"
    assert stats.verdict(stats.interval([9.0, 9.5, 10.5]), high=10) == "undecided"
    assert stats.verdict(stats.interval([5.0, 5.1, 5.2]), high=10) == "holds"
    one = stats.interval([97.0])                               # one seed bounds nothing
    assert math.isnan(one.sd) and (one.low, one.high) == (-math.inf, math.inf)
    assert stats.verdict(one, -0.5, 0.5) == "undecided" and one.cell() == "97.00 (1 seed)"
    assert stats.all_of(["holds", "undecided"]) == "undecided" and stats.all_of(["holds", "fails"]) == "fails"
    assert stats.all_of(["holds", "holds"]) == "holds"
    assert stats.tail_mean([50.0, 90.0, 92.0, 97.0]) == pytest.approx(93.0, rel=1e-15)
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired_difference({1: 1.0}, {2: 1.0})
    with pytest.raises(ValueError, match="finite"):
        stats.interval([1.0, math.nan])


def test_a_prediction_interval_bounds_one_more_draw_where_the_t_interval_bounds_the_mean():
    found = stats.prediction([1.0, 2.0, 3.0, 4.0])
    half = T_975[3] * math.sqrt(5 / 3) * math.sqrt(1 + 1 / 4)          # t SD sqrt(1 + 1/n)
    assert (found.n, found.mean) == (4, 2.5)
    assert (found.low, found.high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-14)
    one = stats.prediction([97.0])                                       # one seed predicts nothing
    assert (one.low, one.high) == (-math.inf, math.inf)
    # 3 draws of N(0, 1), then a 4th: the prediction interval holds the 4th 95% of the time, the t-interval of
    # the mean about 83% (the 4th is off the mean by t_2 SD sqrt(4/3), inside when |t_2| < 4.30 / 2).
    draws = np.random.default_rng(0).standard_normal((4000, 4))
    inside = [(stats.prediction(d[:3]).low <= d[3] <= stats.prediction(d[:3]).high,
               stats.interval(d[:3]).low <= d[3] <= stats.interval(d[:3]).high) for d in draws]
    predicted, of_the_mean = np.mean(inside, axis=0)
    assert abs(predicted - 0.95) < 0.015 and abs(of_the_mean - 0.835) < 0.03


SEED_TOP1 = {"fa": {1: (0.90, 0.92, 0.94), 2: (0.90, 0.93, 0.93), 3: (0.90, 0.91, 0.98)},
             "wm": {1: (0.90, 0.922, 0.944), 2: (0.90, 0.927, 0.930), 3: (0.90, 0.915, 0.99)}}
"""Accuracies after three evaluations: means of the last three 92.0, 92.0, 93.0 (fa) and 92.2, 91.9, 93.5 (wm)."""
SEED_ANGLES = {"fa": {"fc1": (80, 81, 82), "fc2": (40, 42, 44)}, "wm": {"fc1": (8, 9, 10), "fc2": (3, 4, 5)}}
"""Final angle(B, W) per seed 1, 2, 3."""


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Six recordings, fa and wm under seeds 1, 2, 3, with accuracies and final angles set by hand."""
    folder, paths = tmp_path_factory.mktemp("seeded"), []
    for rule, by_seed in SEED_TOP1.items():
        for i, (seed, top1) in enumerate(by_seed.items()):
            torch.manual_seed(seed)
            net = mlp((6, 5, 4), rule=rule).build().double()
            rec = Recorder(folder / f"{rule}-seed{seed}.h5", seeds={"seed": seed})
            rec.begin(net, {})
            for tick, accuracy in enumerate(top1):
                for name, angles in SEED_ANGLES[rule].items():
                    set_angle(net.projection(name), angles[i] + 2 - tick)     # falls to angles[i] at the end
                rec.step(tick, step=tick + 1, phase="learn", loss=torch.tensor(1.0), lr=0.1, examples=8 * (tick + 1),
                         net=net)
                rec.evaluate(tick + 1, {"loss": 1.0, "top1": accuracy, "top5": 1.0})
            rec.close()
            paths.append(folder / f"{rule}-seed{seed}.h5")
    return paths


def hand_cell(values, fmt=".2f"):
    """mean ± SD [mean - t SD / sqrt(3), mean + t SD / sqrt(3)] of three values, t from the table."""
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = T_975[2] * sd / math.sqrt(3)
    return f"{mean:{fmt}} ± {sd:.2f} [{mean - half:{fmt}}, {mean + half:{fmt}}]"


def test_the_report_gives_intervals_paired_differences_and_verdicts_across_seeds(seeded, tmp_path, capsys):
    assert main(["report", *map(str, seeded), "-o", str(tmp_path / "out"), "--baseline", "fa", "--points", "0.5",
                 "--threshold", "10", "--no-progress"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    rows = {cells[1].strip(): cells[2:-1] for line in summary.split("## Across seeds")[1].splitlines()
            if line.startswith("| fa |") or line.startswith("| wm |") for cells in [line.split("|")]}
    assert [c.strip() for c in rows["wm"]] == [
        "3", hand_cell([94.4, 93.0, 99.0]), hand_cell([92.2, 91.9, 93.5]), hand_cell([0.2, -0.1, 0.5], "+.2f"),
        hand_cell([8, 9, 10]), hand_cell([3, 4, 5])]
    assert rows["wm"][3].strip() == "+0.20 ± 0.30 [-0.55, +0.95]"
    assert rows["wm"][4].strip() == "9.00 ± 1.00 [6.52, 11.48]"
    assert rows["fa"][3].strip() == "–" and rows["fa"][4].strip().startswith("81.00 ± 1.00")
    assert ("- undecided: WM: test accuracy (mean of the last 3 evaluations, all if fewer) within 0.5 points of "
            "FA's") in summary
    assert "- undecided: WM: angle(B, W) below 10° in every projection (95% intervals: fc1 [6.52, 11.48]" in summary
    assert "![seeds](seeds.png)" in summary
    non_trivial_png(tmp_path / "out" / "seeds.png")
    main(["report", *map(str, seeded), "-o", str(tmp_path / "wide"), "--baseline", "fa", "--points", "1",
          "--threshold", "5", "--no-progress"])
    summary = (tmp_path / "wide" / "summary.md").read_text()
    assert "- holds: WM: test accuracy" in summary and "- fails: WM: angle(B, W) below 5°" in summary
    twin = tmp_path / "fa-again.h5"
    twin.write_bytes(seeded[0].read_bytes())
    assert main(["report", str(seeded[0]), str(twin), "-o", str(tmp_path / "twins"), "--no-progress"]) == 0
    assert "No statistics across seeds: rule 'fa' has two runs of one seed ([1, 1])" in (
        tmp_path / "twins" / "summary.md").read_text()
    runs = [open_run(p) for p in seeded]
    try:
        found = stats.across_seeds([stats.seed_run(r) for r in runs], baseline="fa")
    finally:
        for r in runs:
            r.close()
    fig = figures.seeds(found, baseline="fa", points=0.5, threshold=10)
    difference = [line.get_ydata()[0] for line in fig.axes[1].lines if line.get_marker() == "s"]
    assert difference == pytest.approx([0.2], abs=1e-9)
    assert sorted(line.get_ydata()[0] for line in fig.axes[1].lines if line.get_linestyle() == "--") == [-0.5, 0.5]
# --- what the report cannot vouch for (issue 23) ---------------------------------------------------
def test_a_nan_tail_is_the_final_value_and_an_all_nan_projection_stays_in_its_rules_mean(tmp_path):
    """Item 5: B = 0 makes angle(B, W) NaN. fc2 (fa) is NaN in every row: fa's final and mean angle are NaN,
    not fc1's alone; fc3 (wm) turns NaN from step 4: its final value is NaN, not the last finite one."""
    path = tmp_path / "nan.h5"
    net = mlp((6, 5, 5, 4), rule="fa", rules_by_layer={"fc3": "wm"}).build().double()
    with Recorder(path) as rec:
        rec.begin(net, {})
        for tick in range(5):
            set_angle(net.projection("fc1"), ANGLES["fc1"][tick])
            set_angle(net.projection("fc3"), ANGLES["fc2"][tick])
            for name in ("fc2",) + (("fc3",) if tick >= 3 else ()):
                net.projection(name).feedback = torch.zeros_like(net.projection(name).weight)
            rec.step(tick, step=tick + 1, phase="learn", loss=torch.tensor(1.0), lr=0.1, examples=8, net=net)
    with open_run(path) as run:
        finals = stats.final(run.alignment)
        assert finals["fc1"] == pytest.approx(10, rel=1e-5) and math.isnan(finals["fc2"]) and math.isnan(finals["fc3"])
        fa, wm = stats.summarize(run)
        assert math.isnan(fa.final_angle) and math.isnan(fa.mean_angle)
        assert math.isnan(wm.final_angle) and wm.mean_angle == pytest.approx((90 + 90 + 50) / 3, rel=1e-5)
        assert stats.nonfinite(run) == [
            "angle of fc2 (B against W): non-finite in every row (5), so it has no value (NaN in averages)",
            "angle of fc3 (B against W): non-finite in 2 of 5 rows, first at learning step 4; the last row too, so "
            "its final value is NaN"]
    report([path], tmp_path / "out", progress=False)
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "**nan: non-finite numbers; see its section below.**" in text
    assert "| nan | fa | 2 | 5 | – | – | NaN | NaN | – | – |" in text
    assert "| nan | wm | 1 | 5 | – | – | NaN | 76.67 | – | – |" in text
    assert "| fc2 | 2 | fa | NaN | NaN | – |" in text
    assert "- Non-finite: angle of fc3 (B against W): non-finite in 2 of 5 rows, first at learning step 4; the " \
           "last row too, so its final value is NaN." in text


@pytest.mark.parametrize("size", [100, 300, 512])
def test_a_tiny_piece_of_a_recording_is_a_recording_error(runs, tmp_path, size, capsys):
    """Item 5: the first 100-512 bytes of a recording gave a KeyError traceback."""
    piece = tmp_path / "piece.h5"
    piece.write_bytes(runs[0].read_bytes()[:size])
    with pytest.raises(RecordingError, match=f"{piece} cannot be opened; it is truncated or damaged"):
        open_run(piece)
    assert main(["report", str(piece), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    assert f"{piece} cannot be opened; it is truncated or damaged" in capsys.readouterr().err


def test_a_file_with_a_recordings_attributes_but_no_tables_is_a_recording_error(tmp_path, capsys):
    """Item 5: the layout attributes alone gave a KeyError traceback at the first table read."""
    import h5py

    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(layout="mirrorcircuits recording", layout_version=1)
        f.create_group("steps")
    with pytest.raises(RecordingError, match=r"has the attributes of a recording but not its /circuit/populations, "
                                             r"/circuit/projections, /circuit/feedback, /probe, /evaluations, "
                                             r"/snapshots, /activity: it is damaged"):
        open_run(path)
    assert main(["report", str(path), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "has the attributes of a recording but not its" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_written_is_one_line(runs, tmp_path, capsys):
    """Clear errors: a read-only folder, or a file where the folder should be: one line and status 1."""
    from test_recorder import _NoOverride

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with _NoOverride() if os.geteuid() == 0 else contextlib.nullcontext():
            assert main(["report", str(runs[0]), "-o", str(folder), "--no-progress"]) == 1
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert err == f"python -m analysis report: [Errno 13] cannot write the report into {folder}: the folder is not " \
                  f"writable\n"
    (tmp_path / "file").write_text("")
    assert main(["report", str(runs[0]), "-o", str(tmp_path / "file"), "--no-progress"]) == 1
    assert capsys.readouterr().err == f"python -m analysis report: [Errno 17] cannot write the report into " \
                                      f"{tmp_path / 'file'}: File exists\n"
