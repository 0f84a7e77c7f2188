"""Reading an image: its blocks, their offsets and bitmaps, their bytes.

``open_image`` parses and validates the whole stream once (format.py) and
refuses an incomplete one unless asked; the returned :class:`Image` reads
blocks lazily, like safetensors' ``safe_open``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from .container import Container, detect_stream
from .errors import BlockError, FormatError
from .format import (
    PAGE_SIZE,
    BlockLayout,
    StreamInfo,
    bit_runs,
    decode_stream,
    read_bitmap,
    require_complete,
)

# Positioned reads of at most this many bytes, as QEMU reads (FORMAT.md).
READ_LIMIT = 4 << 20


@dataclass(frozen=True)
class BlockInfo:
    """A block as the image holds it."""

    layout: BlockLayout
    bitmap: np.ndarray  # bool per page: True = the page's bytes are in the file

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def length(self) -> int:
        return self.layout.length

    @property
    def pages(self) -> int:
        return self.layout.pages

    @property
    def pages_present(self) -> int:
        return int(np.count_nonzero(self.bitmap))

    @property
    def pages_zero(self) -> int:
        return self.pages - self.pages_present


class Image:
    """An open image file.  Use as a context manager, or call ``close``."""

    def __init__(self, path: str | os.PathLike, *, start: int | None = None,
                 allow_incomplete: bool = False) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such image file") from None
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
            self.blocks = {b.name: BlockInfo(b, read_bitmap(self._fd, self.path, b))
                           for b in self.info.layout.blocks}
        except BaseException:
            os.close(self._fd)
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

    def read_block(self, name: str, out: Any = None) -> np.ndarray:
        """The block's bytes: present pages from the file, clear pages zero.

        ``out`` (a writable buffer of the block's length) is filled in
        place; otherwise a new array is returned.
        """
        if not self.info.complete:
            require_complete(self.info, self.path)
        try:
            block = self.blocks[name]
        except KeyError:
            raise BlockError(f"{self.path}: no block named {name!r} (it has "
                             f"{', '.join(map(repr, self.blocks))})") from None
        if out is None:
            target = np.zeros(block.length, dtype=np.uint8)
        else:
            target = np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)
            if target.size != block.length:
                raise BlockError(f"block {name!r} is {block.length} bytes, the "
                                 f"destination {target.size}")
            if target.flags.writeable is False:
                raise BlockError(f"the destination for block {name!r} is read-only")
        if out is not None:
            # Only the clear pages: the present ones are read over below.
            for first, last in zip(*bit_runs(~block.bitmap)):
                target[first * PAGE_SIZE:last * PAGE_SIZE] = 0
        for first, last in zip(*bit_runs(block.bitmap)):
            for at in range(first * PAGE_SIZE, last * PAGE_SIZE, READ_LIMIT):
                end = min(last * PAGE_SIZE, at + READ_LIMIT)
                view = memoryview(target[at:end])
                got = os.preadv(self._fd, [view], block.layout.pages_offset + at)
                if got != end - at:
                    raise FormatError(f"block {name!r}: short read of pages",
                                      path=self.path, offset=block.layout.pages_offset + at)
        return target


def open_image(path: str | os.PathLike, *, start: int | None = None,
               allow_incomplete: bool = False) -> Image:
    """Open and validate an image; raises :class:`FormatError` (or
    :class:`IncompleteImageError`) with the offset of what is wrong.

    Without ``start`` (or with 0) the stream is found: at the file's start,
    or inside a libvirt save file (``image.container`` says which)."""
    return Image(path, start=start, allow_incomplete=allow_incomplete)
