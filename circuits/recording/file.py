"""A recording's HDF5 file as it is written: tables of columns, appended a block of rows at a time.

The recorder (circuits.recording.recorder) decides what to measure; this module decides where the rows go
(docs/recording.md has the layout; its constants and the reader are circuits.recording). Every table
is a group of resizable chunked datasets sharing one row index, /<table>/tick, all created (with a
fletcher32 checksum, as every dataset) before the file enters SWMR mode and takes its name, so
readers follow the file while it grows and a run killed at any moment leaves every flushed row
readable, or no file at all. A resumed run reopens the file cut back to its checkpoint's rows.
Needs numpy and h5py, not torch: device values reach a table through the writer's `to_host`.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import platform
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np

from .layout import (
    LAYOUT,
    LAYOUT_VERSION,
    LIBVER,
    METRICS,
    PHASES,
    TABLES,
    RecordingError,
    key,
    open_recording,
    strings,
)

SCALAR_CHUNK = 1024       # rows per chunk of a scalar column
HEADROOM = 1 << 20        # bytes a flush keeps free beyond its rows, for HDF5's metadata


def as_json(value: Any) -> str:
    """JSON text of a value (dataclasses as dicts, anything else by repr), keys sorted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, default=repr, sort_keys=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions(**more: str) -> dict[str, str]:
    """The versions of what wrote a recording: this package, Python, numpy, h5py, HDF5, the platform, and `more`."""
    from importlib import metadata

    try:
        package = metadata.version("mirrorcircuits")
    except metadata.PackageNotFoundError:
        package = "not installed"
    return {"mirrorcircuits": package, "python": platform.python_version(), **more, "numpy": np.__version__,
            "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version, "platform": platform.platform()}


@dataclasses.dataclass(frozen=True)
class Column:
    """One dataset of a table: name under the file's root, one row's dtype and shape, units, meaning."""

    path: str
    dtype: Any
    units: str
    description: str
    shape: tuple[int, ...] = ()

    def create(self, file: h5py.File, index: str) -> h5py.Dataset:
        chunk = (SCALAR_CHUNK,) if not self.shape else (1,)
        ds = file.create_dataset(self.path, (0, *self.shape), dtype=self.dtype, maxshape=(None, *self.shape),
                                 chunks=chunk + self.shape, fletcher32=True)
        ds.attrs.update(units=self.units, description=self.description, index=index)
        return ds

    def open(self, file: h5py.File) -> h5py.Dataset:
        ds = file.get(self.path)
        if not isinstance(ds, h5py.Dataset) or ds.shape[1:] != self.shape:
            raise RecordingError(f"{file.filename} has no dataset {self.path} of rows shaped {self.shape}: "
                                 f"it was recorded from another circuit or with other recorder settings")
        return ds


@dataclasses.dataclass(frozen=True)
class Contents:
    """What a recording holds, by name; its tables' columns follow from it."""

    aligned: Sequence[str]                       # projections with angle(B, W) in /alignment
    errors: Sequence[str]                        # populations whose error is probed
    learning: Sequence[str]                      # projections whose update dL/dW is probed
    metrics: Sequence[str]                       # evaluation metrics
    snapshots: Mapping[str, tuple[int, ...]]     # projection -> W's shape, for W and B snapshots
    activity: Mapping[str, tuple[int, ...]]      # population -> shape, for activity and error samples
    samples: int                                 # examples per activity sample

    def __post_init__(self) -> None:
        """A RecordingError for a name that lands on the recording's own names: '.' or '' (HDF5's names of a
        group itself) in any group, 'tick' or 'step' in a table whose index columns they are."""
        places = (("projection", self.aligned, "alignment"), ("population", self.errors, "probe/errors"),
                  ("projection", self.learning, "probe/updates"), ("evaluation metric", self.metrics, "evaluations"),
                  ("projection", self.snapshots, "snapshots"), ("population", self.activity, "activity"))
        for what, names, group in places:
            index = ("tick", "step") if group in TABLES else ()
            for name in names:
                if key(name) in ("", "."):
                    clash = f"/{group} itself (HDF5 reads '{key(name)}' as the group)"
                elif key(name) in index:
                    clash = f"the table's index column /{group}/{key(name)}"
                else:
                    continue
                raise RecordingError(f"the {what} named {name!r} collides with the recording's own names: it would "
                                     f"be stored as {clash}; rename it to record this circuit")

    def tables(self) -> dict[str, tuple[list[Column], int, int]]:
        """Every table: its columns, how many come from the device vector, how many are arrays."""
        f4, i8 = np.float32, np.int64

        def index(group: str) -> list[Column]:
            return [Column(f"/{group}/tick", i8, "tick", "learning steps and mirror batches counted together from 0: "
                           "the row index, unique and increasing"),
                    Column(f"/{group}/step", i8, "steps", "learning steps taken (data batches)")]

        steps = index("steps") + [
            Column("/steps/phase", h5py.enum_dtype(PHASES, basetype="u1"), "1",
                   "learn: a learning step on a data batch; mirror: a weight-mirror noise batch"),
            Column("/steps/lr", np.float64, "1", "learning rate of the optimizer's first parameter group"),
            Column("/steps/examples", i8, "examples", "data examples seen"),
            Column("/steps/wall_time", np.float64, "s since 1970-01-01 UTC", "when the tick was recorded"),
            Column("/steps/loss", f4, "1", "training loss of the batch (NaN for a mirror batch)")]
        for name in self.aligned:
            g = f"/alignment/{key(name)}"
            steps += [Column(f"{g}/angle", f4, "degrees",
                             "angle between B and W, flattened: arccos(<B, W> / (|B| |W|))"),
                      Column(f"{g}/norm_ratio", f4, "1", "|B| / |W| (Frobenius norms)"),
                      Column(f"{g}/sign_match", f4, "1", "fraction of synapses with sign(B) = sign(W)")]
        probe = index("probe") + [Column("/probe/loss", f4, "1", "loss of the probe batch")]
        for name in self.errors:
            g = f"/probe/errors/{key(name)}"
            probe += [Column(f"{g}/angle", f4, "degrees", "angle between the error delta = dL/da this population "
                             "receives under the circuit's rules and the one backprop sends (B = W everywhere), on "
                             "the probe batch, flattened over examples and units"),
                      Column(f"{g}/norm_ratio", f4, "1", "|delta_rule| / |delta_backprop|")]
        for name in self.learning:
            g = f"/probe/updates/{key(name)}"
            probe += [Column(f"{g}/angle", f4, "degrees", "angle between the weight update dL/dW under the circuit's "
                             "rules (Kolen-Pollack's decay included) and under backprop, on the probe batch"),
                      Column(f"{g}/norm_ratio", f4, "1", "|dW_rule| / |dW_backprop|")]
        evaluations = index("evaluations") + [
            Column(f"/evaluations/{key(m)}", np.float64, "1", METRICS.get(m, f"evaluation metric {m!r} as the "
                                                                              f"trainer reports it"))
            for m in self.metrics]
        snapshots = index("snapshots") + [
            Column(f"/snapshots/{key(name)}/{w}", f4, "1", text, tuple(shape))
            for name, shape in self.snapshots.items()
            for w, text in (("W", "forward weights W"),
                            ("B", "feedback weights B in W's layout (B = W: perfect alignment)"))]
        activity = index("activity") + [
            Column(f"/activity/{key(pop)}/{v}", f4, "1", text, (self.samples, *shape))
            for pop, shape in self.activity.items()
            for v, text in (("y", "activity y = phi(a) on the first probe examples"),
                            ("delta", "error delta = dL/da under the circuit's rules, same examples"))]
        tables = {"steps": (steps, len(steps) - 6, 0), "probe": (probe, len(probe) - 2, 0),
                  "evaluations": (evaluations, 0, 0), "snapshots": (snapshots, 0, len(snapshots) - 2),
                  "activity": (activity, 0, len(activity) - 2)}
        assert tuple(tables) == TABLES
        return tables


class Table:
    """Datasets that share one row index, /<group>/tick: rows wait in memory and are appended as one block.

    A row is (host values, device values, arrays): Python scalars for the first columns, one device
    vector whose entries fill the next ones (brought to the host once per block), then one array each.
    """

    def __init__(self, file: h5py.File, group: str, columns: Sequence[Column], device_columns: int,
                 array_columns: int, block: int, create: bool) -> None:
        self.index = f"/{group}/tick"
        self.datasets = [c.create(file, self.index) if create else c.open(file) for c in columns]
        self.rows: list[tuple[tuple, Any, tuple]] = []
        self.block = block
        self.n_arrays, self.n_device = array_columns, device_columns
        self.row_bytes = sum(ds.dtype.itemsize * int(np.prod(ds.shape[1:])) for ds in self.datasets)

    def __len__(self) -> int:
        return len(self.datasets[0])

    def append(self, host: tuple, device: Any = None, arrays: tuple = ()) -> None:
        self.rows.append((host, device, arrays))

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.block

    def write(self, to_host: Callable[[Sequence[Any]], np.ndarray]) -> None:
        """Append the waiting rows to every dataset (one resize and one write each); `to_host` stacks the
        rows' device vectors into one host array (rows x values)."""
        if not self.rows:
            return
        hosts, devices, arrays = zip(*self.rows, strict=True)
        columns = [np.asarray(c) for c in zip(*hosts, strict=True)]
        if self.n_device:
            columns += list(to_host(devices).T)
        columns += [np.stack(c) for c in zip(*arrays, strict=True)] if self.n_arrays else []
        start, n = len(self), len(self.rows)
        for ds, values in zip(self.datasets, columns, strict=True):
            ds.resize(start + n, axis=0)
            ds[start:] = values
        self.rows = []


def creation_error(path: Path, e: OSError) -> OSError:
    """What to raise when a file cannot be made in the recording's directory: which directory, and why."""
    directory = path.parent
    if not directory.is_dir():
        return FileNotFoundError(errno.ENOENT, f"cannot create recording {path}: "
                                 f"directory {directory} does not exist", str(directory))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or not os.access(directory, os.W_OK):
        return PermissionError(errno.EACCES, f"cannot create recording {path}: directory {directory} "
                               f"is not writable ({e.strerror or e})", str(directory))
    return OSError(e.errno, f"cannot create recording {path}: {e}")


class RecordingFile:
    """One recording's open file and its tables. `create` makes a new file, `reopen` continues a checkpointed
    one; `write` appends every waiting row (refusing a write the disk has no room for) and flushes."""

    def __init__(self, path: Path, file: h5py.File, contents: Contents, block: int, create: bool) -> None:
        self.path, self.file = path, file
        self.tables = {group: Table(file, group, columns, n_device, n_arrays, block if not n_arrays else 1, create)
                       for group, (columns, n_device, n_arrays) in contents.tables().items()}

    @classmethod
    def create(cls, path: Path, contents: Contents, block: int, describe: Callable[[h5py.File], None]) -> RecordingFile:
        """A new file, never over an existing one, with a new run id; `describe(file)` adds the run's description.

        It is written as `<name>.creating` and renamed to `path` once it holds its description and every
        table and is in SWMR mode: a process killed meanwhile leaves no file at `path`, and no dead end
        (the caller holds the recording's lock, so a partial file left by a killed writer is removed here).
        """
        if path.exists():
            raise FileExistsError(errno.EEXIST, (
                f"{path} already exists and a recording is never overwritten: choose a new path, delete it, "
                f"or resume the run that wrote it from a checkpoint (the trainer restores the recorder's state); "
                f"a run that stopped before its first checkpoint restarts into it from step 0 with Recorder.restart()"),
                str(path))
        partial = path.with_name(path.name + ".creating")
        try:
            partial.unlink(missing_ok=True)
            file = h5py.File(partial, "x", libver=LIBVER)
        except OSError as e:
            raise creation_error(path, e) from e
        try:
            file.attrs.update(layout=LAYOUT, layout_version=LAYOUT_VERSION, run_id=uuid.uuid4().hex, created=now(),
                              description="a mirrorcircuits training run: groups steps, alignment, probe, "
                                          "evaluations, snapshots, activity hold rows indexed by their tick; "
                                          "see docs/recording.md", resumed=as_json([]), finished=False)
            describe(file)
            recording = cls(path, file, contents, block, create=True)
            recording.go_live()
            os.rename(partial, path)
            return recording
        except BaseException:
            file.close()
            partial.unlink(missing_ok=True)
            raise

    @classmethod
    def reopen(cls, path: Path, contents: Contents, block: int, state: Mapping[str, Any],
               projections: Sequence[str]) -> RecordingFile:
        """Continue the file of a checkpointed run (`state`: the recorder's): rows up to the checkpoint, none after.

        A killed SWMR writer leaves the file marked open; it is copied, rows cut to the checkpoint,
        into a fresh file that then replaces it (the original stays until the copy is complete).
        `projections`: the circuit's projection names, which must be the recorded ones.
        """
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"cannot resume recording {path} of run {state['run_id']}: "
                                    f"the file is gone", str(path))
        partial = path.with_name(path.name + ".resuming")
        with open_recording(path) as old:
            if old.attrs.get("run_id") != state["run_id"]:
                raise RecordingError(f"{path} holds run {old.attrs.get('run_id')}, but the checkpoint "
                                     f"resumes run {state['run_id']}")
            recorded = strings(old["circuit/projections"].fields("name")[:])
            if recorded != list(projections):
                raise RecordingError(f"{path} recorded a circuit with projections {recorded}, "
                                     f"not the circuit being resumed")
            partial.unlink(missing_ok=True)
            try:
                with h5py.File(partial, "x", libver=LIBVER) as new:
                    new.attrs.update(old.attrs)
                    for name in old:
                        old.copy(old[name], new, name)
                    for group, (columns, _, _) in contents.tables().items():
                        datasets, rows = [c.open(new) for c in columns], state["rows"][f"/{group}/tick"]
                        held = min(len(ds) for ds in datasets)
                        if held < rows:
                            raise RecordingError(f"{path} holds {held} rows of /{group}, but the checkpoint "
                                                 f"recorded {rows}: the file lost rows it had flushed")
                        for ds in datasets:
                            ds.resize(rows, axis=0)
                    new.attrs["resumed"] = as_json(json.loads(new.attrs["resumed"]) + [{"time": now(),
                                                                                         "tick": state["tick"]}])
                    new.attrs["finished"] = False
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        os.replace(partial, path)
        file = h5py.File(path, "r+", libver=LIBVER)
        try:
            recording = cls(path, file, contents, block, create=False)
            recording.go_live()
            return recording
        except BaseException:
            file.close()
            raise

    def go_live(self) -> None:
        """SWMR mode: from now on readers follow the file as it grows, and a kill leaves every flushed row."""
        self.file.swmr_mode = True
        self.file.flush()

    def close(self, finished: bool) -> None:
        """Close the file; `finished` marks the run finished (the root attribute, written in place as SWMR allows)."""
        try:
            if finished:
                self.file.attrs.modify("finished", True)
        finally:
            self.file.close()

    @property
    def run_id(self) -> str:
        return str(self.file.attrs["run_id"])

    @property
    def full(self) -> bool:
        return any(t.full for t in self.tables.values())

    def rows(self) -> dict[str, int]:
        """Rows written per table index, as a checkpoint keeps them."""
        return {t.index: len(t) for t in self.tables.values()}

    def write(self, to_host: Callable[[Sequence[Any]], np.ndarray]) -> None:
        """Append every waiting row and flush the file: readers see it, a killed run keeps it."""
        tables = self.tables.values()
        rows = sum(len(t.rows) for t in tables)
        need = sum(len(t.rows) * t.row_bytes for t in tables) + HEADROOM
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise OSError(errno.ENOSPC, f"recording {self.path}: the disk is full ({free} bytes free, {need} needed "
                                        f"to write {rows} rows); the file holds every row up to the last flush")
        try:
            for t in tables:
                t.write(to_host)
            self.file.flush()
        except (OSError, RuntimeError) as e:
            m = re.search(r"errno = (\d+)", str(e))
            code = int(m.group(1)) if m else getattr(e, "errno", None) or errno.EIO
            raise OSError(code, (
                f"recording {self.path}: writing {rows} rows failed ({os.strerror(code)}; is the disk full or the "
                f"file size limit reached?); the file holds every row up to the last flush. HDF5 said: {e}")) from e


