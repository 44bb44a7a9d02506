"""Mirror batches beside learning: a mirror batch may run while the next learning step's forward pass does.

A mirror batch reads W and writes B; a learning step's forward reads W and never a stored B (FeedbackPathway
first reads B, and casts it, in backward), and its optimizer step writes W after the backward. So the only
order a mirror batch needs is "before the next read of B": the next backward, a recorded row of alignment, a
check or a checkpoint of the parameters. Serially (the default) a mirror batch is done before anything else
starts.

MirrorStream(device, beside=True) keeps that order and no more:

    launch(batch)   on CUDA, run `batch` on a side stream (after the work queued so far on the current one);
                    elsewhere, hold it until join()
    join()          before B is read: the current stream waits for the side stream (on the device: the host
                    runs on); elsewhere, run the batches held, in their order

On CUDA the side stream's kernels can fill the GPU beside the forward pass's, and the noise is drawn in launch
order (the CUDA generator's offsets advance on the host): the serial run's numbers, up to the run-to-run
differences of nondeterministic kernels. On a CPU nothing overlaps; held batches do the serial run's work in
the order of reads and writes a side stream gives, which tests compare with the serial order. They draw their
noise when they run, so a learning step that draws random numbers too (dropout, brsf's magnitudes) interleaves
them differently from the serial run: as valid a run, not the same numbers. MirrorStream(device, beside=False)
runs each batch at launch.

Only a rule whose B the forward pass does not read can run beside learning: the weight mirror itself, not
Imperfect(wm, ...) with a mask or Dale's signs, whose B * mask is computed in the forward (check_beside).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import CircuitError
from ..rules.synapse import Synapse


class MirrorStream:
    """Runs mirror batches on `device`, beside learning or not: launch() one, join() before anything reads B."""

    def __init__(self, device: torch.device, beside: bool = True) -> None:
        self.device, self.beside = device, beside
        self.stream = torch.cuda.Stream(device) if beside and device.type == "cuda" else None
        self._held: list[Callable[[], None]] = []
        self._done: torch.cuda.Event | None = None

    def launch(self, batch: Callable[[], None]) -> None:
        """Start one mirror batch (a call that changes B), after everything queued so far."""
        if not self.beside:
            batch()
        elif self.stream is None:
            self._held.append(batch)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                batch()
            self._done = self.stream.record_event()

    def join(self) -> None:
        """Make every mirror batch launched so far precede whatever is queued next (call it before B is read)."""
        held, self._held = self._held, []
        for batch in held:
            batch()
        if self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._done = None


def check_beside(mirrored: Sequence[tuple[str, Synapse]]) -> None:
    """A CircuitError naming each mirrored projection whose forward pass reads its stored B (it cannot run beside)."""
    reading = [f"{name} ({s.rule!r})" for name, s in mirrored if s.rule.feedback(s) is not getattr(s, "B", None)]
    if reading:
        raise CircuitError(f"mirror batches cannot run beside learning here: the forward pass reads B of "
                           f"{', '.join(reading)} (its B is computed from the stored one); run them serially "
                           f"(mirror_beside_learning=False)")
