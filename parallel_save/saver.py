"""Saving: QEMU's three phases, setup, iterate and complete.

The Saver decides what to save (which pages each pass covers) and when the
file may claim to be complete; the channels (channels.py, workers/) move
the bytes; format.py says where they go.  The ordering that makes a save
trustworthy lives here:

1. setup writes the header and records; nothing claims completeness yet;
2. every pass waits for all channels before it returns (invariant 3);
3. complete syncs the pages, then writes the bitmaps, then the RAM END,
   EOF and description, syncs again, and only then renames the file into
   place.  A save that stops anywhere before leaves no END: it can never be
   loaded as if it had completed (invariant 5), and an older image at the
   same path is not touched.

A save that fails, however it fails (a channel raises or dies, the disk
fills, Ctrl-C), stops every channel, then cuts its file back to what setup
wrote: a small incomplete image that holds no pages, so a full disk gets
its space back.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import numpy as np

from . import __version__
from .blocks import RamBlock
from .channels import ChannelGroup, deal_chunks
from .control import BYTES_WRITTEN, CHUNK_PAGES, PAGES_DONE, PAGES_WRITTEN, ZERO_PAGES
from .directio import check_direct_io
from .errors import BlockError, SaveStateError
from .format import encode_setup, encode_tail, plan_layout
from .signals import signals_deferred
from .stats import ChannelStats, PassStats, SaveStats, StatusBoard

MAX_CHANNELS = 64

# progress(phase, pages handled in this pass, pages to handle in this pass)
ProgressCallback = Callable[[str, int, int], None]
DirtySet = Mapping[str, Any] | None


def check_channels(channels: int) -> int:
    if not isinstance(channels, int) or isinstance(channels, bool) \
            or not 1 <= channels <= MAX_CHANNELS:
        raise ValueError(f"channels must be an integer from 1 to {MAX_CHANNELS}, "
                         f"not {channels!r}")
    return channels


def check_blocks(blocks: Sequence[RamBlock]) -> list[RamBlock]:
    blocks = list(blocks)
    for block in blocks:
        if not isinstance(block, RamBlock):
            raise BlockError(f"expected RamBlock objects, got {type(block).__name__}")
    return blocks


def check_sources(blocks: Sequence[RamBlock]) -> None:
    """Refuse a block whose file is gone or now too short, before any
    channel maps it (a channel would fail to attach, or die of SIGBUS)."""
    for block in blocks:
        source = block.source
        try:
            size = os.stat(source.path).st_size
        except FileNotFoundError:
            raise BlockError(f"block {block.name!r}: its file {source.path} is gone "
                             f"(removed after the block was made)") from None
        if size < source.offset + source.length:
            raise BlockError(f"block {block.name!r}: its file {source.path} is {size} "
                             f"bytes, too short for {source.length} bytes from offset "
                             f"{source.offset} (truncated after the block was made)")


# What each state means to someone calling a method at the wrong time.
_STATE_WORDS = {
    "new": "not set up yet (call setup first)",
    "setup": "already set up",
    "iterate": "already set up",
    "failed": "failed (an earlier call raised; close it and start a new save)",
    "completed": "completed",
    "closed": "closed",
}


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Saver:
    """Save RAM blocks to ``path`` as a QEMU mapped-ram migration stream.

    ::

        with Saver(path, blocks, channels=4) as saver:
            saver.setup()
            saver.iterate()                  # every page, while memory changes
            saver.iterate(dirty={...})       # only what changed since
            saver.complete(dirty={...})      # last pass, then bitmaps, END, EOF

    ``dirty`` maps block names to bool arrays (True = the page changed);
    ``None`` means every page.  ``sync=False`` skips fdatasync (QEMU does not
    sync either; use it to compare).  ``start`` places the stream at a byte
    offset inside an existing file (QEMU's ``file:PATH,offset=N``); bytes
    before it are left alone.

    Unless ``in_place`` (or ``start``) is given, the save writes a hidden
    temporary file beside ``path`` and renames it over ``path`` once
    complete, so a failed save never destroys an older image.  With
    ``in_place`` the file is truncated at setup: a failed save leaves an
    incomplete image there, never a stale complete one.  When there is no
    older image, a failed save leaves an incomplete one at ``path`` too
    (``open_image`` raises :class:`IncompleteImageError` for it), cut back
    to its headers so that it takes no space.

    Every failure raises: :class:`ChannelError` when a channel raised (the
    cause names the file and the error, such as "No space left on
    device") or died (how: "was killed by SIGKILL"), ``OSError`` naming the
    file when the coordinator's own write, sync or rename fails,
    :class:`SaveStateError` for a call out of order, :class:`BlockError` for
    a bad dirty set (refused before anything happens; the saver stays
    usable).  Any other failure leaves the saver ``failed``: only ``close``
    (or leaving the ``with`` block) remains.
    """

    def __init__(self, path: str | os.PathLike, blocks: Sequence[RamBlock], channels: int = 4,
                 direct_io: bool = False, machine: str = "none", *, sync: bool = True,
                 start: int = 0, in_place: bool = False,
                 status_board: str | bool | None = None,
                 on_progress: ProgressCallback | None = None,
                 description: Mapping[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        self.blocks = check_blocks(blocks)
        self.channels = check_channels(channels)
        self.direct_io = bool(direct_io)
        self.sync = bool(sync)
        self.in_place = bool(in_place) or start > 0
        self.layout = plan_layout(((b.name, b.length) for b in self.blocks), machine,
                                  start=start)
        self.on_progress = on_progress
        self.user_description = dict(description or {})
        self._status_name = status_board
        self.stats = SaveStats(self.path, self.channels, self.direct_io, self.sync)
        self.state = "new"
        self.write_path = self.path
        self._fd: int | None = None
        self._group: ChannelGroup | None = None
        self._board: StatusBoard | None = None
        self._all_dirty = [np.ones(b.pages, dtype=bool) for b in self.blocks]

    # --- context manager ---

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- phases ---

    def setup(self) -> None:
        """Write the stream header and the block records, start the channels."""
        self._expect("new", "setup")
        check_sources(self.blocks)
        self.state = "failed"  # until setup returns
        started = time.perf_counter()
        if self._status_name:
            self._board = StatusBoard(None if self._status_name is True else self._status_name)
        self._open_file()
        # The header goes first: from here on a failure leaves an image
        # that reads as incomplete, not an empty file.
        self._write_setup()
        if self.direct_io:
            check_direct_io(self.write_path, writable=True)
        self._group = ChannelGroup.launch(
            self.channels, self.write_path, writing=True, direct_io=self.direct_io,
            sources=[b.source for b in self.blocks],
            pages_offsets=[b.pages_offset for b in self.layout.blocks])
        self.stats.phases["setup"] = time.perf_counter() - started
        self.state = "setup"
        self._publish()

    def iterate(self, dirty: DirtySet = None) -> PassStats:
        """One pass: write the dirty pages (all pages when ``dirty`` is None)
        at their fixed offsets, clear the bits of those found zero."""
        self._expect(("setup", "iterate"), "iterate")
        pages = self._check_dirty(dirty)
        self.state = "failed"  # until the pass returns
        started = time.perf_counter()
        result = self._pass("iterate", pages)
        self.stats.phases["iterate"] = (self.stats.phases.get("iterate", 0.0)
                                        + time.perf_counter() - started)
        self.state = "iterate"
        return result

    def complete(self, dirty: DirtySet = None) -> SaveStats:
        """The last pass, then bitmaps, END, EOF; the image is then valid."""
        self._expect(("setup", "iterate"), "complete")
        pages = self._check_dirty(dirty)
        self.state = "failed"
        started = time.perf_counter()
        self._pass("complete", pages)
        group = self._group
        merged = group.control.merged_file_bitmap()
        if self.sync:
            self._on_file(os.fdatasync)  # the pages are on disk before the bitmaps claim them
        for index, block in enumerate(self.layout.blocks):
            self._pwrite(group.control.block_bits(merged, index).tobytes(),
                         block.bitmap_offset)
        self.stats.pages_present = int(np.unpackbits(merged).sum())
        iterate_passes = sum(1 for _ in self.stats.passes) - 1
        tail = encode_tail(self.layout, iterate_passes, self._description(merged))
        self._pwrite(tail, self.layout.tail_offset)
        self._on_file(os.ftruncate, self.layout.tail_offset + len(tail))
        if self.sync:
            self._on_file(os.fdatasync)
        # Renamed and completed, or neither: a Ctrl-C in between would have
        # close() cut back a file that is already in place.
        with signals_deferred():
            renamed = self.write_path != self.path
            if renamed:
                os.rename(self.write_path, self.path)
                self.write_path = self.path
            self.stats.status = "completed"
            self.state = "completed"
        try:
            if renamed and self.sync:
                _fsync_directory(self.path)
            self.stats.phases["complete"] = time.perf_counter() - started
            self._publish()
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        """Stop the channels and release everything.  Safe to call twice;
        called by ``with`` and after ``complete``."""
        if self.state == "closed":
            return
        # A second Ctrl-C waits for the cleanup of the first to finish.
        with signals_deferred():
            completed = self.state == "completed"
            try:
                if self._group is not None:
                    self._group.stop(force=not completed)
                    self.stats.control_bytes = (self._group.bytes_sent
                                                + self._group.bytes_received)
                    self._group = None
            finally:
                if not completed and self._fd is not None:
                    self._abandon()
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                if not completed and self.state != "new":
                    self.stats.status = "failed"
                if self._board is not None:
                    self._publish()
                    self._board.close()
                    self._board = None
                self.state = "closed"

    # --- helpers ---

    @property
    def status_board(self) -> str | None:
        """The name under which the status board is published, if any."""
        return self._board.name if self._board else None

    def _expect(self, states, action: str) -> None:
        states = (states,) if isinstance(states, str) else states
        if self.state not in states:
            raise SaveStateError(f"cannot {action}: the saver of {self.path} is "
                                 f"{_STATE_WORDS[self.state]}")

    def _open_file(self) -> None:
        if self.in_place:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            # Drop any older stream here, so that a failure leaves no stale END.
            self._on_file(os.ftruncate, self.layout.start)
        else:
            directory, name = os.path.split(os.path.abspath(self.path))
            partial = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")
            self._fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self.write_path = partial

    def _write_setup(self) -> None:
        for offset, data in encode_setup(self.layout):
            self._pwrite(data, offset)

    def _abandon(self) -> None:
        """A save that failed, its channels stopped: cut the file back to
        what setup wrote (no END, no pages).  A partial file then replaces
        nothing: it is removed when an older image exists, else renamed to
        ``path`` to say that a save was tried and failed.  What cannot be
        cleaned up is reported with a warning, never raised over the error
        that made the save fail."""
        partial = self.write_path != self.path
        try:
            self._on_file(os.ftruncate, self.layout.start)
            self._write_setup()
            reset = True
        except OSError as error:
            reset = False
            if not partial:
                warnings.warn(f"{self.path}: the failed save could not cut the file "
                              f"back to an empty image: {error}", RuntimeWarning,
                              stacklevel=3)
        if not partial:
            return
        try:
            # Renamed only when sure to read as incomplete: the reset may
            # have failed after complete wrote END.
            if reset and not os.path.exists(self.path):
                os.rename(self.write_path, self.path)
            else:
                os.unlink(self.write_path)
        except FileNotFoundError:
            pass  # the directory went away, and the partial file with it
        except OSError as error:
            warnings.warn(f"{self.write_path}: the failed save's partial file could "
                          f"not be removed: {error}", RuntimeWarning, stacklevel=3)
        self.write_path = self.path

    def _on_file(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(fd, *args)`` on the image file; its error names the file,
        which errors of calls on a bare descriptor do not."""
        try:
            return call(self._fd, *args)
        except OSError as error:
            raise OSError(error.errno, error.strerror, self.write_path) from None

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = self._on_file(os.pwrite, view, offset)
            view, offset = view[written:], offset + written

    def _check_dirty(self, dirty: DirtySet) -> list[np.ndarray | None]:
        """Each block's dirty pages (None: none), or a :class:`BlockError`
        before the pass changes anything."""
        if dirty is None:
            return list(self._all_dirty)
        if not isinstance(dirty, Mapping):
            raise BlockError(f"a dirty set maps block names to one bool per page, "
                             f"not a {type(dirty).__name__}")
        unknown = set(dirty) - {b.name for b in self.blocks}
        if unknown:
            raise BlockError(f"dirty set names unknown blocks: {sorted(map(str, unknown))}")
        checked = []
        for block in self.blocks:
            pages = dirty.get(block.name)
            if pages is not None:
                pages = np.asarray(pages)
                if pages.dtype.kind not in "biu" or pages.shape != (block.pages,):
                    raise BlockError(f"dirty set for block {block.name!r} is a "
                                     f"{pages.dtype} array of shape {pages.shape}, "
                                     f"expected one bool per page: ({block.pages},)")
                pages = pages.astype(bool, copy=False)
            checked.append(pages)
        return checked

    def _load_dirty(self, dirty: list[np.ndarray | None]) -> int:
        """Pack the pass's checked dirty set into the control segment;
        returns the number of dirty pages."""
        control = self._group.control
        total = 0
        for index, pages in enumerate(dirty):
            bits = control.block_bits(control.pass_bitmap, index)
            if pages is None:
                bits[:] = 0
                continue
            packed = np.packbits(pages, bitorder="little")
            bits[:packed.size] = packed
            bits[packed.size:] = 0
            total += int(np.count_nonzero(pages))
        return total

    def _dirty_chunks(self) -> np.ndarray:
        control = self._group.control
        bytes_per_chunk = CHUNK_PAGES // 8
        found = []
        for index, base in enumerate(control.layout.chunk_bases):
            bits = control.block_bits(control.pass_bitmap, index)
            chunks = -(-bits.size // bytes_per_chunk)
            padded = np.zeros(chunks * bytes_per_chunk, dtype=np.uint8)
            padded[:bits.size] = bits
            found.append(base + np.flatnonzero(padded.reshape(chunks, -1).any(axis=1)))
        return np.concatenate(found)

    def _pass(self, phase: str, dirty: list[np.ndarray | None]) -> PassStats:
        started = time.perf_counter()
        group = self._group
        dirty_pages = self._load_dirty(dirty)
        counters = group.control.counters
        before = counters.sum(axis=0)
        shards = deal_chunks(self._dirty_chunks(), self.channels)

        def progress() -> None:
            done = int(counters[:, PAGES_DONE].sum() - before[PAGES_DONE])
            if self.on_progress is not None:
                self.on_progress(phase, done, dirty_pages)
            self._publish(phase=phase, pass_pages_done=done, pass_pages=dirty_pages)

        group.run_pass([("save", shard) for shard in shards], progress)
        progress()
        after = counters.sum(axis=0)
        delta = after - before
        result = PassStats(len(self.stats.passes) + 1, dirty_pages,
                           int(delta[PAGES_WRITTEN]), int(delta[ZERO_PAGES]),
                           int(delta[BYTES_WRITTEN]), time.perf_counter() - started)
        self.stats.passes.append(result)
        self.stats.channel_stats = [ChannelStats.from_row(i, row)
                                    for i, row in enumerate(counters)]
        return result

    def _description(self, merged: np.ndarray) -> dict[str, Any]:
        """Our metadata after EOF; QEMU reads past it."""
        control = self._group.control
        blocks = []
        for index, block in enumerate(self.layout.blocks):
            present = int(np.unpackbits(control.block_bits(merged, index)).sum())
            blocks.append({"name": block.name, "length": block.length,
                           "pages": block.pages, "pages_present": present,
                           "pages_zero": block.pages - present})
        return {"parallel_save": {
            "version": __version__, "machine": self.layout.machine,
            "blocks": blocks, "channels": self.channels, "direct_io": self.direct_io,
            "passes": len(self.stats.passes), "synced": self.sync,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"user": self.user_description} if self.user_description else {}),
        }}

    def _publish(self, **extra: Any) -> None:
        if self._board is None:
            return
        channels = [s.__dict__ for s in self.stats.channel_stats]
        self._board.publish(status=self.stats.status if self.state != "failed" else "active",
                            path=self.path, passes=len(self.stats.passes),
                            pages_written=self.stats.pages_written,
                            zero_pages=self.stats.zero_pages,
                            bytes_written=self.stats.bytes_written,
                            phases=dict(self.stats.phases), channels=channels, **extra)


def save(path: str | os.PathLike, blocks: Sequence[RamBlock], channels: int = 4,
         **options: Any) -> SaveStats:
    """Save ``blocks`` in one pass: setup, then complete with every page."""
    with Saver(path, blocks, channels, **options) as saver:
        saver.setup()
        return saver.complete()
