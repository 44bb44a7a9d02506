"""The HDF5 recorder: rows hold the numbers computed, the run is untouched, files survive kills and resume."""
import contextlib
import copy
import ctypes
import errno
import json
import multiprocessing
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ResidualNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import circuits
from circuits.recording import file as recording
from circuits.recording import live_read
from circuits.recording.alignment import alignment
from circuits.recording.recorder import Recorder, RecordingError, open_recording
from models.mlp import mlp


def tiny_net(rules=("fa", "ss")) -> circuits.CircuitNet:
    """retina (5) -> fc1 -> hidden (4, sigmoid) -> fc2 -> output (3), in float64."""
    c = circuits.Circuit("tiny")
    x, h, y = c.input("retina", (5,)), c.population("hidden", (4,), "sigmoid"), c.population("output", (3,))
    c.connect(x, h, circuits.Dense(), rule=rules[0], name="fc1")
    c.connect(h, y, circuits.Dense(), rule=rules[1], name="fc2")
    return c.build().double()


def bn_net() -> circuits.CircuitNet:
    """input_1 (6) -> 0 -> _0 -> batch norm 1 -> _1 (relu) -> 3 -> _3 (tanh) -> 5 -> _5, under KP, FA and SS."""
    module = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 4))
    return circuits.from_torch(module, rule="kp", rules_by_layer={"3": "fa", "5": "ss"}).build()


def np_angle(u, v) -> float:
    u, v = np.ravel(u).astype(np.float64), np.ravel(v).astype(np.float64)
    return float(np.degrees(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1, 1))))


def learn_tick(rec, net, tick, step, loss=0.5):
    rec.step(tick, step=step, phase="learn", loss=torch.tensor(loss), lr=0.1, examples=4 * step, net=net)


