"""What a recording says about its run before its first row: the description that begin() writes once.

The root attributes hold the circuit's name, the trainer's config, the seeds, the library versions and the
recorder's own settings (its cadences, probe batch size, loss and block); /circuit holds the circuit itself
(its populations, projections and feedback, circuits.recording.file.write_circuit); and each group of a
recorded projection or population names what it records (projection, pre, post and rule, or population), with
/alignment's attribute `undefined` listing the projections whose angle(B, W) is not defined.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import h5py
import torch

from ..graph.network import CircuitNet
from ..rules.synapse import Synapse
from .file import as_json, versions, write_circuit
from .layout import key

if TYPE_CHECKING:
    from .recorder import Recorder


def describe(f: h5py.File, recorder: Recorder, config: Mapping[str, Any]) -> None:
    """Root attributes and /circuit of `recorder`'s new file: with what, and the circuit itself."""
    net, circuit = recorder._net, recorder._net.circuit
    seeds = {"torch_initial_seed": torch.initial_seed(), **recorder.seeds}
    settings = {"every": recorder.every, "probe_steps": _listed(recorder.probe_steps), "snapshot": recorder.snapshot,
                "snapshot_steps": _listed(recorder.snapshot_steps), "activity": recorder.activity,
                "activity_steps": _listed(recorder.activity_steps), "activity_samples": recorder.activity_samples,
                "probe_batch": len(recorder._probe_target) if recorder.probe is not None else 0,
                "loss": getattr(recorder.loss, "__name__", repr(recorder.loss)), "block": recorder.block}
    f.attrs.update(circuit=circuit.name, config=as_json(config), seeds=as_json(seeds),
                   versions=as_json(versions(torch=torch.__version__, cuda=str(torch.version.cuda))),
                   recorder=as_json(settings))

    def rule_texts(rule: Any) -> tuple[str, str]:
        return (str(rule), repr(rule)) if rule else ("", "")

    def shape(values: Sequence[int]) -> str:
        return json.dumps(list(values))

    populations = [(p.name, shape(p.shape), p.activation, p.is_input,
                    repr(p.junction) if p.junction is not None else "") for p in circuit.populations()]
    projections = [(name, pre, post, type(projection).__name__, repr(projection), projection.synaptic,
                    *rule_texts(rule), shape(module.weight.shape) if isinstance(module, Synapse) else "")
                   for name, pre, post, projection, rule in circuit.projections()
                   for module in [net.projection(name)]]
    feedback = [(d["name"], u, v, d["carries"], *rule_texts(d["rule"]), bool(d["direct"]),
                 shape(net.projection(d["name"]).feedback_shape) if d["carries"] == "B" else "")
                for u, v, d in circuit.feedback_graph().edges(data=True)]
    write_circuit(f, circuit.name, populations, projections, feedback)
    f["alignment"].attrs.update(undefined=json.dumps(recorder._unaligned), undefined_description=(
        "projections whose angle(B, W) is not defined, so not recorded: direct feedback projections, whose B "
        "joins two error populations that no W joins, and synaptic projections with no feedback of their own"))
    for group, names in (("alignment", [n for n, _ in recorder._synapses]),
                         ("probe/updates", [n for n, _ in recorder._learning]), ("snapshots", recorder.snapshot)):
        for name in names:
            pre, post = _edge(net, name)
            f.require_group(f"{group}/{key(name)}").attrs.update(
                projection=name, pre=pre, post=post, rule=repr(net.projection(name).rule))
    for group, names in (("probe/errors", recorder._errors), ("activity", recorder.activity)):
        for name in names:
            f.require_group(f"{group}/{key(name)}").attrs.update(population=name)


def _edge(net: CircuitNet, name: str) -> tuple[str, str]:
    return next((pre, post) for n, pre, post, _, _ in net.circuit.projections() if n == name)


def _listed(when: int | frozenset[int]) -> int | list[int]:
    return when if isinstance(when, int) else sorted(when)
