"""Seeds batched (circuits.graph.seeds.SeedBatch): copy s is the single-seed run with seed s."""
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import true_float64
from torch import nn

import circuits
from circuits import rules
from circuits.graph.seeds import SeedBatch
from circuits.phases.seeds import SeedLoader
from circuits.recording.layout import RecordingError
from circuits.recording.seeds import SeedRecorders
from models.mlp import mlp

SEEDS = (11, 12, 13)
RULES = {"bp": "bp", "fa": "fa", "ss": "ss", "dfa": "dfa", "kp": rules.KolenPollack(decay=0.01),
         "wm": rules.WeightMirror(eta=0.05, decay=0.05), "ia": "ia"}


@pytest.fixture(scope="module")
def digits():
    """240 training and 100 test digits (8x8, flattened, standardised), float64."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float64)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    return torch.utils.data.TensorDataset(x[:240], y[:240]), torch.utils.data.TensorDataset(x[240:340], y[240:340])


def make(rule):
    return lambda seed: true_float64(mlp(sizes=(64, 24, 10), rule=RULES[rule]).build())


def loader(data, seed):
    """Seed `seed`'s data order: its own shuffling generator."""
    return torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def trainer(net, train, recorder=None):
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    return circuits.Trainer(net, optimizer, circuits.paper_schedule(net, len(train), batch_size=16),
                            recorder=recorder, config=circuits.TrainerConfig(progress=False))


def single_run(rule, seed, digits, path=None):
    """The run of one seed, alone: built under torch.manual_seed(seed), mirror noise from the global generator."""
    train, test = digits
    torch.manual_seed(seed)
    net = make(rule)(seed)
    data = loader(train, seed)
    recorder = circuits.Recorder(path, probe=train[:16], probe_steps=4) if path else None
    history = trainer(net, data, recorder).fit(data, 2, torch.utils.data.DataLoader(test, batch_size=50))
    return net, history


def batched_run(rule, digits, paths=None):
    train, test = digits
    batch = SeedBatch.build(make(rule), SEEDS)
    data = SeedLoader([loader(train, seed) for seed in SEEDS])
    recorder = SeedRecorders([circuits.Recorder(p, probe=train[:16], probe_steps=4) for p in paths]) if paths else None
    history = trainer(batch, data, recorder).fit(data, 2, torch.utils.data.DataLoader(test, batch_size=50))
    return batch, history


@pytest.mark.parametrize("rule", list(RULES))
def test_each_copy_is_its_single_seed_run(rule, digits, one_thread):
    """Two epochs of the authors' cadence (mirror batches first and after every step under wm): every parameter,
    B included, and every evaluation of copy s equal the run of seed s alone, in float64, to 1e-12."""
    batch, history = batched_run(rule, digits)
    for s, seed in enumerate(SEEDS):
        net, alone = single_run(rule, seed, digits)
        for (name, ours), (_, theirs) in zip(batch.nets[s].state_dict().items(), net.state_dict().items(), strict=True):
            assert ours.dtype == torch.float64
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), (rule, seed, name)
        for epoch, metrics in enumerate(alone):
            for k, v in metrics.items():
                assert history[epoch][s][k] == pytest.approx(v, abs=1e-12), (rule, seed, epoch, k)
    assert not torch.equal(batch.nets[0].proj.fc1.weight, batch.nets[1].proj.fc1.weight)    # the seeds differ
    for s in range(len(SEEDS)):      # each copy learns: its test loss falls
        assert history[-1][s]["loss"] < history[0][s]["loss"], history


def test_seeds_differ_and_copies_are_views(digits):
    batch = SeedBatch.build(make("fa"), SEEDS)
    w = batch.stacked["proj/fc1/weight"]
    assert w.shape == (3, 24, 64)
    assert not torch.equal(w[0], w[1])
    for s, net in enumerate(batch.nets):
        assert net.proj.fc1.weight.data_ptr() == w[s].data_ptr()
        assert net.proj.fc1.B.data_ptr() == batch.stacked["proj/fc1/B"][s].data_ptr()
    batch.float()       # moving the stacked tensors moves the views
    assert batch.nets[2].proj.fc1.weight.dtype == torch.float32
    assert batch.nets[2].proj.fc1.weight.data_ptr() == batch.stacked["proj/fc1/weight"][2].data_ptr()
    batch.eval()
    assert not any(net.training for net in batch.nets)


@pytest.mark.parametrize("rule", ["wm"])
def test_one_recording_per_seed_equal_to_the_single_runs(rule, digits, tmp_path, one_thread):
    """SeedRecorders writes seed s's file as a Recorder of seed s's run alone writes it: every alignment row,
    probe and evaluation equal (wall times and run ids aside)."""
    paths = [tmp_path / f"batched-{seed}.h5" for seed in SEEDS]
    batched_run(rule, digits, paths)
    for seed, path in zip(SEEDS, paths, strict=True):
        alone = tmp_path / f"alone-{seed}.h5"
        single_run(rule, seed, digits, alone)
        with h5py.File(path, "r") as ours, h5py.File(alone, "r") as theirs:
            assert ours.attrs["config"] and '"seed": %d' % seed in ours.attrs["config"]
            compared = []

            def visit(name, item, ours=ours):
                if isinstance(item, h5py.Dataset) and name.split("/")[0] in ("steps", "probe", "evaluations") \
                        and not name.endswith("wall_time"):
                    a, b = np.asarray(ours[name]), np.asarray(item)
                    assert a.shape == b.shape, name
                    if a.dtype.kind == "f":
                        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=name)
                    else:
                        np.testing.assert_array_equal(a, b, err_msg=name)
                    compared.append(name)
            theirs.visititems(visit)
            assert any(n.startswith("probe") for n in compared) and any(n.startswith("steps") for n in compared)