# --- the numbers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True])
def test_rows_hold_the_angles_a_numpy_reference_computes(tmp_path, compiled):
    net = tiny_net(("fa", "ss"))
    fc1, fc2 = net.projection("fc1"), net.projection("fc2")
    fc1.feedback = fc1.weight.detach() + 1e-3 * torch.randn_like(fc1.weight)      # nearly aligned: a small angle
    x, t = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    rec = Recorder(tmp_path / "run.h5", probe=(x, t), probe_steps=1, compiled=compiled)
    rec.begin(net, {"lr": 0.1})
    rec.step(0, step=0, phase="mirror", loss=None, lr=0.1, examples=0, net=net)
    rec.step(1, step=1, phase="learn", loss=torch.tensor(0.75, dtype=torch.float64), lr=0.05, examples=6, net=net)
    rec.close()

    W1, b1, B1 = (p.detach().numpy() for p in (fc1.weight, fc1.bias, fc1.feedback))
    W2, b2 = fc2.weight.detach().numpy(), fc2.bias.detach().numpy()
    B2 = np.sign(W2) / np.sqrt(W2.shape[1])                # sign symmetry, dense: sign(W) times 1 / sqrt(fan_in)
    X, onehot = x.numpy(), np.eye(3)[t.numpy()]
    y1 = 1 / (1 + np.exp(-(X @ W1.T + b1)))
    a2 = y1 @ W2.T + b2
    p = np.exp(a2 - a2.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.mean(np.log(p[onehot == 1]))
    d2 = (p - onehot) / len(X)                             # cross-entropy's error at the output
    d1_rule, d1_bp = y1 * (1 - y1) * (d2 @ B2), y1 * (1 - y1) * (d2 @ W2)

    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/tick"]) == [0, 1] and list(f["steps/step"]) == [0, 1]
        assert list(f["steps/phase"]) == [1, 0] and list(f["steps/examples"]) == [0, 6]
        assert list(f["steps/lr"]) == [0.1, 0.05]
        assert np.isnan(f["steps/loss"][0]) and f["steps/loss"][1] == pytest.approx(0.75)
        for name, W, B in (("fc1", W1, B1), ("fc2", W2, B2)):
            g = f[f"alignment/{name}"]
            assert g["angle"][:] == pytest.approx([np_angle(B, W)] * 2, rel=1e-5)
            assert g["norm_ratio"][:] == pytest.approx([np.linalg.norm(B) / np.linalg.norm(W)] * 2, rel=1e-6)
            assert g["sign_match"][:] == pytest.approx([np.mean(np.sign(B) == np.sign(W))] * 2)
        assert 0.01 < f["alignment/fc1/angle"][0] < 1 and f["alignment/fc2/sign_match"][0] == 1
        assert list(f["probe/step"]) == [1] and f["probe/loss"][0] == pytest.approx(loss, rel=1e-6)
        assert f["probe/errors/hidden/angle"][0] == pytest.approx(np_angle(d1_rule, d1_bp), rel=1e-5)
        assert f["probe/errors/hidden/norm_ratio"][0] == pytest.approx(
            np.linalg.norm(d1_rule) / np.linalg.norm(d1_bp), rel=1e-5
        )
        assert f["probe/errors/output/angle"][0] == 0 and f["probe/errors/output/norm_ratio"][0] == 1
        assert f["probe/updates/fc1/angle"][0] == pytest.approx(np_angle(d1_rule.T @ X, d1_bp.T @ X), rel=1e-5)
        assert f["probe/updates/fc2/angle"][0] == 0
        assert "retina" not in f["probe/errors"]               # an input receives no error


def test_compiled_metrics_sum_in_float64():
    """Compiled, the metrics of float32 weights are float64 sums: within float32 rounding (1e-6) of numpy's on a
    million-entry sign-symmetry B (entries of one magnitude), where eager torch's float32 sums on a CPU drift by
    2e-4."""
    c = circuits.Circuit()
    x = c.input("x", shape=(1000,))
    c.connect(x, c.population("y", shape=(1000,)), circuits.Dense(), rule="ss")
    c.connect(x, c.population("z", shape=(64,)), circuits.Dense(), rule="fa")
    net = c.build()
    synapses = [net.projection("x->y"), net.projection("x->z")]
    reference = []
    for s in synapses:
        B, W = s.feedback.detach().double().numpy(), s.weight.detach().double().numpy()
        reference.append([np_angle(B, W), np.linalg.norm(B) / np.linalg.norm(W), np.mean(np.sign(B) == np.sign(W))])
    compiled, eager = alignment(synapses, compiled=True), alignment(synapses)
    assert compiled.dtype == eager.dtype == torch.float32
    np.testing.assert_allclose(compiled.numpy(), reference, rtol=1e-6)        # float32 rows of float64 sums
    np.testing.assert_allclose(eager.numpy(), reference, rtol=1e-3)


def test_compiled_angles_stay_accurate_near_zero():
    """The compiled one-pass chord (from |B|^2, |W|^2 and |B - W|^2) at angles down to 1e-5 degrees, B a rescaled W
    or not, on a million entries: within 1e-7 degrees of a float64 reference chord, exactly 0 for B = W. The
    cosine's form, 1 - <B, W> / (|B| |W|) in float64, errs by 1e-5 degrees at the smallest of these angles."""
    c = circuits.Circuit()
    x = c.input("x", shape=(1000,))
    cases = [(1.0, 0.0), (1.0, 1e-7), (1.01, 1e-7), (0.5, 1e-6), (2.0, 1e-3), (1.0, 1.0)]
    for i, _ in enumerate(cases):
        c.connect(x, c.population(f"y{i}", shape=(1000,)), circuits.Dense(), rule="fa")
    net = c.build()
    synapses, reference = [net.projection(f"x->y{i}") for i in range(len(cases))], []
    generator = torch.Generator().manual_seed(0)
    for s, (scale, eps) in zip(synapses, cases):
        w = s.weight.detach()       # eps relative to W's entries
        s.feedback = scale * w + eps * w.std() * torch.randn(w.shape, generator=generator)
        B, W = s.feedback.detach().double().numpy().ravel(), s.weight.detach().double().numpy().ravel()
        reference.append(np.degrees(2 * np.arcsin(np.linalg.norm(B / np.linalg.norm(B) - W / np.linalg.norm(W)) / 2)))
    angles = alignment(synapses, compiled=True)[:, 0].double().numpy()
    assert angles[0] == 0 and 1e-6 < reference[1] < 1e-5
    np.testing.assert_allclose(angles, reference, rtol=1e-6, atol=1e-7)


def test_the_probe_leaves_the_run_untouched(tmp_path):
    """Same trajectory with and without recording: no .grad, batch-norm statistic or RNG draw changes."""
    net = bn_net()
    twin = copy.deepcopy(net)
    x, t = torch.randn(8, 6), torch.randint(0, 4, (8,))
    rec = Recorder(tmp_path / "run.h5", probe=(x[:4], t[:4]), probe_steps=1, activity=["_1"], activity_steps=1,
                   snapshot=["3"], snapshot_steps=1)
    rec.begin(net, {})
    runs = [(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), rec),
            (twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), None)]
    for step in range(1, 4):
        x.normal_()
        for model, optimizer, r in runs:
            optimizer.zero_grad()
            F.cross_entropy(model(x), t).backward()
            optimizer.step()
            if r is not None:
                grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
                rules, rng = [s.rule for _, s in model.projections()], torch.get_rng_state()
                r.step(step - 1, step=step, phase="learn", loss=torch.tensor(1.0), lr=0.1, examples=8 * step, net=model)
                assert torch.equal(torch.get_rng_state(), rng)
                assert [s.rule for _, s in model.projections()] == rules
                assert {k: p.grad for k, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
                assert all(torch.equal(p.grad, grads[k]) for k, p in model.named_parameters() if p.grad is not None)
    rec.close()
    for (k, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k                           # weights, B, running statistics, batch counts
    with open_recording(tmp_path / "run.h5") as f:
        assert len(f["probe/tick"]) == 3 and np.all(f["probe/errors/_1/angle"][:] > 0)


def test_snapshots_and_activity_hold_W_B_y_and_delta_of_the_chosen_steps(tmp_path):
    net = bn_net()
    x, t = torch.randn(5, 6), torch.randint(0, 4, (5,))
    rec = Recorder(tmp_path / "run.h5", probe=(x, t), probe_steps={1}, snapshot=["0", "5"], snapshot_steps=2,
                   activity=["_1", "_5"], activity_steps=[3], activity_samples=2)
    rec.begin(net, {})
    expected = {}
    for step in range(1, 5):
        with torch.no_grad():
            for p in net.forward_parameters():
                p.add_(0.01 * torch.randn_like(p))
        if step in (2, 4):
            expected[step] = {
                n: (net.projection(n).weight.detach().clone(), net.projection(n).feedback.detach().clone())
                for n in ("0", "5")
            }
        if step == 3:
            probe, traces = copy.deepcopy(net), {}
            F.cross_entropy(probe(x, monitor=traces), t).backward()
            activity = {p: (traces[p].y[:2].detach(), traces[p].a.grad[:2]) for p in ("_1", "_5")}
        learn_tick(rec, net, step - 1, step)
    rec.close()
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["snapshots/step"]) == [2, 4] and list(f["activity/step"]) == [3] and list(f["probe/step"]) == [1]
        for i, step in enumerate((2, 4)):
            for n, (W, B) in expected[step].items():
                assert np.array_equal(f[f"snapshots/{n}/W"][i], W.numpy())
                assert np.array_equal(f[f"snapshots/{n}/B"][i], B.numpy())
        for p, (y, delta) in activity.items():
            assert f[f"activity/{p}/y"].shape == (1, 2, *y.shape[1:])
            np.testing.assert_allclose(f[f"activity/{p}/y"][0], y.numpy(), rtol=1e-6)
            np.testing.assert_allclose(f[f"activity/{p}/delta"][0], delta.numpy(), rtol=1e-5, atol=1e-9)


def test_metrics_reach_the_host_once_per_block(tmp_path, monkeypatch):
    net = circuits.from_torch(ResidualNet(), rule="kp", input_shape=(1, 8, 8)).build()
    rec = Recorder(tmp_path / "run.h5", block=8, every=1)
    rec.begin(net, {})
    calls = {"cpu": 0, "item": 0, "tolist": 0, "__float__": 0}
    for method in calls:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _method=method, _original=original, **kwargs):
            calls[_method] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    for tick in range(16):
        learn_tick(rec, net, tick, tick + 1)
    assert calls == {"cpu": 2, "item": 0, "tolist": 0, "__float__": 0}     # 16 rows, blocks of 8
    monkeypatch.undo()
    rec.close()
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/tick"]) == list(range(16)) and f["alignment/fc/angle"].shape == (16,)