GROUPS = {"steps": "every `every`-th tick: loss, learning rate, phase, examples, wall time",
          "alignment": "per synaptic projection, rows of /steps: B against W",
          "probe": "every probe_steps learning steps, on a fixed probe batch: the circuit's errors and weight updates "
                   "against backprop's",
          "evaluations": "after each evaluation on held-out data",
          "snapshots": "W and B of chosen projections at chosen learning steps",
          "activity": "activity and error of chosen populations on the first probe examples"}
"""The top-level groups and what they hold."""


def write_circuit(file: h5py.File, name: str, populations: Sequence[tuple], projections: Sequence[tuple],
                  feedback: Sequence[tuple]) -> None:
    """/circuit: one table each of populations (name, shape, activation, input, junction), projections (name, pre, post,
    projection, spec, synaptic, rule, rule_spec, weight_shape) and feedback projections (name, source, target,
    carries, rule, rule_spec, direct, feedback_shape); shapes as JSON lists, "" where there is none."""
    circuit = file.create_group("circuit")
    circuit.attrs.update(name=name, description=(
        "the circuit: forward populations and projections; every population p has a feedback partner δp; "
        "the feedback table lists the feedback projections between them"))
    text = h5py.string_dtype()
    tables = (
        ("populations", populations, [("name", text), ("shape", text), ("activation", text), ("input", bool),
                                      ("junction", text)],
         "forward populations; a junction's inputs combine by its operation (the text), not by their sum"),
        ("projections", projections, [(n, text) for n in ("name", "pre", "post", "projection", "spec")]
         + [("synaptic", bool)] + [(n, text) for n in ("rule", "rule_spec", "weight_shape")],
         "projections pre -> post: kind and settings, feedback rule (short name and settings), W's shape"),
        ("feedback", feedback, [(n, text) for n in ("name", "source", "target", "carries", "rule", "rule_spec")]
         + [("direct", bool), ("feedback_shape", text)],
         "feedback projections source -> target between error populations, as they are: layer-local ones "
         "(named as their forward projection) and direct ones; what they carry (B or a local derivative), their "
         "rule, and B's shape (W's layout for layer-local ones, source x target units or channels for direct)"),
    )
    for table, rows, dtype, description in tables:
        circuit.create_dataset(table, data=np.array(list(rows), dtype=dtype),
                               fletcher32=True).attrs["description"] = description
    for group, description in GROUPS.items():
        file.require_group(group).attrs["description"] = description
