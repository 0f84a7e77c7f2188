"""RAM blocks: a name and a page-aligned buffer in shared memory.

Channels are separate processes that read and write the block's bytes
directly (no page ever crosses a pipe), so a block must be backed by a file
that another process can map: a ``multiprocessing.shared_memory`` segment
(a file in /dev/shm), any file mapped shared, or a numpy array over either.
We find that file from the buffer's address in /proc/self/maps rather than
asking the caller, so every kind of buffer is accepted the same way and a
private buffer (a plain numpy array, a bytearray) is refused up front
instead of being saved from a stale copy.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from . import libc
from .errors import BlockError
from .files import length_refusal, unlink_if_ours
from .format import PAGE_SIZE, check_block_length, check_block_name


@dataclass(frozen=True)
class BlockSource:
    """How a channel maps a block: ``length`` bytes of ``path`` from
    ``offset``.  ``device`` and ``inode`` name the file the coordinator
    saw: a channel that opens the path and finds another file (replaced
    since) refuses it instead of saving or restoring the wrong memory.

    A private block (no file: ``path`` is empty) is ``length`` bytes at the
    address ``offset`` of the coordinator's memory, which only a channel
    forked from it sees: a snapshot's copy-on-write view."""

    path: str
    offset: int
    length: int
    device: int = 0
    inode: int = 0


def _mappings_covering(address: int, length: int) -> list[tuple[int, int, str, int, str]]:
    """The /proc/self/maps entries (start, end, perms, offset, path) that
    cover [address, address + length), in address order."""
    covering = []
    with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end <= address or start >= address + length:
                continue
            path = fields[5].rstrip("\n") if len(fields) > 5 else ""
            covering.append((start, end, fields[1], int(fields[2], 16), path))
    return covering


def find_source(name: str, address: int, length: int) -> BlockSource:
    """The shared file behind ``length`` bytes at ``address``, or a
    :class:`BlockError` saying why a channel could not attach to it."""
    covering = _mappings_covering(address, length)
    if not covering or covering[0][0] > address:
        raise BlockError(f"block {name!r}: its buffer is not mapped memory")
    start, _, _, offset, path = covering[0]
    file_offset = offset + (address - start)
    expected_start = start
    for entry_start, entry_end, entry_perms, entry_offset, entry_path in covering:
        # A mapping may be split in several entries (madvise, mprotect);
        # they still form one buffer if they continue the same file.
        contiguous = (entry_start == expected_start and entry_path == path
                      and entry_offset == offset + (entry_start - start))
        if not contiguous:
            raise BlockError(f"block {name!r}: its buffer spans several mappings; "
                             f"the channels need one shared mapping")
        if "s" not in entry_perms:
            raise BlockError(f"block {name!r}: its buffer is private memory; the "
                             f"channels (other processes) cannot see it. Use "
                             f"multiprocessing.shared_memory, or a file mapped "
                             f"shared (for example under /dev/shm)")
        expected_start = entry_end
    if expected_start < address + length:
        raise BlockError(f"block {name!r}: its buffer is not all mapped memory")
    if not path.startswith("/") or path.endswith(" (deleted)"):
        what = path or "anonymous memory"
        raise BlockError(f"block {name!r}: its buffer is shared memory with no file "
                         f"that another process can open ({what}); use "
                         f"multiprocessing.shared_memory or a file under /dev/shm")
    try:
        found = os.stat(path)
    except OSError as error:
        raise BlockError(f"block {name!r}: its file {path} cannot be opened: "
                         f"{error.strerror}") from None
    return BlockSource(path, file_offset, length, found.st_dev, found.st_ino)


def _byte_view(buffer: Any) -> np.ndarray:
    if isinstance(buffer, np.ndarray):
        if not buffer.flags.c_contiguous:
            raise BlockError("a block's numpy array must be C-contiguous")
        return buffer.reshape(-1).view(np.uint8)
    try:
        view = memoryview(buffer)
    except TypeError:
        raise BlockError(f"a block's buffer must support the buffer protocol, not "
                         f"{type(buffer).__name__}") from None
    if not view.c_contiguous:
        raise BlockError("a block's buffer must be C-contiguous")
    return np.frombuffer(view.cast("B"), dtype=np.uint8)