def test_cadences_pick_their_ticks_and_steps(tmp_path):
    net = tiny_net()
    x, t = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    rec = Recorder(tmp_path / "run.h5", every=3, probe=(x, t), probe_steps=[2, 5], snapshot=["fc2"], snapshot_steps=4,
                   block=2)
    rec.begin(net, {})
    for tick in range(12):                      # learn, mirror, learn, mirror, ...: step = learning steps so far
        step = tick // 2 + 1
        rec.step(
            tick,
            step=step,
            phase="learn" if tick % 2 == 0 else "mirror",
            loss=torch.tensor(1.0) if tick % 2 == 0 else None,
            lr=0.1,
            examples=step,
            net=net,
        )
    rec.evaluate(6, {"top1": 0.5, "loss": 1.25})
    rec.close()
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/tick"]) == [0, 3, 6, 9] and list(f["steps/phase"]) == [0, 1, 0, 1]
        assert list(f["probe/step"]) == [2, 5] and list(f["probe/tick"]) == [2, 8]
        assert list(f["snapshots/step"]) == [4] and list(f["snapshots/tick"]) == [6]
        assert list(f["evaluations/tick"]) == [11] and list(f["evaluations/step"]) == [6]
        assert (
            f["evaluations/top1"][0] == 0.5 and f["evaluations/loss"][0] == 1.25 and np.isnan(f["evaluations/top5"][0])
        )


