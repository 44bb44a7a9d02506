"""The phase scheduler and trainer: phases in the stated order and counts, clear errors, resume."""
import h5py
import numpy as np
import pytest
import torch

import circuits
from circuits import Learn, Mirror, Repeat, Schedule


class PhaseLog:
    """A recorder that keeps the phase events the trainer reports."""

    def __init__(self):
        self.events, self.evaluations, self.began, self.closed = [], [], 0, 0

    def begin(self, net, config):
        self.began += 1
        assert "schedule" in config and "rules" in config

    def step(self, tick, *, step, phase, loss, lr, examples, net):
        assert (loss is None) == (phase == "mirror")
        self.events.append((tick, step, phase, examples))

    def evaluate(self, step, metrics):
        self.evaluations.append((step, metrics))

    def close(self):
        self.closed += 1

    def state_dict(self):
        return {"n": len(self.events)}

    def load_state_dict(self, state):
        assert state["n"] == len(self.events)


def wm_mlp(rule="wm"):
    c = circuits.Circuit("mlp", rule=rule)
    x = c.input("x", shape=(64,))
    h = c.population("h", shape=(32,), activation="relu")
    c.connect(x, h, circuits.Dense())
    c.connect(h, c.population("y", shape=(10,)), circuits.Dense())
    return c.build()


def batches(n, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 64, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def test_schedule_runs_phases_in_stated_order_and_counts():
    net = wm_mlp()
    log = PhaseLog()
    schedule = Schedule(Mirror(3, 8), Repeat(Learn(2), Mirror(1, 8)), sleep=Mirror(2, 8))
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), schedule, recorder=log,
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit(batches(5), epochs=2, val_loader=batches(2))
    phases = "".join("L" if p == "learn" else "m" for _, _, p, _ in log.events)
    # epoch 0: 3 mirror, (LL m) until the 5 batches run out, sleep mm; epoch 1 picks up the pattern
    # where it stopped, and a mirror batch due after the last step runs before the data is found empty
    assert phases == "mmm" + "LLm" + "LLm" + "L" + "mm" + "Lm" + "LLm" + "LLm" + "mm"
    assert [t for t, *_ in log.events] == list(range(len(log.events)))
    assert [s for _, s, p, _ in log.events if p == "learn"] == list(range(1, 11))
    assert log.events[-1][3] == 40 and trainer.progress.examples == 40
    assert [s for s, _ in log.evaluations] == [5, 10]
    assert set(log.evaluations[0][1]) == {"loss", "top1", "top5"}
    assert log.began == 1 and log.closed == 1


def test_schedule_ends_training_when_it_runs_out():
    net = wm_mlp("bp")
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), Schedule(Learn(3)),
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit(batches(5), epochs=4)
    assert trainer.progress.step == 3 and trainer.progress.finished


@pytest.mark.parametrize("make,message", [
    (lambda: Schedule(Mirror(3)), "at least one Learn"),
    (lambda: Schedule(), "at least one Learn"),
    (lambda: Learn(0), "positive integer"),
    (lambda: Mirror(batches=-1), "positive integer"),
    (lambda: Mirror(batches=2, batch_size=0), "positive integer"),
    (lambda: Repeat(Learn(1), times=0), "positive integer"),
    (lambda: Repeat(), "at least one phase"),
    (lambda: Schedule(Repeat(Learn(1)), Mirror(2)), "never run"),
    (lambda: Schedule(Learn(1), sleep=Learn(1)), "sleep must be a Mirror"),
    (lambda: Schedule("learn"), "not a phase"),
])
def test_bad_schedules_fail_when_built(make, message):
    with pytest.raises(circuits.CircuitError, match=message):
        make()


def test_paper_schedule_follows_the_authors_cadence():
    net = wm_mlp()
    s = circuits.paper_schedule(net, steps_per_epoch=4)
    first = [type(e).__name__ for e, _ in zip(s.events(), range(8))]
    assert first == ["Mirror"] * 4 + ["Learn", "Mirror", "Learn", "Mirror"]
    assert not circuits.paper_schedule(wm_mlp("kp"), 4).mirrors


def digits_loaders():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    order = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(d.data, dtype=torch.float32)[order] / 16
    y = torch.tensor(d.target)[order]
    train = torch.utils.data.TensorDataset(x[:1400], y[:1400])
    test = torch.utils.data.TensorDataset(x[1400:], y[1400:])
    return (torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
            torch.utils.data.DataLoader(test, batch_size=256))


@pytest.mark.parametrize("rule", ["bp", "wm"])
def test_trainer_learns_digits(rule):
    torch.manual_seed(0)
    net = wm_mlp(rule)
    train, test = digits_loaders()
    schedule = circuits.paper_schedule(net, steps_per_epoch=len(train), batch_size=64)
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), schedule,
                               config=circuits.TrainerConfig(progress=False))
    history = trainer.fit(train, epochs=4, val_loader=test)
    assert history[-1]["top1"] > 0.9, history       # 10 classes: chance is 0.1
    assert history[-1]["top5"] >= history[-1]["top1"]