class RamBlock:
    """A named RAM block over a shared, page-aligned buffer.

    The buffer is used in place, never copied: the saver's channels map the
    same file, and a restore writes into it.  Refused at construction, with
    the reason: a name the format cannot hold, a length that is not a page
    multiple, a buffer that is not page aligned or not shared.
    """

    def __init__(self, name: str, buffer: Any) -> None:
        self._keep = None
        check_block_name(name)
        array = _byte_view(buffer)
        check_block_length(name, array.size)
        address = array.ctypes.data
        if address % PAGE_SIZE:
            raise BlockError(f"block {name!r}: its buffer starts at 0x{address:x}, "
                             f"which is not {PAGE_SIZE}-byte (page) aligned")
        self.name = name
        self.array = array
        self.source = find_source(name, address, array.size)
        self._keep = buffer  # the mapping must outlive us

    @property
    def length(self) -> int:
        return self.source.length

    def close(self) -> None:
        """Let go of the buffer: after this, the caller's own buffer (a
        ``SharedMemory``) can be closed.  A block made by :meth:`from_file`
        unmaps its file.  Safe to call twice."""
        keep, self._keep = self._keep, None
        self.array = np.zeros(0, dtype=np.uint8)
        if isinstance(keep, mmap.mmap):
            keep.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pages(self) -> int:
        return self.length // PAGE_SIZE

    @property
    def private(self) -> bool:
        """Private memory: only a snapshot (channels forked at the
        checkpoint) can save it."""
        return not self.source.path

    @classmethod
    def snapshot_of(cls, name: str, buffer: Any) -> RamBlock:
        """A block over any page-aligned buffer, private memory included (a
        plain numpy array): for :class:`Checkpointer` ``(snapshot=True)``,
        whose channels are forked at each checkpoint and see the memory as
        it was at that instant.  Shared memory is taken as :class:`RamBlock`
        takes it."""
        array = _byte_view(buffer)
        address = array.ctypes.data
        covering = _mappings_covering(address, array.size)
        if covering and all("s" in entry[2] for entry in covering):
            return cls(name, buffer)
        block = cls.__new__(cls)
        block._keep = None
        check_block_name(name)
        check_block_length(name, array.size)
        if address % PAGE_SIZE:
            raise BlockError(f"block {name!r}: its buffer starts at 0x{address:x}, "
                             f"which is not {PAGE_SIZE}-byte (page) aligned")
        block.name, block.array, block._keep = name, array, buffer
        block.source = BlockSource("", address, array.size)
        return block

    def __repr__(self) -> str:
        return (f"RamBlock({self.name!r}, {self.length} bytes at "
                f"{self.source.path}+{self.source.offset})")

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike, *, length: int | None = None,
                  create: bool = False, writable: bool = True) -> RamBlock:
        """Map ``path`` shared as a block's buffer (created, or resized to
        ``length``, when ``create``).  The file is never read into private
        memory: a save reads the pages straight from the page cache."""
        path = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        created = False
        try:
            if create:
                try:
                    # Created 0600: the file holds memory.
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                    created = True
                except FileExistsError:
                    fd = os.open(path, flags)
            else:
                fd = os.open(path, flags)
        except OSError as error:
            raise BlockError(f"block {name!r}: cannot open {path}: "
                             f"{error.strerror}") from None
        try:
            if create and length is not None:
                _resize(fd, name, path, length)
            size = os.fstat(fd).st_size
            if length is not None and size != length:
                raise BlockError(f"block {name!r}: {path} is {size} bytes, "
                                 f"expected {length}")
            if size <= 0 or size % PAGE_SIZE:
                raise BlockError(f"block {name!r}: {path} is {size} bytes, not a "
                                 f"positive multiple of the page size {PAGE_SIZE}")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, access=access)
        except BaseException:
            if created:
                unlink_if_ours(path, fd)  # a failure leaves no file of ours behind
            raise
        finally:
            os.close(fd)
        return cls(name, mapping)


def _resize(fd: int, name: str, path: str, length: int) -> None:
    try:
        os.ftruncate(fd, length)
    except OSError as error:
        reason = length_refusal(fd, length, error) or error.strerror
        raise BlockError(f"block {name!r}: cannot make {path} {length} bytes long: "
                         f"{reason}") from None


class BlockMapping:
    """A block's bytes mapped in this process (a channel), without copying,
    and the descriptor of its file (for finding its holes); a private
    block's bytes where a forked channel inherited them (no file: ``fd``
    and ``mapping`` are None).  ``page_bytes``: the size of the pages its
    memory is made of (a hugetlbfs file's huge pages, else 4 KiB)."""

    def __init__(self, source: BlockSource, writable: bool) -> None:
        self.source = source
        if not source.path:
            self.fd, self.mapping, self.skip = -1, None, 0
            self.page_bytes = PAGE_SIZE
            self.array = np.ctypeslib.as_array(
                (ctypes.c_uint8 * source.length).from_address(source.offset))
            return
        self.fd = open_source(source, writable)
        try:
            # A hugetlbfs file maps in whole huge pages only (offset and
            # length), and says its page size as its block size; a block
            # may begin or end inside one (a buffer carved out of a larger
            # mapping).  Elsewhere whole pages will do.
            unit = max(mmap.ALLOCATIONGRANULARITY, os.fstatvfs(self.fd).f_bsize)
            self.page_bytes = unit
            start = source.offset - source.offset % unit
            self.skip = source.offset - start
            length = source.length + self.skip
            if unit > mmap.ALLOCATIONGRANULARITY:
                length += -length % unit
            self.mapping = mmap.mmap(self.fd, length, mmap.MAP_SHARED,
                                     access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ,
                                     offset=start)
        except BaseException:
            os.close(self.fd)
            raise
        self.array = np.frombuffer(self.mapping, dtype=np.uint8, count=source.length,
                                   offset=self.skip)

    def advise(self, advice: int, first_page: int, pages: int) -> None:
        """madvise(2) on ``pages`` pages of the block from ``first_page``,
        without holding the GIL (mmap.madvise holds it, and populating a
        channel's window, 2 ms for 32 MiB, stopped the channel's other thread
        between two of its writes); OSError if the kernel refuses."""
        if libc.madvise(self.array.ctypes.data + first_page * PAGE_SIZE, pages * PAGE_SIZE,
                        advice) != 0:
            raise libc.last_error()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_source(source: BlockSource, writable: bool) -> int:
    """Open a block's file, refusing one that is not the file the block was
    made over (``source.device``/``inode``): a path is looked up again
    here, and a file put in its place since must not be read or written."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(source.path, flags)
    found = os.fstat(fd)
    if source.inode and (found.st_dev, found.st_ino) != (source.device, source.inode):
        os.close(fd)
        raise BlockError(f"{source.path}: the block's file was replaced by another "
                         f"file after the block was made")
    return fd
