"""File locks: one run owns its output_dir at a time; writers of a shared cache file take turns.

Both use `flock`, which the kernel releases when the holding process ends, however it ends (even
SIGKILL): a lock left by a dead run never blocks the next one. The run lock file also records the
holder's pid, so a refused run can name the one that is running, and a run that takes over from a
crashed one can say so. (Where `fcntl` does not exist, on Windows, nothing is locked.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from smolalign.errors import UserError
from smolalign.run_folder import RunFolder

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("smolalign")



@contextlib.contextmanager
def exclusive_file_lock(path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on `path` (created if missing) for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_folder_lock(output_dir: Path) -> Iterator[None]:
    """Own `output_dir` for the `with` block, or fail at once (UserError) naming the run that owns it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = RunFolder(output_dir).lock_file
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "unknown"
                raise UserError(
                    f"'{output_dir}' is in use by another smolalign run (process {holder}); wait for it to "
                    "finish, stop it, or choose another output_dir."
                ) from None
        previous = handle.read().strip()
        if previous and previous != str(os.getpid()):
            log.warning("taking over %s from process %s, which is no longer running", path, previous)
        _rewrite(handle, str(os.getpid()))
        try:
            yield
        finally:
            _rewrite(handle, "")  # a clean end leaves no holder behind; the file stays (see below)
    finally:
        # The file is never deleted: a process that opened it just before a deletion would lock an orphaned
        # inode while a third process locks a new file of the same name, and both would own the folder.
        handle.close()


def _rewrite(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()
