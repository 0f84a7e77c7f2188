"""Reading an image: its blocks, their offsets and bitmaps, their bytes.

``open_image`` parses and validates the whole stream once (format.py) and
refuses an incomplete one unless asked; the returned :class:`Image` reads
bitmaps and blocks lazily, like safetensors' ``safe_open``: opening an
image of a terabyte reads its headers, not one byte per page.

A hostile image costs at most what the file really holds.  Holes make a
file's size free: an 8 KiB file may claim terabytes of RAM.  So every
region is checked against the file's size before anything is allocated
(format.py), bitmaps are read only where the file holds data (a bitmap in
a hole is all zero bits and is never read), and a page whose bytes lie in
a hole is zero, read as a clear page is: no write, no buffer of zeros.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any, Self

import numpy as np

from .container import Container, detect_stream
from .errors import BlockError, ClosedImageError, FileError, FormatError, ImageNotFoundError
from .files import data_runs, hole_runs, open_regular
from .format import (
    PAGE_SIZE,
    BlockLayout,
    StreamInfo,
    bit_runs,
    check_bitmap_padding,
    decode_stream,
    require_complete,
)

# Positioned reads of at most this many bytes, as QEMU reads (FORMAT.md).
READ_LIMIT = 4 << 20
# Bitmap bytes handled per step (8 Mi pages): bounded temporaries whatever
# the block's size.
BITMAP_STEP = 1 << 20


def clear_bits(packed: np.ndarray, first: int, end: int) -> None:
    """Clear bits [first, end) of a bitmap in QEMU's order (bit i is bit
    i % 8 of byte i // 8), touching only the bytes that hold them."""
    if end <= first:
        return
    low, high = first // 8, end // 8
    keep_below = (1 << (first % 8)) - 1       # the bits of byte ``low`` before ``first``
    keep_from = 0xFF & ~((1 << (end % 8)) - 1)  # the bits of byte ``high`` from ``end`` on
    if low == high:
        packed[low] &= keep_below | keep_from
        return
    packed[low] &= keep_below
    packed[low + 1:high] = 0
    if end % 8:
        packed[high] &= keep_from