def _run(epochs_first, epochs_total, mid_epoch_stop=None):
    torch.manual_seed(0)
    net = wm_mlp()
    schedule = Schedule(Mirror(2, 8), Repeat(Learn(1), Mirror(1, 8)))
    def make(net):
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        return circuits.Trainer(net, opt, schedule, lr_scheduler=sched, config=circuits.TrainerConfig(progress=False))
    data = batches(6)
    trainer = make(net)
    if mid_epoch_stop:
        trainer.hooks.append(lambda t: t.progress.step == mid_epoch_stop and t.stop())
    trainer.fit(data, epochs=epochs_first)
    if epochs_first == epochs_total and not mid_epoch_stop:
        return net
    if mid_epoch_stop:
        assert (trainer.progress.step, trainer.progress.batch_in_epoch) == (mid_epoch_stop, mid_epoch_stop % len(data))
    state = trainer.state_dict()
    torch.manual_seed(123)                     # resume must not depend on the RNG outside the checkpoint
    resumed_net = wm_mlp()
    resumed = make(resumed_net)
    resumed.load_state_dict(state)
    resumed.fit(data, epochs=epochs_total)
    return resumed_net


@pytest.mark.parametrize("first,stop", [(1, None), (2, 9)])
def test_resume_continues_the_same_run(first, stop):
    straight = _run(3, 3)
    resumed = _run(first, 3, mid_epoch_stop=stop)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _beside_run(path, beside, compiled, device):
    """2 epochs of wm learning and mirror batches under bf16 autocast, recorded every 2nd tick; returns the net and
    B of h->y as each training forward found it."""
    torch.manual_seed(0)
    net = wm_mlp().to(device)
    schedule = Schedule(Mirror(2, 8), Repeat(Learn(1), Mirror(1, 8)), sleep=Mirror(2, 8))
    config = circuits.TrainerConfig(progress=False, amp_dtype="bfloat16", mirror_beside_learning=beside)
    trainer = circuits.Trainer(torch.compile(net) if compiled else net, torch.optim.SGD(net.parameters(), lr=0.1),
                               schedule, recorder=circuits.Recorder(path, every=2), config=config)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(net.projection("h->y").B.detach().clone())
                                  if module.training else None)
    trainer.fit(batches(5), epochs=2, val_loader=batches(2))
    return net, seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
def test_mirror_batches_beside_learning_give_the_serial_run(tmp_path, compiled, device):
    """With mirror_beside_learning a mirror batch runs when B is next read (on a CPU: held until then; on CUDA: a side
    stream); on a CPU the forward passes saw B before the mirror batches had run, yet W, B and every recorded row are
    the serial run's, bit for bit: the forward never reads B (compiled neither: B is cast in the backward graph), and
    whatever reads it waits. On CUDA (the GPU check runs this) to float32 rounding: kernels may differ in order."""
    serial, serial_seen = _beside_run(tmp_path / "serial.h5", False, compiled, device)
    beside, beside_seen = _beside_run(tmp_path / "beside.h5", True, compiled, device)
    if device == "cpu":
        assert any(not torch.equal(a, b) for a, b in zip(serial_seen, beside_seen, strict=True))
    for k, v in serial.state_dict().items():
        torch.testing.assert_close(beside.state_dict()[k], v, rtol=0 if device == "cpu" else 1e-5,
                                   atol=0 if device == "cpu" else 1e-6, msg=k)
    with h5py.File(tmp_path / "serial.h5") as f, h5py.File(tmp_path / "beside.h5") as g:
        assert len(f["steps/loss"]) == 13            # ticks 0, 2, ..., 24: mirror batches among them
        for name in ("steps/phase", "steps/loss", "alignment/h->y/angle", "alignment/x->h/angle", "evaluations/loss"):
            np.testing.assert_allclose(g[name][:], f[name][:], rtol=0 if device == "cpu" else 1e-4, err_msg=name)


class FeedbackReader(PhaseLog):
    """A recorder that says nothing of which ticks it records, and reads B of h->y at every tick."""

    def __init__(self):
        super().__init__()
        self.feedback = []

    def step(self, tick, *, step, phase, loss, lr, examples, net):
        super().step(tick, step=step, phase=phase, loss=loss, lr=lr, examples=examples, net=net)
        self.feedback.append(net.projection("h->y").B.detach().clone())


def test_beside_learning_refuses_a_B_read_in_the_forward_and_joins_for_any_recorder():
    """Imperfect(wm, sparsity) computes B * mask in the forward: beside learning is refused, naming the projection.
    A recorder without records() gets B after each mirror batch, as in the serial run."""
    beside = circuits.TrainerConfig(progress=False, mirror_beside_learning=True)
    masked = wm_mlp(rule=circuits.rules.Imperfect(circuits.rules.WeightMirror(), sparsity=0.5))
    with pytest.raises(circuits.CircuitError, match=r"reads B of x->h \(Imperfect"):
        circuits.Trainer(masked, torch.optim.SGD(masked.parameters(), lr=0.1), config=beside)
    seen = []
    for config in (circuits.TrainerConfig(progress=False), beside):
        torch.manual_seed(0)
        net, log = wm_mlp(), FeedbackReader()
        circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), Schedule(Repeat(Learn(1), Mirror(1, 8))),
                         recorder=log, config=config).fit(batches(3), epochs=1)
        assert [p for _, _, p, _ in log.events] == ["learn", "mirror"] * 3
        seen.append(log.feedback)
    assert all(torch.equal(a, b) for a, b in zip(*seen, strict=True))


def test_a_state_dict_taken_beside_learning_holds_every_mirror_batch_launched():
    """A checkpoint right after a mirror batch (held on a CPU) has B after it, as in the serial run."""
    states = []
    for beside in (False, True):
        torch.manual_seed(0)
        net = wm_mlp()
        trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                   config=circuits.TrainerConfig(progress=False, mirror_beside_learning=beside))
        trainer.mirror(Mirror(1, 8))
        states.append(trainer.state_dict()["net"])
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