def test_the_file_describes_itself(tmp_path):
    net = mlp((6, 5, 4), activation="tanh", rule="wm", rules_by_layer={"fc1": "kp"}).build()
    x, t = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    rec = Recorder(tmp_path / "run.h5", probe=(x, t), seeds={"data": 7})
    rec.begin(net, {"optimizer": "SGD", "lr": 0.3, "rule": circuits.rules.KolenPollack(decay=0.01)})
    learn_tick(rec, net, 0, 1)
    rec.close()
    with open_recording(tmp_path / "run.h5") as f:
        assert f.attrs["layout"] == recording.LAYOUT and f.attrs["layout_version"] == recording.LAYOUT_VERSION
        assert json.loads(f.attrs["config"]) == {"optimizer": "SGD", "lr": 0.3, "rule": "KolenPollack(decay=0.01)"}
        assert json.loads(f.attrs["seeds"]) == {"torch_initial_seed": torch.initial_seed(), "data": 7}
        assert json.loads(f.attrs["versions"])["torch"] == torch.__version__
        pops = f["circuit/populations"]
        assert recording.strings(pops.fields("name")[:]) == ["retina", "hidden1", "output"]
        assert recording.strings(pops.fields("shape")[:]) == ["[6]", "[5]", "[4]"] and list(
            pops.fields("input")[:]
        ) == [True, False, False]
        projections = f["circuit/projections"]
        assert recording.strings(projections.fields("rule")[:]) == ["kp", "wm"]
        assert recording.strings(projections.fields("weight_shape")[:]) == ["[5, 6]", "[4, 5]"]
        assert f["alignment/fc2"].attrs["rule"] == repr(circuits.rules.WeightMirror())
        datasets = []
        f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        rows = [d for d in datasets if not d.name.startswith("/circuit")]
        assert len(rows) > 20 and all({"units", "description", "index"} <= set(d.attrs) for d in rows)
        assert all(d.maxshape[0] is None and d.chunks for d in rows)
        assert {d.attrs["index"] for d in rows} == {
            f"/{g}/tick" for g in ("steps", "probe", "evaluations", "snapshots", "activity")
        }
        assert all("description" in f[g].attrs for g in ("steps", "alignment", "probe", "evaluations", "circuit"))


def test_ticks_must_increase_and_chosen_names_must_exist(tmp_path):
    net = tiny_net()
    rec = Recorder(tmp_path / "run.h5")
    rec.begin(net, {})
    learn_tick(rec, net, 3, 1)
    with pytest.raises(RecordingError, match="tick 3 is not after the last recorded tick 3"):
        learn_tick(rec, net, 3, 2)
    with pytest.raises(RecordingError, match="phase 'sleep'"):
        rec.step(4, step=2, phase="sleep", loss=None, lr=0.1, examples=0, net=net)
    with pytest.raises(RecordingError, match=r"metrics \['accuracy'\] were not declared"):
        rec.evaluate(1, {"accuracy": 0.5})
    rec.close()
    with pytest.raises(RecordingError, match=r"no synaptic projection named \['fc9'\]; it has \['fc1', 'fc2'\]"):
        Recorder(tmp_path / "other.h5", snapshot=["fc9"]).begin(net, {})
    with pytest.raises(ValueError, match="activity samples are taken on the probe batch"):
        Recorder(tmp_path / "other.h5", activity=["hidden"])
    assert not (tmp_path / "other.h5").exists()