class BlockInfo:
    """A block as the image holds it.  Its bitmap is read from the image
    when asked (the image must still be open), never kept."""

    def __init__(self, layout: BlockLayout, image: Image) -> None:
        self.layout = layout
        self._image = image
        self._present: int | None = None

    def __repr__(self) -> str:
        return f"BlockInfo({self.name!r}, {self.length} bytes)"

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def length(self) -> int:
        return self.layout.length

    @property
    def pages(self) -> int:
        return self.layout.pages

    def bitmap_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """The parts of the bitmap the file holds data for, as (byte offset
        in the bitmap, bytes), at most BITMAP_STEP bytes each; the bytes not
        yielded are zero (they lie in a hole of the file)."""
        fd, path = self._image.fileno(), self._image.path
        first = self.layout.bitmap_offset
        end = first + self.layout.bitmap_size
        for run_first, run_end in data_runs(fd, first, end):
            for at in range(run_first, run_end, BITMAP_STEP):
                count = min(BITMAP_STEP, run_end - at)
                raw = os.pread(fd, count, at)
                if len(raw) != count:
                    raise FormatError(f"block {self.name!r}: bitmap is truncated (the "
                                      f"file shrank while it was read)", path=path, offset=at)
                chunk = np.frombuffer(raw, dtype=np.uint8)
                if at + count == end:
                    self._check_padding(chunk, at - first)
                yield at - first, chunk

    def _check_padding(self, tail: np.ndarray, offset: int) -> None:
        """Open checked the padding; checked again as read, since the file
        may have changed since, and a padding bit would name a page past
        the block's end."""
        bits = np.unpackbits(tail, bitorder="little")
        extra = np.flatnonzero(bits[max(0, self.pages - offset * 8):])
        if extra.size:
            raise FormatError(f"block {self.name!r}: bitmap sets bits past the block's "
                              f"{self.pages} pages", path=self._image.path,
                              offset=self.layout.bitmap_offset + offset)

    def packed_bitmap(self) -> np.ndarray:
        """The block's bitmap exactly as the file stores it: ``bitmap_size``
        bytes of QEMU's little-endian words (bit i = page i).  A part in a
        hole of the file is not read: it stays untouched zero memory."""
        packed = np.zeros(self.layout.bitmap_size, dtype=np.uint8)
        for offset, chunk in self.bitmap_chunks():
            packed[offset:offset + chunk.size] = chunk
        return packed

    def data_bitmap(self) -> np.ndarray:
        """:meth:`packed_bitmap` with the bits cleared of the pages whose
        bytes lie wholly in a hole of the image: what a reader must copy.
        Such a page reads as zero, so it is restored as a clear page is (no
        write into a destination known to be zero).

        Equal to the packed bitmap for any image a save or QEMU wrote (their
        present pages are written data), so the holes are looked for (a pair
        of lseeks per run of present pages) only where they matter: when the
        bitmaps claim more pages than the file holds bytes
        (:attr:`Image.holes_matter`).  Otherwise writing what the bits say
        costs at most what the file holds, and the packed bitmap is returned."""
        self.check_in_file()
        if not self._image.holes_matter:
            return self.packed_bitmap()
        packed = np.zeros(self.layout.bitmap_size, dtype=np.uint8)
        fd = self._image.fileno()
        pages_offset = self.layout.pages_offset
        for offset, chunk in self.bitmap_chunks():
            if not chunk.any():
                continue
            chunk = chunk.copy()
            first_page = offset * 8
            present = np.unpackbits(chunk, bitorder="little").view(bool)
            for first, last in zip(*bit_runs(present)):
                start = pages_offset + (first_page + first) * PAGE_SIZE
                end = pages_offset + (first_page + last) * PAGE_SIZE
                for hole, hole_end in hole_runs(fd, start, end):
                    # Only the pages wholly inside the hole: a page partly
                    # in data is read (its hole part reads as zero anyway).
                    clear_bits(chunk, -(-(hole - pages_offset) // PAGE_SIZE) - first_page,
                               (hole_end - pages_offset) // PAGE_SIZE - first_page)
            packed[offset:offset + chunk.size] = chunk
        return packed

    def check_in_file(self) -> None:
        """Refuse a file cut short since it was opened: past its end a
        block's pages would read as a hole, i.e. zero, silently."""
        size = os.fstat(self._image.fileno()).st_size
        if size < self.layout.end:
            raise FormatError(f"block {self.name!r}: pages {self.layout.pages_offset}.."
                              f"{self.layout.end} are past the end of the file ({size} "
                              f"bytes): the image was truncated while it was read",
                              path=self._image.path, offset=max(size, self.layout.pages_offset))

    @property
    def bitmap(self) -> np.ndarray:
        """One bool per page, True where the page is to be read from the
        file: :meth:`data_bitmap` unpacked (the bits set, less the pages in
        holes when the bits claim more than the file holds).  Costs one byte
        per page: prefer the packed forms."""
        return np.unpackbits(self.data_bitmap(), count=self.pages,
                             bitorder="little").view(bool)

    @property
    def pages_present(self) -> int:
        """The bits set in the file's bitmap, counted in bounded steps (a
        bitmap in a hole counts zero without being read)."""
        if self._present is None:
            self._present = sum(int(np.bitwise_count(chunk).sum(dtype=np.int64))
                                for _, chunk in self.bitmap_chunks())
        return self._present

    @property
    def pages_zero(self) -> int:
        return self.pages - self.pages_present


class Image:
    """An open image file.  Use as a context manager, or call ``close``.

    The file is opened once, checked to be a regular file (a FIFO or a
    device is refused at once, never waited on), and read only through
    that descriptor: :meth:`fileno` is the file that was validated, for
    whoever reads it next (the channels of a restore).
    """

    def __init__(self, path: str | os.PathLike, *, start: int | None = None,
                 allow_incomplete: bool = False) -> None:
        self.path = os.fspath(path)
        self._fd = -1
        self._holes_matter: bool | None = None
        try:
            self._fd = open_regular(self.path)
        except FileError as error:
            if error.errno == errno.ENOENT:
                raise ImageNotFoundError(error.errno, "no such image file",
                                         self.path) from None
            raise
        try:
            # No start given (0 is every caller's default): the stream is at
            # the file's start or inside a container that says where.
            self.container: Container | None = (
                None if start else detect_stream(self._fd, self.path))
            self.info: StreamInfo = (self.container.decode(self._fd, self.path)
                                     if self.container else
                                     decode_stream(self._fd, self.path, start))
            if not allow_incomplete:
                require_complete(self.info, self.path)
            for block in self.info.layout.blocks:
                check_bitmap_padding(self._fd, self.path, block)
            self.blocks = {b.name: BlockInfo(b, self) for b in self.info.layout.blocks}
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def holes_matter(self) -> bool:
        """Whether the bitmaps claim more present pages than the file has
        bytes on disk: then some present pages are surely holes, and a
        reader that copied them would write more than the file holds (a
        "bomb": a 72 KiB file whose bits claim 2 GiB).  Counted once, from
        the packed bitmaps."""
        if self._holes_matter is None:
            claimed = sum(b.pages_present for b in self.blocks.values()) * PAGE_SIZE
            self._holes_matter = claimed > os.fstat(self.fileno()).st_blocks * 512
        return self._holes_matter

    def fileno(self) -> int:
        """The descriptor of the validated file (read-only, close-on-exec).
        It stays ours: a caller that keeps it past ``close`` dups it."""
        if self._fd < 0:
            raise ClosedImageError(f"{self.path}: the image is closed")
        return self._fd

    @property
    def machine(self) -> str:
        return self.info.layout.machine

    @property
    def complete(self) -> bool:
        return self.info.complete

    @property
    def start(self) -> int:
        return self.info.layout.start

    @property
    def description(self) -> dict[str, Any] | None:
        return self.info.description

    def block(self, name: str) -> BlockInfo:
        """The block named ``name``, or a :class:`BlockError` listing those there are."""
        try:
            return self.blocks[name]
        except KeyError:
            raise BlockError(f"{self.path}: no block named {name!r} (it has "
                             f"{', '.join(map(repr, self.blocks))})") from None

    def read_block(self, name: str, out: Any = None) -> np.ndarray:
        """The block's bytes: present pages from the file, clear pages zero.

        ``out`` (a writable buffer of the block's length) is filled in
        place; otherwise a new array is returned.  Only the file's data is
        read: pages in holes are zero, like clear pages, and a new array
        is not written there at all.
        """
        if not self.info.complete:
            require_complete(self.info, self.path)
        block = self.block(name)
        if out is None:
            target = np.zeros(block.length, dtype=np.uint8)
        else:
            target = np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)
            if target.size != block.length:
                raise BlockError(f"block {name!r} is {block.length} bytes, the "
                                 f"destination {target.size}")
            if target.flags.writeable is False:
                raise BlockError(f"the destination for block {name!r} is read-only")
        fd = self.fileno()
        packed = block.data_bitmap()
        for byte in range(0, packed.size, BITMAP_STEP):
            first_page = byte * 8
            present = np.unpackbits(packed[byte:byte + BITMAP_STEP],
                                    count=min(BITMAP_STEP * 8, block.pages - first_page),
                                    bitorder="little").view(bool)
            if out is not None:
                # Only the clear pages: the present ones are read over below.
                for first, last in zip(*bit_runs(~present)):
                    target[(first_page + first) * PAGE_SIZE:(first_page + last) * PAGE_SIZE] = 0
            for first, last in zip(*bit_runs(present)):
                self._read_pages(fd, block, target, (first_page + first) * PAGE_SIZE,
                                 (first_page + last) * PAGE_SIZE)
        block.check_in_file()  # a hole read as zero may have been the file cut short
        return target

    def _read_pages(self, fd: int, block: BlockInfo, target: np.ndarray, first: int,
                    end: int) -> None:
        """Bytes [first, end) of the block into ``target``; by data run
        when holes matter (a hole reads as zero, and is not read)."""
        pages_offset = block.layout.pages_offset
        runs = (data_runs(fd, pages_offset + first, pages_offset + end) if self.holes_matter
                else [(pages_offset + first, pages_offset + end)])
        at = first
        for run, run_end in runs:
            if run - pages_offset > at:
                target[at:run - pages_offset] = 0
            for offset in range(run, run_end, READ_LIMIT):
                count = min(run_end, offset + READ_LIMIT) - offset
                view = memoryview(target[offset - pages_offset:offset - pages_offset + count])
                if os.preadv(fd, [view], offset) != count:
                    raise FormatError(f"block {block.name!r}: short read of pages (the "
                                      f"file shrank while it was read)", path=self.path,
                                      offset=offset)
            at = run_end - pages_offset
        if at < end:
            target[at:end] = 0


def open_image(path: str | os.PathLike, *, start: int | None = None,
               allow_incomplete: bool = False) -> Image:
    """Open and validate an image; raises :class:`FormatError` (or
    :class:`IncompleteImageError`) with the offset of what is wrong,
    :class:`ImageNotFoundError` if there is no such file, and
    :class:`FileError` if it is not a regular file.

    Without ``start`` (or with 0) the stream is found: at the file's start,
    or inside a libvirt save file (``image.container`` says which)."""
    return Image(path, start=start, allow_incomplete=allow_incomplete)
