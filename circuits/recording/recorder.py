"""Recording a run to one self-describing HDF5 file: what the circuit learns, step by step.

The trainer calls begin / step / evaluate / close (docs/recording.md has the file's layout, circuits.recording
its constants and reader, circuits.recording.alignment the metrics, circuits.recording.description what begin()
writes about the run). A row holds:

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
of rows (one torch.stack and one .cpu(), no .item() per metric); circuits.recording.file appends the
blocks (SWMR: readers follow the growing file; a killed run keeps every flushed row). A run resumed
from a checkpoint (load_state_dict before begin) continues the same file with no missing or repeated
rows; an existing file is never overwritten; one writer at a time (begin() locks `<path>.lock`).
begin() also checks, before the first step, the probe batch (run once through the circuit and the
loss) and the names of the metrics the trainer will evaluate.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph.network import CircuitNet, Trace, unwrap
from .alignment import _angles, _pair_norms, alignment
from .description import describe
from .file import Contents, RecordingFile, creation_error
from .layout import LAYOUT_VERSION, METRICS, PHASES, TABLES, RecordingError, WriterLock, open_recording

Steps = Union[int, Iterable[int]]
"""When something happens: an int n is every n-th learning step (step % n == 0), else those steps."""

def _is_due(when: int | frozenset[int], step: int) -> bool:
    return step % when == 0 if isinstance(when, int) else step in when


def _steps(name: str, when: Steps) -> int | frozenset[int]:
    if isinstance(when, int) and not isinstance(when, bool):
        if when < 1:
            raise ValueError(f"{name}={when}: an interval must be a positive number of learning steps")
        return when
    steps = list(when) if isinstance(when, Iterable) and not isinstance(when, (str, bytes)) else [when]
    bad = [s for s in steps if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0]
    if bad:
        raise ValueError(f"Recorder {name}={when!r}: give a positive interval (an int: every n-th learning step) "
                         f"or the learning steps themselves (ints from 0), not {bad[0]!r}")
    return frozenset(int(s) for s in steps)


def _to_host(rows) -> np.ndarray:
    """Device vectors of a block of rows, stacked and copied to the host in one transfer."""
    return torch.stack(rows).cpu().numpy()


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
    compiled: compute the alignment metrics with torch.compile (circuits.recording.alignment.alignment(
        compiled=True): two fused passes over B and W instead of a dozen, compiled at the first
        recorded step, summed in float64).
    """

    def __init__(self, path: str | os.PathLike, *, every: int = 1,
                 probe: tuple[Tensor | Mapping[str, Tensor], Tensor] | None = None, probe_steps: Steps = 100,
                 loss: Callable[[Any, Tensor], Tensor] = F.cross_entropy,
                 snapshot: Sequence[str] = (), snapshot_steps: Steps = 1000,
                 activity: Sequence[str] = (), activity_steps: Steps = 1000, activity_samples: int = 8,
                 metrics: Sequence[str] = tuple(METRICS), seeds: Mapping[str, int] | None = None,
                 block: int = 256, flush_seconds: float = 10.0, compiled: bool = False) -> None:
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
        self.compiled = compiled
        self.probe, self.loss = probe, loss
        self.probe_steps = _steps("probe_steps", probe_steps)
        self.snapshot, self.snapshot_steps = list(snapshot), _steps("snapshot_steps", snapshot_steps)
        self.activity, self.activity_steps = list(activity), _steps("activity_steps", activity_steps)
        self.activity_samples = activity_samples
        self._samples = 0           # activity samples per probe: set by _bind from the probe batch
        self.metrics = list(metrics)
        self.seeds = dict(seeds or {})
        self._file: RecordingFile | None = None
        self._resume: dict[str, Any] | None = None
        self._tick = -1
        self._failure: OSError | None = None
        self._last_flush = time.monotonic()
        self._lock = WriterLock(self.path.with_name(self.path.name + ".lock"))

    # --- the trainer's interface -------------------------------------------------------------
    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(finished=exc[0] is None)

    def begin(self, net: torch.nn.Module, config: Mapping[str, Any]) -> None:
        """Create the file (or reopen it on resume), with the circuit, `config`, seeds and versions.

        Checked first, so that a mistake stops the run before its first step: no other writer may hold
        the file; the probe batch must run through the circuit and the loss, and give the activity
        shapes recorded. (The trainer checks its metric names with check_metrics before this.)
        """
        net = unwrap(net)
        if getattr(net, "is_seed_batch", False):
            raise RecordingError(f"a Recorder writes one run to {self.path}; seeds batched write one file per seed: "
                                 f"circuits.recording.seeds.SeedRecorders([Recorder(...) for each seed])")
        if self._file is not None:
            if net is not self._net:
                raise RecordingError(f"recorder of {self.path} is already recording another net")
            return
        try:
            holder = self._lock.acquire()
        except OSError as e:
            raise creation_error(self.path, e) from e
        if holder is not None:
            raise RecordingError(f"{self.path} is being written by another recorder ({holder}); one writer at a "
                                 f"time: wait for that run to end, or stop it")
        try:
            self._bind(net)
            self._try_probe()
            if self._resume is None:
                self._file = RecordingFile.create(self.path, self._contents(), self.block,
                                                  lambda f: describe(f, self, config))
                self._tick = -1
            else:
                self._file = RecordingFile.reopen(self.path, self._contents(), self.block, self._resume,
                                                  [name for name, *_ in self._net.circuit.projections()])
                self._tick = self._resume["tick"]
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
        if self.records(tick):
            loss_value = (loss.detach().reshape(1).float().to(self._device) if loss is not None
                          else torch.full((1,), float("nan"), device=self._device))
            device = torch.cat([loss_value, alignment([s for _, s in self._synapses], self.compiled).flatten()])
            host = (tick, step, PHASES[phase], float(lr), int(examples), time.time())
            self._file.tables["steps"].append(host, device)
        if phase == "learn":
            self._after_learning_step(tick, step)
        if self._file.full or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def records(self, tick: int) -> bool:
        """Whether step(tick) records a row of /steps and /alignment (reading every B and W)."""
        return tick % self.every == 0

    def evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one evaluation (written at once): the metrics named at construction, NaN for any missing."""
        self._check_open()
        self.check_metrics(metrics)
        values = tuple(float(metrics.get(m, float("nan"))) for m in self.metrics)
        self._file.tables["evaluations"].append((self._tick, step) + values)
        self.flush()

    def close(self, finished: bool | None = None) -> None:
        """Write what waits, close the file, give back the lock. A later begin() continues it, like a resume.

        finished: mark the run finished in the file (its root attribute `finished`, which a later begin()
        clears); by default unless an exception is being raised or handled, as when the trainer closes the
        recorder on its way out of an error. A run whose write failed is never marked finished.
        """
        if self._file is None:
            return
        if finished is None:
            finished = sys.exc_info()[0] is None
        try:
            if self._failure is None:
                self.flush()
                self._resume = self._state()
        finally:
            recording, self._file = self._file, None
            try:
                with contextlib.suppress(Exception) if self._failure is not None else contextlib.nullcontext():
                    recording.close(finished and self._failure is None)
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
        try:
            self._file.write(_to_host)
        except OSError as e:
            self._failure = e
            raise
        self._last_flush = time.monotonic()

    def check_metrics(self, names: Iterable[str]) -> None:
        """A RecordingError unless every metric name in `names` was declared (Recorder(metrics=...))."""
        unknown = set(names) - set(self.metrics)
        if unknown:
            raise RecordingError(f"evaluation metrics {sorted(unknown)} were not declared; this recorder "
                                 f"records {self.metrics} (Recorder(metrics=...))")

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._file is None:
            raise RuntimeError(f"recorder of {self.path} is not recording: call begin(net, config) first")

    def _state(self) -> dict[str, Any]:
        return {"layout_version": LAYOUT_VERSION, "run_id": self._file.run_id, "path": str(self.path),
                "tick": self._tick, "rows": self._file.rows()}

    # --- what the circuit holds --------------------------------------------------------------
    def _bind(self, net: CircuitNet) -> None:
        """The net's projections and populations; checks the names the settings choose."""
        self._net = net
        self._device = next(net.parameters()).device
        in_layout = {n for n, s in net.projections() if s.rule is not None and not s.rule.reads_output_error}
        self._synapses = [(n, s) for n, s in net.projections() if n in in_layout]   # a B in W's layout
        self._learning = [(n, s) for n, s in net.projections() if s.weight.requires_grad]
        self._unaligned = [n for n, s in net.projections() if n not in in_layout] + [
            n for n, _ in net.feedback_projections()
        ]
        self._errors = net.error_populations()
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

    def _contents(self) -> Contents:
        return Contents(aligned=[n for n, _ in self._synapses], errors=self._errors,
                        learning=[n for n, _ in self._learning], metrics=self.metrics,
                        snapshots={n: tuple(self._net.projection(n).weight.shape) for n in self.snapshot},
                        activity=self._activity_shapes, samples=self._samples)

    # --- the probe ---------------------------------------------------------------------------
    def _after_learning_step(self, tick: int, step: int) -> None:
        """After a learning step: probe, snapshot, sample activity, as their step settings say."""
        if self.snapshot and _is_due(self.snapshot_steps, step):
            arrays = []
            for name in self.snapshot:
                synapse = self._net.projection(name)
                arrays += [t.detach().float().cpu().numpy() for t in (synapse.weight, synapse.feedback)]
            self._file.tables["snapshots"].append((tick, step), None, tuple(arrays))
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
                self._file.tables["activity"].append((tick, step), None, arrays)
            if probing:
                with self._net.backprop_reference():
                    _, bp_errors, bp_updates, _ = self._errors_and_updates()
                pairs = list(zip(errors, bp_errors, strict=True)) + list(zip(updates, bp_updates, strict=True))
                norms = _pair_norms(pairs, self._device)
                device = torch.cat([loss.reshape(1).float(), _angles(norms).flatten()])
                self._file.tables["probe"].append((tick, step), device)

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
