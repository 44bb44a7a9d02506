"""The checkpoint of an ImageNet run (OUT/checkpoint.pt of models.imagenet) on disk: read back and checked to
belong to the run (`load_checkpoint`), written atomically with a clear error when the disk is full
(`write_checkpoint`), and the run folder's lock that keeps a second process off it (`lock_run`).
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

import circuits
from circuits.recording import WriterLock

from .imagenet_recipe import Recipe, Worker


def load_checkpoint(path: Path, key: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A checkpoint's contents, or a CircuitError if it is not one or belongs to another run
    (another architecture, rule, crop size or number of classes: `key`, the recipe's checkpoint_key)."""
    if not path.is_file():
        raise circuits.CircuitError(f"--resume: there is no checkpoint {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises OSError, EOFError, RuntimeError, UnpicklingError...
        why = ("it holds objects other than tensors and plain values" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no data'}")
        raise circuits.CircuitError(
            f"{path} cannot be read as a checkpoint: it is truncated, damaged or not a checkpoint "
            f"of models.imagenet ({why}); move it away to run again from step 0, "
            f"or choose another --out"
        ) from None
    if not isinstance(state, dict) or "checkpoint_key" not in state or "trainer" not in state:
        raise circuits.CircuitError(f"{path} is not an ImageNet checkpoint of models.imagenet")
    theirs, ours = state["checkpoint_key"], key
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs.get(k)!r} (this run: {ours[k]!r})" for k in ours if theirs.get(k) != ours[k])
        raise circuits.CircuitError(f"checkpoint {path} belongs to another run: {diff}")
    return state


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save into PATH.partial, then an atomic rename. A write the disk has no room for (torch: "[enforce fail
    at inline_container.cc] unexpected pos", or ENOSPC / EFBIG / EDQUOT) removes the .partial and raises an OSError
    saying so; the previous checkpoint is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    try:
        torch.save(state, partial)
    except (OSError, RuntimeError) as e:
        partial.unlink(missing_ok=True)
        code = getattr(e, "errno", None)
        if "unexpected pos" not in str(e) and code not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        kept = f"the previous checkpoint {path} is kept" if path.is_file() else "no checkpoint was written before"
        raise OSError(code or errno.ENOSPC, (
            f"writing checkpoint {path} failed: the disk is full (or a file size limit was reached; "
            f"{shutil.disk_usage(path.parent).free} bytes free there); {kept} and the partial file was removed; "
            f"free some space and run again with --resume. torch said: {str(e).splitlines()[0][:200]}")) from e
    os.replace(partial, path)


def lock_run(recipe: Recipe, worker: Worker) -> WriterLock | None:
    """Rank 0: the run folder's lock (OUT/checkpoint.pt.lock), or a CircuitError naming the process that holds it."""
    out = Path(recipe.out)
    if not worker.main:
        return None
    if recipe.resume and not out.is_dir():
        raise circuits.CircuitError(f"--resume: there is no checkpoint {out / 'checkpoint.pt'} (no folder {out})")
    out.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(out / "checkpoint.pt.lock")
    holder = lock.acquire()
    if holder is not None:
        raise circuits.CircuitError(f"{out} is in use by another run ({holder}): one process writes a run folder at "
                                    f"a time; wait for it to end or stop it, or choose another --out")
    return lock
