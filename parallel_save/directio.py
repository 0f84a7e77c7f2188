"""Whether a file can be written with O_DIRECT at our alignment.

Pages are 4 KiB at 1 MiB-aligned offsets and page-aligned buffers, so any
file system asking for at most 4096-byte alignment works.  We ask the
kernel (statx STATX_DIOALIGN, through ctypes on Python 3.11) and then open
the file again with O_DIRECT, before anything is written, so the error
comes early and names the path and the option.
"""

from __future__ import annotations

import ctypes
import os

from . import libc
from .errors import DirectIOError
from .format import PAGE_SIZE

_STATX_DIOALIGN = 0x2000
_STATX_SIZE = 256
_STX_MASK = 0
_STX_DIO_MEM_ALIGN = 152
_STX_DIO_OFFSET_ALIGN = 156


_AT_EMPTY_PATH = 0x1000


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory alignment, offset alignment) the kernel reports for O_DIRECT
    on the open file ``fd``; (0, 0) if it does not support it; None if it
    cannot say."""
    if libc.statx is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if libc.statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buffer) != 0:
        return None
    raw = buffer.raw
    mask = int.from_bytes(raw[_STX_MASK:_STX_MASK + 4], "little")
    if not mask & _STATX_DIOALIGN:
        return None
    mem = int.from_bytes(raw[_STX_DIO_MEM_ALIGN:_STX_DIO_MEM_ALIGN + 4], "little")
    off = int.from_bytes(raw[_STX_DIO_OFFSET_ALIGN:_STX_DIO_OFFSET_ALIGN + 4], "little")
    return mem, off


def check_direct_io_fd(fd: int, shown: str, writable: bool = True,
                       option: str = "direct_io") -> int:
    """The open file ``fd`` opened again with O_DIRECT (a new descriptor of
    the same file: through /proc/self/fd, never its path), or a
    :class:`DirectIOError` naming ``shown`` unless it needs no more than
    page alignment."""
    alignment = dio_alignment(fd)
    if alignment is not None:
        mem, off = alignment
        if off == 0:
            raise DirectIOError(f"{shown}: the file system does not support O_DIRECT "
                                f"({option}); save without it")
        if off > PAGE_SIZE or mem > PAGE_SIZE:
            raise DirectIOError(f"{shown}: O_DIRECT needs {max(off, mem)}-byte alignment "
                                f"here, parallel-save aligns to {PAGE_SIZE} ({option})")
    try:
        return os.open(f"/proc/self/fd/{fd}", (os.O_RDWR if writable else os.O_RDONLY)
                       | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as error:
        raise DirectIOError(f"{shown}: cannot open with O_DIRECT ({option}): "
                            f"{error.strerror}") from None

