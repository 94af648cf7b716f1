"""Child processes that must not outlive their parent (`serve`'s workers, a Ray actor's process)."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """In the child, before exec (`Popen(preexec_fn=...)`): get SIGTERM when the parent dies, however it
    dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
