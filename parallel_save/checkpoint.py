"""Repeated checkpoints of the same memory: warm channels, incremental
images, always one good image.

A :class:`Checkpointer` keeps two images side by side in a directory,
``checkpoint-a.img`` and ``checkpoint-b.img``, each a complete QEMU
mapped-ram image that QEMU loads, and writes each checkpoint over the older
of the two.  Every page has a fixed place in the file, so bringing the
older image up to date means writing only the pages changed since *that
image* was last written: the union of the dirty sets of the last two
checkpoints (or, with the hash tracker, the pages whose hash differs from
what that image holds).  Its channels, their mappings of the blocks and
both files stay open from one checkpoint to the next.

Why a crash never costs the previous checkpoint, nor passes off a mixed
image as complete (a crash, a power cut or a SIGKILL at any moment):

1. Only the older image is written; the newer one is not touched at all.
2. Before the first byte of a checkpoint reaches the older image, its END
   is cut off (and, with ``sync``, that cut is on disk): from its first
   change on, it reads as incomplete.
3. Its pages, then its bitmaps are written and synced; only then its END
   and EOF, synced again.  It claims completeness only once everything it
   claims is on disk.

Each image's description carries a generation number, one more than the
newest complete image's: :func:`latest_checkpoint` picks the complete
image with the highest.  A checkpoint that fails leaves its image
incomplete; the next one writes that image whole again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np

from .blocks import RamBlock
from .channels import ChannelGroup, choose_start_method
from .errors import BlockError, FormatError, ParallelSaveError, SaveStateError
from .format import decode_stream, encode_tail, our_metadata, plan_layout
from .image import open_image
from .imagefile import ImageFile
from .restorer import restore
from .saver import (
    check_blocks,
    check_channels,
    check_dirty_set,
    check_sources,
    image_description,
)
from .signals import signals_deferred
from .stats import RestoreStats
from .tracking import DirtyTracker, HashTracker

IMAGE_NAMES = ("checkpoint-a.img", "checkpoint-b.img")
DirtySet = Mapping[str, Any] | None


@dataclass(frozen=True)
class CheckpointStats:
    """One checkpoint: which image, which generation, what it wrote."""

    image: str
    generation: int
    full: bool                 # every page looked at (an image's first checkpoint)
    dirty_pages: int           # pages looked at
    pages_written: int
    zero_pages: int
    pages_unchanged: int       # hash tracker: looked at, unchanged since that image
    bytes_written: int
    seconds: float
    pause_seconds: float = 0.0  # snapshot: how long the caller was stopped for the fork

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PendingCheckpoint:
    """A snapshot checkpoint being written in the background; :meth:`wait`
    gives its stats (or raises what made it fail)."""

    def __init__(self, checkpointer: Checkpointer, target: _Side, started: float,
                 pause: float) -> None:
        self.pause_seconds = pause
        self._result: CheckpointStats | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(checkpointer, target,
                                                                started, pause),
                                        name="parallel-save snapshot", daemon=True)
        self._thread.start()

    def _run(self, checkpointer: Checkpointer, target: _Side, started: float,
             pause: float) -> None:
        try:
            self._result = checkpointer._write(target, started, pause)
        except BaseException as error:  # noqa: BLE001 -- handed to wait()
            self._error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> CheckpointStats:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class _Side:
    """One of the two images and what the checkpointer knows of it."""

    def __init__(self, index: int, path: str) -> None:
        self.index = index
        self.path = path
        self.file: ImageFile | None = None
        self.generation = 0              # 0: holds no checkpoint of ours yet
        self.bitmaps: list[np.ndarray] | None = None  # None: write it whole next time
        self.pending: list[np.ndarray] | None = None  # pages changed since it was written


def _generation(path: str) -> int:
    """The generation of a complete checkpoint image, else 0."""
    try:
        with open_image(path) as image:
            return _generation_in(image.description)
    except (FormatError, OSError, ParallelSaveError):
        return 0


def _generation_in(description: dict[str, Any] | None) -> int:
    """The checkpoint generation an image's description records, else 0."""
    ours = our_metadata(description or {})
    checkpoint = ours.get("checkpoint") if isinstance(ours, dict) else None
    generation = checkpoint.get("generation") if isinstance(checkpoint, dict) else None
    return generation if isinstance(generation, int) and generation > 0 else 0


def latest_checkpoint(directory: str | os.PathLike) -> tuple[str, int]:
    """The newest complete checkpoint image in ``directory`` and its
    generation.  An image being written, or cut short by a crash, reads as
    incomplete and is never chosen."""
    directory = os.fspath(directory)
    found = [(_generation(os.path.join(directory, name)), os.path.join(directory, name))
             for name in IMAGE_NAMES]
    generation, path = max(found)
    if not generation:
        raise ParallelSaveError(f"{directory}: no complete checkpoint image "
                                f"({' or '.join(IMAGE_NAMES)})")
    return path, generation


