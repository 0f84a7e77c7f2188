"""Kernel-assisted tracking: userfaultfd write protection in asynchronous
mode, read and re-armed with the PAGEMAP_SCAN ioctl (Linux >= 6.7).

The blocks' address ranges are registered with a userfaultfd in
write-protect mode with ``UFFD_FEATURE_WP_ASYNC`` (a write to a protected
page is resolved by the kernel itself, which only notes that the page was
written: no handler thread, no message) and ``WP_UNPOPULATED`` (pages not
mapped yet are protected too).  Collecting is one ``PAGEMAP_SCAN`` per
block on /proc/self/pagemap with ``PM_SCAN_WP_MATCHING``: the kernel
reports the pages written since the last scan and protects them again,
page by page under the page-table lock, and flushes the TLB before it
returns.  A write either happened before a page's scan (reported, and the
pass reads the page after the scan) or faults after it (noted for the next
scan): nothing is lost in between.

What it sees: writes through this process's page tables, at the blocks'
own addresses, by any thread of the saving process (and the kernel's
copies into that memory, such as a ``readv``).  What it does not see: other
processes (their page tables are their own), other mappings of the same
file, and ``write``/``pwrite`` on the file.  Use a :class:`DirtyLog` for
those writers.  Soft-dirty bits would be the older way; they are compiled
out of many kernels (and writing ``clear_refs`` then succeeds silently), so
this tracker does not rely on them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Sequence

import numpy as np

from .. import libc
from ..blocks import RamBlock
from ..format import PAGE_SIZE
from .contract import DirtyPages, DirtyTracker, TrackingError, block_pages_of

_SYSCALL_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFD_FEATURES = {_UFFD_FEATURE_WP_ASYNC: "WP_ASYNC (Linux >= 6.7)",
                  _UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED (Linux >= 6.4)"}
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WRITTEN = 1 << 1
# Regions returned by one scan call; more are fetched by calling again
# from where the walk stopped.
_REGIONS = 4096


def _iowr(kind: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | number


def _ior(kind: int, number: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (kind << 8) | number


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


_UFFDIO_API = _iowr(0xAA, 0x3F, ctypes.sizeof(_UffdioApi))
_UFFDIO_REGISTER = _iowr(0xAA, 0x00, ctypes.sizeof(_UffdioRegister))
_UFFDIO_UNREGISTER = _ior(0xAA, 0x01, ctypes.sizeof(_UffdioRange))
_UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, ctypes.sizeof(_UffdioWriteprotect))
_PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_PmScanArg))

def _ioctl(fd: int, request: int, argument: ctypes.Structure) -> int:
    result = libc.ioctl(fd, request, ctypes.addressof(argument))
    if result < 0:
        raise libc.last_error()
    return result


def _open_userfaultfd() -> int:
    number = _SYSCALL_USERFAULTFD.get(platform.machine())
    if number is None:
        raise TrackingError(f"userfaultfd tracking is not wired up for {platform.machine()}")
    # User-mode faults only: all a write tracker needs, and allowed even
    # where vm.unprivileged_userfaultfd forbids the rest.
    fd = libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY)
    if fd < 0:
        code = ctypes.get_errno()
        why = {errno.ENOSYS: "this kernel has no userfaultfd",
               errno.EPERM: "userfaultfd is not permitted here",
               errno.EINVAL: "this kernel lacks UFFD_USER_MODE_ONLY (Linux >= 5.11)"}
        raise TrackingError(f"userfaultfd write tracking is unavailable: "
                            f"{why.get(code, os.strerror(code))}")
    return fd


def _available_features() -> int:
    """What this kernel's userfaultfd offers (asked on a throw-away
    descriptor: the API handshake can be done once per descriptor)."""
    fd = _open_userfaultfd()
    try:
        api = _UffdioApi(_UFFD_API, 0, 0)
        _ioctl(fd, _UFFDIO_API, api)
        return api.features
    finally:
        os.close(fd)


def _check_pagemap_scan(pagemap: int) -> None:
    empty = _PmScanArg(size=ctypes.sizeof(_PmScanArg))
    try:
        _ioctl(pagemap, _PAGEMAP_SCAN, empty)
    except OSError as error:
        if error.errno in (errno.ENOTTY, errno.EINVAL):
            raise TrackingError("userfaultfd write tracking is unavailable: this kernel "
                                "has no PAGEMAP_SCAN ioctl (Linux >= 6.7)") from None
        raise


def uffd_support() -> str | None:
    """None when :class:`UffdTracker` works on this kernel, else why not."""
    try:
        missing = [text for bit, text in _UFFD_FEATURES.items()
                   if not _available_features() & bit]
        if missing:
            return f"this kernel's userfaultfd lacks {' and '.join(missing)}"
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_pagemap_scan(pagemap)
        finally:
            os.close(pagemap)
    except TrackingError as error:
        return str(error)
    return None


class UffdTracker(DirtyTracker):
    """Tracks the writes the saving process makes to ``blocks``, with the
    kernel's help (see the module docstring for what it cannot see).

    Tracking starts at construction; ``start`` starts it again.  Raises
    :class:`TrackingError` where the kernel lacks what it needs.
    """

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.block_pages = block_pages_of(blocks)
        self._ranges = [(block.name, block.array.ctypes.data, block.length)
                        for block in blocks]
        self._keep = list(blocks)  # the ranges must stay mapped while registered
        self._fd = _open_userfaultfd()
        self._pagemap: int | None = None
        self._registered: list[tuple[int, int]] = []
        try:
            self._handshake()
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            _check_pagemap_scan(self._pagemap)
            for name, address, length in self._ranges:
                self._register(name, address, length)
        except BaseException:
            self.close()
            raise
        self._regions = np.zeros((_REGIONS, 3), dtype=np.uint64)

    def _handshake(self) -> None:
        wanted = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED
        try:
            _ioctl(self._fd, _UFFDIO_API, _UffdioApi(_UFFD_API, wanted, 0))
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            reason = uffd_support() or f"the userfaultfd API handshake failed ({error})"
            raise TrackingError(f"userfaultfd write tracking is unavailable: {reason}") from None

    def _register(self, name: str, address: int, length: int) -> None:
        region = _UffdioRange(address, length)
        try:
            _ioctl(self._fd, _UFFDIO_REGISTER,
                   _UffdioRegister(region, _UFFDIO_REGISTER_MODE_WP, 0))
            self._registered.append((address, length))
            _ioctl(self._fd, _UFFDIO_WRITEPROTECT,
                   _UffdioWriteprotect(region, _UFFDIO_WRITEPROTECT_MODE_WP))
        except OSError as error:
            raise TrackingError(f"block {name!r}: its memory cannot be write-protected "
                                f"with userfaultfd: {error.strerror}") from None

    def close(self) -> None:
        for address, length in self._registered:
            try:
                _ioctl(self._fd, _UFFDIO_UNREGISTER, _UffdioRange(address, length))
            except OSError:
                pass  # the memory was unmapped first: nothing left to unregister
        self._registered = []
        for fd in (self._fd, self._pagemap):
            if fd is not None:
                os.close(fd)
        self._fd = self._pagemap = None

    def start(self) -> None:
        """Forget the writes so far (they are protected again, unreported)."""
        self.collect()

    def collect(self, final: bool = False) -> DirtyPages:
        """The pages written since the last collect; they are protected
        again in the same step.  ``final`` changes nothing here: the kernel
        misses no write, whenever the writers stop."""
        if self._pagemap is None:
            raise TrackingError("the tracker is closed")
        return {name: self._scan(address, length) for name, address, length in self._ranges}

    def _scan(self, address: int, length: int) -> np.ndarray:
        end = address + length
        # +1 at each written region's first page, -1 after its last one.
        edges = np.zeros(length // PAGE_SIZE + 1, dtype=np.int32)
        arg = _PmScanArg(size=ctypes.sizeof(_PmScanArg),
                         flags=_PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC,
                         start=address, end=end, vec=self._regions.ctypes.data,
                         vec_len=_REGIONS, category_mask=_PAGE_IS_WRITTEN,
                         return_mask=_PAGE_IS_WRITTEN)
        while True:
            count = _ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
            regions = self._regions[:count]
            np.add.at(edges, ((regions[:, 0] - address) // PAGE_SIZE).astype(np.intp), 1)
            np.add.at(edges, ((regions[:, 1] - address) // PAGE_SIZE).astype(np.intp), -1)
            if arg.walk_end >= end:
                break
            arg.start = arg.walk_end
        return np.cumsum(edges[:-1]) > 0
