"""Process-level settings that make CPU inference fast; called explicitly by the CLI and benchmarks.

glibc returns every large freed block (here: feature maps of tens of MB) to the OS and page-faults it back
in on the next allocation. On this machine that doubled the time of an IMDN x2 forward pass on a 512x384
input (6.5 s -> 2.7 s with the thresholds raised; system time 9.1 s -> 1.6 s). Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse.

The price is fragmentation across inputs of different sizes: evaluating CARN-M x2 on Urban100 grew the
resident set to 7 GB after 15 images (13 GB later, until the OOM killer stopped it). `release_memory()`
(malloc_trim) between images hands the free heap back, so the speed stays and memory stays bounded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False
_libc: ctypes.CDLL | None = None


def tune_allocator() -> bool:
    """Keep large freed blocks in the process heap (glibc only); returns whether the setting took effect."""
    global _tuned, _libc
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False
    _libc = libc if _tuned else None
    return _tuned


def release_memory() -> None:
    """Return free heap memory to the OS (between images); a no-op unless `tune_allocator` took effect."""
    if _libc is not None:
        _libc.malloc_trim(0)


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for records of where numbers were measured."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