def restore_latest(directory: str | os.PathLike, into: Any, channels: int | None = None,
                   **options: Any) -> tuple[str, RestoreStats]:
    """Restore the newest complete checkpoint of ``directory`` into
    ``into`` (as :func:`restore`); returns the image it chose and the stats.

    A checkpointer still running writes the other image, and comes back to
    this one only at the checkpoint after next, cutting its END first: the
    image is checked again once restored, and a restore that overlapped
    that is refused rather than returned mixed."""
    path, generation = latest_checkpoint(directory)
    with open_image(path) as image:
        if _generation_in(image.description) != generation:
            raise ParallelSaveError(f"{path}: overwritten by a running checkpointer while "
                                    f"it was chosen; restore again")
        stats = restore(image, into, channels, **options)
        after = decode_stream(image.fileno(), path)
        if not after.complete or _generation_in(after.description) != generation:
            raise ParallelSaveError(f"{path}: a running checkpointer began writing over "
                                    f"this checkpoint during the restore; what was "
                                    f"restored may be mixed: restore again")
    return path, stats



class Checkpointer:
    """Checkpoint ``blocks`` into ``directory`` again and again.

    In outline (complete examples: README.md)::

        with ps.Checkpointer("ckpt/", [ram], channels=4, tracker=log) as ckpt:
            while running:
                step()
                stats = ckpt.checkpoint()     # only what changed since that image

    ``tracker`` says which pages changed: a :class:`DirtyLog` or an
    :class:`UffdTracker` (collected at each checkpoint), ``"hash"`` (the
    channels hash every page and write those that differ from what the
    image holds: no cooperation from writers), or None: then each
    :meth:`checkpoint` takes ``dirty=`` (block name -> one bool per page),
    and without it writes every page.  The first checkpoint of each image
    writes it whole.

    A checkpoint of memory that keeps changing while it is written is not
    a point in time: stop the writers around :meth:`checkpoint` for that
    (a tracker then loses nothing: what they write meanwhile is in the
    next checkpoint).  ``sync`` (default) makes every checkpoint durable
    before it returns.  Other options as :class:`Saver`.
    """

    def __init__(self, directory: str | os.PathLike, blocks: Sequence[RamBlock],
                 channels: int | None = None, *, machine: str = "none",
                 tracker: DirtyTracker | str | None = None, sync: bool = True,
                 direct_io: bool = False, mode: int | None = None,
                 start_method: str | None = None, snapshot: bool = False) -> None:
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise ParallelSaveError(f"{self.directory}: no such directory for checkpoints")
        self.blocks = check_blocks(blocks)
        if len({b.name for b in self.blocks}) != len(self.blocks):
            raise BlockError("a block name is given twice")
        self.channels = check_channels(channels)
        self.tracker = HashTracker() if tracker == "hash" else tracker
        if self.tracker is not None and not isinstance(self.tracker, DirtyTracker):
            raise BlockError(f"tracker must be a DirtyTracker or 'hash', not {tracker!r}")
        self.snapshot = bool(snapshot)
        if self.snapshot and self.hashing:
            raise BlockError("a snapshot checkpointer takes a DirtyLog, an UffdTracker or "
                             "dirty sets, not the hash tracker (its channels are new at "
                             "each checkpoint)")
        if not self.snapshot:
            check_sources(self.blocks)
        self.sync = bool(sync)
        self.direct_io = bool(direct_io)
        self.mode = mode
        self.start_method = choose_start_method(start_method)
        self.layout = plan_layout(((b.name, b.length) for b in self.blocks), machine)
        self.sides = [_Side(i, os.path.join(self.directory, name))
                      for i, name in enumerate(IMAGE_NAMES)]
        # What an earlier run left counts: its newest image is the last to
        # be written over, and generations go on from it.  Its pages are
        # not trusted: each image's first checkpoint here writes it whole.
        for side in self.sides:
            side.generation = _generation(side.path)
        self.generation = max(side.generation for side in self.sides)
        self._group: ChannelGroup | None = None
        self._pending: PendingCheckpoint | None = None
        self.checkpoints: list[CheckpointStats] = []
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def hashing(self) -> bool:
        return isinstance(self.tracker, HashTracker)

    # --- the checkpoint ---

    def checkpoint(self, dirty: DirtySet = None, *, wait: bool = True
                   ) -> CheckpointStats | PendingCheckpoint:
        """Bring the older image up to date; returns what it took.

        With ``snapshot``, the channels are forked now and see the memory
        as it is at this instant, whatever the caller writes next; the
        call returns once they are forked with ``wait=False`` (a
        :class:`PendingCheckpoint`: its ``wait()`` gives the stats; the
        next checkpoint waits for it)."""
        if self._closed:
            raise SaveStateError(f"the checkpointer of {self.directory} is closed")
        self._finish_pending()
        started = time.perf_counter()
        changed = self._changed(dirty)
        target = min(self.sides, key=lambda side: side.generation)
        for side in self.sides:
            side.pending = _union(side.pending, changed)
        if target.file is None:
            target.file = ImageFile(target.path, in_place=True, mode=self.mode,
                                    direct_io=self.direct_io)
        if not self.snapshot:
            return self._write(target, started)
        try:
            self._launch(target)  # the instant of the snapshot
        except BaseException:
            self._failed(target)
            raise
        pending = PendingCheckpoint(self, target, started, self._group.snapshot_pause)
        self._pending = pending
        return pending.wait() if wait else pending

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _write(self, target: _Side, started: float, pause: float = 0.0) -> CheckpointStats:
        """Everything after the instant: the target made to read as
        incomplete, the pass, the bitmaps and the END."""
        try:
            full = self._prepare(target, target.bitmaps is None)
            pages = None if full else target.pending
            counts = self._group.save_pass(
                [np.ones(b.pages, dtype=bool) for b in self.blocks] if pages is None or
                self.hashing else pages,
                (lambda done, total: target.file.start_writeback()) if self.sync else None)
            bitmaps = self._group.file_bitmaps()
            generation = self.generation + 1
            target.file.finish(self.layout, bitmaps,
                               encode_tail(self.layout, 0, self._description(generation,
                                                                            bitmaps)),
                               self.sync)
        except BaseException:
            self._failed(target)
            raise
        finally:
            if self.snapshot and self._group is not None:
                self._group.stop()  # its channels see this instant only
                self._group = None
        self.generation = target.generation = generation
        target.bitmaps = bitmaps
        target.pending = [np.zeros(b.pages, dtype=bool) for b in self.blocks]
        dirty_pages = (sum(b.pages for b in self.blocks) if pages is None or self.hashing
                       else sum(int(np.count_nonzero(p)) for p in pages))
        stats = CheckpointStats(target.path, generation, full, dirty_pages,
                                counts.pages_written, counts.zero_pages,
                                counts.pages_unchanged, counts.bytes_written,
                                time.perf_counter() - started, pause)
        self.checkpoints.append(stats)
        return stats

    def _failed(self, target: _Side) -> None:
        target.bitmaps = None  # incomplete now: written whole next time
        target.generation = 0
        if self._group is not None and not self._group.processes:
            self._group = None  # a channel failed: the group is stopped

    def _changed(self, dirty: DirtySet) -> list[np.ndarray] | None:
        """The pages changed since the last checkpoint (None: unknown, so
        every page), checked before anything is written."""
        if self.tracker is not None and dirty is not None:
            raise SaveStateError("this checkpointer has a tracker: it collects the dirty "
                                 "pages itself (no dirty=)")
        if self.tracker is not None and not self.hashing:
            if not self.checkpoints:
                self.tracker.start()
                return None
            dirty = self.tracker.collect()
        if dirty is None:
            return None
        return [np.zeros(block.pages, dtype=bool) if pages is None else pages
                for block, pages in zip(self.blocks, check_dirty_set(self.blocks, dirty))]

    def _launch(self, target: _Side) -> None:
        """Start the channels on the target image."""
        self._group = ChannelGroup.launch(
            self.channels, target.file.channel_fd, target.path, writing=True,
            direct_io=self.direct_io, sources=[b.source for b in self.blocks],
            pages_offsets=[b.pages_offset for b in self.layout.blocks],
            hash_keys=self.tracker.draw_keys() if self.hashing else None,
            hash_tables=len(self.sides), start_method=self.start_method)
        if self.hashing:
            for side in self.sides:  # a new group's hashes know no file
                side.bitmaps = None

    def _prepare(self, target: _Side, full: bool) -> bool:
        """Make the target image read as incomplete before anything else
        is written to it, and point the channels at it; returns whether it
        is written whole."""
        if self._group is None:
            check_sources(self.blocks)
            self._launch(target)
            full = full or self.hashing
        if full:
            target.file.cut_old_stream(0, self.sync)
            target.file.write_setup(self.layout)
        else:
            target.file.call(os.ftruncate, self.layout.tail_offset)  # no END any more
        if self.sync:
            target.file.call(os.fdatasync)
        if full and self.hashing:
            self._group.forget_hashes(target.index)
        zeros = [np.zeros(-(-b.pages // 8), dtype=np.uint8) for b in self.blocks]
        self._group.switch_file(target.file.channel_fd,
                                zeros if full else target.bitmaps, target.index)
        return full

    def _description(self, generation: int, bitmaps: list[np.ndarray]) -> dict[str, Any]:
        present = [int(np.bitwise_count(bits).sum(dtype=np.int64)) for bits in bitmaps]
        return image_description(self.layout, present, channels=self.channels,
                                 direct_io=self.direct_io, synced=self.sync,
                                 checkpoint={"generation": generation})

    def close(self) -> None:
        """Stop the channels and close both images; safe to call twice."""
        if self._closed:
            return
        try:
            self._finish_pending()
        finally:
            self._close()

    def _close(self) -> None:
        with signals_deferred():
            self._closed = True
            if self._group is not None:
                self._group.stop()
                self._group = None
            for side in self.sides:
                if side.file is not None:
                    side.file.close()
                    side.file = None


def _union(first: list[np.ndarray] | None, second: list[np.ndarray] | None
           ) -> list[np.ndarray] | None:
    """Pages changed in either (None: every page)."""
    if first is None or second is None:
        return None
    return [a | b for a, b in zip(first, second)]

