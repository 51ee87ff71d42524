"""The C library's functions that Python's ``os`` does not wrap (``renameat2``, ``madvise`` with any advice)."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable


def libc_function(name: str, argtypes: list, restype: type = ctypes.c_int) -> Callable[..., int] | None:
    """``name`` from the C library, with ``errno`` kept for ``ctypes.get_errno``; None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