def test_resume_from_a_checkpoint_is_the_uninterrupted_run(digits, one_thread):
    """A checkpoint after epoch 1 (the seeds' generators inside the batch's state) resumed by a fresh batch and
    trainer continues exactly as the run that never stopped."""
    train, test = digits
    straight, _ = batched_run("wm", digits)

    batch = SeedBatch.build(make("wm"), SEEDS)
    loaders = [loader(train, seed) for seed in SEEDS]
    first = trainer(batch, SeedLoader(loaders))
    first.fit(SeedLoader(loaders), 1)
    state, orders = first.state_dict(), [d.generator.get_state() for d in loaders]

    again = SeedBatch.build(make("wm"), SEEDS)
    for g in again.generators:       # not what the checkpoint had: the state must restore it
        g.manual_seed(0)
    loaders = [loader(train, seed) for seed in SEEDS]
    for d, order in zip(loaders, orders, strict=True):
        d.generator.set_state(order)
    second = trainer(again, SeedLoader(loaders))
    second.load_state_dict(state)
    second.fit(SeedLoader(loaders), 2)
    for ours, theirs in zip(again.state_dict().values(), straight.state_dict().values(), strict=True):
        if isinstance(ours, torch.Tensor):
            assert torch.equal(ours, theirs)


def test_refusals(digits, tmp_path):
    train, _ = digits
    for rule in ("brsf", rules.InformationAlignment(sub_batch=4)):
        with pytest.raises(circuits.CircuitError, match="draws at random in every learning step"):
            SeedBatch.build(lambda seed: mlp(sizes=(64, 10), rule=rule).build(), SEEDS)
    def dropout(seed):
        return circuits.from_torch(nn.Sequential(nn.Linear(64, 8), nn.Dropout(0.5), nn.Linear(8, 10)),
                                   input_shape=(64,)).build()
    with pytest.raises(circuits.CircuitError, match="Dropout"):
        SeedBatch.build(dropout, SEEDS)
    with pytest.raises(circuits.CircuitError, match="not the circuit of copy 0"):
        SeedBatch([mlp(sizes=(64, 10)).build(), mlp(sizes=(64, 12, 10)).build()], (1, 2))
    batch = SeedBatch.build(make("fa"), SEEDS)
    with pytest.raises(circuits.CircuitError, match=r"one slice per seed \(3"):
        batch(torch.zeros(2, 5, 64, dtype=torch.float64))
    with pytest.raises(circuits.CircuitError, match="seed axis first"):
        batch.losses(F.cross_entropy, batch(torch.zeros(3, 5, 64, dtype=torch.float64)), torch.zeros(5, dtype=int))
    with pytest.raises(RecordingError, match="one file per seed"):
        circuits.Recorder(tmp_path / "one.h5").begin(batch, {})
    wm = SeedBatch.build(make("wm"), SEEDS)
    with pytest.raises(circuits.CircuitError, match="pass no generator"):
        circuits.mirror_step(wm, 8, generator=torch.Generator())
    assert batch(torch.zeros(5, 64, dtype=torch.float64)).shape == (3, 5, 10)     # no seed axis: shown to all
    with pytest.raises(circuits.CircuitError, match="has no generator of its own"):
        SeedLoader([loader(train, 1), torch.utils.data.DataLoader(train, batch_size=32)])


@pytest.mark.parametrize("rule", ["fa", "wm", "dfa", "ia"])
def test_convolutions_and_batch_norm_batch_too(rule, one_thread):
    """A converted convnet with batch norm: two learning steps and mirror batches both ways, then evaluation:
    every parameter, running statistic and output of copy s is seed s's alone (float64, 1e-12)."""
    torch.set_default_dtype(torch.float64)
    try:
        wm = rules.WeightMirror(eta=0.1, decay=0.1)

        def make(seed):
            module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(24, 10))
            return true_float64(circuits.from_torch(module, input_shape=(1, 8, 8),
                                                    rule=wm if rule == "wm" else rule).build())
        batch = SeedBatch.build(make, SEEDS[:2])
        singles, streams = [], []
        for seed in SEEDS[:2]:
            torch.manual_seed(seed)
            singles.append(make(seed))
            streams.append(torch.get_rng_state())
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(2, 8, 1, 8, 8, generator=g), torch.randint(0, 10, (2, 8), generator=g)
        optimizer = torch.optim.SGD(batch.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            batch.losses(F.cross_entropy, batch(x), y).sum().backward()
            optimizer.step()
            if rule == "wm":
                circuits.mirror_step(batch, 16)
        for s, net in enumerate(singles):
            optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
            torch.set_rng_state(streams[s])
            for _ in range(2):
                optimizer.zero_grad()
                F.cross_entropy(net(x[s]), y[s]).backward()
                optimizer.step()
                if rule == "wm":
                    circuits.mirror_step(net, 16)
            for (name, ours), theirs in zip(batch.nets[s].state_dict().items(), net.state_dict().values(),
                                            strict=True):
                if ours.is_floating_point():
                    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), (rule, s, name)
        batch.eval()
        out = batch(x[0])
        for s, net in enumerate(singles):
            assert torch.allclose(out[s], net.eval()(x[0]), rtol=0, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)
