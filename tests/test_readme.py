"""Every python block of the README runs as written, in order, in a fresh folder (at tiny sizes)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs=10": "epochs=1", "batches=200": "batches=2", "batches=50": "batches=2", "batches=300": "batches=2",
        "split.train, batch_size=64": "torch.utils.data.Subset(split.train, range(256)), batch_size=64"}
"""The only changes made to the README's code: fewer epochs, mirror batches and training images."""


def test_readme_python_blocks_run_in_order(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 6
    script = "\n".join(blocks)
    for big, small in TINY.items():
        assert big in script, big
        script = script.replace(big, small)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "wm.h5").exists() and (tmp_path / "alignment.png").exists()
    report = subprocess.run([sys.executable, "-m", "analysis", "report", "runs/wm.h5", "-o", "report/"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "report" / "summary.md").exists()


def test_the_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    modules = [p for package in ("circuits", "models", "analysis") for p in sorted((ROOT / package).rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py")]
    packages = sorted(p.parent.name for p in (ROOT / "circuits").glob("*/__init__.py"))
    assert [name for name in packages if f"`{name}/`" not in layout] == [], "README's layout names every subpackage"
    missing = [f"{p.parent.name}/{p.name}" for p in modules if f"`{p.name}`" not in layout]
    assert not missing, f"README's layout section does not name {missing}"
    named = set(re.findall(r"`(\w+\.py)`", layout))
    gone = sorted(named - {p.name for p in modules} - {p.name for p in (ROOT / "benchmarks").glob("*.py")})
    assert not gone, f"README's layout section names modules that do not exist: {gone}"
