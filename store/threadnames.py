"""OS-level names for a replica's threads.

Python's thread names stay inside Python; `top -H`, `ps -L` and
/proc/<pid>/task/*/comm show every thread as "python". With the name set
(Linux `prctl(PR_SET_NAME)`, at most 15 bytes) one can see which thread of a
replica is busy or blocked in the kernel (`/proc/<pid>/task/<tid>/wchan`)
without a debugger. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import threading

from .libc import LIBC

PR_SET_NAME = 15

_prctl = getattr(LIBC, "prctl", None)  # not Linux: no such call


def name_this_thread(name: str | None = None) -> None:
    """Name the calling OS thread (default: its Python thread name)."""
    if _prctl is None:
        return
    text = (name or threading.current_thread().name).encode("ascii", "replace")[:15]
    _prctl(PR_SET_NAME, ctypes.c_char_p(text), 0, 0, 0)
