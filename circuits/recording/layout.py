"""The recording file: its layout, and reading it. Needs numpy and h5py, not torch.

One HDF5 file per run (circuits.recording.recorder.Recorder writes it; docs/recording.md has the full layout).
Every row dataset is chunked and resizable along its first axis, indexed by the tick (one learning step
or one mirror batch), and carries `units`, `description` and `index` attributes. The root holds
`layout` = LAYOUT and `layout_version` = LAYOUT_VERSION; readers refuse other layouts and newer versions.

A file cut short (its writer killed mid-write, or a write the system refused) is read up to its last
row that lies wholly in the file; HDF5's metadata read retries are bounded (READ_ATTEMPTS), so a part
past the end gives a RecordingError within about a second instead of a reader waiting for hours. One
process writes a recording at a time (WriterLock on `<path>.lock`).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import h5py

LAYOUT = "mirrorcircuits recording"
"""The root attribute `layout` of every recording."""
LAYOUT_VERSION = 1
"""The root attribute `layout_version`; readers refuse newer versions."""
LIBVER = ("v110", "v110")
"""HDF5 file format bounds: 1.10 objects, the oldest that SWMR allows, so HDF5 >= 1.10 tools read the file."""
PHASES = {"learn": 0, "mirror": 1}
"""The enum stored in /steps/phase."""
TABLES = ("steps", "probe", "evaluations", "snapshots", "activity")
"""The tables (groups with their own /<group>/tick index)."""
REQUIRED = ("circuit/populations", "circuit/projections", "circuit/feedback", *TABLES)
"""What open_recording checks that a recording holds: the circuit's tables and a group per table."""
READ_ATTEMPTS = 30
"""Metadata read attempts of a SWMR reader: HDF5 retries a read whose checksum fails (a writer may be
mid-write) with doubling waits, by default 100 times, which is hours on a file cut short; 30 is about 1 s."""
METRICS = {"loss": "mean loss on the held-out data",
           "top1": "top-1 accuracy on the held-out data (fraction of examples correct)",
           "top5": "top-5 accuracy on the held-out data (fraction of examples correct)"}


class RecordingError(ValueError):
    """A recording that does not fit: a foreign or newer file, another run's file, a mismatched circuit."""


def key(name: str) -> str:
    """A population or projection name as an HDF5 link name ('/' separates groups)."""
    return name.replace("%", "%25").replace("/", "%2F")


def strings(values: Iterable[bytes | str]) -> list[str]:
    """HDF5 variable-length strings (read as bytes) as Python strings."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class WriterLock:
    """An exclusive advisory lock (flock) on the file `path`, for one writer process at a time.

    acquire() returns None once held, or says who holds it; release() removes the file and gives the
    lock back. The system drops the lock of a killed process, so a stale file never blocks anyone.
    The lock file is opened without following a symbolic link (O_NOFOLLOW): a link planted in a shared
    folder is a RecordingError, so the holder's description never overwrites the file it points to.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (at once, never waiting): None when held now, else the holder's description."""
        if self._fd is not None:
            return None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise RecordingError(f"lock file {self.path} is a symbolic link; a lock never follows one, so "
                                         f"that it cannot overwrite another file: remove the link") from e
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                return holder or f"a process holding {self.path}"
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)     # its holder released and removed it meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {platform.node()}: {' '.join(sys.argv)}"[:4000].encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _superblock(path: Path) -> tuple[bool, int | None]:
    """(whether a writer has the file open or died with it open, the end-of-file address it records),
    from a version 2 or 3 superblock at offset 0: version at byte 8, size of offsets at 9, consistency
    flags at 11, then the base, superblock-extension and end-of-file addresses. (False, None) otherwise."""
    with open(path, "rb") as f:
        head = f.read(12 + 3 * 8)
    if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] < 2:
        return False, None
    size = head[9]
    if len(head) < 12 + 3 * size:
        return head[11] != 0, None
    base, _, eof = (int.from_bytes(head[12 + i * size:12 + (i + 1) * size], "little") for i in range(3))
    return head[11] != 0, base + eof


def cut_short(path: str | os.PathLike) -> tuple[int, int] | None:
    """(bytes in the file, bytes its HDF5 superblock says it has) of a file cut short: a writer killed
    mid-write, a write the system refused, a partial copy. None for a whole file."""
    _, eof = _superblock(Path(path))
    size = os.path.getsize(path)
    return (size, eof) if eof is not None and size < eof else None


def rows_within(ds: h5py.Dataset, end: int | None) -> int:
    """Rows of `ds` whose chunks lie wholly before byte `end` of the file (all rows when end is None).

    HDF5 reads bytes past the end of a file as zeros: rows of a file cut short are cut here instead.
    """
    rows = len(ds)
    if end is None or rows == 0:
        return rows
    per_chunk = ds.chunks[0]
    for first in range((rows - 1) // per_chunk * per_chunk, -1, -per_chunk):
        info = ds.id.get_chunk_info_by_coord((first,) + (0,) * (ds.ndim - 1))
        if info.byte_offset is not None and info.byte_offset + info.size <= end:
            return min(rows, first + per_chunk)
    return 0


T = TypeVar("T")


def live_read(read: Callable[[], T], seconds: float = 1.0) -> T:
    """read(), again after a short wait while it fails with an OSError, for at most about `seconds`.

    A reader of a file still being written (SWMR) can meet a chunk that its writer is rewriting in place: the chunk's
    fletcher32 checksum then fails ("filter returned failure during read"), and the writer's next write makes it
    whole. `read` should refresh what it reads (h5py's Dataset.refresh). A chunk that stays torn (its writer was
    killed mid-write) raises the last OSError once the time is up."""
    deadline, wait = time.monotonic() + seconds, 0.001
    while True:
        try:
            return read()
        except OSError:
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(2 * wait, 0.1)


@functools.cache
def _read_attempts_setter() -> Callable[[int, int], int] | None:
    """HDF5's H5Pset_metadata_read_attempts from the library h5py uses (h5py does not wrap it), or None."""
    try:
        function = ctypes.CDLL(h5py.h5.__file__).H5Pset_metadata_read_attempts
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = (ctypes.c_int64, ctypes.c_uint), ctypes.c_int
    return function


