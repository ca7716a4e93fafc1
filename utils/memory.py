"""Process memory housekeeping."""
from __future__ import annotations

import ctypes

__all__ = ["release_freed_memory"]


def release_freed_memory() -> None:
    """Give heap memory freed by finished work back to the system (glibc ``malloc_trim``): the
    next slide's (or column panel's) buffers then start from a low-water mark, not from the
    leftovers of the malloc arenas of threads that are gone."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
