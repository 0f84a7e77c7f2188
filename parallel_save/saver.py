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

from ._version import __version__
from .blocks import RamBlock
from .channels import ChannelGroup, deal_chunks
from .control import (
    BYTES_WRITTEN,
    CHUNK_PAGES,
    PAGES_DONE,
    PAGES_WRITTEN,
    UNCHANGED_PAGES,
    ZERO_PAGES,
)
from .directio import check_direct_io
from .errors import BlockError, DirectIOError, SaveStateError
from .format import encode_setup, encode_tail, plan_layout
from .signals import signals_deferred
from .stats import ChannelStats, PassStats, SaveStats, StatusBoard
from .tracking import DirtyTracker, count_dirty, merge_dirty
from .tracking.hashing import draw_keys

MAX_CHANNELS = 64

# progress(phase, pages handled in this pass, pages to handle in this pass)
ProgressCallback = Callable[[str, int, int], None]
DirtySet = Mapping[str, Any] | DirtyTracker | None
TRACKERS = (None, "hash")
# Saver.run's default: stop iterating once at most this share of the pages
# is dirty.
DIRTY_FRACTION_LIMIT = 0.01


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
    ``None`` means every page; a tracker (:class:`DirtyLog`,
    :class:`UffdTracker`) means what it collects now.  ``tracker="hash"``
    makes every pass hash the pages it looks at and write only those whose
    hash changed since the file got them (no cooperation from writers:
    tracking/hashing.py).  :meth:`run` does a whole live save.
    ``sync=False`` skips fdatasync (QEMU does not sync either; use it to
    compare).  ``start`` places the stream at a byte offset inside an
    existing file (QEMU's ``file:PATH,offset=N``); bytes before it are left
    alone.

    Unless ``in_place`` (or ``start``) is given, the save writes a hidden
    temporary file beside ``path`` (beside the file it leads to, if it is a
    symbolic link) and renames it over that file once complete, so a failed
    save never destroys an older image.  With
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
    (or leaving the ``with`` block) remains.  Ctrl-C stops a save the same
    way; SIGTERM does too under :func:`parallel_save.signals.terminate_cleanly`
    (without it, Python dies at once and leaves the hidden partial file).
    """

    def __init__(self, path: str | os.PathLike, blocks: Sequence[RamBlock], channels: int = 4,
                 direct_io: bool = False, machine: str = "none", *, sync: bool = True,
                 start: int = 0, in_place: bool = False,
                 status_board: str | bool | None = None,
                 on_progress: ProgressCallback | None = None,
                 description: Mapping[str, Any] | None = None,
                 tracker: str | None = None) -> None:
        if tracker not in TRACKERS:
            raise ValueError(f"tracker must be one of {TRACKERS}, not {tracker!r}")
        self.tracker = tracker
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
        # The file that a complete save renames its partial file over.
        self._replacing: str | None = None
        self._fd: int | None = None
        self._group: ChannelGroup | None = None
        self._board: StatusBoard | None = None

    # --- context manager ---

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # Unclosed: no ``with``, or a Ctrl-C that struck between the end of
        # the block and close().  Its channels and partial file would
        # outlive it.
        if getattr(self, "state", "closed") not in ("new", "closed"):
            warnings.warn(f"{self.path}: a Saver dropped without close(); closing it",
                          ResourceWarning, stacklevel=2)
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
        self._group = ChannelGroup.launch(
            self.channels, self.write_path, writing=True, direct_io=self.direct_io,
            sources=[b.source for b in self.blocks],
            pages_offsets=[b.pages_offset for b in self.layout.blocks],
            hashing=self.tracker == "hash")
        if self.tracker == "hash":
            self._group.control.hash_keys[:] = draw_keys()
        self.stats.phases["setup"] = time.perf_counter() - started
        self.state = "setup"
        self.stats.status = "active"
        self._publish()

    def iterate(self, dirty: DirtySet = None) -> PassStats:
        """One pass: write the dirty pages (all pages when ``dirty`` is None)
        at their fixed offsets, clear the bits of those found zero."""
        self._expect(("setup", "iterate"), "iterate")
        pages = self._check_dirty(self._collected(dirty, final=False))
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
        pages = self._check_dirty(self._collected(dirty, final=True))
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
        if self.sync and not self._replacing:
            # Written in place, the file is never renamed: the bitmaps must
            # be on disk before the END that makes them count.
            self._on_file(os.fdatasync)
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
            renamed = self._replacing
            if renamed:
                os.rename(self.write_path, renamed)
                self.write_path, self._replacing = renamed, None
            self.stats.status = "completed"
            self.state = "completed"
        try:
            if renamed and self.sync:
                _fsync_directory(renamed)
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
            self._check_direct_io()  # before the truncation below destroys anything
            # Drop any older stream here, so that a failure leaves no stale END.
            self._on_file(os.ftruncate, self.layout.start)
        else:
            # Beside the file the path leads to, so that the rename is atomic
            # and a symbolic link keeps pointing at the image.
            target = os.path.realpath(self.path)
            directory, name = os.path.split(target)
            partial = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")
            self._fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self.write_path, self._replacing = partial, target
            self._check_direct_io()

    def _check_direct_io(self) -> None:
        """Refuse O_DIRECT before anything is written: on failure the
        temporary file goes away and nothing is left at the path."""
        if not self.direct_io:
            return
        try:
            check_direct_io(self.write_path, writable=True, shown=self.path)
        except DirectIOError:
            os.close(self._fd)
            self._fd = None
            if self._replacing is not None:
                os.unlink(self.write_path)
                self.write_path, self._replacing = self.path, None
            raise

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
        target = self._replacing
        try:
            self._on_file(os.ftruncate, self.layout.start)
            self._write_setup()
            reset = True
        except OSError as error:
            reset = False
            if target is None:
                warnings.warn(f"{self.path}: the failed save could not cut the file "
                              f"back to an empty image: {error}", RuntimeWarning,
                              stacklevel=3)
        if target is None:
            return
        try:
            # Renamed only when sure to read as incomplete: the reset may
            # have failed after complete wrote END.
            if reset and not os.path.lexists(target):
                os.rename(self.write_path, target)
            else:
                os.unlink(self.write_path)
        except FileNotFoundError:
            pass  # the directory went away, and the partial file with it
        except OSError as error:
            warnings.warn(f"{self.write_path}: the failed save's partial file could "
                          f"not be removed: {error}", RuntimeWarning, stacklevel=3)
        self.write_path, self._replacing = target, None

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

    def _check_tracker(self, tracker: DirtyTracker) -> None:
        expected = {b.name: b.pages for b in self.blocks}
        if tracker.block_pages != expected:
            raise BlockError(f"the tracker follows blocks {tracker.block_pages} (name: "
                             f"pages), the save has {expected}")

    def _collected(self, dirty: DirtySet, final: bool) -> Mapping[str, Any] | None:
        """A tracker's dirty set, collected now; checked first, because a
        collected set that were then refused would lose its marks."""
        if not isinstance(dirty, DirtyTracker):
            return dirty
        self._check_tracker(dirty)
        return dirty.collect(final=final)

    def _check_dirty(self, dirty: DirtySet) -> list[np.ndarray | None]:
        """Each block's dirty pages (None: none), or a :class:`BlockError`
        before the pass changes anything."""
        if dirty is None:
            # Made per pass, not kept: a byte per page for the whole save.
            return [np.ones(b.pages, dtype=bool) for b in self.blocks]
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
                           int(delta[BYTES_WRITTEN]), time.perf_counter() - started,
                           int(delta[UNCHANGED_PAGES]))
        self.stats.passes.append(result)
        self.stats.channel_stats = [ChannelStats.from_row(i, row)
                                    for i, row in enumerate(counters)]
        self._publish(phase=phase)  # observers see the pass counted at once
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
        self._board.publish(status=self.stats.status,
                            path=self.path, passes=len(self.stats.passes),
                            pages_written=self.stats.pages_written,
                            zero_pages=self.stats.zero_pages,
                            bytes_written=self.stats.bytes_written,
                            phases=dict(self.stats.phases), channels=channels, **extra)

    # --- live save ---

    def run(self, tracker: DirtyTracker | None = None, *, max_passes: int = 10,
            dirty_pages_limit: int | None = None,
            stop_writers: Callable[[], None] | None = None) -> SaveStats:
        """A whole live save, the way QEMU migrates a running VM: set up
        (unless done), start ``tracker``, write every page once, then pass
        over the dirty pages until at most ``dirty_pages_limit`` are left
        (default: 1 % of the pages; -1: never, always run ``max_passes``) or
        ``max_passes`` passes (the full one included) have run; then call
        ``stop_writers``, after which nothing may write to the blocks (like
        stopping the VM), and complete with the pages dirtied since the last
        pass.  Returns the save's stats;
        ``stats.passes`` has each pass's dirty pages and seconds.

        ``tracker`` is a :class:`DirtyLog` or an :class:`UffdTracker`; or
        None with ``Saver(..., tracker="hash")``, where every pass looks at
        every page and the count that must fall under the limit is the
        pages the last pass found changed.
        """
        if tracker is None and self.tracker != "hash":
            raise ValueError("run needs a tracker (a DirtyLog or an UffdTracker), or a "
                             "Saver made with tracker='hash'")
        if not isinstance(max_passes, int) or max_passes < 1:
            raise ValueError(f"max_passes must be a whole number of at least 1, "
                             f"not {max_passes!r}")
        if dirty_pages_limit is None:
            dirty_pages_limit = int(sum(b.pages for b in self.blocks) * DIRTY_FRACTION_LIMIT)
        if tracker is not None:
            self._check_tracker(tracker)
        if self.state == "new":
            self.setup()
        if tracker is not None:
            tracker.start()
        result = self.iterate()
        collected = None  # dirty pages collected but not saved yet
        for _ in range(max_passes - 1):
            if tracker is None:
                dirty_pages = result.dirty_pages - result.pages_unchanged
            else:
                collected = tracker.collect()
                dirty_pages = count_dirty(collected)
            if dirty_pages <= dirty_pages_limit:
                break
            result = self.iterate(collected)
            collected = None
        if stop_writers is not None:
            stop_writers()
        if tracker is None:
            return self.complete()
        last = tracker.collect(final=True)
        return self.complete(last if collected is None else merge_dirty(collected, last))


def save(path: str | os.PathLike, blocks: Sequence[RamBlock], channels: int = 4,
         **options: Any) -> SaveStats:
    """Save ``blocks`` in one pass: setup, then complete with every page."""
    with Saver(path, blocks, channels, **options) as saver:
        saver.setup()
        return saver.complete()
