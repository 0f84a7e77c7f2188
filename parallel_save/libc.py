"""The C library's calls that Python's os module lacks, bound once (the
C library's function objects are shared: two modules setting their own
argument types on one of them would override each other).

sync_file_range(2) (start a file's writeback), madvise(2) (mmap.madvise
holds the GIL for the call; a call through ctypes lets go of it), statx(2)
(O_DIRECT's alignment), renameat2(2) (swapping two names), syscall(2) and
ioctl(2) for userfaultfd, and prctl(2) (naming a process, asking for a
signal when its parent dies).  Each is None where this C library lacks
it, and its caller falls back.  The failed call's error is
:func:`last_error`.
"""

from __future__ import annotations

import ctypes
import os

_LIBC = ctypes.CDLL(None, use_errno=True)


def _bind(name: str, argtypes: tuple | None = None):
    try:
        function = getattr(_LIBC, name)
    except AttributeError:
        return None
    if argtypes is not None:
        function.argtypes = argtypes
    return function


sync_file_range = _bind("sync_file_range",
                        (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint))
# The address is a full pointer: ctypes would pass a bare int as a C int.
madvise = _bind("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
statx = _bind("statx")
renameat2 = _bind("renameat2")
syscall = _bind("syscall")
if syscall is not None:
    syscall.restype = ctypes.c_long  # a descriptor, or -1
ioctl = _bind("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p))
# Its second argument is an unsigned long or a pointer, by option: callers
# wrap it (ctypes.c_ulong, ctypes.c_char_p).
prctl = _bind("prctl")
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def last_error(filename: str | None = None) -> OSError:
    """The OSError of the call that just failed in this thread (its errno)."""
    error = ctypes.get_errno()
    if filename is None:
        return OSError(error, os.strerror(error))
    return OSError(error, os.strerror(error), filename)


def set_process_name(name: str) -> None:
    """Name the calling thread, the process where it is the main one: what
    ps(1), top(1) and /proc/<pid>/comm show (15 bytes at most)."""
    if prctl is not None:
        prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def set_parent_death_signal(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when the thread
    that forked it ends; False where it cannot."""
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum)) == 0
