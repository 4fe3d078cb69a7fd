"""Children that end with the process that started them, even when it is killed with SIGKILL
(Linux ``PR_SET_PDEATHSIG``, prctl(2))."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child is sent ``sig`` when the process starting it ends. The setting
    survives exec (not of a set-user-ID program) and is not passed on to the child's own children
    (QEMU, started by the machine service, outlives it). A child whose parent ended between fork
    and here gets ``sig`` at once."""
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec
