"""The documentation site (mkdocs.yml, docs/): every page is in the navigation, the API reference covers every
public name, and the user guide's Python blocks run as written, in order, in a fresh folder (at tiny sizes)."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
import circuits
import models
from circuits import rules

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TINY = {"epochs=10": "epochs=1", "epochs=5": "epochs=1", "batches=200": "batches=20", "batches=50": "batches=2",
        "batches=300": "batches=2", "split.train, batch_size=64": "torch.utils.data.Subset(split.train, range(256)), "
                                                                 "batch_size=64"}
"""The only changes made to the pages' code: fewer epochs, mirror batches and training images."""
RECORDING = """
import torch
from pathlib import Path
from torch.utils.data import DataLoader
import circuits, models
Path("runs").mkdir()
split = models.data.digits(flat=True, standardize=True)
net = models.mlp([64, 32, 10], activation="tanh", rule="wm").build()
x, t = split.train.tensors
recorder = circuits.Recorder("runs/wm.h5", probe=(x[:32], t[:32]), probe_steps=5)
trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                           circuits.paper_schedule(net, steps_per_epoch=4, batch_size=32),
                           recorder=recorder, config=circuits.TrainerConfig(progress=False))
trainer.fit(DataLoader(torch.utils.data.Subset(split.train, range(640)), batch_size=32), 1,
            DataLoader(split.test, batch_size=256))
"""
"""A short weight-mirror run recorded to runs/wm.h5, for the analysis page to read."""


def nav_pages(entries) -> list[str]:
    """The page files of mkdocs.yml's nav, in order."""
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_navigation_and_every_entry_is_a_page():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    files = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(pages) == files, f"in the nav, not in docs/: {sorted(set(pages) - set(files))}; " \
                                   f"in docs/, not in the nav: {sorted(set(files) - set(pages))}"
    assert len(pages) == len(set(pages))


def documented() -> dict[int, str]:
    """Every object a `::: identifier` line of the API reference documents (a module: it and its members)."""
    found = {}
    for page in (DOCS / "api").glob("*.md"):
        for identifier in re.findall(r"^::: ([\w.]+)$", page.read_text(), flags=re.M):
            module, _, name = identifier.rpartition(".")
            try:
                obj = importlib.import_module(identifier)
                members = vars(obj).values()
            except ModuleNotFoundError:
                obj = getattr(importlib.import_module(module), name)
                members = ()
            found[id(obj)] = identifier
            found.update({id(member): identifier for member in members})
    return found


@pytest.mark.parametrize("package", [circuits, rules, analysis, models], ids=lambda p: p.__name__)
def test_the_api_reference_documents_every_public_name(package):
    found = documented()
    public = [name for name in package.__all__ if not (package is circuits and name == "rules")]
    missing = [name for name in public if id(getattr(package, name)) not in found]
    assert not missing, f"docs/api/ has no `::: ...` entry for {package.__name__}.{missing}"


@pytest.mark.parametrize("page", ["writing-rules.md", "phases.md", "analysis.md"])
def test_a_pages_python_blocks_run_in_order(page, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks
    script = "\n".join(blocks)
    for big, small in TINY.items():
        script = script.replace(big, small)
    if page == "analysis.md":
        script = RECORDING + script
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if page == "writing-rules.md":
        assert "fc1 partial |B| / |W| = 0.50" in done.stdout
        angles = [float(a) for a in re.findall(r"angle\(B, W\) [\d.]+° -> ([\d.]+)°", done.stdout)]
        assert len(angles) == 2 and max(angles) < 80          # learned B turned towards W from ~90°
        assert done.stdout.count("|B| 1.000") == 2
    if page == "phases.md":
        assert re.search(r"epoch 1: top-1 \d+\.\d%, top-5 \d+\.\d%", done.stdout)
    if page == "analysis.md":
        assert (tmp_path / "alignment.png").exists() and "Run('runs/wm.h5'" in done.stdout
