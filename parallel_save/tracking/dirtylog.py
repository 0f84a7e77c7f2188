"""The dirty log: a shared-memory file in which writers, in any process,
mark the pages they wrote, and from which the saver collects the dirty set
before each pass.

Layout of the file (``/dev/shm/NAME``, little-endian)::

    0     magic "PSDIRTY1", u64 total pages, u64 table bytes
    64    the active buffer's index (one byte, on a cache line of its own)
    128   the block table: JSON [[name, pages], ...]
    B0    buffer 0: one byte per page of every block, blocks end to end
    B1    buffer 1: the same

The protocol, and why no mark is ever lost
------------------------------------------

A writer writes its data, *then* marks: it reads the active index ``a`` and
stores 1 into ``buffer[a][page]``.  The saver collects: it flips the
active index, copies the buffer that was active (one read of each byte),
and stores 0 into exactly the bytes it saw set, never into the others.
The pass that saves the collected pages reads them after that.

Take any write to page p, and the store of its mark at time m, after the
data.  Either the mark survives in the log (the last store to that byte is
a 1), and a later collect reports p; or a collect's clear of that byte came
after m (the only store of 0 is that clear).  That collect had seen the
byte set, so p is in its set, and its pass reads p after the clear, so
after m, so after the data: the pass saves this write or a newer one.
Either way the write reaches the file, whatever the interleaving:

- a writer that read the index before the flip and marks the old buffer
  after the collect cleared it: its mark stays in the old buffer (the
  clear touched only the bytes it had seen), which the collect after next
  reports, or ``collect(final=True)``, which reads both buffers once the
  writers stopped;
- a mark stored between the saver's copy and its clear: the clear erases
  it only if the byte was already set in the copy, which is the case above;
- a clear of the whole buffer (memset) or a read-modify-write of bits
  would lose a mark stored between the copy and the clear: that is why the
  log holds one byte per page (a byte store is atomic; setting a bit is a
  read-modify-write that can undo a concurrent clear of its neighbour) and
  why the saver clears byte by byte.

Correctness rests on those three points alone, not on the flip: a writer
may mark either buffer at any time.  The flip gives each pass a clean cut
(marks made after it go to the next pass) and keeps the saver's clears
off the cache lines that writers are storing into.

Ordering: x86-64 keeps each CPU's stores in program order (TSO), so data
stored before a mark is visible to whoever sees the mark; the saver hands
the pass to the channels through a pipe (a system call) after its clear.
Weaker memory models would need a release fence between data and mark.

Only one process collects at a time; any number of writers mark.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ..artifacts import SEGMENT_DIR, open_ours, segment_name
from ..blocks import RamBlock
from ..errors import BlockError, ParallelSaveError
from ..format import PAGE_SIZE, round_up
from .contract import DirtyPages, DirtyTracker, TrackingError, block_pages_of

MAGIC = b"PSDIRTY1"
_HEADER = struct.Struct("<8sQQ")  # magic, total pages, table bytes
ACTIVE_OFFSET = 64
TABLE_OFFSET = 128
_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
# Marks for up to 2 MiB of pages, stored by one memoryview slice
# assignment (a third of the cost of a numpy slice fill).
_ONES = memoryview(b"\x01" * 512)


def _layout(total_pages: int, table_bytes: int) -> tuple[int, int, int]:
    """(buffer 0 offset, buffer 1 offset, file size): page-aligned buffers."""
    first = round_up(TABLE_OFFSET + table_bytes, PAGE_SIZE)
    stride = round_up(max(total_pages, 1), PAGE_SIZE)
    return first, first + stride, first + 2 * stride


class DirtyLog(DirtyTracker):
    """A dirty log shared by writer processes and the saver.  In outline
    (a complete example: README.md).

    Owner (usually the saving process)::

        log = DirtyLog.create(blocks)          # give writers log.name
        saver.run(log, stop_writers=...)       # or iterate(dirty=log)
        log.close()                            # removes the file

    Writer, in any process::

        log = DirtyLog.attach(name)
        block_memory[offset:offset + n] = data    # write first,
        log.mark("ram0", offset, n)               # then mark

    A writer in another language maps the file and marks by hand: read
    the byte at ``ACTIVE_OFFSET``, store 1 at ``buffer_offsets[active] +
    page`` (pages numbered through the blocks in table order).
    """

    def __init__(self, name: str, mapping: mmap.mmap, block_pages: dict[str, int],
                 owner: bool) -> None:
        self.name = name
        self.path = os.path.join(SEGMENT_DIR, name)
        self.block_pages = block_pages
        # A child forked with the owner's object is no owner: its close
        # must not remove the log from under the saver.
        self._owner_pid = os.getpid() if owner else None
        self._mapping = mapping
        self._bases: dict[str, tuple[int, int]] = {}
        base = 0
        for block, pages in block_pages.items():
            self._bases[block] = (base, pages)
            base += pages
        self.total_pages = base
        first, second, _ = _layout(base, _HEADER.unpack_from(mapping)[2])
        self.buffer_offsets = (first, second)
        self._view = memoryview(mapping)
        # memoryviews for a writer's single-page mark (fastest from
        # Python), numpy views of the same bytes for everything else.
        self._buffers = (self._view[first:first + base], self._view[second:second + base])
        self._arrays = tuple(np.frombuffer(mapping, np.uint8, base, offset)
                             for offset in (first, second))

    # --- life ---

    @classmethod
    def create(cls, blocks: Sequence[RamBlock] | Mapping[str, int]) -> DirtyLog:
        """A new, empty log for these blocks (RAM blocks, or {name: length
        in bytes}), under a name no other log can collide with."""
        block_pages = block_pages_of(blocks)
        table = json.dumps(list(block_pages.items())).encode()
        total = sum(block_pages.values())
        size = _layout(total, len(table))[2]
        name = segment_name("dirty")
        path = os.path.join(SEGMENT_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mapping[TABLE_OFFSET:TABLE_OFFSET + len(table)] = table
        _HEADER.pack_into(mapping, 0, MAGIC, total, len(table))
        return cls(name, mapping, block_pages, owner=True)

    @classmethod
    def attach(cls, name: str) -> DirtyLog:
        """Attach a writer (or a saver) to the log another process created."""
        if not name or "/" in name or name in (".", ".."):
            raise TrackingError(f"{name!r} is not a dirty log name (use log.name)")
        path = os.path.join(SEGMENT_DIR, name)
        try:
            fd, found = open_ours(path, os.O_RDWR, "dirty log")
        except FileNotFoundError:
            raise TrackingError(f"no dirty log named {name!r} (closed by its owner, "
                                f"or never created)") from None
        except ParallelSaveError as error:
            raise TrackingError(str(error)) from None
        try:
            size = found.st_size
            if size < TABLE_OFFSET:
                raise TrackingError(f"{path} is not a dirty log (too short)")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        magic, total, table_bytes = _HEADER.unpack_from(mapping)
        if magic != MAGIC or _layout(total, table_bytes)[2] != size:
            mapping.close()
            raise TrackingError(f"{path} is not a dirty log")
        table = json.loads(bytes(mapping[TABLE_OFFSET:TABLE_OFFSET + table_bytes]))
        return cls(name, mapping, dict(table), owner=False)

    def close(self) -> None:
        """Detach; the owner also removes the file (writers still attached
        keep their mapping, but nobody collects from it any more)."""
        if self._mapping is None:
            return
        if self._owner_pid == os.getpid():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._buffers = self._arrays = ()
        self._view.release()
        self._mapping.close()
        self._mapping = None

    def __repr__(self) -> str:
        return f"DirtyLog({self.name!r}, {self.block_pages})"

    # --- writers ---

    def _block(self, block: str) -> tuple[int, int]:
        try:
            return self._bases[block]
        except KeyError:
            raise BlockError(f"the dirty log has no block {block!r} "
                             f"(it has {sorted(self._bases)})") from None

    def mark(self, block: str, offset: int, length: int) -> None:
        """Mark the pages holding bytes [offset, offset + length) of a block
        as written.  Call it after writing them, never before."""
        base, pages = self._block(block)
        end = offset + length
        if offset < 0 or length < 0 or end > pages << _PAGE_SHIFT:
            raise BlockError(f"bytes [{offset}, {end}) are outside block {block!r} "
                             f"({pages << _PAGE_SHIFT} bytes)")
        if not length:
            return
        first = base + (offset >> _PAGE_SHIFT)
        last = base + ((end + PAGE_SIZE - 1) >> _PAGE_SHIFT)
        active = self._view[ACTIVE_OFFSET]
        if last - first == 1:
            self._buffers[active][first] = 1
        elif last - first <= len(_ONES):
            self._buffers[active][first:last] = _ONES[:last - first]
        else:
            self._arrays[active][first:last] = 1

    def mark_pages(self, block: str, pages: Iterable[int] | np.ndarray) -> None:
        """Mark pages of a block as written: page numbers, or one bool per
        page.  Call it after writing them, never before."""
        base, count = self._block(block)
        pages = np.asarray(pages)
        if pages.dtype == bool:
            if pages.shape != (count,):
                raise BlockError(f"a page mask for block {block!r} needs shape "
                                 f"({count},), not {pages.shape}")
            index = np.flatnonzero(pages)
        elif pages.dtype.kind in "iu" or pages.size == 0:
            index = pages.ravel().astype(np.intp)
            if index.size and (index.min() < 0 or index.max() >= count):
                raise BlockError(f"page numbers of block {block!r} must be in "
                                 f"[0, {count}), got [{index.min()}, {index.max()}]")
        else:
            raise BlockError(f"pages must be page numbers or a bool mask, not {pages.dtype}")
        # A fancy-index store writes each selected byte alone: no neighbour
        # is read and written back.
        self._arrays[self._view[ACTIVE_OFFSET]][base + index] = 1

    # --- the saver ---

    def start(self) -> None:
        """Drop every mark: the full pass that follows reads all pages after
        this, so the writes behind those marks are in it."""
        self.collect(final=True)

    def collect(self, final: bool = False) -> DirtyPages:
        """The pages marked since the last collect, per block name.  Flips
        the active buffer and collects the other; ``final`` (once the
        writers have stopped) collects both."""
        if final:
            indexes = (0, 1)
        else:
            old = self._view[ACTIVE_OFFSET]
            self._view[ACTIVE_OFFSET] = 1 - old
            indexes = (old,)
        seen = np.zeros(self.total_pages, dtype=bool)
        for index in indexes:
            array = self._arrays[index]
            # A private snapshot: each byte is read once (np.flatnonzero
            # reads twice, and refuses a count that changed in between).
            marked = np.flatnonzero(array.copy())
            array[marked] = 0  # only the bytes seen set: see the module docstring
            seen[marked] = True
        return {block: seen[base:base + pages] for block, (base, pages) in self._bases.items()}
