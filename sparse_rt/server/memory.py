"""Memory that ended sessions freed, handed back to the operating system.

A training session keeps its last gradient reply until it ends. glibc's
allocator keeps blocks of that size in its heap when they are freed, so a
server whose thousands of short sessions expired would hold on to their
memory: reused by the next sessions, but never returned. ``malloc_trim(0)``
(what Dask's "trim memory" does too) returns the free heap pages; elsewhere
than glibc this is a no-op and the platform's allocator decides.
"""
from __future__ import annotations

import ctypes
import sys


def _trim_function():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:  # not glibc (e.g. musl)
        return None


_MALLOC_TRIM = _trim_function()


def give_back() -> bool:
    """Return the heap's free pages to the system; True if any were (False also where it cannot be done)."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False
