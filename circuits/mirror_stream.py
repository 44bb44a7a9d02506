"""Mirror batches beside learning: a mirror batch may run while the next learning step's forward pass does.

A mirror batch reads W and writes B; a learning step's forward reads W (never B: FeedbackPathway first reads B,
and casts it, in backward), and its optimizer step writes W after the backward. So the only order a mirror
batch needs is "before the next read of B": the next backward, a recorded row of alignment, a check or a
checkpoint of the parameters. Serially (the default) a mirror batch is done before anything else starts.

MirrorStream(device) keeps that order and no more:

    launch(batch)   on CUDA, run `batch` on a side stream (after the work queued so far on the current one);
                    elsewhere, hold it until join()
    join()          before B is read: the current stream waits for the side stream (on the device: the host
                    runs on); elsewhere, run the batches held, in their order

On CUDA the side stream's kernels can fill the GPU beside the forward pass's; on a CPU join() runs the held
batches after the forward, the order of reads and writes a side stream gives, which tests can compare with
the serial order. Noise is drawn in launch order either way (the CUDA generator's offsets advance on the host).
"""
from __future__ import annotations

from typing import Callable

import torch


class MirrorStream:
    """Runs mirror batches beside learning on `device`: launch() one, join() before anything reads B."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._held: list[Callable[[], None]] = []
        self._done: torch.cuda.Event | None = None

    def launch(self, batch: Callable[[], None]) -> None:
        """Start one mirror batch (a call that changes B), after everything queued so far."""
        if self.stream is None:
            self._held.append(batch)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            batch()
        self._done = self.stream.record_event()

    def join(self) -> None:
        """Make every mirror batch launched so far precede whatever is queued next (call it before B is read)."""
        if self.stream is None:
            held, self._held = self._held, []
            for batch in held:
                batch()
        elif self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._done = None
