"""Restoring: the mirror of a save.  Read the bitmaps, deal the image's
chunks to the channels, which pread the present pages straight into the
destination blocks and zero the clear ones (unless the destination is
known to be zero already, as QEMU assumes of fresh RAM)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .blocks import RamBlock
from .channels import ChannelGroup
from .directio import check_direct_io_fd
from .errors import BlockError
from .format import PAGE_SIZE
from .image import Image, open_image
from .saver import ProgressCallback, check_blocks, check_channels, check_sources
from .stats import RestoreStats

Destination = Mapping[str, Any] | Sequence[RamBlock]


def _destinations(into: Destination) -> dict[str, RamBlock]:
    if isinstance(into, Mapping):
        return {name: buffer if isinstance(buffer, RamBlock) and buffer.name == name
                else RamBlock(name, buffer) for name, buffer in into.items()}
    blocks = check_blocks(into)
    named = {b.name: b for b in blocks}
    if len(named) != len(blocks):
        raise BlockError("a destination block name is given twice")
    return named


def unmatched_blocks(image_blocks: Iterable[str], destinations: Iterable[str]
                     ) -> tuple[list[str], list[str]]:
    """The image's blocks that have no destination, and the destinations
    that name no block of the image, each in the order given."""
    image_blocks, destinations = list(image_blocks), list(destinations)
    return ([n for n in image_blocks if n not in destinations],
            [n for n in destinations if n not in image_blocks])


def restore(path: str | os.PathLike | Image, into: Destination,
            channels: int | None = None, *, start: int | None = None,
            direct_io: bool = False, assume_zero: bool = False,
            start_method: str | None = None,
            on_progress: ProgressCallback | None = None) -> RestoreStats:
    """Load the image at ``path`` (or an open :class:`Image`: the file
    checked is the file read) into ``into`` (``{name: buffer}`` or a list
    of :class:`RamBlock`), with ``channels`` reader processes (None: one
    per CPU, at most 8).

    Every block of the image must have a destination of exactly its length,
    and no destination may be left over: a mismatch is refused before any
    byte is written.  ``assume_zero=True`` skips zeroing the pages the image
    says are zero (right for fresh memory or a new sparse file); otherwise
    they are given back to the destination's file where it can (a hole
    reads as zero), so a sparse destination stays sparse.  The channels
    read through the descriptor that was validated, so a file renamed over
    ``path`` meanwhile cannot mix in.
    """
    channels = check_channels(channels)
    started = time.perf_counter()
    if isinstance(path, Image):
        opened = contextlib.nullcontext(path)
    else:
        opened = open_image(path, start=start)
    with opened as image:
        path = image.path
        targets = _destinations(into)
        missing, extra = unmatched_blocks(image.blocks, targets)
        if missing or extra:
            raise BlockError(f"{path}: destinations do not match the image's blocks"
                             + (f"; missing {missing}" if missing else "")
                             + (f"; not in the image {extra}" if extra else ""))
        for name, block in image.blocks.items():
            if targets[name].length != block.length:
                raise BlockError(f"{path}: block {name!r} is {block.length} bytes, its "
                                 f"destination {targets[name].length}")
        check_sources(list(targets.values()))
        blocks = list(image.blocks.values())
        # Pages whose bytes lie in holes of the image count as clear: a
        # hostile image writes no more than it holds.
        present = [b.data_bitmap() for b in blocks]
        image_fd = image.fileno()
        if direct_io:
            image_fd = check_direct_io_fd(image_fd, path, writable=False)
        try:
            group = ChannelGroup.launch(
                channels, image_fd, path, writing=False, direct_io=direct_io,
                sources=[targets[b.name].source for b in blocks],
                pages_offsets=[b.layout.pages_offset for b in blocks],
                start_method=start_method)
        finally:
            if image_fd != image.fileno():
                os.close(image_fd)  # the channels hold their own
        try:
            def progress(done: int, total: int) -> None:
                if on_progress is not None:
                    on_progress("restore", done, total)

            counts = group.restore_pass(present, not assume_zero, progress, last=True)
            stats = RestoreStats(path, channels, counts.pages_read, counts.pages_zeroed,
                                 counts.pages_read * PAGE_SIZE,
                                 channel_stats=group.channel_stats())
        except BaseException:
            group.stop(force=True)
            raise
        group.stop()
        stats.control_bytes = group.bytes_sent + group.bytes_received
        stats.seconds = time.perf_counter() - started
        return stats
