"""The C library, for the few Linux calls the standard library lacks
(`sync_file_range`, `prctl`); None where it cannot be loaded."""

from __future__ import annotations

import ctypes
import ctypes.util

try:
    LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    LIBC = None
