"""Opening the files parallel-save reads and writes, safely on a shared
machine: regular files only (a FIFO or a device is refused at once instead
of blocking an open or a read forever), symbolic links only where the
caller allows them, and where a file holds its bytes (its data runs) as
opposed to holes that read as zero but cost nothing on disk.

A file is checked once, through the descriptor that is then used: the
path is never opened a second time.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from . import background, libc
from .errors import FileError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, for an error message: "a FIFO"..."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def not_regular(path: str | os.PathLike, mode: int) -> FileError:
    return FileError(None, f"not a regular file: {file_kind(mode)}", os.fspath(path))


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, *,
                 follow_symlinks: bool = True, dir_fd: int | None = None,
                 create_mode: int = 0o600) -> int:
    """Open ``path`` as a regular file and return the descriptor.

    Opened with O_NONBLOCK, so that a FIFO without a writer or a device
    cannot block the open, then checked with fstat on the descriptor (no
    race with a rename), then made blocking again for ordinary reads.
    ``follow_symlinks=False`` refuses a symbolic link as the last
    component (O_NOFOLLOW).  Refusals are :class:`FileError` naming the
    path: "not a regular file: a FIFO", "is a symbolic link", the system's
    reason otherwise.
    """
    path = os.fspath(path)
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, create_mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_symlinks:
            raise FileError(error.errno, "is a symbolic link (refused: it could point "
                            "anywhere)", path) from None
        if error.errno == errno.ENXIO:  # a socket, a FIFO with no reader to write to
            try:
                mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks).st_mode
            except OSError:
                mode = 0
            raise not_regular(path, mode) from None
        raise FileError(error.errno, error.strerror, path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


# sync_file_range(2) flag: start writing the dirty pages back, wait for none.
_SYNC_FILE_RANGE_WRITE = 2


# Where the kernel keeps its pools of huge pages, one per page size.
HUGE_PAGE_POOLS = "/sys/kernel/mm/hugepages"


def free_bytes(directory: str) -> int:
    """Bytes the file system of ``directory`` can still take.  A hugetlbfs
    mounted without a size limit (as /dev/hugepages is) says 0 of 0 blocks:
    its files take their pages from the machine's pool of huge pages of its
    page size (its block size), so that pool's free pages, less those
    reserved for mappings already made, plus what it may still overcommit,
    are what it can take."""
    info = os.statvfs(directory)
    if info.f_blocks or info.f_bsize <= os.sysconf("SC_PAGE_SIZE"):
        return info.f_bavail * info.f_frsize
    pool = Path(HUGE_PAGE_POOLS, f"hugepages-{info.f_bsize >> 10}kB")
    try:
        free, reserved, overcommit, surplus = (
            int((pool / name).read_text(encoding="ascii"))
            for name in ("free_hugepages", "resv_hugepages", "nr_overcommit_hugepages",
                         "surplus_hugepages"))
    except OSError:
        return 0  # not a pool we know: nothing we can promise
    return max(0, free - reserved + max(0, overcommit - surplus)) * info.f_bsize


def unlink_if_ours(path: str, fd: int, dir_fd: int | None = None) -> bool:
    """Unlink ``path`` (relative to ``dir_fd``) if it still names the file
    open as ``fd``, never a file another process has put there since;
    whether it did."""
    try:
        found = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    ours = os.fstat(fd)
    if (found.st_dev, found.st_ino) != (ours.st_dev, ours.st_ino):
        return False
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def length_refusal(fd: int, length: int, error: OSError) -> str | None:
    """Why the file open as ``fd`` cannot be made ``length`` bytes long,
    when ftruncate failed with ``error`` for its file system's page size: a
    hugetlbfs file holds whole huge pages (its block size) and refuses
    anything else with EINVAL.  None for any other failure."""
    unit = os.fstatvfs(fd).f_bsize
    if error.errno == errno.EINVAL and length % unit:
        return f"its file system takes only lengths in whole pages of {unit >> 10} KiB"
    return None


def start_writeback(fd: int) -> None:
    """Have the kernel start writing the file's dirty pages to disk now,
    without waiting for them.  A durable save calls it while its channels
    write: the disk then works during the pass instead of only in the final
    fdatasync (the file system starts by itself only once a tenth or so of
    the machine's memory is dirty).  Best effort: an error here is the
    fdatasync's to report."""
    if libc.sync_file_range is not None:
        libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def close_in_background(fd: int, name: str) -> threading.Thread:
    """Close ``fd`` on a thread of its own (returned, started): the last
    close of a large unlinked file frees its blocks, which can take seconds
    (ext4 with discard), and the caller need not wait for that.

    Returns once the descriptor has left this process's table (the close
    has begun), not when the close ends: a process forked before that
    would inherit the descriptor, and the file would be freed when that
    child exits (a channel's exit)."""
    held = os.fstat(fd)
    closer = background.start(os.close, (fd,), name, daemon=True)
    while closer.is_alive():
        try:
            now = os.fstat(fd)
        except OSError:
            break  # the slot is empty: the close has begun
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            break  # and the number was taken again since
        time.sleep(0.0002)
    return closer


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The data of the open file from ``start`` on, as (first byte, first
    byte of the hole after it) for each run of data that begins before
    ``end``; the hole may lie past ``end`` (a caller can remember how far
    the file is known to hold data).  The rest are holes, which read as
    zero.

    Found with SEEK_DATA/SEEK_HOLE, so the cost is one pair of lseeks per
    run of data, never a read of a hole: a sparse file of terabytes with
    a few KiB of data gives a few runs.  A file system that does not know
    holes reports the whole file as data.  Only the returned offsets are
    used, never the descriptor's position, so descriptors shared with
    other processes (which use pread) are not disturbed.
    """
    at = start
    while at < end:
        try:
            first = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only holes from here to the end of the file
                return
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield at, end
                return
            raise
        if first >= end:
            return
        hole = os.lseek(fd, first, os.SEEK_HOLE)
        yield first, hole
        at = hole


def in_page_cache(fd: int, offset: int, buffer: bytearray) -> bool | None:
    """Whether the page of the open file at ``offset`` is in the page
    cache, found by reading it into ``buffer`` (a page's length) with
    RWF_NOWAIT, which fails rather than wait for the disk: True, False, or
    None where the file system cannot say (the caller then assumes it is
    not).  A read of one page: far cheaper than advice about megabytes the
    cache already holds."""
    try:
        return os.preadv(fd, [buffer], offset, os.RWF_NOWAIT) == len(buffer)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The [first, last) byte ranges of ``[start, end)`` that hold data in
    the open file, in order (:func:`data_extents`, cut at ``end``)."""
    for first, hole in data_extents(fd, start, end):
        yield first, min(hole, end)


def hole_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The [first, last) ranges of ``[start, end)`` that are holes: the
    complement of :func:`data_runs`."""
    at = start
    for first, last in data_runs(fd, start, end):
        if first > at:
            yield at, first
        at = last
    if at < end:
        yield at, end
