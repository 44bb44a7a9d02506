"""The DALI loader (models.imagenet_dali) on tiny JPEGs written here, on DALI's CPU backend.

Skipped where NVIDIA DALI is not installed (pip install '.[dali]'), except the test of the message that
names the extra.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import circuits
from models import imagenet, imagenet_dali
from models.imagenet_dali import dali_batches
from models.imagenet_data import IMAGENET_STD, DatasetError, image_batches, synthetic_image_folder

needs_dali = pytest.mark.skipif(imagenet_dali.Pipeline is None, reason="NVIDIA DALI is not installed ('.[dali]')")
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)
ONE_LEVEL = 1 / (255 * min(IMAGENET_STD))      # one grey level of one pixel, normalised


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 5 train JPEGs, a truncated JPEG and a file that is not an image (17 files); 3 x 2 val JPEGs."""
    root = synthetic_image_folder(tmp_path_factory.mktemp("imagenet"), classes=3, train_per_class=5,
                                  val_per_class=2, size=(24, 32), corrupt=1)
    (root / "train" / "n00000001" / "junk.JPEG").write_bytes(b"not an image")
    return root


def epoch(batches, number: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches.sampler.set_epoch(number)
    return list(batches)


@needs_dali
@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_dali_gives_the_torch_loaders_batches_within_a_grey_level(folder, rank, world_size):
    """Same order, shard, crops and flips as models.imagenet_data; the pixels differ by decoder and resize rounding."""
    made = {name: loader(folder, batch_size=4, device="cpu", size=16, workers=0, seed=5, rank=rank,
                         world_size=world_size) for name, loader in imagenet_dali.LOADERS.items()}
    batches = {name: epoch(train, 3) + list(val) for name, (train, val, _) in made.items()}
    # train: 17 files (9 per rank of 2: DistributedSampler pads), last incomplete batch dropped; val: 6 (3 per rank)
    assert len(batches["dali"]) == len(batches["torch"]) == {1: 4 + 2, 2: 2 + 1}[world_size]
    for (x, y), (x2, y2) in zip(batches["torch"], batches["dali"], strict=True):
        assert x.shape == x2.shape and x.dtype == x2.dtype == torch.float32
        assert torch.equal(y, y2)
        assert float((x - x2).abs().max()) <= 1.01 * ONE_LEVEL
    assert made["dali"][2] == made["torch"][2] == ["n00000000", "n00000001", "n00000002"]
    # the unreadable files of this rank's share (both on one rank): replaced and counted alike
    assert made["dali"][0].skipped == made["torch"][0].skipped
    assert world_size > 1 or made["dali"][0].skipped == 2


@needs_dali
def test_dali_epochs_depend_on_seed_and_epoch_alone(folder):
    def loader(seed: int = 0):
        return dali_batches(folder, batch_size=4, device="cpu", size=16, workers=2, seed=seed,
                            channels_last=True)[0]

    running = loader()
    first, second = epoch(running, 0), epoch(running, 1)          # one pipeline, two epochs
    fresh = loader()
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in second)
    for (x, y), (x2, y2) in zip(second, epoch(fresh, 1), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    other_seed = epoch(loader(seed=1), 1)
    assert not torch.equal(torch.cat([y for _, y in other_seed]), torch.cat([y for _, y in second]))
    # a pass left after two batches (a run stopped mid-epoch) does not shift the next pass
    fresh.sampler.set_epoch(1)
    for _, _ in zip(range(2), fresh):
        pass
    for (x, y), (x2, y2) in zip(second, epoch(fresh, 1), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@needs_dali
def test_a_stopped_dali_run_resumes_into_the_same_weights(folder, tmp_path, monkeypatch):
    def run(out: Path, *args: str) -> imagenet.ImageNetTrainer:
        return imagenet.main(["--data", str(folder), "--out", str(out), "--loader", "dali", "--workers", "1",
                              "--arch", "resnet8", "--image-size", "16", "--batch-size", "4", "--lr", "0.05",
                              "--no-progress", "--rule", "wm", "--epochs", "2", "--checkpoint-every", "2",
                              "--mirror-warmup", "2", *args])

    whole = run(tmp_path / "whole")
    learn = circuits.Trainer.learn

    def crash_at_step_7(self, *batch):
        if self.progress.step == 6:
            raise KeyboardInterrupt          # killed mid-epoch 1, after the checkpoint of step 6
        return learn(self, *batch)

    monkeypatch.setattr(circuits.Trainer, "learn", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split")
    monkeypatch.setattr(circuits.Trainer, "learn", learn)
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["trainer"]["progress"]
    assert (saved["step"], saved["epoch"], saved["batch_in_epoch"]) == (6, 1, 2)
    resumed = run(tmp_path / "split", "--resume")
    assert resumed.progress.step == whole.progress.step == 8
    assert resumed.train.skipped == whole.train.skipped == 3     # of 2 unreadable files in 17: 1 in 16 used, then 2
    a, b = whole.circuit_net.state_dict(), resumed.circuit_net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_dali
def test_a_corrupt_jpeg_stops_dali_naming_the_file(tmp_path):
    root = synthetic_image_folder(tmp_path, classes=2, train_per_class=2, val_per_class=1, size=(96, 128))
    bad = root / "train" / "n00000001" / "train_n00000001_0.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])          # the header reads, the scan data ends early
    train, _, _ = dali_batches(root, batch_size=4, device="cpu", size=16, workers=0)
    with pytest.raises(DatasetError, match=f"could not decode the image {bad}.*--loader torch"):
        epoch(train, 0)


def test_loader_dali_without_dali_names_the_extra(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(imagenet_dali, "Pipeline", None)
    with pytest.raises(circuits.CircuitError, match=r"pip install 'mirrorcircuits\[dali\]'"):
        dali_batches(folder, batch_size=4, device="cpu")
    with pytest.raises(circuits.CircuitError, match=r"--loader dali needs NVIDIA DALI.*mirrorcircuits\[dali\]"):
        imagenet.main(["--data", str(folder), "--out", str(tmp_path / "run"), "--loader", "dali"])
    assert not (tmp_path / "run").exists()
    image_batches(folder, batch_size=4, device="cpu", size=16, workers=0)      # the torch loader needs no DALI