def _open_swmr(path: Path) -> h5py.File:
    """A SWMR read of `path` whose metadata reads give up after READ_ATTEMPTS (about 1 s of retries)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    setter = _read_attempts_setter()
    if setter is not None and setter(fapl.id, READ_ATTEMPTS) < 0:
        raise RecordingError(f"HDF5 refused {READ_ATTEMPTS} metadata read attempts for {path}")
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl))


def open_recording(path: str | os.PathLike, lock_timeout: float = 10.0) -> h5py.File:
    """Open a recording read-only (also while it is written, or after its writer was killed or a write failed).

    A writer locks the file while it opens it, until its SWMR mode starts; this waits up to
    `lock_timeout` seconds for that. A RecordingError says what is wrong with a file that is not a
    recording of this layout, or cannot be read. A file cut short (see cut_short) opens as a SWMR
    reader would, which needs no end-of-file check; read its rows with rows_within (analysis.Run does).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"no recording at {path}", str(path))
    if not h5py.is_hdf5(path):
        raise RecordingError(f"{path} is not an HDF5 file, so not a mirrorcircuits recording")
    left_open, _ = _superblock(path)
    short = cut_short(path)
    if short is not None and _read_attempts_setter() is None:
        raise RecordingError(f"{path} is cut short ({short[0]} of {short[1]} bytes) and this h5py build does not "
                             f"let its read retries be bounded: reading it could wait for hours")
    deadline = time.monotonic() + lock_timeout
    while True:
        try:
            if left_open or short:  # being written, its writer died, or cut short: a SWMR reader sees every flushed row
                f = _open_swmr(path)
            else:                    # closed: HDF5 checks that it is whole (a SWMR reader would not, and wait forever)
                f = h5py.File(path, "r")
            break
        except BlockingIOError as e:   # a writer holds the lock while it opens the file, until SWMR mode starts
            if time.monotonic() > deadline:
                raise RecordingError(f"{path} stayed locked by its writer for {lock_timeout} s: {e}") from e
            time.sleep(0.05)
        except OSError as e:
            if not left_open and _superblock(path)[0]:   # a writer opened it since the check (a resume): read as SWMR
                left_open = True
                continue
            raise RecordingError(f"{path} cannot be opened; it is truncated or damaged: {e}") from e
    try:
        layout, version = f.attrs.get("layout"), f.attrs.get("layout_version")
    except (OSError, RuntimeError, KeyError) as e:     # h5py raises KeyError for a root it cannot read
        f.close()
        raise RecordingError(f"{path} cannot be opened; it is truncated or damaged: {e}") from e
    if layout != LAYOUT and short:
        f.close()
        raise RecordingError(f"{path} cannot be opened; it is truncated or damaged: cut short at {short[0]} of "
                             f"{short[1]} bytes, its description (root attributes) is not in it")
    if layout != LAYOUT:
        f.close()
        raise RecordingError(f"{path} is an HDF5 file but not a mirrorcircuits recording (its root has no "
                             f"attribute layout = {LAYOUT!r})")
    if version is None or int(version) > LAYOUT_VERSION:
        f.close()
        raise RecordingError(f"{path} has recording layout version {version}, newer than the version "
                             f"{LAYOUT_VERSION} this mirrorcircuits reads: upgrade mirrorcircuits")
    try:
        missing = [f"/{name}" for name in REQUIRED if name not in f]
    except (OSError, RuntimeError, KeyError) as e:
        f.close()
        raise RecordingError(f"{path} cannot be opened; it is truncated or damaged: {e}") from e
    if missing:
        f.close()
        raise RecordingError(f"{path} has the attributes of a recording but not its {', '.join(missing)}: it is "
                             f"damaged, or was not written by circuits.Recorder")
    return f