# --- files: live reading, kill -9, resume ----------------------------------------------------------
def _trainer(path: Path) -> tuple[circuits.Trainer, DataLoader]:
    """A tiny weight-mirror / Kolen-Pollack run whose every tick is recorded, flushed every 4 rows."""
    torch.manual_seed(0)
    net = mlp((8, 6, 4), activation="tanh", rule="wm", rules_by_layer={"fc1": "kp"}).build()
    x, t = torch.randn(32, 8), torch.randint(0, 4, (32,))
    loader = DataLoader(TensorDataset(x, t), batch_size=8)
    rec = Recorder(path, probe=(x[:8], t[:8]), probe_steps=2, block=4)
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), circuits.paper_schedule(net, 2, 8),
                               recorder=rec, config=circuits.TrainerConfig(progress=False))
    return trainer, loader


def _writer(path: str, checkpoint: str) -> None:
    """Runs in its own process until killed: 2 epochs, a checkpoint, then slow steps."""
    torch.set_num_threads(1)
    trainer, loader = _trainer(Path(path))
    trainer.fit(loader, epochs=2, val_loader=loader)
    torch.save(trainer.state_dict(), checkpoint + ".part")
    os.replace(checkpoint + ".part", checkpoint)
    trainer.hooks.append(lambda _: time.sleep(0.05))
    trainer.fit(loader, epochs=10_000, val_loader=loader)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A writer process killed with SIGKILL mid-run, while this process read its file as it grew."""
    folder = tmp_path_factory.mktemp("killed")
    path, checkpoint = folder / "run.h5", folder / "checkpoint.pt"
    writer = multiprocessing.get_context("spawn").Process(
        target=_writer, args=(str(path), str(checkpoint)), daemon=True
    )
    writer.start()
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():
            assert writer.is_alive() and time.monotonic() < deadline, "the writer died before its checkpoint"
            time.sleep(0.05)
        rows_at_checkpoint = torch.load(checkpoint)["recorder"]["rows"]["/steps/tick"]
        seen = []                                # (rows, ticks contiguous from 0) at each read
        while not seen or seen[-1][0] < rows_at_checkpoint + 24:
            assert writer.is_alive() and time.monotonic() < deadline, "the writer ended before it was killed"
            with open_recording(path) as f:
                ticks = live_read(lambda: f["steps/tick"][:])      # a chunk may be mid-write: read again
                seen.append((len(ticks), bool(np.array_equal(ticks, np.arange(len(ticks))))))
            time.sleep(0.02)
        alive_at_kill = writer.is_alive()
    finally:
        writer.kill()
        writer.join()
    return dict(path=path, checkpoint=checkpoint, seen=seen, alive=alive_at_kill, exitcode=writer.exitcode,
                rows_at_checkpoint=rows_at_checkpoint)


def test_a_reader_process_reads_the_growing_file(killed_run):
    rows = [n for n, _ in killed_run["seen"]]
    assert all(contiguous for _, contiguous in killed_run["seen"])
    assert rows == sorted(rows) and len(set(rows)) >= 3 and rows[-1] >= killed_run["rows_at_checkpoint"] + 24


def test_a_live_read_tries_again_while_a_chunk_is_mid_write():
    """A chunk its writer rewrites in place fails its checksum for a moment: read again; one that stays torn raises."""
    failures = iter([OSError("filter returned failure during read")] * 2)

    def read():
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return "rows"
    assert live_read(read) == "rows"
    start = time.monotonic()
    with pytest.raises(OSError, match="filter returned failure"):
        live_read(lambda: (_ for _ in ()).throw(OSError("filter returned failure during read")), seconds=0.3)
    assert 0.1 < time.monotonic() - start < 1.0


def test_sigkill_leaves_a_file_with_every_flushed_row(killed_run):
    assert killed_run["alive"] and killed_run["exitcode"] == -signal.SIGKILL
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(killed_run["path"], "r")                  # the writer never closed it ...
    with open_recording(killed_run["path"]) as f:         # ... and a SWMR reader sees every flushed row
        ticks = f["steps/tick"][:]
        assert len(ticks) >= killed_run["seen"][-1][0] and np.array_equal(ticks, np.arange(len(ticks)))
        assert len(f["alignment/fc1/angle"]) >= killed_run["seen"][-1][0]


def test_resume_appends_without_gaps_or_duplicates(killed_run, tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(killed_run["path"].read_bytes())
    trainer, loader = _trainer(path)
    trainer.load_state_dict(torch.load(killed_run["checkpoint"]))
    trainer.fit(loader, epochs=4, val_loader=loader)
    reference, _ = _trainer(tmp_path / "reference.h5")
    reference.fit(loader, epochs=4, val_loader=loader)
    assert reference.evaluate(loader)["top1"] >= 0                     # after fit: evaluated, not recorded
    with open_recording(path) as f, open_recording(tmp_path / "reference.h5") as g:
        assert len(f["steps/tick"]) < killed_run["seen"][-1][0]        # rows after the checkpoint were dropped ...
        for name in ("steps/tick", "steps/step", "steps/phase", "probe/tick", "evaluations/tick", "evaluations/step"):
            assert np.array_equal(f[name][:], g[name][:]), name        # ... and recorded again, once
        assert np.array_equal(f["steps/tick"][:], np.arange(len(g["steps/tick"])))
        for name in ("steps/loss", "alignment/fc1/angle", "alignment/fc2/angle", "probe/errors/hidden1/angle",
                     "evaluations/top1", "evaluations/loss"):
            np.testing.assert_allclose(f[name][:], g[name][:], rtol=1e-5, err_msg=name)
        assert json.loads(f.attrs["resumed"])[-1]["tick"] == torch.load(killed_run["checkpoint"])["recorder"]["tick"]
        assert f.attrs["run_id"] != g.attrs["run_id"]


# --- clear errors ----------------------------------------------------------------------------------
def test_an_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists and a recording is never overwritten"):
        Recorder(path).begin(tiny_net(), {})
    assert path.read_bytes() == b"precious"


class _NoOverride:
    """Permission bits bind root too: this thread drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, then restores them."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    def __enter__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.header, self.data = self.Header(0x20080522, 0), (self.Data * 2)()
        if self.libc.capget(ctypes.byref(self.header), self.data) != 0:
            pytest.skip("running as root and capabilities cannot be read: a directory's mode does not bind")
        self.saved = self.data[0].effective
        self.data[0].effective &= ~(1 << 1 | 1 << 2)        # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        assert self.libc.capset(ctypes.byref(self.header), self.data) == 0

    def __exit__(self, *exc):
        self.data[0].effective = self.saved
        assert self.libc.capset(ctypes.byref(self.header), self.data) == 0


