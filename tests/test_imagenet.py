"""ImageNet training (models.imagenet, models.imagenet_data) on a tiny generated folder of JPEGs, on CPU.

Run as a script under torch.distributed.run, this file trains through models.imagenet.main and saves
each rank's final parameters to $IMAGENET_TEST_DUMP/rank{RANK}.pt (the two-process test does that).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import circuits
from circuits.recording import WriterLock, open_recording
from models import imagenet, imagenet_recipe
from models.imagenet_data import DatasetError, image_batches, synthetic_image_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)
TINY = ["--arch", "resnet8", "--image-size", "16", "--batch-size", "4", "--lr", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 5 training JPEGs + 1 truncated JPEG (16 files: 4 batches of 4), 3 x 2 val JPEGs."""
    return synthetic_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, train_per_class=5,
                                  val_per_class=2, size=(24, 32), corrupt=1)


def run(folder: Path, out: Path, *args: str) -> imagenet.ImageNetTrainer:
    return imagenet.main(["--data", str(folder), "--out", str(out), "--workers", "0", *TINY, *args])


def angle(b: torch.Tensor, w: torch.Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(b.detach().flatten(), w.detach().flatten(), dim=0)
    return math.degrees(math.acos(float(cos.clamp(-1, 1))))


def initial_net(rule: str) -> circuits.CircuitNet:
    """The net a run with seed 0 starts from."""
    recipe = imagenet_recipe.Recipe(data="", arch="resnet8", rule=rule, image_size=16)
    torch.manual_seed(0)
    return imagenet_recipe.ARCHS["resnet8"](classes=3, input_shape=(3, 16, 16),
                                            rule=imagenet_recipe.feedback_rule(recipe)).build()


def kp_contraction(steps: int, lr: float, momentum: float, decay: float) -> float:
    """The factor by which D = W - B shrinks in `steps` steps of torch's SGD with momentum under KP.

    W and B receive the same data gradient, so D sees only the decay: g_D = decay D,
    buf_t = momentum buf_{t-1} + g_D (buf_1 = g_D), D <- D - lr buf: D stays parallel to itself.
    """
    d, buf = 1.0, 0.0
    for t in range(steps):
        buf = decay * d if t == 0 else momentum * buf + decay * d
        d -= lr * buf
    return d


@pytest.mark.parametrize("rule", ["bp", "fa", "ss", "kp", "wm", "ia"])
def test_every_rule_trains_a_few_steps(folder, tmp_path, rule):
    extra = {
        "kp": ["--weight-decay", "0.05", "--kp-decay", "0.05"],
        "ia": ["--ia-sub-batch", "2"],
        "wm": ["--mirror-warmup", "20", "--probe-every", "2"],
    }
    trainer = run(folder, tmp_path / rule, "--rule", rule, "--epochs", "1", *extra.get(rule, []))
    net, start = trainer.circuit_net, initial_net(rule)
    assert trainer.progress.step == 4 and trainer.progress.epoch == 1
    assert trainer.train.skipped == 1                      # the truncated JPEG, replaced, counted
    assert (tmp_path / rule / "checkpoint.pt").is_file()
    shrink = kp_contraction(4, lr=0.05, momentum=0.9, decay=0.05 + 0.05)
    for name, synapse in net.projections():
        before = start.projection(name)
        assert not torch.equal(synapse.weight, before.weight), name          # W learned
        if rule == "fa":
            assert torch.equal(synapse.B, before.B), name                    # B fixed
        if rule == "kp":    # B in the optimizer beside W, same decay: W - B shrinks by a known factor
            assert torch.allclose(
                synapse.weight - synapse.B, shrink * (before.weight - before.B), rtol=0, atol=2e-6
            ), name
        if rule == "wm":    # B learned from noise alone, toward W
            assert angle(synapse.B, synapse.weight) < angle(before.B, before.weight) - 5, name
        if rule == "ia":    # B learned by the optimizer, from a sub-batch of 2
            assert synapse.rule.sub_batch == 2 and not torch.equal(synapse.B, before.B), name
    assert rule != "kp" or shrink < 0.96        # a visible contraction, far beyond atol
    assert rule != "wm" or trainer.progress.tick == 20 + 2 * 4              # warm-up + one mirror batch per step
    with open_recording(tmp_path / rule / "run.h5") as f:                  # recorded on the way
        assert len(f["steps/tick"]) == math.ceil(trainer.progress.tick / 10) and list(f["evaluations/step"]) == [4]
        assert list(f["probe/step"]) == ([2, 4] if rule == "wm" else [])
        if rule == "wm":
            assert list(f["probe/errors/output/angle"]) == [0, 0]           # the loss's own error: same as BP
            assert all(10 < a < 90 for a in f["probe/errors/conv1/angle"])   # sent back through B, not W


def test_stop_and_resume_continues_the_same_run(folder, tmp_path, monkeypatch):
    args = ("--rule", "wm", "--epochs", "2", "--checkpoint-every", "2", "--mirror-warmup", "2")
    whole = run(folder, tmp_path / "whole", *args)

    learn = circuits.Trainer.learn

    def crash_at_step_8(self, *batch):
        if self.progress.step == 7:
            raise KeyboardInterrupt          # killed mid-epoch 1; the last checkpoint is from before step 7
        return learn(self, *batch)

    monkeypatch.setattr(circuits.Trainer, "learn", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        run(folder, tmp_path / "split", *args, "--workers", "2")
    monkeypatch.setattr(circuits.Trainer, "learn", learn)
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["trainer"]["progress"]
    assert saved["step"] == 6 and saved["batch_in_epoch"] == 2 and saved["epoch"] == 1   # taken before step 7
    resumed = run(folder, tmp_path / "split", *args, "--workers", "2", "--resume")
    assert resumed.progress.step == whole.progress.step == 8 and resumed.progress.tick == whole.progress.tick
    assert resumed.train.skipped == whole.train.skipped == 2          # one per epoch, none counted twice
    a, b = whole.circuit_net.state_dict(), resumed.circuit_net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.optimizer.param_groups[0]["lr"] == whole.optimizer.param_groups[0]["lr"]
    with open_recording(tmp_path / "whole" / "run.h5") as a, open_recording(tmp_path / "split" / "run.h5") as b:
        assert list(b["steps/tick"][:]) == list(a["steps/tick"][:]) == list(range(0, whole.progress.tick, 10))
        assert list(b["evaluations/step"][:]) == list(a["evaluations/step"][:]) == [4, 8]
        assert b["evaluations/top1"][:].tolist() == a["evaluations/top1"][:].tolist()


def test_two_processes_through_torchrun_end_with_identical_weights(tmp_path):
    """Rank equality on a folder without corrupt files (skipping them is tested in one process: a rank once
    aborted, "terminate called without an active exception", right after libjpeg refused a truncated file)."""
    folder = synthetic_image_folder(tmp_path / "clean", classes=3, train_per_class=6, val_per_class=2, size=(24, 32))
    env = dict(os.environ, IMAGENET_TEST_DUMP=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__)), "--data", str(folder), "--out", str(tmp_path / "run"), "--workers", "0",
           *TINY, "--batch-size", "8", "--rule", "wm", "--epochs", "1", "--mirror-warmup", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    start = initial_net("wm").state_dict()
    assert rank0.keys() == rank1.keys() and any(k.endswith(".B") for k in rank0)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k               # W and B alike on both ranks
        assert not torch.equal(rank0[k], start[k]), k           # and trained
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert "2 x cpu" in done.stdout


def test_cpu_and_device_decoding_give_the_same_batches(folder):
    batches = {}
    for decode in ("cpu", "device"):
        train, val, classes = image_batches(folder, batch_size=4, device="cpu", size=16, decode=decode, workers=0)
        train.sampler.set_epoch(3)
        batches[decode] = list(train) + list(val)
        assert train.skipped == 1 and len(classes) == 3
    shapes = [x.shape for x, _ in batches["cpu"]]
    assert shapes == [(4, 3, 16, 16)] * 4 + [(4, 3, 16, 16), (2, 3, 16, 16)]
    for (x, y), (x2, y2) in zip(batches["cpu"], batches["device"]):
        assert torch.equal(y, y2)
        assert (x - x2).abs().max() < 0.1                       # PIL and libjpeg resampling differ slightly
    x = torch.cat([x for x, _ in batches["cpu"]])
    assert abs(float(x.mean())) < 1.5 and 0.3 < float(x.std()) < 2       # normalised


def test_bad_folders_give_clear_errors(folder, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        run(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no val/ folder"):
        run(tmp_path / "noval", tmp_path / "o")
    (tmp_path / "noval" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no valid file"):
        run(tmp_path / "noval", tmp_path / "o")
    other = synthetic_image_folder(tmp_path / "other", classes=2, train_per_class=2, val_per_class=1)
    (other / "val" / "n00000001").rename(other / "val" / "zebra")
    with pytest.raises(DatasetError, match="different class folders"):
        run(other, tmp_path / "o")


def test_checkpoints_of_other_runs_are_refused(folder, tmp_path):
    run(folder, tmp_path / "bp", "--rule", "bp", "--epochs", "1")
    with pytest.raises(circuits.CircuitError, match="exists: pass --resume"):
        run(folder, tmp_path / "bp", "--rule", "bp", "--epochs", "1")
    with pytest.raises(circuits.CircuitError, match=r"another run: rule 'bp' \(this run: 'fa'\)"):
        run(folder, tmp_path / "bp", "--rule", "fa", "--resume")
    with pytest.raises(circuits.CircuitError, match="another run: arch 'resnet8'"):
        run(folder, tmp_path / "bp", "--rule", "bp", "--arch", "resnet20", "--resume")
    with pytest.raises(circuits.CircuitError, match="no checkpoint"):
        run(folder, tmp_path / "none", "--resume")
    fewer = synthetic_image_folder(tmp_path / "fewer", classes=2, train_per_class=4, val_per_class=1)
    with pytest.raises(circuits.CircuitError, match=r"another run: classes 3 \(this run: 2\)"):
        run(fewer, tmp_path / "bp", "--rule", "bp", "--resume")
    (tmp_path / "bp" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(circuits.CircuitError, match="cannot be read as a checkpoint"):
        run(folder, tmp_path / "bp", "--rule", "bp", "--resume")
    with pytest.raises(circuits.CircuitError, match="does not split evenly over 2 processes"):
        imagenet_recipe.resolve(imagenet.parse_args(["--data", "x", "--batch-size", "5"]),
                                imagenet_recipe.Worker(world_size=2))


def test_milestones_may_be_given_none():
    assert imagenet.parse_args(["--data", "x", "--milestones"]).milestones == ()     # a step schedule without drops
    assert imagenet.parse_args(["--data", "x", "--milestones", "5", "9"]).milestones == (5, 9)
    with pytest.raises(SystemExit):
        imagenet.parse_args(["--data", "x", "--milestones", "-1"])


# --- issue 13: what happens when things go wrong ------------------------------------------------
def test_an_evaluation_survives_a_kill_during_it_a_restart_and_a_resume(folder, tmp_path, monkeypatch):
    """Items 5 and 8: killed during its evaluation before any checkpoint, the run is run again from step 0
    into its recording by --resume, and its evaluation row survives resuming the finished run."""
    out, args = tmp_path / "run", ("--rule", "bp", "--epochs", "1")
    evaluate = circuits.Trainer.evaluate

    def killed(self, loader):
        raise KeyboardInterrupt

    monkeypatch.setattr(circuits.Trainer, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, *args)
    monkeypatch.setattr(circuits.Trainer, "evaluate", evaluate)
    assert not (out / "checkpoint.pt").exists()          # the end-of-epoch checkpoint waits for the evaluation
    with open_recording(out / "run.h5") as f:
        losses = f["steps/loss"][:]
        assert list(f["evaluations/step"]) == [] and len(losses) == 1
    with pytest.raises(circuits.CircuitError, match=r"run.h5 exists but .*checkpoint.pt does not: that run stopped "
                                                    r"before its first checkpoint. Pass --resume to run it again"):
        run(folder, out, *args)
    again = run(folder, out, *args, "--resume")
    finished = run(folder, out, *args, "--resume")
    assert again.progress.step == finished.progress.step == 4
    with open_recording(out / "run.h5") as f:
        assert list(f["evaluations/step"]) == [4] and f["evaluations/top1"].shape == (1,)
        assert np.array_equal(f["steps/loss"][:], losses)                 # the same run, recorded again
        assert [r["tick"] for r in json.loads(f.attrs["resumed"])] == [-1, again.progress.tick - 1]


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(folder, tmp_path, monkeypatch):
    """Item 1: no checkpoint is written from a non-finite state; the error names the step."""
    learn = circuits.Trainer.learn

    def poisoned(self, inputs, target):
        return learn(self, torch.full_like(inputs, float("nan")) if self.progress.step == 2 else inputs, target)

    monkeypatch.setattr(circuits.Trainer, "learn", poisoned)
    with pytest.raises(circuits.DivergenceError, match="the loss was non-finite at learning step 3"):
        run(folder, tmp_path / "kp", "--rule", "kp", "--epochs", "2", "--checkpoint-every", "2")
    state = torch.load(tmp_path / "kp" / "checkpoint.pt", weights_only=True)["trainer"]
    assert state["progress"]["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["net"].values() if v.is_floating_point())


def test_no_checkpoint_holds_nonfinite_running_statistics(folder, tmp_path, monkeypatch):
    """Issue 23, item 2: a batch scaled by 1e30 (step 3) leaves batch-norm running_var = inf with a finite loss; the
    end-of-epoch checkpoint held it, the "last good" one. Buffers are checked with the parameters now."""
    learn = circuits.Trainer.learn

    def scaled(self, inputs, target):
        return learn(self, inputs * 1e30 if self.progress.step == 2 else inputs, target)

    monkeypatch.setattr(circuits.Trainer, "learn", scaled)
    with pytest.raises(circuits.DivergenceError, match=r"buffers non-finite now: .*running_var") as error:
        run(folder, tmp_path / "bn", "--rule", "fa", "--epochs", "1", "--checkpoint-every", "2")
    assert error.value.step is None and error.value.buffers
    state = torch.load(tmp_path / "bn" / "checkpoint.pt", weights_only=True)["trainer"]
    assert state["progress"]["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in state["net"].values() if v.is_floating_point())


def test_unreadable_validation_images_stop_the_run_before_its_first_step(tmp_path):
    """Item 9: not after a whole epoch of training."""
    bad = synthetic_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    for image in (bad / "val").rglob("*.JPEG"):
        image.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="every image of a batch of 2 was unreadable"):
        run(bad, tmp_path / "out", "--probe-every", "0")
    assert not (tmp_path / "out" / "run.h5").exists() and not (tmp_path / "out" / "checkpoint.pt").exists()


def test_a_second_process_on_a_run_folder_is_refused(folder, tmp_path):
    """Item 8: while one process runs in OUT, another (here: its lock held by this process) is refused."""
    out = tmp_path / "busy"
    out.mkdir()
    first = WriterLock(out / "checkpoint.pt.lock")
    assert first.acquire() is None
    try:
        with pytest.raises(circuits.CircuitError, match=rf"{out} is in use by another run \(process {os.getpid()} on"):
            run(folder, out, "--epochs", "1")
    finally:
        first.release()
    assert not (out / "run.h5").exists()


# --- issue 23: trust what a run reports -----------------------------------------------------------
def crash_at(monkeypatch, step: int) -> None:
    """Learning step `step` raises KeyboardInterrupt (a kill); monkeypatch.undo() restores learn."""
    learn = circuits.Trainer.learn

    def crashing(self, *batch):
        if self.progress.step == step - 1:
            raise KeyboardInterrupt
        return learn(self, *batch)
    monkeypatch.setattr(circuits.Trainer, "learn", crashing)


def test_a_resume_with_another_lr_trains_at_it(folder, tmp_path, capsys):
    """Item 1: "resuming with changed settings: lr 0.05 -> 0.01" was printed, and the run went on at 0.05 (the
    checkpoint's optimizer and scheduler won). The recording's lr column shows the rate used."""
    out = tmp_path / "run"
    run(folder, out, "--epochs", "1", "--record-every", "1")
    resumed = run(folder, out, "--epochs", "2", "--record-every", "1", "--lr", "0.01", "--momentum", "0.5",
                  "--resume")
    printed = capsys.readouterr().out
    assert "resuming with changed settings: epochs 1 -> 2, lr 0.05 -> 0.01, momentum 0.9 -> 0.5" in printed
    assert resumed.progress.step == 8
    assert [(g["lr"], g["momentum"]) for g in resumed.optimizer.param_groups] == [(0.01, 0.5)]
    with open_recording(out / "run.h5") as f:
        assert f["steps/lr"][:].tolist() == [0.05] * 4 + [0.01] * 4
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["optimizer"]["param_groups"]
    assert [(g["lr"], g["momentum"]) for g in saved] == [(0.01, 0.5)]        # a later resume keeps them


def _derived(folder: Path, out: Path, *args: str) -> imagenet.ImageNetTrainer:
    """A run without --lr: 0.1 x batch / 256."""
    return imagenet.main(["--data", str(folder), "--out", str(out), "--workers", "0", "--arch", "resnet8",
                          "--image-size", "16", "--no-progress", "--epochs", "1", "--checkpoint-every", "2",
                          "--record-every", "1", *args])


def test_a_resume_mid_epoch_with_another_batch_size_goes_on_by_examples(folder, tmp_path, monkeypatch):
    """Item 1: killed 8 examples into the epoch (2 batches of 4), resumed at batch 2: the epoch's other 8 examples
    in 4 steps, at the lr batch 2 derives (not 4 steps over 8 of the 12 remaining, some twice, at the old lr)."""
    out = tmp_path / "run"
    crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _derived(folder, out, "--batch-size", "4")
    monkeypatch.undo()
    resumed = _derived(folder, out, "--batch-size", "2", "--resume")
    assert (resumed.progress.step, resumed.progress.examples, resumed.progress.epoch) == (6, 16, 1)
    with open_recording(out / "run.h5") as f:
        assert f["steps/examples"][:].tolist() == [4, 8, 10, 12, 14, 16]
        assert f["steps/lr"][:].tolist() == [0.1 * 4 / 256] * 2 + [0.1 * 2 / 256] * 4


def test_a_weight_mirror_run_resumed_at_another_batch_size_keeps_its_place_in_the_phase_schedule(
        folder, tmp_path, monkeypatch):
    """Item 1: the warm-up is one epoch's worth of steps (4 at batch 4, 8 at batch 2); the saved position, 4 warm-up
    batches then L M L, moves past the new warm-up: no second warm-up, one mirror batch after each step."""
    out = tmp_path / "run"
    crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _derived(folder, out, "--rule", "wm", "--batch-size", "4")
    monkeypatch.undo()
    resumed = _derived(folder, out, "--rule", "wm", "--batch-size", "2", "--resume")
    assert (resumed.progress.step, resumed.progress.tick, resumed.progress.position) == (6, 4 + 2 * 6, 8 + 2 * 6)
    with open_recording(out / "run.h5") as f:
        assert f["steps/phase"][:].tolist() == [1] * 4 + [0, 1] * 6           # 0: learn, 1: mirror


def test_resume_changes_that_cannot_be_applied_are_refused(folder, tmp_path, monkeypatch):
    """Item 1: refused with the reason, before anything is loaded."""
    out = tmp_path / "run"
    crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, "--epochs", "1", "--checkpoint-every", "2")
    monkeypatch.undo()
    with pytest.raises(circuits.CircuitError, match=r"nothing was loaded: --seed 0 -> 1: .*; --batch-size: the run is "
                                                    r"8 examples \(per process\) into epoch 0, not a whole number of "
                                                    r"batches of 3; resume with a batch size \(per process\) that "
                                                    r"divides 8, or with the saved one \(4 per process\)"):
        run(folder, out, "--epochs", "1", "--batch-size", "3", "--seed", "1", "--resume")
    with pytest.raises(circuits.CircuitError, match=r"--seed 0 -> 1: the seed fixes the data order"):
        run(folder, out, "--epochs", "1", "--seed", "1", "--resume")
    assert run(folder, out, "--epochs", "1", "--resume").progress.step == 4


def test_a_checkpoint_the_disk_has_no_room_for_keeps_the_last_one(folder, tmp_path, monkeypatch):
    """Issue 23: torch's "[enforce fail at inline_container.cc:672] unexpected pos" became "the disk is full"; the
    last checkpoint survives and no .partial is left."""
    out = tmp_path / "full"
    save = torch.save

    def disk_full(obj, path, *args, **kwargs):       # the first checkpoint (step 2) is written, then the disk fills
        if not (out / "checkpoint.pt").exists():
            return save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=rf"writing checkpoint {out / 'checkpoint.pt'} failed: the disk is full .*; "
                                      rf"the previous checkpoint {out / 'checkpoint.pt'} is kept and the partial "
                                      rf"file was removed; free some space and run again with --resume"):
        run(folder, out, "--epochs", "1", "--checkpoint-every", "2")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "run.h5"]      # no checkpoint.partial
    assert torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["progress"]["step"] == 2


if __name__ == "__main__":
    trainer = imagenet.main(sys.argv[1:])
    params = {
        k: v for k, v in trainer.circuit_net.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    torch.save(params, Path(os.environ["IMAGENET_TEST_DUMP"]) / f"rank{os.environ['RANK']}.pt")
