"""A read-only view of one recording (the HDF5 file circuits.Recorder writes), finished or still growing.

Every table of the file becomes a `Series`: its tick and step index and named numpy columns of equal
length. Each access reads the file anew, so a live run's view grows as its writer flushes.

    run = open_run("runs/kp.h5")
    run.alignment["fc1"]["angle"]        # angle(B, W) of projection fc1, degrees, one value a row
    run.alignment["fc1"].step            # the learning step of each row
    run.evaluations["top1"]              # held-out top-1 accuracy after each evaluation
    run.circuit                          # networkx graph: populations, their feedback partners, projections
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import h5py
import networkx as nx
import numpy as np

from circuits.graph import schema
from circuits.recording import (
    PHASES,
    TABLES,
    RecordingError,
    cut_short,
    live_read,
    open_recording,
    rows_within,
    strings,
)


@dataclass(frozen=True)
class Series:
    """Rows of one recorded table: `tick` and `step` index them; `columns` by name, one entry a row.

    series["loss"] is a column; series[:3], series[-10:], series[series.step > 100] (a slice, an index array or a
    boolean mask) are the Series of those rows.
    """

    tick: np.ndarray
    step: np.ndarray
    columns: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str | slice | np.ndarray) -> Any:
        if isinstance(key, str):
            try:
                return self.columns[key]
            except KeyError:
                raise KeyError(f"no column {key!r}; columns: {list(self.columns)}") from None
        if not isinstance(key, (slice, np.ndarray, list)):
            raise TypeError(f"a Series takes a column name, a slice, an index array or a boolean mask, got "
                            f"{type(key).__name__} {key!r} (one row: series[i:i + 1])")
        return Series(self.tick[key], self.step[key], {name: values[key] for name, values in self.columns.items()})

    def __len__(self) -> int:
        return len(self.tick)


class Run:
    """One recording, opened read-only. Use as a context manager, or close() it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = open_recording(self.path)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, circuit {self.file.attrs['circuit']!r}, rule {self.rule!r}, "
                f"{len(self.steps)} rows)")

    # --- what the run was --------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return self.path.stem

    def _json(self, attribute: str) -> Any:
        if attribute not in self.file.attrs:
            raise RecordingError(f"{self.path} has no root attribute {attribute!r}; the file is damaged")
        return json.loads(self.file.attrs[attribute])

    @property
    def finished(self) -> bool | None:
        """Whether its writer closed it normally (the root attribute `finished`): False while it is written,
        after a kill, or after an error ended the run; None for a file recorded before runs were marked."""
        value = self.file.attrs.get("finished")
        return None if value is None else bool(value)

    def rows_cut(self) -> dict[str, tuple[int, int | None]]:
        """Per table that lost rows because the file is cut short (see cut_short): (rows read, rows recorded),
        over all its datasets (/alignment: its projections'); (0, None) for a table whose own description
        lies past the end; {} for a whole file."""
        short = cut_short(self.path)
        if short is None:
            return {}
        out: dict[str, tuple[int, int | None]] = {}
        for group in TABLES[:1] + ("alignment",) + TABLES[1:]:
            datasets: list[h5py.Dataset] = []
            try:
                self.file[group].visititems(lambda _, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
                read = min((rows_within(ds, short[0]) for ds in datasets), default=0)
                recorded = max((len(ds) for ds in datasets), default=0)
            except (OSError, RuntimeError, KeyError):     # h5py raises these for metadata past the end
                read, recorded = 0, None
            if recorded is None or read < recorded:
                out[group] = (read, recorded)
        return out

    @property
    def config(self) -> dict[str, Any]:
        """The configuration the trainer recorded (JSON; objects as their repr)."""
        return self._json("config")

    @property
    def seeds(self) -> dict[str, int]:
        return self._json("seeds")

    @property
    def versions(self) -> dict[str, str]:
        return self._json("versions")

    @property
    def settings(self) -> dict[str, Any]:
        """The recorder's settings (every, probe_steps, ...)."""
        return self._json("recorder")

    @property
    def circuit(self) -> nx.DiGraph:
        """The circuit as circuits.Circuit.graph draws it: forward populations (pathway "forward") with
        shape, activation and input; a feedback partner "δp" for each (pathway "feedback"); forward edges
        pre -> post; feedback edges between error populations as recorded, carrying "B" (synaptic, or a
        direct feedback projection, `direct` True) or "local derivative"."""
        table = self.file["circuit/populations"]
        graph = nx.DiGraph(name=str(self.file["circuit"].attrs["name"]))
        junctions = _column(table, "junction") if "junction" in table.dtype.names else [""] * len(table)
        for name, shape, activation, is_input, junction in zip(
            *(_column(table, f) for f in ("name", "shape", "activation", "input")), junctions, strict=True
        ):
            schema.add_population(graph, name, shape=tuple(json.loads(shape)), activation=activation,
                                  input=bool(is_input), **({"junction": junction} if junction else {}))
        table = self.file["circuit/projections"]
        forward = {}
        for name, pre, post, kind, spec, synaptic, rule, rule_spec, weight in zip(
            *(_column(table, f) for f in table.dtype.names), strict=True
        ):
            edge = dict(name=name, projection=kind, spec=spec, synaptic=bool(synaptic), rule=rule or None,
                        rule_spec=rule_spec or None, weight_shape=tuple(json.loads(weight)) if weight else None)
            schema.add_projection(graph, pre, post, **edge)
            forward[name] = edge
        table = self.file["circuit/feedback"]
        for name, source, target, carries, rule, rule_spec, direct, shape in zip(
            *(_column(table, f) for f in table.dtype.names), strict=True
        ):
            edge = dict(forward.get(name, dict(name=name, synaptic=True, weight_shape=None)), rule=rule or None,
                        rule_spec=rule_spec or None, feedback_shape=tuple(json.loads(shape)) if shape else None)
            schema.add_feedback(graph, source, target, carries=carries, direct=bool(direct), **edge)
        return graph

    @property
    def projections(self) -> list[str]:
        """Synaptic projections, in the circuit's order."""
        table = self.file["circuit/projections"]
        return [n for n, s in zip(_column(table, "name"), _column(table, "synaptic"), strict=True) if s]

    @property
    def rules(self) -> dict[str, str]:
        """The feedback rule (short name) of every feedback projection through a B (layer-local ones
        under their forward projection's name, then direct ones)."""
        table = self.file["circuit/feedback"]
        rows = zip(*(_column(table, f) for f in ("name", "rule", "carries", "direct")), strict=True)
        named = sorted(rows, key=lambda row: row[3])      # layer-local first, each group in file order
        return {n: r for n, r, carries, _ in named if carries == "B"}

    @property
    def rule(self) -> str:
        """The run's rule: one short name, or several joined by '+' (in the circuit's order)."""
        return "+".join(dict.fromkeys(self.rules.values()))

    @property
    def depth(self) -> dict[str, int]:
        """Per synaptic projection: how many synaptic projections the longest path from an input to it
        crosses, itself included (1 for the first layer)."""
        graph = self.circuit
        forward = schema.pathway(graph, schema.FORWARD)
        before: dict[str, int] = {}
        for pop in nx.topological_sort(forward):
            before[pop] = max(
                (before[u] + forward.edges[u, pop]["synaptic"] for u in forward.predecessors(pop)), default=0
            )
        return {d["name"]: before[u] + 1 for u, _, d in forward.edges(data=True) if d["synaptic"]}

    # --- what the run recorded ---------------------------------------------------------------
    def _series(self, group: str, columns: Mapping[str, str]) -> Series:
        """The table indexed by /group/tick, with `columns` (name -> dataset path), cut to the rows all hold
        (in a file cut short, the rows that lie wholly in it)."""
        short = cut_short(self.path)
        try:
            datasets = {
                name: self.file[path]
                for name, path in {"tick": f"{group}/tick", "step": f"{group}/step", **columns}.items()
            }

            def read() -> dict[str, np.ndarray]:
                if self.file.swmr_mode:
                    for ds in datasets.values():
                        ds.refresh()
                rows = min(rows_within(ds, short[0] if short else None) for ds in datasets.values())
                return {name: ds[:rows] for name, ds in datasets.items()}
            values = live_read(read) if self.file.swmr_mode else read()     # a live file: a chunk may be mid-write
        except (OSError, RuntimeError, KeyError) as e:    # h5py raises these for a failed HDF5 read
            why = (f"the file is cut short ({short[0]} of {short[1]} bytes: its writer was killed mid-write, or a "
                   f"write failed) and this table lies past its end" if short else "it is damaged")
            raise RecordingError(f"{self.path}: table /{group} cannot be read; {why} (HDF5: {e})") from e
        return Series(values.pop("tick"), values.pop("step"), values)

    def _by_name(self, group: str, index: str, attribute: str) -> dict[str, Series]:
        """One Series per subgroup of `group` (a projection or population, named by its attribute)."""
        out = {}
        if group not in self.file:
            raise RecordingError(f"{self.path}: group /{group} is missing; the file is damaged")
        for sub in self.file[group].values():
            if isinstance(sub, h5py.Group):
                out[str(sub.attrs[attribute])] = self._series(index, {k: sub[k].name for k in sub})
        return out

    @property
    def steps(self) -> Series:
        """Per recorded tick: loss (NaN for mirror batches), lr, phase ("learn"/"mirror"), examples, wall_time (s)."""
        s = self._series("steps", {k: f"steps/{k}" for k in ("loss", "lr", "phase", "examples", "wall_time")})
        names = np.empty(max(PHASES.values()) + 1, dtype=object)
        names[list(PHASES.values())] = list(PHASES)
        phase = names[s["phase"].astype(np.intp)]
        return Series(s.tick, s.step, {**s.columns, "phase": phase})

    @property
    def alignment(self) -> dict[str, Series]:
        """Per synaptic projection, rows of `steps`: angle (degrees), norm_ratio, sign_match."""
        return self._by_name("alignment", "steps", "projection")

    @property
    def errors(self) -> dict[str, Series]:
        """Per population, on the probe batch: angle (degrees) and norm_ratio of its error against backprop's."""
        return self._by_name("probe/errors", "probe", "population")

    @property
    def updates(self) -> dict[str, Series]:
        """Per learning projection, on the probe batch: angle (degrees) and norm_ratio of dW against backprop's."""
        return self._by_name("probe/updates", "probe", "projection")

    @property
    def probe(self) -> Series:
        """The probe batch's loss at each probe."""
        return self._series("probe", {"loss": "probe/loss"})

    @property
    def evaluations(self) -> Series:
        """Per evaluation: the trainer's metrics (loss, top1 and top5 accuracy as fractions)."""
        group = self.file["evaluations"]
        return self._series("evaluations", {k: f"evaluations/{k}" for k in group if k not in ("tick", "step")})

    @property
    def snapshots(self) -> dict[str, Series]:
        """Per chosen projection: W and B at the chosen steps (read whole into memory)."""
        return self._by_name("snapshots", "snapshots", "projection")

    @property
    def activity(self) -> dict[str, Series]:
        """Per chosen population: y and delta on the first probe examples at the chosen steps."""
        return self._by_name("activity", "activity", "population")


def _column(table: h5py.Dataset, field_name: str) -> list:
    values = table.fields(field_name)[:]
    return strings(values) if values.dtype.kind in "OS" else list(values)


def open_run(path: str | os.PathLike) -> Run:
    """A read-only view of the recording at `path`; circuits.recording.recorder.RecordingError if it is not one
    (not HDF5, another layout, a newer layout version, truncated)."""
    return Run(path)