def test_a_read_only_directory_is_named(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with _NoOverride() if os.geteuid() == 0 else contextlib.nullcontext():
            with pytest.raises(PermissionError, match=f"directory {folder} is not writable"):
                Recorder(folder / "run.h5").begin(tiny_net(), {})
    finally:
        folder.chmod(stat.S_IRWXU)
    assert not (folder / "run.h5").exists()


def test_a_full_disk_stops_the_recording_with_every_flushed_row_kept(tmp_path, monkeypatch):
    net = tiny_net()
    rec = Recorder(tmp_path / "run.h5", block=4)
    rec.begin(net, {})
    for tick in range(4):
        learn_tick(rec, net, tick, tick + 1)                 # one block: written
    usage = recording.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(recording.shutil, "disk_usage", lambda _: usage._replace(free=4096))
    for tick in range(4, 7):
        learn_tick(rec, net, tick, tick + 1)
    with pytest.raises(OSError, match=r"the disk is full \(4096 bytes free") as error:
        learn_tick(rec, net, 7, 8)
    assert error.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="the disk is full"):
        learn_tick(rec, net, 8, 9)                          # a failed recorder stays failed
    rec.close()
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/tick"]) == [0, 1, 2, 3]


def _fill(path: str, report: str) -> None:
    """Records until the file size limit (RLIMIT_FSIZE) stops a write; reports the error."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.set_num_threads(1)
    net = tiny_net()
    rec = Recorder(path, block=64)
    rec.begin(net, {})
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 200_000, resource.RLIM_INFINITY))
    try:
        for tick in range(100_000):
            learn_tick(rec, net, tick, tick + 1)
        outcome = {"error": None}
    except OSError as e:
        outcome = {"error": type(e).__name__, "errno": e.errno, "message": str(e), "tick": tick}
    Path(report).write_text(json.dumps(outcome))
    os._exit(0)     # HDF5 cannot close a file whose writes failed, and may crash at exit


def test_a_write_the_os_refuses_gives_a_clear_error(tmp_path):
    path, report = tmp_path / "run.h5", tmp_path / "report.json"
    child = multiprocessing.get_context("spawn").Process(target=_fill, args=(str(path), str(report)))
    child.start()
    child.join(120)
    outcome = json.loads(report.read_text())
    assert outcome["error"] == "OSError" and outcome["errno"] == errno.EFBIG, outcome
    assert f"recording {path}: writing 64 rows failed (File too large; is the disk full" in outcome["message"]
    with open_recording(path) as f:
        ticks = f["steps/tick"][:]
        assert 0 < len(ticks) <= outcome["tick"] + 1 and np.array_equal(ticks, np.arange(len(ticks)))


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "notes.h5").write_text("not hdf5")
    with pytest.raises(RecordingError, match="is not an HDF5 file"):
        open_recording(tmp_path / "notes.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(RecordingError, match="is an HDF5 file but not a mirrorcircuits recording"):
        open_recording(tmp_path / "other.h5")
    net = tiny_net()
    rec = Recorder(tmp_path / "run.h5")
    rec.begin(net, {})
    learn_tick(rec, net, 0, 1)
    rec.close()
    state = rec.state_dict()
    assert state["rows"]["/steps/tick"] == 1 and state["tick"] == 0

    foreign = Recorder(tmp_path / "other.h5")                 # resuming onto a file of another layout
    foreign.load_state_dict(state)
    with pytest.raises(RecordingError, match="not a mirrorcircuits recording"):
        foreign.begin(net, {})
    other = Recorder(tmp_path / "run.h5")                     # resuming another run onto this file
    other.load_state_dict({**state, "run_id": "0" * 32})
    with pytest.raises(RecordingError, match=f"holds run {state['run_id']}, but the checkpoint resumes run 0000"):
        other.begin(net, {})
    changed = Recorder(tmp_path / "run.h5")                   # resuming with another circuit
    changed.load_state_dict(state)
    with pytest.raises(RecordingError, match="recorded a circuit with projections"):
        changed.begin(mlp((5, 3)).build(), {})
    with h5py.File(tmp_path / "run.h5", "r+") as f:
        f.attrs["layout_version"] = recording.LAYOUT_VERSION + 1
    with pytest.raises(RecordingError, match="newer than the version 1 this mirrorcircuits reads"):
        open_recording(tmp_path / "run.h5")


# --- trusting what a recording says (issue 23) -----------------------------------------------------
def test_every_dataset_carries_a_fletcher32_checksum_and_reads_live(tmp_path):
    """Item 5: row tables (resized in SWMR mode, a block at a time) and /circuit's tables are checksummed."""
    net = tiny_net()
    x, t = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    rec = Recorder(tmp_path / "run.h5", probe=(x, t), probe_steps=1, snapshot=["fc1"], snapshot_steps=1,
                   activity=["hidden"], activity_steps=1, block=2)
    rec.begin(net, {})
    for tick in range(5):
        learn_tick(rec, net, tick, tick + 1)
    rec.evaluate(5, {"loss": 1.0, "top1": 0.5, "top5": 1.0})
    with open_recording(tmp_path / "run.h5") as live:            # a SWMR reader while the writer holds the file
        assert list(live["steps/tick"][:]) == [0, 1, 2, 3, 4] and list(live["evaluations/top1"][:]) == [0.5]
    rec.close()
    with open_recording(tmp_path / "run.h5") as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        assert len(datasets) > 30 and [d.name for d in datasets if not d.fletcher32] == []
        assert list(f["steps/tick"][:]) == [0, 1, 2, 3, 4] and f["snapshots/fc1/W"].shape == (5, 4, 5)


