"""Recording a run to one self-describing HDF5 file: what the circuit learns, step by step.

The trainer calls begin / step / evaluate / close (docs/recording.md has the file's layout; the
layout's constants and its reader are circuits.recording, the metrics circuits.alignment). A row holds:

- every `every` ticks (learning steps and mirror batches): loss, learning rate, phase, examples
  seen, wall time; and per synaptic projection with a B in W's layout angle(B, W), |B| / |W| and
  the fraction of synapses with sign(B) = sign(W) (direct feedback projections, whose B has no W,
  are listed in /alignment's attribute `undefined` instead);
- every `probe_steps` learning steps, on a fixed probe batch: the error delta = dL/da of every
  population under the circuit's rules and under backprop (CircuitNet.backprop_reference: every
  error back through W, layer by layer, direct feedback off),
  angle(delta_rule, delta_bp) and |delta_rule| / |delta_bp|, and the same for the weight
  updates dL/dW; the backprop reference leaves the run untouched (no .grad, batch-norm
  statistics restored, random number generators untouched);
- after every evaluation: the trainer's metrics (loss, top-1 and top-5 accuracy);
- optionally, at chosen learning steps: W and B of chosen projections, and the activity y and
  error delta of chosen populations on the first examples of the probe batch.

Metrics are computed on the circuit's device, buffered there, and copied to the host once per block
of rows (one torch.stack and one .cpu(), no .item() per metric); blocks are appended to resizable
chunked datasets, all created before the file enters HDF5's single-writer/multiple-reader (SWMR)
mode, so other processes read the file while it grows, and a run killed at any moment leaves every
flushed row readable. A run resumed from a checkpoint (load_state_dict before begin) continues the
same file with no missing or repeated rows; an existing file is never overwritten. One process writes a
recording at a time: begin() takes an exclusive lock (`<path>.lock`) that close() gives back, and
refuses a second writer. begin() also checks, before the first step, the probe batch (it is run once
through the circuit and the loss) and the names of the metrics the trainer will evaluate.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import platform
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import h5py
import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .alignment import _angles, _pair_norms, alignment
from .network import CircuitNet, Trace, unwrap
from .recording import (LAYOUT, LAYOUT_VERSION, LIBVER, METRICS, PHASES, TABLES, RecordingError, WriterLock, key,
                        open_recording, strings)
from .synapse import Synapse

Steps = Union[int, Iterable[int]]
"""When something happens: an int n is every n-th learning step (step % n == 0), else those steps."""

_SCALAR_CHUNK = 1024       # rows per chunk of a scalar column
_HEADROOM = 1 << 20        # bytes a flush keeps free beyond its rows, for HDF5's metadata


def _is_due(when: int | frozenset[int], step: int) -> bool:
    return step % when == 0 if isinstance(when, int) else step in when


def _steps(name: str, when: Steps) -> int | frozenset[int]:
    if isinstance(when, int) and not isinstance(when, bool):
        if when < 1:
            raise ValueError(f"{name}={when}: an interval must be a positive number of learning steps")
        return when
    return frozenset(int(s) for s in when)


def _json(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=repr, sort_keys=True)


def _versions() -> dict[str, str]:
    from importlib import metadata

    try:
        package = metadata.version("mirrorcircuits")
    except metadata.PackageNotFoundError:
        package = "not installed"
    return {"mirrorcircuits": package, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "numpy": np.__version__, "h5py": h5py.version.version,
            "hdf5": h5py.version.hdf5_version, "platform": platform.platform()}


@dataclasses.dataclass(frozen=True)
class _Column:
    """One dataset of a table: name under the file's root, one row's dtype and shape, units, meaning."""

    path: str
    dtype: Any
    units: str
    description: str
    shape: tuple[int, ...] = ()

    def create(self, file: h5py.File, index: str) -> h5py.Dataset:
        chunk = (_SCALAR_CHUNK,) if not self.shape else (1,)
        ds = file.create_dataset(self.path, (0, *self.shape), dtype=self.dtype, maxshape=(None, *self.shape),
                                 chunks=chunk + self.shape)
        ds.attrs.update(units=self.units, description=self.description, index=index)
        return ds

    def open(self, file: h5py.File) -> h5py.Dataset:
        ds = file.get(self.path)
        if not isinstance(ds, h5py.Dataset) or ds.shape[1:] != self.shape:
            raise RecordingError(f"{file.filename} has no dataset {self.path} of rows shaped {self.shape}: "
                                 f"it was recorded from another circuit or with other recorder settings")
        return ds


class _Table:
    """Datasets that share one row index, /<group>/tick: rows wait in memory and are appended as one block.

    A row is (host values, device values, arrays): Python scalars for the first columns, one device
    vector whose entries fill the next ones (copied to the host once per block), then one array each.
    """

    def __init__(self, file: h5py.File, group: str, columns: Sequence[_Column], device_columns: int,
                 array_columns: int, block: int, create: bool) -> None:
        self.index = f"/{group}/tick"
        self.datasets = [c.create(file, self.index) if create else c.open(file) for c in columns]
        self.rows: list[tuple[tuple, Tensor | None, tuple]] = []
        self.block = block
        self.n_arrays, self.n_device = array_columns, device_columns
        self.row_bytes = sum(ds.dtype.itemsize * int(np.prod(ds.shape[1:])) for ds in self.datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])

    def append(self, host: tuple, device: Tensor | None = None, arrays: tuple = ()) -> None:
        self.rows.append((host, device, arrays))

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.block

    def write(self) -> None:
        """Append the waiting rows to every dataset (one resize and one write each)."""
        if not self.rows:
            return
        hosts, devices, arrays = zip(*self.rows, strict=True)
        columns = [np.asarray(c) for c in zip(*hosts, strict=True)]
        if self.n_device:
            columns += list(torch.stack(devices).cpu().numpy().T)
        columns += [np.stack(c) for c in zip(*arrays, strict=True)] if self.n_arrays else []
        start, n = len(self), len(self.rows)
        for ds, values in zip(self.datasets, columns, strict=True):
            ds.resize(start + n, axis=0)
            ds[start:] = values
        self.rows = []


class Recorder:
    """Writes one HDF5 file per run from the trainer's hooks (begin, step, evaluate, close).

    path: the file to create (never overwritten; resuming a checkpointed run appends to it).
    every: record /steps and /alignment at every `every`-th tick (learning step or mirror batch).
    probe: a fixed (inputs, target) batch for the error and update angles against backprop (inputs a
        tensor, or a dict by input population); loss: the loss on the probe batch (the trainer's).
    probe_steps, snapshot_steps, activity_steps: learning steps at which to probe, snapshot W and B of
        the projections named in `snapshot`, and sample activity y and error delta of the populations
        named in `activity` on the first `activity_samples` probe examples (int: every n-th step).
    metrics: the evaluation metrics evaluate() receives; seeds: extra seeds to store with the run.
    block: rows buffered per table before a write; flush_seconds: the longest a row waits for a flush.
    """

    def __init__(self, path: str | os.PathLike, *, every: int = 1,
                 probe: tuple[Tensor | Mapping[str, Tensor], Tensor] | None = None, probe_steps: Steps = 100,
                 loss: Callable[[Any, Tensor], Tensor] = F.cross_entropy,
                 snapshot: Sequence[str] = (), snapshot_steps: Steps = 1000,
                 activity: Sequence[str] = (), activity_steps: Steps = 1000, activity_samples: int = 8,
                 metrics: Sequence[str] = tuple(METRICS), seeds: Mapping[str, int] | None = None,
                 block: int = 256, flush_seconds: float = 10.0) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(
                f"recording path {self.path} is a directory; name a file, e.g. {self.path / 'run.h5'}"
            )
        for name, value in (("every", every), ("activity_samples", activity_samples), ("block", block)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Recorder {name}={value!r} must be a positive integer")
        if activity and probe is None:
            raise ValueError("activity samples are taken on the probe batch: pass probe=(inputs, target)")
        self.every, self.block, self.flush_seconds = every, block, float(flush_seconds)
        self.probe, self.loss = probe, loss
        self.probe_steps = _steps("probe_steps", probe_steps)
        self.snapshot, self.snapshot_steps = list(snapshot), _steps("snapshot_steps", snapshot_steps)
        self.activity, self.activity_steps = list(activity), _steps("activity_steps", activity_steps)
        self.activity_samples = activity_samples
        self.metrics = list(metrics)
        self.seeds = dict(seeds or {})
        self._file: h5py.File | None = None
        self._tables: dict[str, _Table] = {}
        self._resume: dict[str, Any] | None = None
        self._run_id: str | None = None
        self._tick = -1
        self._failure: OSError | None = None
        self._last_flush = time.monotonic()
        self._lock = WriterLock(self.path.with_name(self.path.name + ".lock"))

    # --- the trainer's interface -------------------------------------------------------------
    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def begin(self, net: torch.nn.Module, config: Mapping[str, Any]) -> None:
        """Create the file (or reopen it on resume), with the circuit, `config`, seeds and versions.

        Checked first, so that a mistake stops the run before its first step: no other writer may hold
        the file; the probe batch must run through the circuit and the loss, and give the activity
        shapes recorded. (The trainer checks its metric names with check_metrics before this.)
        """
        net = unwrap(net)
        if self._file is not None:
            if net is not self._net:
                raise RecordingError(f"recorder of {self.path} is already recording another net")
            return
        try:
            holder = self._lock.acquire()
        except OSError as e:
            raise self._creation_error(e) from e
        if holder is not None:
            raise RecordingError(f"{self.path} is being written by another recorder ({holder}); one writer at a "
                                 f"time: wait for that run to end, or stop it")
        try:
            self._bind(net)
            self._try_probe()
            if self._resume is None:
                self._create(config)
            else:
                self._reopen(self._resume)
            self._file.swmr_mode = True
            self._file.flush()
        except BaseException:
            self._lock.release()
            raise
        self._last_flush = time.monotonic()

    def step(self, tick: int, *, step: int, phase: str, loss: Tensor | None, lr: float, examples: int,
             net: torch.nn.Module) -> None:
        """Record one tick (a learning step or a mirror batch), as `every` and the *_steps settings say."""
        self._check_open()
        if tick <= self._tick:
            raise RecordingError(f"tick {tick} is not after the last recorded tick {self._tick} of {self.path}: "
                                 f"ticks must increase (a resumed run continues from its checkpoint's tick)")
        if phase not in PHASES:
            raise RecordingError(f"phase {phase!r} is not one of {list(PHASES)}")
        self._tick = tick
        if tick % self.every == 0:
            loss_value = (loss.detach().reshape(1).float().to(self._device) if loss is not None
                          else torch.full((1,), float("nan"), device=self._device))
            device = torch.cat([loss_value, alignment([s for _, s in self._synapses]).flatten()])
            self._tables["steps"].append((tick, step, PHASES[phase], float(lr), int(examples), time.time()), device)
        if phase == "learn":
            self._after_learning_step(tick, step)
        if any(t.full for t in self._tables.values()) or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one evaluation (written at once): the metrics named at construction, NaN for any missing."""
        self._check_open()
        self.check_metrics(metrics)
        values = tuple(float(metrics.get(m, float("nan"))) for m in self.metrics)
        self._tables["evaluations"].append((self._tick, step) + values)
        self.flush()

    def close(self) -> None:
        """Write what waits, close the file, give back the lock. A later begin() continues it, like a resume."""
        if self._file is None:
            return
        try:
            if self._failure is None:
                self.flush()
                self._resume = self._state()
        finally:
            file, self._file = self._file, None
            try:
                with contextlib.suppress(Exception) if self._failure is not None else contextlib.nullcontext():
                    file.close()
            finally:
                self._lock.release()

    def restart(self) -> None:
        """Record into the existing file at `path` from its start: the next begin() drops all its rows and
        keeps its run id and description. For a run that stopped before its first checkpoint and is
        run again from step 0 (models.imagenet --resume does this when there is no checkpoint)."""
        if self._file is not None:
            raise RuntimeError(f"recorder of {self.path} is recording: restart it before begin()")
        with open_recording(self.path) as f:
            run_id = f.attrs.get("run_id")
        self._resume = {"layout_version": LAYOUT_VERSION, "run_id": run_id, "path": str(self.path), "tick": -1,
                        "rows": {f"/{t}/tick": 0 for t in TABLES}}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume this recording: the file's rows now (written first)."""
        if self._file is not None:
            self.flush()
            return self._state()
        return dict(self._resume) if self._resume else {"layout_version": LAYOUT_VERSION, "run_id": None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next begin() reopens the file and drops the rows recorded after this state."""
        if self._file is not None:
            raise RuntimeError(f"recorder of {self.path} is recording: load its state before begin()")
        if state.get("layout_version") != LAYOUT_VERSION or "run_id" not in state:
            raise RecordingError(f"recorder state {dict(state)!r} is not a layout-{LAYOUT_VERSION} recorder state")
        self._resume = dict(state) if state["run_id"] is not None else None

    # --- writing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Append every waiting row and flush the file: readers see it, a killed run keeps it."""
        self._check_open()
        tables = self._tables.values()
        rows = sum(len(t.rows) for t in tables)
        need = sum(len(t.rows) * t.row_bytes for t in tables) + _HEADROOM
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise self._fail(OSError(errno.ENOSPC, (
                f"recording {self.path}: the disk is full ({free} bytes free, {need} needed to write "
                f"{rows} rows); the file holds every row up to the last flush")))
        try:
            for t in tables:
                t.write()
            self._file.flush()
        except (OSError, RuntimeError) as e:
            code = (
                int(m.group(1))
                if (m := re.search(r"errno = (\d+)", str(e)))
                else getattr(e, "errno", None) or errno.EIO
            )
            raise self._fail(OSError(code, (
                f"recording {self.path}: writing {rows} rows failed ({os.strerror(code)}; is the disk full or the "
                f"file size limit reached?); the file holds every row up to the last flush. HDF5 said: {e}"))) from e
        self._last_flush = time.monotonic()

    def check_metrics(self, names: Iterable[str]) -> None:
        """A RecordingError unless every metric name in `names` was declared (Recorder(metrics=...))."""
        unknown = set(names) - set(self.metrics)
        if unknown:
            raise RecordingError(f"evaluation metrics {sorted(unknown)} were not declared; this recorder "
                                 f"records {self.metrics} (Recorder(metrics=...))")

    def _fail(self, error: OSError) -> OSError:
        self._failure = error
        return error

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._file is None:
            raise RuntimeError(f"recorder of {self.path} is not recording: call begin(net, config) first")

    def _state(self) -> dict[str, Any]:
        return {"layout_version": LAYOUT_VERSION, "run_id": self._run_id, "path": str(self.path), "tick": self._tick,
                "rows": {t.index: len(t) for t in self._tables.values()}}

    # --- what the circuit holds --------------------------------------------------------------
    def _bind(self, net: CircuitNet) -> None:
        """The net's projections and populations; checks the names the settings choose."""
        self._net = net
        self._device = next(net.parameters()).device
        self._synapses = [(n, s) for n, s in net.projections() if s.rule is not None]   # a B in W's layout
        self._learning = [(n, s) for n, s in net.projections() if s.weight.requires_grad]
        self._unaligned = [n for n, s in net.projections() if s.rule is None] + [
            n for n, _ in net.feedback_projections()
        ]
        self._errors = _error_populations(net)
        shapes = {p.name: p.shape for p in net.circuit.populations()}
        for names, known, what in ((self.snapshot, [n for n, _ in self._synapses], "synaptic projection"),
                                   (self.activity, self._errors, "population that receives an error")):
            missing = [n for n in names if n not in known]
            if missing:
                raise RecordingError(f"circuit {net.circuit.name!r} has no {what} named {missing}; it has {known}")
        if self.probe is not None:
            inputs, target = self.probe
            self._probe_inputs = ({k: v.to(self._device) for k, v in inputs.items()} if isinstance(inputs, Mapping)
                                  else inputs.to(self._device))
            self._probe_target = target.to(self._device)
            self._samples = min(self.activity_samples, len(target))
        self._activity_shapes = {p: shapes[p] for p in self.activity}

    def _try_probe(self) -> None:
        """Run the probe batch once (the run untouched): a RecordingError now rather than at the first probe step."""
        if self.probe is None:
            return
        inputs, target = self.probe
        try:
            with self._isolated():
                _, _, _, traces = self._errors_and_updates()
        except Exception as e:  # noqa: BLE001 - any failure of the user's batch or loss, reported with its shapes
            shapes = ({k: tuple(v.shape) for k, v in inputs.items()} if isinstance(inputs, Mapping)
                      else tuple(inputs.shape))
            raise RecordingError(
                f"the probe batch (inputs {shapes}, target {tuple(target.shape)}) does not run "
                f"through circuit {self._net.circuit.name!r} and the loss: {type(e).__name__}: {e}"
            ) from e
        for pop, shape in self._activity_shapes.items():
            seen = tuple(traces[pop].y.shape[1:])
            if seen != tuple(shape):
                raise RecordingError(f"activity of population {pop!r}: the circuit declares shape {tuple(shape)}, "
                                     f"the probe batch gives {seen}")

    def _columns(self) -> dict[str, tuple[list[_Column], int, int]]:
        """Every table: its columns, how many come from the device vector, how many are arrays."""
        f4, i8 = np.float32, np.int64

        def index(group: str) -> list[_Column]:
            return [_Column(f"/{group}/tick", i8, "tick", "learning steps and mirror batches counted together from 0: "
                            "the row index, unique and increasing"),
                    _Column(f"/{group}/step", i8, "steps", "learning steps taken (data batches)")]

        steps = index("steps") + [
            _Column("/steps/phase", h5py.enum_dtype(PHASES, basetype="u1"), "1",
                    "learn: a learning step on a data batch; mirror: a weight-mirror noise batch"),
            _Column("/steps/lr", np.float64, "1", "learning rate of the optimizer's first parameter group"),
            _Column("/steps/examples", i8, "examples", "data examples seen"),
            _Column("/steps/wall_time", np.float64, "s since 1970-01-01 UTC", "when the tick was recorded"),
            _Column("/steps/loss", f4, "1", "training loss of the batch (NaN for a mirror batch)")]
        for name, _ in self._synapses:
            g = f"/alignment/{key(name)}"
            steps += [
                _Column(f"{g}/angle", f4, "degrees", "angle between B and W, flattened: arccos(<B, W> / (|B| |W|))"),
                _Column(f"{g}/norm_ratio", f4, "1", "|B| / |W| (Frobenius norms)"),
                _Column(f"{g}/sign_match", f4, "1", "fraction of synapses with sign(B) = sign(W)"),
            ]
        probe = index("probe") + [_Column("/probe/loss", f4, "1", "loss of the probe batch")]
        for name in self._errors:
            g = f"/probe/errors/{key(name)}"
            probe += [
                _Column(
                    f"{g}/angle",
                    f4,
                    "degrees",
                    "angle between the error delta = dL/da this population "
                    "receives under the circuit's rules and the one backprop sends (B = W everywhere), on the "
                    "probe batch, flattened over examples and units",
                ),
                _Column(f"{g}/norm_ratio", f4, "1", "|delta_rule| / |delta_backprop|"),
            ]
        for name, _ in self._learning:
            g = f"/probe/updates/{key(name)}"
            probe += [_Column(f"{g}/angle", f4, "degrees", "angle between the weight update dL/dW under the circuit's "
                              "rules (Kolen-Pollack's decay included) and under backprop, on the probe batch"),
                      _Column(f"{g}/norm_ratio", f4, "1", "|dW_rule| / |dW_backprop|")]
        evaluations = index("evaluations") + [
            _Column(
                f"/evaluations/{key(m)}",
                np.float64,
                "1",
                METRICS.get(m, f"evaluation metric {m!r} as the trainer reports it"),
            )
            for m in self.metrics
        ]
        synapses = dict(self._synapses)
        snapshots = index("snapshots") + [
            _Column(f"/snapshots/{key(name)}/{w}", f4, "1", text, tuple(synapses[name].weight.shape))
            for name in self.snapshot
            for w, text in (
                ("W", "forward weights W"),
                ("B", "feedback weights B in W's layout (B = W: perfect alignment)"),
            )
        ]
        activity = index("activity") + [
            _Column(f"/activity/{key(pop)}/{v}", f4, "1", text, (self._samples, *shape))
            for pop, shape in self._activity_shapes.items()
            for v, text in (("y", "activity y = phi(a) on the first probe examples"),
                            ("delta", "error delta = dL/da under the circuit's rules, same examples"))]
        tables = {"steps": (steps, len(steps) - 6, 0), "probe": (probe, len(probe) - 2, 0),
                  "evaluations": (evaluations, 0, 0), "snapshots": (snapshots, 0, len(snapshots) - 2),
                  "activity": (activity, 0, len(activity) - 2)}
        assert tuple(tables) == TABLES
        return tables

    def _open_tables(self, create: bool) -> None:
        self._tables = {group: _Table(self._file, group, columns, n_device, n_arrays,
                                      self.block if not n_arrays else 1, create)
                        for group, (columns, n_device, n_arrays) in self._columns().items()}

    # --- creating and reopening the file -----------------------------------------------------
    def _creation_error(self, e: OSError) -> OSError:
        """What to raise when a file cannot be made in the recording's directory: which directory, and why."""
        directory = self.path.parent
        if not directory.is_dir():
            return FileNotFoundError(errno.ENOENT, f"cannot create recording {self.path}: "
                                     f"directory {directory} does not exist", str(directory))
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or not os.access(directory, os.W_OK):
            return PermissionError(errno.EACCES, f"cannot create recording {self.path}: directory {directory} "
                                   f"is not writable ({e.strerror or e})", str(directory))
        return OSError(e.errno, f"cannot create recording {self.path}: {e}")

    def _create(self, config: Mapping[str, Any]) -> None:
        if self.path.exists():
            raise FileExistsError(errno.EEXIST, (
                f"{self.path} already exists and a recording is never overwritten: choose a new path, delete it, "
                f"or resume the run that wrote it from a checkpoint (the trainer restores the recorder's state); "
                f"a run that stopped before its first checkpoint restarts into it from step 0 with Recorder.restart()"),
                str(self.path))
        try:
            self._file = h5py.File(self.path, "x", libver=LIBVER)
        except OSError as e:
            raise self._creation_error(e) from e
        try:
            self._run_id = uuid.uuid4().hex
            self._tick = -1
            self._write_description(config)
            self._open_tables(create=True)
        except BaseException:
            self._file.close()
            self._file = None
            self.path.unlink()
            raise

    def _write_description(self, config: Mapping[str, Any]) -> None:
        """Root attributes and /circuit: who, when, with what, and the circuit itself."""
        f = self._file
        seeds = {"torch_initial_seed": torch.initial_seed(), **self.seeds}
        settings = {"every": self.every, "probe_steps": _listed(self.probe_steps), "snapshot": self.snapshot,
                    "snapshot_steps": _listed(self.snapshot_steps), "activity": self.activity,
                    "activity_steps": _listed(self.activity_steps), "activity_samples": self.activity_samples,
                    "probe_batch": len(self._probe_target) if self.probe is not None else 0,
                    "loss": getattr(self.loss, "__name__", repr(self.loss)), "block": self.block}
        f.attrs.update(layout=LAYOUT, layout_version=LAYOUT_VERSION, run_id=self._run_id,
                       description="a mirrorcircuits training run: groups steps, alignment, probe, evaluations, "
                                   "snapshots, activity hold rows indexed by their tick; see docs/recording.md",
                       created=_now(), circuit=self._net.circuit.name, config=_json(config),
                       seeds=_json(seeds), versions=_json(_versions()), recorder=_json(settings),
                       resumed=_json([]))
        circuit = f.create_group("circuit")
        circuit.attrs.update(name=self._net.circuit.name, description=(
            "the circuit: forward populations and projections; every population p has a feedback partner δp; "
            "the feedback table lists the feedback projections between them"))
        text = h5py.string_dtype()
        pops = np.array([(p.name, json.dumps(list(p.shape)), p.activation, p.is_input)
                         for p in self._net.circuit.populations()],
                        dtype=[("name", text), ("shape", text), ("activation", text), ("input", bool)])
        circuit.create_dataset("populations", data=pops).attrs["description"] = "forward populations"
        rows = []
        for name, pre, post, projection, rule in self._net.circuit.projections():
            module = self._net.projection(name)
            weight = json.dumps(list(module.weight.shape)) if isinstance(module, Synapse) else ""
            rows.append((name, pre, post, type(projection).__name__, repr(projection), projection.synaptic,
                         str(rule) if rule else "", repr(rule) if rule else "", weight))
        projections = np.array(rows, dtype=[(n, text) for n in ("name", "pre", "post", "projection", "spec")]
                               + [("synaptic", bool)] + [(n, text) for n in ("rule", "rule_spec", "weight_shape")])
        circuit.create_dataset("projections", data=projections).attrs["description"] = (
            "projections pre -> post: kind and settings, feedback rule (short name and settings), W's shape")
        rows = []
        for u, v, d in self._net.circuit.feedback_graph().edges(data=True):
            module = self._net.projection(d["name"])
            shape = json.dumps(list(module.feedback_shape)) if d["carries"] == "B" else ""
            rows.append((d["name"], u, v, d["carries"], str(d["rule"] or ""), repr(d["rule"]) if d["rule"] else "",
                         bool(d["direct"]), shape))
        feedback = np.array(
            rows,
            dtype=[(n, text) for n in ("name", "source", "target", "carries", "rule", "rule_spec")]
            + [("direct", bool), ("feedback_shape", text)],
        )
        circuit.create_dataset("feedback", data=feedback).attrs["description"] = (
            "feedback projections source -> target between error populations, as they are: layer-local ones "
            "(named as their forward projection) and direct ones; what they carry (B or a local derivative), "
            "their rule, and B's shape (W's layout for layer-local ones, source x target units or channels for direct)")
        for group, text_ in (("steps", "every `every`-th tick: loss, learning rate, phase, examples, wall time"),
                             ("alignment", "per synaptic projection, rows of /steps: B against W"),
                             ("probe", "every probe_steps learning steps, on a fixed probe batch: the circuit's "
                                       "errors and weight updates against backprop's"),
                             ("evaluations", "after each evaluation on held-out data"),
                             ("snapshots", "W and B of chosen projections at chosen learning steps"),
                             ("activity", "activity and error of chosen populations on the first probe examples")):
            f.require_group(group).attrs["description"] = text_
        f["alignment"].attrs.update(undefined=json.dumps(self._unaligned), undefined_description=(
            "projections whose angle(B, W) is not defined, so not recorded: direct feedback projections, whose B "
            "joins two error populations that no W joins, and synaptic projections with no feedback of their own"))
        for group, names in (
            ("alignment", [n for n, _ in self._synapses]),
            ("probe/updates", [n for n, _ in self._learning]),
            ("snapshots", self.snapshot),
        ):
            for name in names:
                pre, post = _edge(self._net, name)
                f.require_group(f"{group}/{key(name)}").attrs.update(
                    projection=name, pre=pre, post=post, rule=repr(self._net.projection(name).rule))
        for group, names in (("probe/errors", self._errors), ("activity", self.activity)):
            for name in names:
                f.require_group(f"{group}/{key(name)}").attrs.update(population=name)

    def _reopen(self, state: Mapping[str, Any]) -> None:
        """Continue the file of a checkpointed run: rows up to the checkpoint, none after.

        A killed SWMR writer leaves the file marked open; it is copied, rows cut to the checkpoint,
        into a fresh file that then replaces it (the original stays until the copy is complete).
        """
        if not self.path.exists():
            raise FileNotFoundError(errno.ENOENT, f"cannot resume recording {self.path} of run {state['run_id']}: "
                                    f"the file is gone", str(self.path))
        partial = self.path.with_name(self.path.name + ".resuming")
        with open_recording(self.path) as old:
            if old.attrs.get("run_id") != state["run_id"]:
                raise RecordingError(f"{self.path} holds run {old.attrs.get('run_id')}, but the checkpoint "
                                     f"resumes run {state['run_id']}")
            recorded = strings(old["circuit/projections"].fields("name")[:])
            if recorded != [name for name, *_ in self._net.circuit.projections()]:
                raise RecordingError(f"{self.path} recorded a circuit with projections {recorded}, "
                                     f"not the circuit being resumed")
            partial.unlink(missing_ok=True)
            try:
                with h5py.File(partial, "x", libver=LIBVER) as new:
                    new.attrs.update(old.attrs)
                    for name in old:
                        old.copy(old[name], new, name)
                    for group, (columns, _, _) in self._columns().items():
                        datasets, rows = [c.open(new) for c in columns], state["rows"][f"/{group}/tick"]
                        held = min(len(ds) for ds in datasets)
                        if held < rows:
                            raise RecordingError(f"{self.path} holds {held} rows of /{group}, but the checkpoint "
                                                 f"recorded {rows}: the file lost rows it had flushed")
                        for ds in datasets:
                            ds.resize(rows, axis=0)
                    new.attrs["resumed"] = _json(
                        json.loads(new.attrs["resumed"]) + [{"time": _now(), "tick": state["tick"]}]
                    )
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, self.path)
        self._file = h5py.File(self.path, "r+", libver=LIBVER)
        self._run_id, self._tick = state["run_id"], state["tick"]
        self._open_tables(create=False)

    # --- the probe ---------------------------------------------------------------------------
    def _after_learning_step(self, tick: int, step: int) -> None:
        """After a learning step: probe, snapshot, sample activity, as their step settings say."""
        if self.snapshot and _is_due(self.snapshot_steps, step):
            arrays = []
            for name in self.snapshot:
                synapse = self._net.projection(name)
                arrays += [t.detach().float().cpu().numpy() for t in (synapse.weight, synapse.feedback)]
            self._tables["snapshots"].append((tick, step), None, tuple(arrays))
        if self.probe is None:
            return
        probing, sampling = _is_due(self.probe_steps, step), bool(self.activity) and _is_due(self.activity_steps, step)
        if not (probing or sampling):
            return
        with self._isolated():
            loss, errors, updates, traces = self._errors_and_updates()
            if sampling:
                k = self._samples
                arrays = tuple(t.detach()[:k].float().cpu().numpy() for pop in self.activity
                               for t in (traces[pop].y, errors[self._errors.index(pop)]))
                self._tables["activity"].append((tick, step), None, arrays)
            if probing:
                with self._net.backprop_reference():
                    _, bp_errors, bp_updates, _ = self._errors_and_updates()
                pairs = list(zip(errors, bp_errors, strict=True)) + list(zip(updates, bp_updates, strict=True))
                norms = _pair_norms(pairs, self._device)
                device = torch.cat([loss.reshape(1).float(), _angles(norms).flatten()])
                self._tables["probe"].append((tick, step), device)

    def _errors_and_updates(self) -> tuple[Tensor, list[Tensor | None], list[Tensor | None], dict[str, Trace]]:
        """Loss on the probe batch, and the errors dL/da and updates dL/dW the circuit computes now."""
        traces: dict[str, Trace] = {}
        inputs = self._probe_inputs
        out = self._net(**inputs, monitor=traces) if isinstance(inputs, Mapping) else self._net(inputs, monitor=traces)
        loss = self.loss(out, self._probe_target)
        summed = [traces[p].a for p in self._errors]
        grads = torch.autograd.grad(loss, summed + [s.weight for _, s in self._learning], allow_unused=True)
        return loss.detach(), list(grads[:len(summed)]), list(grads[len(summed):]), traces

    @contextlib.contextmanager
    def _isolated(self) -> Iterator[None]:
        """Probe without changing the run: buffers (batch-norm statistics) restored, RNG forked,
        full precision, gradients enabled (torch.autograd.grad leaves every .grad alone)."""
        buffers = [(b, b.clone()) for b in self._net.buffers()]
        devices = [self._device] if self._device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                    torch.autocast(self._device.type, enabled=False):
                yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)


def _error_populations(net: CircuitNet) -> list[str]:
    """Populations, in topological order, whose summed input depends on a parameter: they receive an error."""
    circuit = net.circuit
    graph = circuit.forward_graph()
    sources = {post for name, _, post, _, _ in circuit.projections()
               if any(p.requires_grad for p in net.projection(name).parameters())}
    reached = sources.union(*(nx.descendants(graph, s) for s in sources))
    return [p for p in circuit.order() if p in reached]


def _edge(net: CircuitNet, name: str) -> tuple[str, str]:
    return next((pre, post) for n, pre, post, _, _ in net.circuit.projections() if n == name)


def _listed(when: int | frozenset[int]) -> int | list[int]:
    return when if isinstance(when, int) else sorted(when)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
