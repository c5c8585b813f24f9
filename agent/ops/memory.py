"""Hand freed heap back to the kernel.

glibc keeps memory freed by a program in its heap for reuse; only the top of the heap is given
back on its own. Start-up (config validation, imports) and each burst of work (a checkpoint's
lists, a replay batch) leave free holes that stay counted in the RSS. `malloc_trim(0)` returns
the free pages; it takes a millisecond or two on a small heap, so it runs once at start-up and
then once a minute. Without glibc (musl, other systems) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_EVERY_S = 60.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def trim() -> bool:
    """Return free heap pages to the kernel; False where that is not available."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
