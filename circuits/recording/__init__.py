"""Recording a run to HDF5, and reading it back.

`layout` (the file's layout and its reader; numpy and h5py only) and `file` (writing its rows; h5py only) need
no torch, so `analysis` reads recordings without it; `alignment` (angle(B, W) and the other synaptic metrics),
`recorder` (circuits.Recorder: what a recording measures, tick by tick) and `description` (what begin() writes
about the run and its circuit) run on torch. This package's own import loads the torch-free reader alone.
"""
from .layout import (
                     LAYOUT,
                     LAYOUT_VERSION,
                     METRICS,
                     PHASES,
                     TABLES,
                     RecordingError,
                     WriterLock,
                     cut_short,
                     key,
                     live_read,
                     open_recording,
                     rows_within,
                     strings,
)

__all__ = ["LAYOUT", "LAYOUT_VERSION", "METRICS", "PHASES", "TABLES", "RecordingError", "WriterLock", "cut_short",
           "key", "live_read", "open_recording", "rows_within", "strings"]
