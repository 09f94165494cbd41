"""`keep_freed_memory`: freed tensor memory stays in the heap for reuse, by glibc's own accounting; an API call
gives glibc's defaults back when it returns."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from smolalign.models import memory

HEAP_OF_A_FREED_BLOCK = """
import ctypes, sys, torch
from smolalign.models.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc's malloc statistics (malloc.h), all size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
assert sys.argv[1] == "default" or keep_freed_memory("cpu")
block = torch.ones(16 * 2**20)  # 64 MB: above glibc's largest default mmap threshold (32 MB)
mapped_while_alive = libc.mallinfo2().hblkhd
del block
print(mapped_while_alive, libc.mallinfo2().fordblks)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                    or tuple(map(int, platform.libc_ver()[1].split("."))) < (2, 33), reason="glibc 2.33's mallinfo2")
def test_freed_tensor_memory_stays_in_the_heap_for_reuse():
    """glibc's own accounting, not page-fault counts (those depend on the kernel): by default a 64 MB tensor
    is a separate mapping, unmapped when freed, so the next one faults its pages in again; with the setting
    it comes from the heap and stays there, free for the next chunk."""

    def heap_after(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", HEAP_OF_A_FREED_BLOCK, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        mapped, free_in_heap = map(int, done.stdout.split())
        return mapped, free_in_heap

    block = 16 * 2**20 * 4
    mapped, free_in_heap = heap_after("default")
    assert mapped >= block and free_in_heap < block  # its own mapping, given back to the kernel when freed
    mapped, free_in_heap = heap_after("keep")
    assert mapped < block and free_in_heap >= block  # from the heap, and kept there once freed


def test_a_gpu_run_leaves_malloc_alone(monkeypatch):
    """A GPU's tensors do not come from malloc: for them glibc is not even opened."""

    def no_libc(name):
        raise AssertionError(f"{name} opened for a GPU run")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_memory("cuda") is False
    assert memory.keep_freed_memory(torch.device("cuda", 0)) is False


def test_the_setting_is_given_back_when_the_work_returns(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(memory, "_glibc", lambda device: FakeLibc())
    with memory.freed_memory_kept("cpu") as kept:
        assert kept and calls == [(memory.M_MMAP_THRESHOLD, memory.KEEP_BELOW_BYTES),
                                  (memory.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert calls[2:] == [(memory.M_MMAP_THRESHOLD, 128 * 1024), (memory.M_TRIM_THRESHOLD, 128 * 1024)]
