"""The two exception types a user sees as one sentence instead of a traceback.

`UserError`: anything the user can fix (a missing file, a bad column, an invalid value, an output_dir
in use). The CLI prints the sentence and exits with status 2.

`RunError`: a run that started but cannot go on (non-finite losses in a row, a save that failed
because the disk is full or the folder unwritable). What was saved before stays usable; the CLI prints
the sentence and exits with status 1.

Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input, reported as one clear sentence."""


class RunError(Exception):
    """A run that had to stop, reported as one clear sentence; earlier checkpoints stay usable."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for a UserError."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


@contextlib.contextmanager
def writes_reported(target: Path) -> Iterator[None]:
    """Turn a failed write (disk full, folder unwritable) into a RunError naming the path."""
    try:
        yield
    except OSError as error:
        path = error.filename or target
        raise RunError(f"could not write '{path}': {error.strerror or error}; files written before it, "
                       "checkpoints included, are unchanged.") from None
