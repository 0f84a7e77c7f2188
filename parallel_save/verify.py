"""Checking an image: what it holds (:func:`describe_image`) and whether it
holds given bytes (:func:`verify_image`).

Verify reads the image with positioned reads through the image's own
validated descriptor, never a mapping: an image truncated while it is
compared gives a :class:`FormatError` naming the file and offset, not a
SIGBUS.  Memory is bounded: a few MiB of pages at a time, and one bit per
page for the pages that differ.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blocks import RamBlock
from .errors import BlockError, FileError, FormatError
from .files import open_regular
from .format import PAGE_SIZE, bit_runs, our_metadata
from .image import Image, open_image

# Pages compared per step: 4 MiB of the image and 4 MiB of the source.
COMPARE_PAGES = 1024
# Page numbers listed per block in a summary (to_dict's "first_differing").
LISTED_PAGES = 20

Source = str | os.PathLike | RamBlock | Any


@dataclass
class BlockVerdict:
    """How one block of the image compares with its source.

    ``differing`` is a bitmap in QEMU's order (bit i = page i differs),
    one bit per page whatever the number of differences.
    """

    name: str
    pages: int
    differing: np.ndarray

    @property
    def pages_differing(self) -> int:
        return int(np.bitwise_count(self.differing).sum(dtype=np.int64))

    @property
    def equal(self) -> bool:
        return not self.differing.any()

    def differing_pages(self, limit: int | None = None) -> np.ndarray:
        """The numbers of the pages that differ, in order (the first
        ``limit`` of them), found a bounded step at a time."""
        found: list[np.ndarray] = []
        count = 0
        step = COMPARE_PAGES * 64
        for first in range(0, self.differing.size, step):
            bits = np.unpackbits(self.differing[first:first + step], bitorder="little")
            pages = first * 8 + np.flatnonzero(bits)
            found.append(pages)
            count += pages.size
            if limit is not None and count >= limit:
                break
        pages = np.concatenate(found) if found else np.empty(0, np.int64)
        return pages if limit is None else pages[:limit]


@dataclass
class VerifyResult:
    """What :func:`verify_image` found."""

    path: str
    blocks: dict[str, BlockVerdict]
    not_compared: list[str] = field(default_factory=list)

    @property
    def pages_differing(self) -> int:
        return sum(b.pages_differing for b in self.blocks.values())

    @property
    def equal(self) -> bool:
        """Every block compared equals its source."""
        return all(b.equal for b in self.blocks.values())

    @property
    def complete(self) -> bool:
        """Every block of the image was compared."""
        return not self.not_compared

    @property
    def ok(self) -> bool:
        """The image holds exactly the sources, all of its blocks checked."""
        return self.equal and self.complete

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``parallel-save verify --json`` prints)."""
        return {"image": self.path, "equal": self.equal, "complete": self.complete,
                "pages_differing": self.pages_differing,
                "blocks": {name: {"pages": b.pages, "pages_differing": b.pages_differing,
                                  "first_differing": b.differing_pages(LISTED_PAGES).tolist()}
                           for name, b in self.blocks.items()},
                "not_compared": list(self.not_compared)}


class _FileSource:
    """A source block read from a file with pread (no mapping: a file
    truncated under us is an error, not a SIGBUS)."""

    def __init__(self, name: str, path: str | os.PathLike) -> None:
        self.name, self.path = name, os.fspath(path)
        self.fd = open_regular(self.path)
        self.length = os.fstat(self.fd).st_size

    def read(self, first: int, count: int) -> np.ndarray:
        buffer = np.empty(count, dtype=np.uint8)
        if os.preadv(self.fd, [memoryview(buffer)], first) != count:
            raise FileError(None, f"short read at offset {first}: the source of block "
                            f"{self.name!r} shrank while it was compared", self.path)
        return buffer

    def close(self) -> None:
        os.close(self.fd)


class _MemorySource:
    def __init__(self, name: str, buffer: Any) -> None:
        self.name = name
        array = buffer.array if isinstance(buffer, RamBlock) else buffer
        try:
            self.array = np.frombuffer(memoryview(array).cast("B"), dtype=np.uint8)
        except TypeError:
            raise BlockError(f"the source of block {name!r} must be a path or a buffer, "
                             f"not {type(buffer).__name__}") from None
        self.length = self.array.size

    def read(self, first: int, count: int) -> np.ndarray:
        return self.array[first:first + count]

    def close(self) -> None:
        pass


def _open_source(name: str, source: Source) -> _FileSource | _MemorySource:
    if isinstance(source, (str, os.PathLike)):
        return _FileSource(name, source)
    return _MemorySource(name, source)