def test_a_run_closed_normally_is_marked_finished_and_no_other(tmp_path):
    """Item 5: the root attribute `finished`: False while written, True after close(), False again on resume,
    and False when close() runs on the way out of an error (the trainer's `finally`) or a `with` block's."""
    net, path = tiny_net(), tmp_path / "run.h5"

    def finished() -> bool:
        with open_recording(path) as f:
            return bool(f.attrs["finished"])

    rec = Recorder(path)
    rec.begin(net, {})
    learn_tick(rec, net, 0, 1)
    assert finished() is False
    rec.close()
    assert finished() is True
    rec.begin(net, {})                                              # a second fit continues the file
    assert finished() is False
    with pytest.raises(KeyboardInterrupt):
        try:
            learn_tick(rec, net, 1, 2)
            raise KeyboardInterrupt
        finally:
            rec.close()
    assert finished() is False
    with pytest.raises(ZeroDivisionError):
        with Recorder(path) as again:
            again.load_state_dict(rec.state_dict())
            again.begin(net, {})
            learn_tick(again, net, 2, 3)
            1 / 0
    assert finished() is False
    with open_recording(path) as f:
        assert list(f["steps/tick"][:]) == [0, 1, 2]


def test_names_that_land_on_the_recordings_own_are_refused_when_recorded(tmp_path):
    """Clear errors: a population or projection named '.', or 'tick' / 'step' beside a table's index, would
    overwrite the recording's own datasets (or HDF5's name of the group itself): named before any file exists."""
    c = circuits.Circuit("clash")
    x, h, y = c.input("retina", (5,)), c.population("tick", (4,), "sigmoid"), c.population("output", (3,))
    c.connect(x, h, circuits.Dense(), rule="fa", name="step")
    c.connect(h, y, circuits.Dense(), rule="fa", name="fc2")
    net = c.build().double()
    probe = (torch.randn(2, 5, dtype=torch.float64), torch.tensor([0, 1]))
    path = tmp_path / "run.h5"
    with Recorder(path, probe=probe) as rec:                       # /alignment/step, /probe/errors/tick: no clash
        rec.begin(net, {})
        learn_tick(rec, net, 0, 1)
    path.unlink()
    for settings, message in (
        (dict(snapshot=["step"]), "the projection named 'step' collides with the recording's own names: it would "
                                  "be stored as the table's index column /snapshots/step; rename it"),
        (dict(activity=["tick"], probe=probe), "the population named 'tick' collides .* index column /activity/tick"),
        (dict(metrics=["loss", "step"]), "the evaluation metric named 'step' collides .* column /evaluations/step"),
    ):
        with pytest.raises(RecordingError, match=message):
            Recorder(path, **settings).begin(net, {})
    dot = circuits.Circuit("dot")
    x, y = dot.input("retina", (5,)), dot.population(".", (3,))
    dot.connect(x, y, circuits.Dense(), rule="fa", name="fc1")
    with pytest.raises(RecordingError, match=r"the population named '\.' collides .* as /probe/errors itself \(HDF5"):
        Recorder(path, probe=probe).begin(dot.build().double(), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("setting, value, shown", [("probe_steps", 2.5, "2.5"), ("snapshot_steps", [1, 2.5], "2.5"),
                                                   ("activity_steps", "10", "'10'"), ("probe_steps", [-1], "-1")])
def test_step_settings_that_are_no_steps_are_named(setting, value, shown):
    """Clear errors: Recorder(probe_steps=2.5) names the setting, not "'float' object is not iterable"."""
    with pytest.raises(ValueError, match=rf"Recorder {setting}=.*: give a positive interval .* not {shown}$"):
        Recorder("run.h5", **{setting: value})


def test_a_reader_that_saw_the_file_closed_just_before_a_writer_opened_it_reads_it_live(tmp_path):
    """A reader (another process) that checks the superblock just before a resumed writer opens the file (the
    kill tests' reader met this under load) reads it as SWMR instead of failing: "file is already open for write"."""
    net = tiny_net()
    rec = Recorder(tmp_path / "run.h5")
    rec.begin(net, {})
    learn_tick(rec, net, 0, 1)
    rec.flush()
    reader = ("import sys\n"
              "from circuits.recording import layout\n"
              "superblock, calls = layout._superblock, []\n"
              "def stale_then_true(path):\n"
              "    calls.append(path)\n"
              "    return (False, None) if len(calls) == 1 else superblock(path)\n"
              "layout._superblock = stale_then_true\n"
              "with layout.open_recording(sys.argv[1]) as f:\n"
              "    print(f['steps/tick'][:].tolist(), len(calls))\n")
    done = subprocess.run([sys.executable, "-c", reader, str(tmp_path / "run.h5")], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    rec.close()
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[0]", "3"]                 # the check, cut_short, the check again
