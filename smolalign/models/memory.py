"""Keep freed tensor memory inside the process on Linux CPUs.

PyTorch's CPU tensors come from malloc. glibc hands blocks above its mmap threshold (128 KB, rising to
at most 32 MB: weight gradients, the 49k x 576 embedding gradient) straight back to the kernel when they
are freed, and trims the top of its heap, so the next step touches fresh pages again: on SmolLM2-135M,
hundreds of thousands of page faults and seconds of system time per training step on a 2-core CPU. Raising
both thresholds keeps that memory in the heap for reuse; the peak RSS stays that of the largest step.

`freed_memory_kept` scopes it to smolalign's own work: the thresholds go back to glibc's defaults (128 KiB;
glibc's dynamic growth of the mmap threshold does not come back) when the work returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
from collections.abc import Iterator

import torch

log = logging.getLogger("smolalign")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BELOW_BYTES = 1 << 30  # blocks up to 1 GB come from the heap, whose top is never given back
GLIBC_DEFAULT_BYTES = 128 * 1024  # both thresholds' defaults (mallopt(3))


def keep_freed_memory(device: torch.device | str) -> bool:
    """Ask glibc to reuse freed blocks instead of returning them to the kernel, for work on `device`; False
    where it does not apply (a GPU's tensors do not come from malloc; other C libraries)."""
    libc = _glibc(device)
    kept = libc is not None and _set_thresholds(libc, mmap=KEEP_BELOW_BYTES, trim=2**31 - 1)
    if libc is not None and not kept:
        log.debug("glibc refused the malloc thresholds; freed memory goes back to the kernel")
    return kept


@contextlib.contextmanager
def freed_memory_kept(device: torch.device | str) -> Iterator[bool]:
    """`keep_freed_memory` for the block, then glibc's default thresholds again (an API call leaves the
    notebook's process as it found it, but for glibc's dynamic mmap threshold)."""
    kept = keep_freed_memory(device)
    try:
        yield kept
    finally:
        if kept:
            _set_thresholds(_glibc(device), mmap=GLIBC_DEFAULT_BYTES, trim=GLIBC_DEFAULT_BYTES)


def _glibc(device: torch.device | str):
    if torch.device(device).type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _set_thresholds(libc, *, mmap: int, trim: int) -> bool:
    return libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