def _read_image_pages(image: Image, name: str, pages_offset: int, present: np.ndarray,
                      first_page: int) -> np.ndarray:
    """The pages ``first_page + i`` of a block as a restore gives them:
    present ones from the image, the rest zero."""
    out = np.zeros(present.size * PAGE_SIZE, dtype=np.uint8)
    fd = image.fileno()
    for first, last in zip(*bit_runs(present)):
        offset = pages_offset + (first_page + first) * PAGE_SIZE
        count = (last - first) * PAGE_SIZE
        view = memoryview(out[first * PAGE_SIZE:last * PAGE_SIZE])
        if os.preadv(fd, [view], offset) != count:
            raise FormatError(f"block {name!r}: short read of pages: the image was "
                              f"truncated while it was compared", path=image.path,
                              offset=offset)
    return out


def compare_block(image: Image, name: str, source: Source) -> BlockVerdict:
    """Compare one block of the open image with ``source`` (a path or a
    buffer of the block's length): a present page must equal the source's,
    a clear page must be zero in the source (its slot may hold stale bytes)."""
    block = image.block(name)
    opened = _open_source(name, source)
    try:
        if opened.length != block.length:
            where = f"{opened.path} is" if isinstance(opened, _FileSource) else "its source is"
            raise BlockError(f"block {name!r}: the image holds {block.length} bytes, "
                             f"{where} {opened.length}")
        packed = block.data_bitmap()
        differing = np.zeros(packed.size, dtype=np.uint8)
        for first_page in range(0, block.pages, COMPARE_PAGES):
            count = min(COMPARE_PAGES, block.pages - first_page)
            present = np.unpackbits(packed[first_page // 8:(first_page + count + 7) // 8],
                                    count=count, bitorder="little").view(bool)
            stored = _read_image_pages(image, name, block.layout.pages_offset, present,
                                       first_page)
            expected = opened.read(first_page * PAGE_SIZE, count * PAGE_SIZE)
            pages = (stored.view(np.uint64).reshape(count, -1)
                     != expected.view(np.uint64).reshape(count, -1)).any(axis=1)
            if pages.any():
                # COMPARE_PAGES is a multiple of 8: whole bytes of the bitmap.
                differing[first_page // 8:first_page // 8 + (count + 7) // 8] = np.packbits(
                    pages, bitorder="little")
        block.check_in_file()  # a hole read as zero may have been the file cut short
        return BlockVerdict(name, block.pages, differing)
    finally:
        opened.close()


def verify_image(path: str | os.PathLike, sources: Mapping[str, Source], *,
                 start: int = 0) -> VerifyResult:
    """Compare the image at ``path`` with ``sources``: ``{block name: a path
    or a buffer}``.  Blocks of the image with no source are listed in
    ``not_compared`` (``result.ok`` is then False); a source naming no
    block of the image is a :class:`BlockError`.  Nothing is mapped: the
    image and file sources are read with pread, a few MiB at a time."""
    with open_image(path, start=start) as image:
        unknown = [n for n in sources if n not in image.blocks]
        if unknown:
            raise BlockError(f"{image.path} has no block {', '.join(map(repr, unknown))} "
                             f"(it holds {', '.join(map(repr, image.blocks))})")
        verdicts = {name: compare_block(image, name, source)
                    for name, source in sources.items()}
        return VerifyResult(image.path, verdicts,
                            [n for n in image.blocks if n not in sources])


def describe_image(image: Image) -> dict[str, Any]:
    """What an open image holds, as a JSON-ready dict (what ``parallel-save
    inspect --json`` prints; these keys are stable).  Page counts come
    from the bitmaps, counted without unpacking them; an incomplete image
    has none yet (None)."""
    size = os.fstat(image.fileno())
    complete = image.complete
    blocks = []
    for block in image.blocks.values():
        layout = block.layout
        blocks.append({
            "name": block.name, "length": block.length, "pages": block.pages,
            # The bitmaps are written last: an incomplete image has none yet.
            "pages_present": block.pages_present if complete else None,
            "pages_zero": block.pages_zero if complete else None,
            "record_offset": layout.record_offset, "bitmap_offset": layout.bitmap_offset,
            "pages_offset": layout.pages_offset,
        })
    description = image.description or {}
    return {
        "path": image.path, "machine": image.machine, "start": image.start,
        "complete": complete, "incomplete_reason": image.info.incomplete_reason,
        "iterations": image.info.passes, "capabilities": list(image.info.layout.capabilities),
        "device_state": image.info.device_sections,
        "file_size": size.st_size, "disk_usage": size.st_blocks * 512,
        "ram_bytes": sum(b["length"] for b in blocks),
        "pages": sum(b["pages"] for b in blocks),
        "pages_present": sum(b["pages_present"] for b in blocks) if complete else None,
        "pages_zero": sum(b["pages_zero"] for b in blocks) if complete else None,
        "blocks": blocks,
        "description": our_metadata(description),
        "qemu_description": our_metadata(description) is None and bool(description),
        # What holds the stream (a libvirt save file), None for a bare stream.
        "container": (image.container.to_dict() if image.container is not None
                      and image.container.kind != "qemu" else None),
    }
