"""Saving: QEMU's three phases, setup, iterate and complete.

The Saver decides what to save (which pages each pass covers) and when the
file may claim to be complete; the channel group (channels.py) moves the
bytes and owns the wire; imagefile.py creates the file and puts it in
place; format.py says where the bytes go.  The ordering that makes a save
trustworthy lives here:

1. setup writes the header and records; nothing claims completeness yet;
2. every pass waits for all channels before it returns (invariant 3);
3. complete syncs the pages, then writes the bitmaps, then the RAM END,
   EOF and description, syncs again, and only then gives the file the
   image's name.  A save that stops anywhere before leaves no END: it can
   never be loaded as if it had completed (invariant 5), and an older image
   at the same path is not touched.

A save that fails, however it fails (a channel raises or dies, the disk
fills, Ctrl-C), stops every channel, then leaves the older image, or
nothing: its unnamed file goes away.  Saving in place, it cuts the file
back to what setup wrote: a small incomplete image that holds no pages.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import numpy as np

from ._version import __version__
from .blocks import RamBlock
from .channels import ChannelGroup, choose_start_method
from .errors import BlockError, ImageWriteError, OptionError, SaveStateError
from .format import StreamLayout, encode_tail, plan_layout
from .imagefile import ImageFile
from .signals import signals_deferred
from .stats import PassStats, SaveStats, StatusBoard
from .tracking import DirtyTracker, HashTracker, merge_dirty

MAX_CHANNELS = 64

# progress(phase, pages handled in this pass, pages to handle in this pass)
ProgressCallback = Callable[[str, int, int], None]
DirtySet = Mapping[str, Any] | DirtyTracker | None
# Saver.run's default: stop iterating once at most this share of the pages
# is dirty.
DIRTY_FRACTION_LIMIT = 0.01


# The default channel count: one per CPU this process may run on, up to
# this many.  More channels than cores only queue for the CPU and for the
# file's lock (bench: on 2 cores, 2 channels save and restore faster than
# 4 or 8); beyond 8 the disk, not the CPU, is the limit.
MAX_DEFAULT_CHANNELS = 8


def default_channels() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_DEFAULT_CHANNELS))


def check_channels(channels: int | None) -> int:
    """``channels``, checked; None: :func:`default_channels`."""
    if channels is None:
        return default_channels()
    if not isinstance(channels, int) or isinstance(channels, bool) \
            or not 1 <= channels <= MAX_CHANNELS:
        raise OptionError(f"channels must be an integer from 1 to {MAX_CHANNELS}, "
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
        if block.private:
            raise BlockError(f"block {block.name!r}: its buffer is private memory; the "
                             f"channels (other processes) cannot see it. Use shared "
                             f"memory, or a Checkpointer(snapshot=True)")
        try:
            size = os.stat(source.path).st_size
        except FileNotFoundError:
            raise BlockError(f"block {block.name!r}: its file {source.path} is gone "
                             f"(removed after the block was made)") from None
        if size < source.offset + source.length:
            raise BlockError(f"block {block.name!r}: its file {source.path} is {size} "
                             f"bytes, too short for {source.length} bytes from offset "
                             f"{source.offset} (truncated after the block was made)")


def check_dirty_set(blocks: Sequence[RamBlock], dirty: Any) -> list[np.ndarray | None]:
    """A dirty set (block name -> one bool per page) checked against the
    blocks: each block's pages as bools, None where it names none; a
    :class:`BlockError` for anything else, before anything is written."""
    if not isinstance(dirty, Mapping):
        raise BlockError(f"a dirty set maps block names to one bool per page, "
                         f"not a {type(dirty).__name__}")
    unknown = set(dirty) - {b.name for b in blocks}
    if unknown:
        raise BlockError(f"dirty set names unknown blocks: {sorted(map(str, unknown))}")
    checked = []
    for block in blocks:
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


def image_description(layout: StreamLayout, present: Sequence[int],
                      **details: Any) -> dict[str, Any]:
    """What we write after EOF (QEMU reads past it): the version, machine,
    each block with its pages present (``present``, per block) and zero,
    the time, and ``details`` of the save."""
    blocks = [{"name": block.name, "length": block.length, "pages": block.pages,
               "pages_present": count, "pages_zero": block.pages - count}
              for count, block in zip(present, layout.blocks)]
    return {"parallel_save": {
        "version": __version__, "machine": layout.machine, "blocks": blocks,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}}


# What each state means to someone calling a method at the wrong time.
_STATE_WORDS = {
    "new": "not set up yet (call setup first)",
    "setup": "already set up",
    "iterate": "already set up",
    "failed": "failed (an earlier call raised; close it and start a new save)",
    "completed": "completed",
    "closed": "closed",
}


class Saver:
    """Save RAM blocks to ``path`` as a QEMU mapped-ram migration stream.

    In outline (complete examples: README.md)::

        with Saver(path, blocks, channels=4) as saver:
            saver.setup()
            saver.iterate()                  # every page, while memory changes
            saver.iterate(dirty={...})       # only what changed since
            saver.complete(dirty={...})      # last pass, then bitmaps, END, EOF

    ``dirty`` maps block names to bool arrays (True = the page changed);
    ``None`` means every page; a tracker (:class:`DirtyLog`,
    :class:`UffdTracker`) means what it collects now.  ``tracker="hash"``
    (or a :class:`HashTracker`) makes every pass hash the pages it looks
    at and write only those whose hash changed since the file got them (no
    cooperation from writers: tracking/hashing.py); any other tracker given
    here is the default of :meth:`run`, which does a whole live save.
    ``sync=False`` skips fdatasync (QEMU does not sync either; use it to
    compare).  ``start`` places the stream at a byte offset inside an
    existing file (QEMU's ``file:PATH,offset=N``); bytes before it are left
    alone.

    Unless ``in_place`` (or ``start``) is given, the save writes an unnamed
    file in ``path``'s directory and gives it the name once complete
    (imagefile.py), so a failed save leaves the older image, or nothing.
    With ``in_place`` the file is cut at setup: a failed save leaves an
    incomplete image there, never a stale complete one.  ``path`` is taken
    as given: a symbolic link or a special file there is refused unless
    ``follow_symlinks``.  The image is created with ``mode`` (default 0600:
    it holds memory), or the mode and owner of the image it replaces.
    ``start_method`` ("fork" or "spawn") says how channels are started; by
    default fork, or spawn (new interpreters) once the process has threads.

    Every failure raises a :class:`ParallelSaveError`: :class:`ChannelError`
    when a channel raised (the cause names the file and the error, such as
    "No space left on device") or died (how: "was killed by SIGKILL"),
    :class:`ImageWriteError` (also an ``OSError``, with its ``errno``)
    naming the file when the coordinator's own write, sync or rename fails,
    :class:`DestinationError` for a path that cannot be written safely,
    :class:`SaveStateError` for a call out of order, :class:`BlockError` for
    a bad dirty set (refused before anything happens; the saver stays
    usable).  Any other failure leaves the saver ``failed``: only ``close``
    (or leaving the ``with`` block) remains.  Ctrl-C stops a save the same
    way; SIGTERM does too under :func:`parallel_save.signals.terminate_cleanly`
    (without it, Python dies at once; the unnamed file goes with it).
    """

    def __init__(self, path: str | os.PathLike, blocks: Sequence[RamBlock],
                 channels: int | None = None,
                 direct_io: bool = False, machine: str = "none", *, sync: bool = True,
                 start: int = 0, in_place: bool = False, mode: int | None = None,
                 follow_symlinks: bool = False, start_method: str | None = None,
                 status_board: str | bool | None = None,
                 on_progress: ProgressCallback | None = None,
                 description: Mapping[str, Any] | None = None,
                 tracker: DirtyTracker | str | None = None) -> None:
        if tracker == "hash":
            tracker = HashTracker()
        if tracker is not None and not isinstance(tracker, DirtyTracker):
            raise OptionError(f"tracker must be a DirtyTracker (DirtyLog, UffdTracker, "
                              f"HashTracker) or 'hash', not {tracker!r}")
        if mode is not None and (not isinstance(mode, int) or not 0 <= mode <= 0o7777):
            raise OptionError(f"mode must be a file mode such as 0o600, not {mode!r}")
        self.tracker = tracker
        self.path = os.fspath(path)
        self.blocks = check_blocks(blocks)
        self.channels = check_channels(channels)
        self.direct_io = bool(direct_io)
        self.sync = bool(sync)
        self.in_place = bool(in_place) or start > 0
        self.mode = mode
        self.follow_symlinks = bool(follow_symlinks)
        self.start_method = choose_start_method(start_method)
        self.layout = plan_layout(((b.name, b.length) for b in self.blocks), machine,
                                  start=start)
        self.on_progress = on_progress
        self.user_description = dict(description or {})
        self._status_name = status_board
        self.stats = SaveStats(self.path, self.channels, self.direct_io, self.sync)
        self.state = "new"
        self._file: ImageFile | None = None
        self._group: ChannelGroup | None = None
        self._board: StatusBoard | None = None

    # --- context manager ---

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        # Unclosed: no ``with``, or a Ctrl-C that struck between the end of
        # the block and close().  Its channels and its file would
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
        self._file = ImageFile(self.path, in_place=self.in_place, mode=self.mode,
                               follow_symlinks=self.follow_symlinks, direct_io=self.direct_io)
        if self.in_place:
            self._file.cut_old_stream(self.layout.start, self.sync)
        # The header goes first: from here on a failure leaves an image
        # that reads as incomplete, not an empty file.
        self._file.write_setup(self.layout)
        hashing = isinstance(self.tracker, HashTracker)
        self._group = ChannelGroup.launch(
            self.channels, self._file.channel_fd, self.path, writing=True,
            direct_io=self.direct_io, sources=[b.source for b in self.blocks],
            pages_offsets=[b.pages_offset for b in self.layout.blocks],
            hash_keys=self.tracker.draw_keys() if hashing else None,
            start_method=self.start_method)
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
        self._pass("complete", pages, last=True)
        bitmaps = self._group.file_bitmaps()
        present = [int(np.bitwise_count(bits).sum(dtype=np.int64)) for bits in bitmaps]
        self.stats.pages_present = sum(present)
        iterate_passes = len(self.stats.passes) - 1
        if self.sync:
            self._phase("sync")
        self._file.finish(self.layout, bitmaps,
                          encode_tail(self.layout, iterate_passes, self._description(present)),
                          self.sync)
        # Named and completed, or neither: a Ctrl-C in between would have
        # close() discard a file that is already in place.
        self._phase("rename")
        with signals_deferred():
            try:
                self._file.commit(self.sync)
            except OSError as error:
                raise ImageWriteError(error.errno, error.strerror, self.path) from None
            self.stats.status = "completed"
            self.state = "completed"
        try:
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
                if self._file is not None:
                    if not completed:
                        self._abandon()
                    self._file.discard()
                    self._file = None
                if not completed and self.state != "new":
                    self.stats.status = "failed"
                if self._board is not None:
                    self._publish()
                    self._board.close()
                    self._board = None
                self.state = "closed"

    # --- helpers ---

    @property
    def write_path(self) -> str | None:
        """A path to the file being written (None before setup): ``path``
        in place, else the file's descriptor under /proc, since it has no
        name until it is complete."""
        if self._file is None:
            return None
        if self.in_place:
            return self.path
        return f"/proc/{os.getpid()}/fd/{self._file.fd}"

    @property
    def status_board(self) -> str | None:
        """The name under which the status board is published, if any."""
        return self._board.name if self._board else None

    def _expect(self, states, action: str) -> None:
        states = (states,) if isinstance(states, str) else states
        if self.state not in states:
            raise SaveStateError(f"cannot {action}: the saver of {self.path} is "
                                 f"{_STATE_WORDS[self.state]}")

    def _abandon(self) -> None:
        """A save that failed, its channels stopped.  A new file is simply
        dropped (ImageFile.discard); one written in place is cut back to
        what setup wrote: no END, no pages.  What cannot be cleaned up is
        reported with a warning, never raised over the error that made the
        save fail."""
        if not self.in_place:
            return
        try:
            self._file.call(os.ftruncate, self.layout.start)
            self._file.write_setup(self.layout)
        except OSError as error:
            warnings.warn(f"{self.path}: the failed save could not cut the file "
                          f"back to an empty image: {error}", RuntimeWarning, stacklevel=3)

    def _check_tracker(self, tracker: DirtyTracker) -> None:
        expected = {b.name: b.pages for b in self.blocks}
        if tracker.block_pages is not None and tracker.block_pages != expected:
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
        return check_dirty_set(self.blocks, dirty)

    def _pass(self, phase: str, dirty: list[np.ndarray | None],
              last: bool = False) -> PassStats:
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if self.sync:
                # Called every tenth of a second or so while channels write.
                self._file.start_writeback()
            if self.on_progress is not None:
                self.on_progress(phase, done, total)
            self._publish(phase=phase, pass_pages_done=done, pass_pages=total)

        counts = self._group.save_pass(dirty, progress, last)
        dirty_pages = sum(int(np.count_nonzero(d)) for d in dirty if d is not None)
        result = PassStats(len(self.stats.passes) + 1, dirty_pages, counts.pages_written,
                           counts.zero_pages, counts.bytes_written,
                           time.perf_counter() - started, counts.pages_unchanged)
        self.stats.passes.append(result)
        self.stats.channel_stats = self._group.channel_stats()
        self._publish(phase=phase)  # observers see the pass counted at once
        return result

    def _phase(self, phase: str) -> None:
        """Tell the progress display that a step without pages began."""
        if self.on_progress is not None:
            self.on_progress(phase, 0, 0)
        self._publish(phase=phase)

    def _description(self, present: list[int]) -> dict[str, Any]:
        """Our metadata after EOF; QEMU reads past it."""
        return image_description(
            self.layout, present, channels=self.channels, direct_io=self.direct_io,
            passes=len(self.stats.passes), synced=self.sync,
            **({"user": self.user_description} if self.user_description else {}))

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

        ``tracker`` is any :class:`DirtyTracker` (a :class:`DirtyLog`, an
        :class:`UffdTracker`), by default the one the Saver was made with.
        With a :class:`HashTracker` every pass looks at every page, and the
        count that must fall under the limit is the pages the last pass
        found changed.
        """
        tracker = tracker if tracker is not None else self.tracker
        if tracker is None:
            raise OptionError("run needs a tracker (a DirtyLog or an UffdTracker), or "
                              "a Saver made with tracker='hash'")
        if isinstance(tracker, HashTracker) and not isinstance(self.tracker, HashTracker):
            raise OptionError("a HashTracker works in the channels: give it to the "
                              "Saver (tracker=...), not only to run")
        if not isinstance(max_passes, int) or max_passes < 1:
            raise OptionError(f"max_passes must be a whole number of at least 1, "
                              f"not {max_passes!r}")
        if dirty_pages_limit is None:
            dirty_pages_limit = int(sum(b.pages for b in self.blocks) * DIRTY_FRACTION_LIMIT)
        self._check_tracker(tracker)
        if self.state == "new":
            self.setup()
        tracker.start()
        result = self.iterate()
        collected = None  # dirty pages collected but not saved yet
        for _ in range(max_passes - 1):
            collected = tracker.collect()
            dirty_pages = tracker.pages_left(collected, result)
            if dirty_pages <= dirty_pages_limit:
                break
            result = self.iterate(collected)
            collected = None
        if stop_writers is not None:
            stop_writers()
        last = tracker.collect(final=True)
        return self.complete(last if collected is None else merge_dirty(collected, last))


def save(path: str | os.PathLike, blocks: Sequence[RamBlock], channels: int | None = None,
         **options: Any) -> SaveStats:
    """Save ``blocks`` in one pass: setup, then complete with every page."""
    with Saver(path, blocks, channels, **options) as saver:
        saver.setup()
        return saver.complete()
