"""glibc malloc settings that keep a training step's large temporaries in the process (every command, first).

Why: with glibc's defaults a block of 32 MiB or more (the dynamic mmap threshold's ceiling on 64-bit) is
mmap()ed when allocated and munmap()ed when freed, so every step of a full-size UNet on a CPU maps fresh
zero-filled pages for its large temporaries (oneDNN's reordered convolution weights, attention scores,
activations) and faults each page in again: about 19 million minor page faults and 30-39 s of kernel time in
a 20-step, 55-75 s SD 1.5 run (issue 29; docs/cpu-speed.md). Serving those blocks from the heap instead, and
not trimming the freed top of the heap back to the kernel after every step, lets the next step reuse pages
that are already mapped. PyTorch's CPU performance tuning guide recommends the same (an allocator that keeps
freed memory; https://pytorch.org/tutorials/recipes/recipes/tuning_guide.html). Only where memory comes
from changes, never the arithmetic: results are bit-identical (tests/test_allocator.py).

The settings are mallopt(3) calls, applied by `tune_allocator()`, which console.run_command calls before a
command does anything else (so train_dreambooth.py, app.py and every `python -m moslora_diffusion.*` command
get it) and tests/conftest.py calls for the test suite. Library code never calls it: a program that imports
the package keeps its own allocator settings. MOSLORA_MALLOC=default leaves glibc's defaults (what every
command did before; the fresh-process benchmark's `today` variants). Where the C library is not glibc
(macOS, musl, Windows) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV = "MOSLORA_MALLOC"
# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MIB = 1 << 20
# Blocks below 1 GiB come from the heap (mallopt takes an int; glibc accepts up to its heap limit). Larger ones
# (whole weight tensors of a big model) are still mapped on their own and given back when freed.
MMAP_THRESHOLD = 1024 * MIB
# Free memory at the top of the heap is given back to the kernel only above 2 GiB - 1: a step's temporaries
# stay mapped for the next step; a process shrinks after a peak only by what exceeds this.
TRIM_THRESHOLD = 2**31 - 1
# Grow the heap 64 MiB at a time (fewer brk() calls while a model loads).
TOP_PAD = 64 * MIB
NAMES = {M_MMAP_THRESHOLD: "mmap_threshold", M_TRIM_THRESHOLD: "trim_threshold", M_TOP_PAD: "top_pad"}
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))

_applied: dict[str, int] | None = None


def _glibc():
    """The process's C library when it is glibc, else None (musl, macOS, Windows have no mallopt of these)."""
    if platform.system() != "Linux":
        return None
    name, _version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def tune_allocator(libc=None) -> dict[str, int]:
    """Applies SETTINGS with mallopt(3) once per process; returns what was applied ({} when nothing was).

    Nothing is done (and {} returned) with MOSLORA_MALLOC=default, or where the C library is not glibc.
    `libc` is for tests (an object with a `mallopt(param, value) -> int` method). Never raises: an allocator
    setting glibc refuses is left at its default.
    """
    global _applied
    if libc is None and _applied is not None:
        return dict(_applied)
    applied: dict[str, int] = {}
    target = libc if libc is not None else _glibc()
    if target is not None and os.environ.get(ENV, "").strip().lower() != "default":
        for param, value in SETTINGS:
            if target.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
                applied[NAMES[param]] = value
    if libc is None:
        _applied = applied
    return dict(applied)
