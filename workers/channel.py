"""A channel: one worker of a save or restore, like a QEMU multifd channel,
and the channel process that hosts one or several of them, a thread each.

A channel is handed two descriptors over its connection, the image file
the coordinator opened and checked (already with O_DIRECT when asked) and
the control segment, maps the RAM blocks itself, then loops over small
messages from the coordinator: each names a pass and the chunks to handle
(the vocabulary is in parallel_save/control.py).  Page bytes go straight
between the shared mappings and the file; nothing but chunk numbers and
one-line replies crosses the pipe.

A channel process never outlives its coordinator, whatever thread started
it and however the coordinator ends: from its first instructions on, the
kernel's parent-death signal or a thread watching the coordinator's pidfd
kills it when that process is gone (die_with_coordinator).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import faulthandler
import fcntl
import mmap
import os
import pickle
import select
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures

# Imported by name, so now, not on each forked channel's first look-ahead
# thread (the package imports it lazily): launching one channel waited for
# those imports, 8.8 ms instead of 4.5.
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# The standard library's (same wire as multiprocess's): it imports fast,
# which a channel started as a new interpreter waits for.
from multiprocessing import reduction

import numpy as np

from .. import libc
from ..blocks import BlockMapping
from ..control import (
    BUSY_NS,
    BYTES_WRITTEN,
    CHUNK_PAGES,
    CLAIM_BYTES,
    DONE,
    ERROR,
    HASH_LANES,
    PAGES_DONE,
    PAGES_READ,
    PAGES_SENT,
    PAGES_WRITTEN,
    PAGES_ZEROED,
    READY,
    RESTORE,
    SAVE,
    SHARDS_DONE,
    STOP,
    SWITCH,
    UNCHANGED_PAGES,
    WRITE_CALLS,
    ZERO_PAGES,
    ChannelPlan,
    ControlSegment,
)
from ..files import data_extents, in_page_cache
from ..format import PAGE_SIZE
from ..tracking.hashing import PageHasher

_WORDS_PER_PAGE = PAGE_SIZE // 8
# madvise advice (Linux >= 5.14): fault a range of pages in with one call.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23


class HostedTurns:
    """What the channels of one process share of their turns: a record
    lock belongs to the process, so a second thread of it asking for a
    lock the first holds would be granted it at once.  Each lock is taken
    here first, among the process's own channels, then from the kernel,
    among processes."""

    def __init__(self) -> None:
        self.writer = threading.Lock()
        self.guard = threading.Lock()
        self.reading: set[int] = set()  # reader places held by this process
        # Held by the channel running a pass, where they run one at a time
        # (ChannelPlan.passes_in_turn).
        self.running = threading.Lock()


class Turns:
    """Channels' turns at writing a file (a save's image, a restore's
    destination), a POSIX record lock on the first byte of the control
    segment (each channel process is its own lock owner; its channels
    share ``hosted``).

    Buffered writes to one file take its inode lock, and a writer that finds
    it taken spins while the owner runs: with two channels or more per CPU
    the cores go to spinning and to switching between channels.  A saving
    channel that cannot have its turn at once checks its next step for
    zeros instead, and writes what it has when its turn comes; a restoring
    one reads its step into its mapping, in one of ``readers`` places (the
    bytes after the first) where those are counted."""

    def __init__(self, fd: int, readers: int = 0, hosted: HostedTurns | None = None) -> None:
        self.fd = fd
        # A restore's readers beside the turn's holder, at most (0: any
        # number): the record locks on the bytes after the first.
        self.readers = readers
        self.hosted = hosted if hosted is not None else HostedTurns()

    def take(self, wait: bool) -> bool:
        if not self.hosted.writer.acquire(blocking=wait):
            return False
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, 0)
        except (BlockingIOError, PermissionError):
            self.hosted.writer.release()
            return False
        except BaseException:
            self.hosted.writer.release()
            raise
        return True

    def give(self) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
        finally:
            self.hosted.writer.release()

    def take_reading(self) -> int:
        """A reader's place, if one is free (its byte; 0: none is)."""
        hosted = self.hosted
        for byte in range(1, self.readers + 1):
            with hosted.guard:
                if byte in hosted.reading:
                    continue  # another channel of this process has it
                hosted.reading.add(byte)
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            except (BlockingIOError, PermissionError):
                with hosted.guard:
                    hosted.reading.discard(byte)
                continue
            return byte
        return 0

    def give_reading(self, byte: int) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, byte)
        finally:
            with self.hosted.guard:
                self.hosted.reading.discard(byte)


def die_with_coordinator(plan: ChannelPlan, forked_by_main_thread: bool = False) -> None:
    """Kill this process as soon as the coordinator process is gone.

    A channel the coordinator's main thread forked asks the kernel for
    SIGKILL when that thread ends (PR_SET_PDEATHSIG): in Python, the main
    thread ends with its process.  Any other channel (spawned, forked by a
    snapshot's holder or by another thread: the signal follows the
    *thread* that forked, so a save set up in a short-lived thread would
    lose its channels when the thread ends) watches the coordinator's
    pidfd, which becomes readable when the process exits, from a thread
    of its own (which costs each channel about half a millisecond of CPU:
    at 8 channels, their CPU for a 1 MiB save went from 45-48 to 41-42 ms
    without it).  Checking our parent afterwards closes the race with a
    coordinator that died (and whose pid was reused) before we got here."""
    if (forked_by_main_thread and plan.parent == plan.coordinator
            and libc.set_parent_death_signal(signal.SIGKILL)):
        pidfd = None
    else:
        try:
            pidfd = os.pidfd_open(plan.coordinator)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)
    if os.getppid() != plan.parent:
        os.kill(os.getpid(), signal.SIGKILL)
    if pidfd is None:
        return

    named = threading.Event()

    def watch() -> None:
        # Not the channel's name, which a new thread inherits.
        libc.set_process_name("ps watch")
        named.set()
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="coordinator watch", daemon=True).start()
    named.wait()  # so that a channel that says READY shows its threads' names


# In a pass that deals chunks (control.py), a channel handles its chunks a
# window at a time: every numpy call then covers up to 16 chunks (32 MiB),
# so a sparse pass (1 % dirty) costs a few calls per window instead of a
# dozen per chunk.  Windows are whole chunks, so a window's bits are whole
# bytes of the bitmaps.  (At 1 and 2 channels; more channels get larger
# windows, see Channel.  In a claimed pass, a window is a shard.)
WINDOW_PAGES = 16 * CHUNK_PAGES
# The longest single pwrite/pread: large enough to stream, small enough to
# report progress and to keep one call from holding the file for long.
MAX_SPAN_PAGES = 2048
# Populate runs one by one only while they are few and not mostly single
# pages; a sparse pass over pages already mapped by an earlier pass needs
# none.
MAX_POPULATE_RUNS = 64
MIN_POPULATE_RUN_PAGES = 8
# Zero detection reduces up to this many runs of a window in place, when
# they average at least MIN_SLICED_RUN_PAGES: each run (and each step of
# one) costs a few numpy calls and, where channels take turns, a turn.
# Shorter runs are gathered.  A sparse pass at 8 channels gives each
# window a dozen single pages: handled a page at a time, a 1 % pass of a
# 1 GiB block took 50 ms instead of 15.
MAX_SLICED_RUNS = 16
MIN_SLICED_RUN_PAGES = 32
# ... and writes them a step at a time, while the step is in the cache.
# ext4 gives a buffered write into new pages folios as large as the write,
# and every later write into a folio walks all its blocks: over folios of
# 2 MiB a pass over scattered pages (10 % of a dense 1 GiB) took 1.5x as
# long as over 512 KiB ones, 2.5x as long as over 64 KiB ones.  So a pass
# that later passes may write over goes 512 KiB at a time (QEMU's multifd
# packet); the last pass, after which nothing writes into the file (all
# of a one-pass save), goes 2 MiB at a time: fewer calls, fewer turns, and
# a dense 1 GiB at 2 channels in 0.35 s instead of 0.39 s (8 channels 0.38
# instead of 0.46).
STEP_PAGES = 128
LAST_PASS_STEP_PAGES = 512
# A restore sends a step into the destination's file only if its runs
# average this many pages: a send is two system calls a run (lseek,
# sendfile), and short runs are read more cheaply (a random half-zero
# 1 GiB by one channel: 0.34 s read, 0.43 s sent).
MIN_SENT_RUN_PAGES = 16
# Steps checked ahead while waiting for a turn at the file (Turns).
MAX_WAITING_STEPS = 8
# How long a channel whose last pass is done waits for its coordinator to
# close the connection before it lets go of its memory (_serve).
LAST_PASS_LINGER = 1.0
# With the hash tracker, windows of 4 MiB: each is copied to private
# memory, and hashing dwarfs the per-window numpy calls anyway.
HASH_WINDOW_PAGES = 2 * CHUNK_PAGES
if WINDOW_PAGES % CHUNK_PAGES or HASH_WINDOW_PAGES % CHUNK_PAGES:
    raise ImportError("a channel's windows must be whole chunks")


def few_long_runs(pages: np.ndarray, runs: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether ``runs`` (of ``pages``) are better sliced than gathered."""
    return len(runs[0]) <= MAX_SLICED_RUNS and pages.size >= len(runs[0]) * MIN_SLICED_RUN_PAGES


def nonzero_pages(words: np.ndarray, pages: np.ndarray,
                  runs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which of ``pages`` (sorted indexes into ``words``, one uint64 row per
    page, forming ``runs``) are non-zero: vectorised, never page by page in
    Python.  A few long runs are reduced in place (no copy); many short
    runs, a sparse pass, are gathered first, and only the pages whose first
    word is zero are then read in full."""
    if few_long_runs(pages, runs):
        return np.concatenate([step_nonzero(words[start:end]) for start, end in zip(*runs)]
                              or [np.zeros(0, bool)])
    found = words[pages, 0] != 0
    maybe_zero = np.flatnonzero(~found)
    if maybe_zero.size:
        found[maybe_zero] = rows_nonzero(words[pages[maybe_zero]])
    return found


def step_nonzero(words: np.ndarray) -> np.ndarray:
    """Which pages of a step (rows of ``words``) are non-zero.  A page whose
    first word is not zero is not zero: that check reads one cache line a
    page, and suffices for most data pages.  The other pages are read in
    full: gathered when they are few, else the whole step is reduced (a
    gather of most of a step costs more than reading all of it).  Where
    the first words of every 8th page already say the step is of the
    second kind, the whole step is reduced at once: the check of every
    first word would only add a cache line and a TLB miss a page (1 GiB
    of the guest-like image: 118-128 ms instead of 132-136)."""
    sample = words[::8, 0]
    if np.count_nonzero(sample) * 4 < sample.size * 3:
        return rows_nonzero(words)
    found = words[:, 0] != 0
    maybe_zero = np.flatnonzero(~found)
    if maybe_zero.size * 4 > found.size:
        return rows_nonzero(words)
    if maybe_zero.size:
        found[maybe_zero] = rows_nonzero(words[maybe_zero])
    return found


def rows_nonzero(rows: np.ndarray) -> np.ndarray:
    """Which rows (pages, one contiguous row of words each, consecutive in
    memory) have a non-zero word.  One reduction over the rows as a flat
    array, cut at each row's start: ``rows.max(axis=1)`` runs its inner
    loop once per row, and took 118-130 ms for a GiB where this takes
    84-96 (a flat maximum of the whole GiB, 79)."""
    if not rows.shape[0]:
        return np.zeros(0, dtype=bool)
    flat = rows.reshape(-1)  # a view: the rows are consecutive
    return np.maximum.reduceat(flat, np.arange(0, flat.size, rows.shape[1])) != 0


_CHUNK_SHIFT = CHUNK_PAGES.bit_length() - 1  # CHUNK_PAGES is a power of two
_CHUNK_MASK = CHUNK_PAGES - 1
_CHUNK_BYTES = CHUNK_PAGES // 8  # a chunk's bytes of a bitmap


class OwnBits:
    """A window's bits (its bytes of a bitmap) in the chunks a channel
    handles there (``own``: their ascending indexes in the window),
    unpacked one row of CHUNK_PAGES per chunk.  Where chunks are dealt
    round the channels, a window holds 1/N of its chunks for each of N
    channels: on the whole window, each channel would do a lone channel's
    work on the bits, N channels N times it; on their own chunks, all of
    them together do one block's.  Finding the runs to read of a 1 GiB
    restore at 8 channels took 37-53 ms of CPU over whole windows, 9-14 ms
    on own chunks.  (A claimed shard's chunks are all the channel's.)"""

    __slots__ = ("bits", "own", "pages", "rows")

    def __init__(self, bits: np.ndarray | None, own: np.ndarray, pages: int) -> None:
        self.bits, self.own, self.pages = bits, own, pages
        if bits is None:
            self.rows = np.zeros((own.size, CHUNK_PAGES), dtype=bool)
            return
        if bits.size % _CHUNK_BYTES:  # a block's last window may end inside a chunk
            bits = np.concatenate((bits, np.zeros(-bits.size % _CHUNK_BYTES, np.uint8)))
        self.rows = np.unpackbits(bits.reshape(-1, _CHUNK_BYTES)[own], axis=1,
                                  bitorder="little").view(bool)

    @classmethod
    def of_pages(cls, pages: np.ndarray, own: np.ndarray, count: int) -> OwnBits:
        """The bits of these window pages (in chunks ``own``), of no bitmap."""
        bits = cls(None, own, count)
        bits.rows.reshape(-1)[bits._positions(pages)] = True
        return bits

    def count(self) -> int:
        """The own pages (a block's last chunk may be short)."""
        if not self.own.size:
            return 0
        last = min(CHUNK_PAGES, self.pages - int(self.own[-1]) * CHUNK_PAGES)
        return (self.own.size - 1) * CHUNK_PAGES + last

    def _pages(self, positions: np.ndarray) -> np.ndarray:
        """Window page numbers of positions in the rows: row r is chunk
        own[r], so its positions move by (own[r] - r) chunks."""
        shift = (self.own.astype(np.int64) - np.arange(self.own.size)) << _CHUNK_SHIFT
        return positions + shift[positions >> _CHUNK_SHIFT]

    def _positions(self, pages: np.ndarray) -> np.ndarray:
        """Positions in the rows of window pages (in own chunks)."""
        row_of_chunk = np.zeros(int(self.own[-1]) + 1 if self.own.size else 0, np.int64)
        row_of_chunk[self.own] = np.arange(self.own.size)
        return (row_of_chunk[pages >> _CHUNK_SHIFT] << _CHUNK_SHIFT) | (pages & _CHUNK_MASK)

    def set_pages(self) -> np.ndarray:
        return self._within(self._pages(np.flatnonzero(self.rows)))

    def clear_pages(self) -> np.ndarray:
        return self._within(self._pages(np.flatnonzero(~self.rows)))

    def set_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """The runs of set bits, (starts, ends) in window pages, as
        page_runs(set_pages()) gives them; without listing the pages where
        the own chunks lie side by side (a claimed shard's always do): a
        restoring channel's windows took 110 us each to list, 60 % of that
        spent on pages that only became runs again."""
        own = self.own
        if not own.size or int(own[-1]) - int(own[0]) + 1 != own.size:
            return page_runs(self.set_pages())
        first = int(own[0]) << _CHUNK_SHIFT
        bits = self.rows.reshape(-1)[:max(0, self.pages - first)].view(np.int8)
        edges = np.flatnonzero(np.diff(bits, prepend=np.int8(0), append=np.int8(0)))
        return edges[0::2] + first, edges[1::2] + first

    def _within(self, pages: np.ndarray) -> np.ndarray:
        """Less the bits past the window's last page (a short last chunk's)."""
        return pages[:np.searchsorted(pages, self.pages)]

    def store(self, cleared: OwnBits, set_: np.ndarray) -> None:
        """Clear the bits set in ``cleared`` (of the same chunks), then set
        those of pages ``set_``, and write the rows back into the bitmap."""
        self.rows &= ~cleared.rows
        self.rows.reshape(-1)[self._positions(set_)] = True
        packed = np.packbits(self.rows, axis=1, bitorder="little")
        whole = self.bits.size // _CHUNK_BYTES  # chunks whose bytes are all there
        full = self.own < whole
        self.bits[:whole * _CHUNK_BYTES].reshape(whole, _CHUNK_BYTES)[self.own[full]] = \
            packed[full]
        if not full.all():
            tail = self.bits[whole * _CHUNK_BYTES:]
            tail[:] = packed[-1, :tail.size]


def page_runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of consecutive page numbers in a sorted array: (starts, ends)."""
    if not pages.size:
        return pages, pages
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    return pages[np.concatenate(([0], breaks))], pages[np.concatenate((breaks - 1, [-1]))] + 1


def split_spans(starts: np.ndarray, ends: np.ndarray, limit: int = MAX_SPAN_PAGES
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cut spans longer than ``limit`` pages into pieces of at most ``limit``."""
    pieces = -(-(ends - starts) // limit)
    if not pieces.size or pieces.max() <= 1:
        return starts, ends
    first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
    new_starts = np.repeat(starts, pieces) + limit * (np.arange(pieces.sum()) - first_piece)
    return new_starts, np.minimum(new_starts + limit, np.repeat(ends, pieces))


def direct_io_spans(dirty_runs: tuple[np.ndarray, np.ndarray], written: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For O_DIRECT: one span per dirty run, from its first to its last
    non-zero page (``written``: sorted page numbers).  The zero pages inside
    go along (their bits stay clear), which turns thousands of small
    O_DIRECT writes into a few large ones; only pages of this pass are
    ever rewritten."""
    if not written.size:
        return written, written
    run_of = np.searchsorted(dirty_runs[0], written, side="right") - 1
    boundary = run_of[1:] != run_of[:-1]
    firsts = written[np.concatenate(([True], boundary))]
    lasts = written[np.concatenate((boundary, [True]))]
    return firsts, lasts + 1


@dataclass(slots=True)
class SaveWindow:
    """One window of a save pass, between finding its dirty pages and
    writing the non-zero ones."""

    block: int
    first: int                 # the window's pages in its block: [first, end)
    end: int
    dirty: OwnBits             # the pages this pass saves, in the channel's chunks
    all_dirty: np.ndarray      # their numbers (in the window)
    dirty_pages: np.ndarray    # those to read: not in holes of the block's file
    dirty_runs: tuple[np.ndarray, np.ndarray]
    words: np.ndarray          # the window's pages (or a private copy of them)
    base: int                  # file offset of the window's first page
    unchanged: int             # pages the hash tracker found unchanged
    started_ns: int
    prepared_ns: int


@dataclass(slots=True)
class RestoreWindow:
    """One window of a restore pass: the runs of pages to read, and those
    to clear."""

    block: int
    first: int
    words: np.ndarray          # the window's pages in the destination
    base: int                  # file offset of the window's first page
    starts: np.ndarray         # runs of pages present in the image
    ends: np.ndarray
    bits: OwnBits              # the image's bits of the channel's pages
    own_pages: int
    present_pages: int         # how many of them are present
    send: bool                 # its long runs go into the destination's file (_read_or_send)
    pieces: list[np.ndarray] = field(default_factory=list)  # see Channel._map_ahead


# A window's mapping ahead comes in this many pieces, so that the reader,
# done with the window before, can take over those not started.
MAP_PIECES = 8


def _steps(starts: np.ndarray, ends: np.ndarray, pages: int):
    """Spans grouped into steps of about ``pages`` pages (longer spans cut
    first): yields (starts, ends) lists, a step at a time."""
    if not starts.size:
        return
    starts, ends = split_spans(starts, ends, pages)
    step = (np.cumsum(ends - starts) - 1) // pages
    bounds = np.flatnonzero(np.diff(step)) + 1
    for step_starts, step_ends in zip(np.split(starts, bounds), np.split(ends, bounds)):
        yield step_starts.tolist(), step_ends.tolist()


class _StepQueue:
    """A window's steps, taken from the front by one thread and from the
    back by another, until they meet."""

    def __init__(self, steps: list) -> None:
        self._steps = steps
        self._front = 0
        self._back = len(steps)
        self._lock = threading.Lock()

    def first(self):
        with self._lock:
            if self._front >= self._back:
                return None
            self._front += 1
            return self._steps[self._front - 1]

    def last(self):
        with self._lock:
            if self._front >= self._back:
                return None
            self._back -= 1
            return self._steps[self._back]


def _store_zero(words: np.ndarray, pages: np.ndarray) -> None:
    words[pages, 0] = 0


def _pread(fd: int, buffer: memoryview, offset: int) -> int:
    return os.preadv(fd, [buffer], offset)


class Channel:
    def __init__(self, number: int, plan: ChannelPlan, image_fd: int, control_fd: int,
                 claims_fd: int, hosted: HostedTurns | None = None) -> None:
        self.number = number
        self.plan = plan
        self.fd = image_fd
        self.claims = claims_fd  # the claims pipe's read end (control.py)
        self.control = ControlSegment.attach(plan.control, control_fd)
        self.counters = self.control.counters[number]
        self.file_bits = self.control.file_bitmaps[number]
        self.blocks: list[BlockMapping] = []
        self.words = []  # each block as one row of uint64 per page
        for source in plan.sources:
            block = BlockMapping(source, writable=not plan.writing)
            self.blocks.append(block)
            self.words.append(block.array.view(np.uint64).reshape(-1, _WORDS_PER_PAGE))
        self.can_populate = True
        self.can_seek_holes = True
        self.can_remove = True
        self.can_send = True
        self.can_probe_cache = True
        self.probe = bytearray(PAGE_SIZE)  # in_page_cache's read
        self.can_drop = True
        self.last_pass = False
        # Whether both threads read windows (_restore_side_by_side), and
        # what they count under.
        self.side_by_side = False
        self.accounting = threading.Lock()
        # The last pass's windows left mapped, oldest first, and their own
        # pages (_let_go).
        self.kept: collections.deque[tuple[BlockMapping, int, int, int]] = collections.deque()
        self.kept_pages = 0
        self.chunk_bases = np.asarray(plan.control.chunk_bases)
        self.block_pages = plan.control.block_pages
        self.bitmap_bases = plan.control.bitmap_bases
        # Chunks are dealt round the channels, so a window of 16 chunks
        # holds 16 / N of a channel's own: the window grows with the count
        # to keep 8 of them (at 8 channels a 1 % pass took 40 ms with
        # windows of 2 own chunks, 24 ms with 8; full passes took the same).
        # In a claimed pass a window is a shard, all of whose chunks are
        # the channel's.
        self.window_pages = WINDOW_PAGES * max(1, plan.control.channels // 2)
        self.shard_pages = plan.shard_chunks * CHUNK_PAGES
        # With a core to spare, a second thread works a window ahead: zero
        # checks of a save, mapping the destination's pages of a restore.
        self.lookahead = (ThreadPoolExecutor(1, "look-ahead")
                          if plan.lookahead else None)
        self.turns = Turns(self.control.fd, plan.readers, hosted) if plan.turns else None
        # A buffered restore sends pages into the destination's file where
        # it can (_read_or_send).
        self.sending = not plan.writing and not plan.direct_io
        self.step_pages = STEP_PAGES  # per pass: see save()
        self.hasher = None
        self.hash_table = 0
        if plan.control.hashing:
            self.hasher = PageHasher(self.control.hash_keys)
            self.window_pages = HASH_WINDOW_PAGES
            self.page_bases = plan.control.page_bases
            # Page-aligned (an anonymous mapping), for O_DIRECT writes.
            self.copy_mapping = mmap.mmap(-1, HASH_WINDOW_PAGES * PAGE_SIZE)
            self.copy = np.frombuffer(self.copy_mapping, np.uint64).reshape(
                HASH_WINDOW_PAGES, _WORDS_PER_PAGE)
            self.hashes = np.empty((HASH_WINDOW_PAGES, HASH_LANES), dtype=np.uint64)

    def close(self) -> None:
        if self.lookahead is not None:
            self.lookahead.shutdown()
        os.close(self.fd)
        os.close(self.claims)
        self.control.close()
        for block in self.blocks:
            block.close()

    def _claimed(self, chunks: np.ndarray):
        """The chunks (of the pass's ``chunks``, ascending) of each shard
        this channel claims, until the claims pipe is empty."""
        width = self.plan.shard_chunks
        while True:
            try:
                claim = os.read(self.claims, CLAIM_BYTES)
            except BlockingIOError:
                return  # every shard of the pass is claimed
            if not claim:
                return  # the coordinator is gone
            shard = int.from_bytes(claim, "little")
            low, high = np.searchsorted(chunks, (shard * width, (shard + 1) * width))
            yield chunks[low:high]

    def _windows(self, chunks: np.ndarray, claim: bool):
        """The windows of these chunks (ascending), or with ``claim`` of
        the shards of them this channel claims: yields (block, first page,
        end page, own), ``own`` the ascending indexes in the window of the
        chunks to handle (see OwnBits; a shard is one window, or two where
        it spans blocks, or several of the hash tracker's)."""
        window_pages = (self.shard_pages if claim and self.hasher is None
                        else self.window_pages)
        per_window = window_pages // CHUNK_PAGES
        for shard in self._claimed(chunks) if claim else (chunks,):
            blocks = np.searchsorted(self.chunk_bases, shard, side="right") - 1
            local = shard - self.chunk_bases[blocks]
            keys = blocks.astype(np.int64) << 32 | local // per_window
            bounds = np.flatnonzero(np.diff(keys)) + 1
            for group in np.split(np.arange(shard.size), bounds):
                if not group.size:
                    continue
                block = int(blocks[group[0]])
                first = int(local[group[0]] // per_window) * window_pages
                end = min(first + window_pages, self.block_pages[block])
                yield block, first, end, local[group] % per_window

    def _bits(self, row: np.ndarray, block: int, first: int, end: int) -> np.ndarray:
        """The packed bits of pages [first, end) of a block in a bitmap row
        (``first`` is a multiple of 8, so they are whole bytes)."""
        base = self.bitmap_bases[block] + first // 8
        return row[base:base + (end - first + 7) // 8]

    def _own_bits(self, row: np.ndarray, block: int, first: int, end: int,
                  own: np.ndarray) -> OwnBits:
        return OwnBits(self._bits(row, block, first, end), own, end - first)

    def _populate(self, block: int, first: int, starts: np.ndarray, ends: np.ndarray,
                  write: bool) -> None:
        """Map the runs of pages in one system call each: a channel's
        mapping starts empty, and faulting it in page by page costs twice
        as much as the zero detection itself."""
        mapped = self.blocks[block]
        if not self.can_populate or len(starts) > MAX_POPULATE_RUNS or mapped.mapping is None:
            return
        if int((ends - starts).sum()) < len(starts) * MIN_POPULATE_RUN_PAGES:
            return  # a call per page or two costs what their faults cost
        advice = _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ
        try:
            for start, end in zip(starts.tolist(), ends.tolist()):
                mapped.advise(advice, first + start, end - start)
        except OSError:
            self.can_populate = False  # an older kernel: let the pages fault

    def _hole_pages(self, block: int, first: int, end: int) -> np.ndarray | None:
        """Which pages [first, end) of a block lie wholly in holes of its
        file (None: none, or the file system cannot say).  They are zero,
        and reading them through the mapping would allocate them on tmpfs:
        a sparse source stays sparse."""
        if not self.can_seek_holes or self.blocks[block].fd < 0:
            return None
        fd, source = self.blocks[block].fd, self.plan.sources[block]
        low = source.offset + first * PAGE_SIZE
        high = source.offset + end * PAGE_SIZE
        status = os.fstat(fd)
        size = status.st_size
        if size < high:
            # Beyond the end of the file is no hole: reading it is SIGBUS.
            raise OSError(errno.EFAULT, f"the block's file was cut short under the save "
                          f"({size} bytes, its pages need {source.offset + source.length})",
                          source.path)
        if status.st_blocks * 512 >= status.st_size:
            # Every byte allocated: no holes to look for.  Cheap, and the
            # common case: SEEK_HOLE in a file without holes walks the whole
            # rest of the file (tmpfs), once per window.
            return None
        if high <= self._data_end.get(block, 0):
            return None  # an earlier window's SEEK_HOLE found data past here
        holes = None
        position = max(low, self._data_end.get(block, 0))

        def mark(hole_start: int, hole_end: int) -> None:
            nonlocal holes
            pages_first = -(-(hole_start - low) // PAGE_SIZE)
            pages_end = (min(hole_end, high) - low) // PAGE_SIZE
            if pages_end > pages_first:
                if holes is None:
                    holes = np.zeros(end - first, dtype=bool)
                holes[pages_first:pages_end] = True

        try:
            for data, hole in data_extents(fd, position, high):
                mark(position, data)
                position = self._data_end[block] = hole
        except OSError:
            self.can_seek_holes = False
            return None
        mark(position, high)  # nothing but hole from the last data on
        return holes

    # --- save ---

    def save(self, chunks: np.ndarray, claim: bool, last: bool) -> None:
        """Write the dirty pages of these chunks (with ``claim``, of the
        shards of them this channel claims); ``last``: no pass will write
        into the file after this one (the step size: STEP_PAGES)."""
        self.step_pages = LAST_PASS_STEP_PAGES if last else STEP_PAGES
        self.last_pass = last
        # Per block, how far the file is known to hold data (no holes): a
        # channel's windows come in ascending order, so each part of the
        # file is searched for holes once per pass.
        self._data_end: dict[int, int] = {}
        windows = (self._prepare(*window) for window in self._windows(chunks, claim))
        if self.lookahead is not None and self.hasher is None:
            # The zero check of the next window runs while this one's pages
            # are written: the channel's one file writer never waits for it.
            self._one_window_ahead(
                windows, lambda work: [self.lookahead.submit(self._detect, work)],
                lambda work, ahead: self._write_detected(work, ahead[0].result()))
            return
        for work in windows:
            self._populate(work.block, work.first, *work.dirty_runs, write=False)
            if (self.hasher is None and not self.plan.direct_io
                    and few_long_runs(work.dirty_pages, work.dirty_runs)):
                written, nbytes, calls = self._write_nonzero(work.words, work.dirty_runs,
                                                             work.base)
            else:
                written = work.dirty_pages[nonzero_pages(work.words, work.dirty_pages,
                                                         work.dirty_runs)]
                nbytes, calls = self._write_found(work, written)
            self._account(work, written, nbytes, calls)

    def _one_window_ahead(self, windows, start, then) -> None:
        """``start(window)`` hands the look-ahead thread a window's work
        (returns its futures) one window before ``then(window, futures)``
        runs on this thread (numpy, madvise through BlockMapping.advise and
        the file's system calls let go of the GIL)."""
        pending = None  # (window, the futures of its work ahead)
        try:
            for work in windows:
                ahead = start(work)
                if pending is not None:
                    then(*pending)
                pending = work, ahead
            if pending is not None:
                work, ahead = pending
                pending = None
                then(work, ahead)
        finally:
            if pending is not None:
                # An error: the work ahead still reads memory; let it end first.
                futures.wait(pending[1])

    def _detect(self, work: SaveWindow) -> np.ndarray:
        self._populate(work.block, work.first, *work.dirty_runs, write=False)
        return work.dirty_pages[nonzero_pages(work.words, work.dirty_pages, work.dirty_runs)]

    def _write_detected(self, work: SaveWindow, written: np.ndarray) -> None:
        # Busy: the window's preparing, then from here on (not the wait).
        work.started_ns = time.perf_counter_ns() - (work.prepared_ns - work.started_ns)
        nbytes, calls = self._write_found(work, written)
        self._account(work, written, nbytes, calls)

    def _prepare(self, block: int, first: int, end: int, own: np.ndarray) -> SaveWindow:
        """A window's dirty pages, less those in holes of the block's file
        (or, with the hash tracker, less those the file holds already)."""
        started = time.perf_counter_ns()
        dirty = self._own_bits(self.control.pass_bitmap, block, first, end, own)
        all_dirty = dirty_pages = dirty.set_pages()
        unchanged = 0
        holes = None if self.hasher is not None else self._hole_pages(block, first, end)
        if holes is not None:
            # Pages in holes are zero pages: not read, not written.
            dirty_pages = all_dirty[~holes[all_dirty]]
        dirty_runs = page_runs(dirty_pages)
        words = self.words[block][first:end]
        if self.hasher is not None:
            self._populate(block, first, *dirty_runs, write=False)
            words, changed = self._changed_pages(block, first, words, dirty_pages,
                                                 dirty_runs)
            unchanged = dirty_pages.size - changed.size
            all_dirty = dirty_pages = changed
            dirty = OwnBits.of_pages(changed, own, end - first)
            dirty_runs = page_runs(changed)
        base = self.plan.pages_offsets[block] + first * PAGE_SIZE
        return SaveWindow(block, first, end, dirty, all_dirty, dirty_pages, dirty_runs,
                          words, base, unchanged, started, time.perf_counter_ns())

    def _write_found(self, work: SaveWindow, written: np.ndarray) -> tuple[int, int]:
        """Write a window's non-zero dirty pages (``written``); returns the
        bytes and the calls."""
        if self.plan.direct_io:
            spans = direct_io_spans(work.dirty_runs, written)
        else:
            spans = page_runs(written)
        # Buffered: a step at a time, as the fused loop writes (see
        # STEP_PAGES).  O_DIRECT: large.
        starts, ends = split_spans(*spans, MAX_SPAN_PAGES if self.plan.direct_io
                                   else self.step_pages)
        nbytes = self._spans_io(os.pwrite, "writing", work.words, starts.tolist(),
                                ends.tolist(), work.base)
        return nbytes, starts.size

    def _account(self, work: SaveWindow, written: np.ndarray, nbytes: int, calls: int) -> None:
        block, first, end = work.block, work.first, work.end
        # Only this channel writes these chunks' bits (control.py), so its
        # bits here are the latest: written pages set, dirty pages found
        # zero cleared.
        self._own_bits(self.file_bits, block, first, end, work.dirty.own).store(
            cleared=work.dirty, set_=written)
        row = self.counters
        row[PAGES_WRITTEN] += written.size
        row[ZERO_PAGES] += work.all_dirty.size - written.size
        row[BYTES_WRITTEN] += nbytes
        row[WRITE_CALLS] += calls
        row[UNCHANGED_PAGES] += work.unchanged
        row[PAGES_DONE] += work.all_dirty.size + work.unchanged
        row[SHARDS_DONE] += 1
        row[BUSY_NS] += time.perf_counter_ns() - work.started_ns
        if self.last_pass:
            self._let_go(block, first, end, work.dirty.count())

    def _let_go(self, block: int, first: int, end: int, own: int) -> None:
        """Done with pages [first, end) of a block in this channel for good
        (the last pass); ``own`` of them are its own, the most it mapped.
        Up to ``plan.kept_pages`` own pages stay mapped, for the channel's
        exit to unmap after the coordinator's call has returned, as a QEMU
        never unmaps its guest's memory to migrate it (unmapping 1 GiB
        costs the channels 40-50 ms of CPU: a guest-like save of it took
        253 -> 238 ms at 2 channels, 266 -> 246 ms at 8, unmapped after the
        call instead of window by window).  Beyond that, the oldest windows
        are unmapped now (the block's file keeps the pages), so a channel's
        page tables stay bounded whatever the block's size."""
        mapped = self.blocks[block]
        if mapped.mapping is None or not self.can_drop:
            return  # a private block's bytes are the snapshot itself
        self.kept.append((mapped, first, end, own))
        self.kept_pages += own
        while self.kept_pages > self.plan.kept_pages:
            mapped, first, end, own = self.kept.popleft()
            self.kept_pages -= own
            if self.lookahead is not None and not self.side_by_side:
                # A lone channel's thread is the one writer (or reader): the
                # look-ahead thread lets go, once done with the next window
                # (a dense 1 GiB by one channel: 414-420 ms with the exit's
                # teardown, 441 ms dropping windows on the writer's thread,
                # 359 ms on this one).
                self.lookahead.submit(self._drop, mapped, first, end)
            else:
                self._drop(mapped, first, end)

    def _drop(self, mapped: BlockMapping, first: int, end: int) -> None:
        try:
            mapped.advise(mmap.MADV_DONTNEED, first, end - first)
        except OSError:
            self.can_drop = False

    def _write_nonzero(self, words: np.ndarray, runs: tuple[np.ndarray, np.ndarray],
                       base: int) -> tuple[np.ndarray, int, int]:
        """Zero detection and write in one step (of step_pages) of each of a
        few long runs: the pwrite copies pages the check just brought into
        the core's cache, instead of reading the window from memory a second
        time.  Where channels take turns at the file, a step whose turn
        cannot be had at once waits (up to MAX_WAITING_STEPS) while the next
        steps are checked.  Returns the pages written, the bytes and the
        calls."""
        step = self.step_pages
        found = []
        waiting: list[tuple[list[int], list[int]]] = []
        nbytes = calls = 0
        turns = self.turns
        for run_start, run_end in zip(runs[0].tolist(), runs[1].tolist()):
            for start in range(run_start, run_end, step):
                end = min(start + step, run_end)
                pages = start + np.flatnonzero(step_nonzero(words[start:end]))
                if not pages.size:
                    continue
                starts, ends = page_runs(pages)
                found.append(pages)
                calls += starts.size
                waiting.append((starts.tolist(), ends.tolist()))
                if turns is None or turns.take(wait=len(waiting) >= MAX_WAITING_STEPS):
                    nbytes += self._write_waiting(words, waiting, base)
        if waiting:  # held back for a turn that was not to be had
            turns.take(wait=True)
            nbytes += self._write_waiting(words, waiting, base)
        written = np.concatenate(found) if found else np.zeros(0, np.int64)
        return written, nbytes, calls

    def _write_waiting(self, words: np.ndarray, waiting: list[tuple[list[int], list[int]]],
                       base: int) -> int:
        """Write the steps held back (runs of pages), in this channel's turn
        where channels take turns; the turn ends even if a write fails."""
        try:
            return sum(self._spans_io(os.pwrite, "writing", words, starts, ends, base)
                       for starts, ends in waiting)
        finally:
            waiting.clear()
            if self.turns is not None:
                self.turns.give()

    def _changed_pages(self, block: int, first: int, words: np.ndarray, dirty_pages: np.ndarray,
                       dirty_runs: tuple[np.ndarray, np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
        """The hash tracker's step: which dirty pages of a window changed
        since the file last got them.  Returns a private copy of the window
        holding those pages, and their numbers.

        Memory may change at any moment, so each page is read once, into
        private memory, and the hash, the zero check and the write all use
        that copy: the stored hash is always the hash of what the file holds
        (or of zeros, where its bit is clear).  A page torn by a concurrent
        writer is saved torn, and hashes differently from memory at the next
        pass, which saves it again."""
        copy, hashes = self.copy[:words.shape[0]], self.hashes[:words.shape[0]]
        if few_long_runs(dirty_pages, dirty_runs):
            # A few long runs: slices are plain memcpy (fancy indexing of
            # whole pages costs four times as much).
            for start, end in zip(dirty_runs[0].tolist(), dirty_runs[1].tolist()):
                copy[start:end] = words[start:end]
                self.hasher.hash_into(copy[start:end], hashes[start:end])
        else:
            gathered = words[dirty_pages]
            copy[dirty_pages] = gathered
            hashes[dirty_pages] = self.hasher.hash(gathered)
        new = hashes[dirty_pages]
        index = self.page_bases[block] + first + dirty_pages
        table = self.control.page_hashes[self.hash_table]
        rows = np.flatnonzero((new != table[index]).any(axis=1))
        table[index[rows]] = new[rows]
        changed = dirty_pages[rows]
        return copy, changed

    def _spans_io(self, io, verb: str, words: np.ndarray, starts: list[int],
                  ends: list[int], base: int) -> int:
        """Move each span of pages between memory and its fixed offset in
        the file with one call (``io`` is a pwrite or a pread).  The hot
        loop of a save or restore: nothing per span but slice and call."""
        view = memoryview(words).cast("B")
        fd = self.fd
        total = low = 0
        try:
            for start, end in zip(starts, ends):
                low, high = start * PAGE_SIZE, end * PAGE_SIZE
                done = io(fd, view[low:high], base + low)
                while done < high - low:  # short transfer: ENOSPC ahead, or a short file
                    more = io(fd, view[low + done:high], base + low + done)
                    if more == 0:
                        raise OSError(errno.EIO, f"{verb} stopped short: the file "
                                      f"ends inside the pages region")
                    done += more
                total += high - low
        except OSError as error:
            raise OSError(error.errno, f"{error.strerror} ({verb} pages at offset "
                          f"{base + low})", self.plan.image_name) from None
        return total

    # --- restore ---

    def restore(self, chunks: np.ndarray, zero_clear: bool, claim: bool, last: bool) -> None:
        """Read these chunks' present pages into the destinations (and zero
        their clear pages with ``zero_clear``), with ``claim`` of the shards
        of them this channel claims; ``last``: the restore's last pass
        (each window's mapping is let go once read)."""
        self.last_pass = last
        windows = (self._prepare_restore(*window)
                   for window in self._windows(chunks, claim))
        if self.lookahead is not None and all(b.page_bytes > PAGE_SIZE for b in self.blocks):
            self._restore_side_by_side(windows, zero_clear)
            return
        if self.lookahead is None:
            for work in windows:
                if zero_clear and not work.send:
                    self._ready_restore(work)
                else:
                    # Into a destination known to be zero, pread faults the
                    # pages in more cheaply than populating them first
                    # (2 channels: dense 1 GiB 0.531 -> 0.498 s, guest-like
                    # 0.217 -> 0.210 s; 8 channels guest-like 0.269 -> 0.250).
                    self._read_ahead(work)
                self._read_window(work, zero_clear)
            return
        # With a look-ahead thread, a window of long runs is sent while
        # the thread reads its last steps (_read_or_send); for other
        # windows, the thread readies the next one while this one is read.
        if zero_clear:
            # A destination that may hold anything: the look-ahead thread
            # populates the next window's runs while this one is read.
            self._one_window_ahead(
                windows,
                lambda work: [] if work.send else [
                    self.lookahead.submit(self._ready_restore, work)],
                lambda work, ahead: (self._read_window(work, True) if work.send
                                     else self._read_populated(work, ahead)))
            return
        # Into a destination known to be zero, the next window's present
        # pages are mapped (allocated and cleared: half the work of such a
        # restore) by the look-ahead thread while this one reads the window
        # before, and by both where this thread is done first.
        self._one_window_ahead(
            windows, lambda work: [] if work.send else self._map_ahead(work),
            lambda work, ahead: (self._read_window(work, False) if work.send
                                 else self._read_mapped(work, ahead)))

    def _restore_side_by_side(self, windows: Iterator[RestoreWindow], zero_clear: bool) -> None:
        """A lone channel's two threads each read whole windows, taking the
        next one as they finish one: into memory in huge pages (a hugetlbfs,
        which refuses sendfile), where mapping the next window (allocating
        and clearing its pages) while reading this one only has the two
        threads compete for the memory's bandwidth: 1 GiB into a hugetlbfs
        took 107 ms so, 91 ms by one thread faulting the pages in as it
        reads, 66-77 ms by two threads reading half each.  (A/B, 1 GiB at 1
        channel: dense 118 -> 87 ms, guest-like 65 -> 54 ms; sharing each
        window's steps instead, as a sending channel does, waited at every
        window's end for the slower thread: dense 106 -> 89 ms.)"""
        self.can_send = False
        self.side_by_side = True
        taking = threading.Lock()
        failed = False

        def take() -> RestoreWindow | None:
            with taking:
                return None if failed else next(windows, None)

        def read_windows() -> None:
            nonlocal failed
            try:
                while (work := take()) is not None:
                    self._read_ahead(work)
                    self._read_window(work, zero_clear)
            except BaseException:
                failed = True  # the other thread takes no more windows
                raise

        other = self.lookahead.submit(read_windows)
        try:
            read_windows()
        finally:
            futures.wait([other])
            self.side_by_side = False
        other.result()

    def _prepare_restore(self, block: int, first: int, end: int, own: np.ndarray
                         ) -> RestoreWindow:
        bits = self._own_bits(self.control.pass_bitmap, block, first, end, own)
        starts, ends = split_spans(*bits.set_runs())
        present_pages = int((ends - starts).sum())
        send = (self.sending and self.can_send and self.blocks[block].fd >= 0
                and starts.size * MIN_SENT_RUN_PAGES <= present_pages)
        return RestoreWindow(block, first, self.words[block][first:end],
                             self.plan.pages_offsets[block] + first * PAGE_SIZE,
                             starts, ends, bits, bits.count(), present_pages, send)

    def _ready_restore(self, work: RestoreWindow) -> None:
        """Map the pages that get bytes, one system call per run (a
        destination that may hold anything: its other pages are given back
        after the read), and start reading the window's span."""
        self._populate(work.block, work.first, work.starts, work.ends, write=True)
        self._read_ahead(work)

    def _map_ahead(self, work: RestoreWindow) -> list[futures.Future]:
        """Hand the look-ahead thread the mapping of a window's present
        pages, into a destination known to be zero, in MAP_PIECES pieces.
        Storing a zero into each page maps it with one fault in user space
        (no system call per run, unlike madvise) and changes nothing;
        faulting inside the pread costs the reader more."""
        self._read_ahead(work)
        work.pieces = [piece for piece in np.array_split(work.bits.set_pages(),
                                                         MAP_PIECES) if piece.size]
        return [self.lookahead.submit(_store_zero, work.words, piece) for piece in work.pieces]

    def _read_mapped(self, work: RestoreWindow, ahead: list[futures.Future]) -> None:
        """Map the pieces the look-ahead thread has not started yet, from
        the last back, while it goes on from the first (a dense window's
        faults take longer than reading the window before); then read."""
        for future, piece in zip(reversed(ahead), reversed(work.pieces)):
            if not future.cancel():
                break
            _store_zero(work.words, piece)
        for future in ahead:
            if not future.cancelled():
                future.result()
        self._read_window(work, False)

    def _read_populated(self, work: RestoreWindow, ahead: list[futures.Future]) -> None:
        ahead[0].result()
        self._read_window(work, True)

    def _read_ahead(self, work: RestoreWindow) -> None:
        if work.starts.size and not self.plan.direct_io:
            # One readahead for the window's whole span: the disk then
            # reads it in large requests instead of one per run.  Unless
            # the span's last page is cached already (an image just
            # written, or read before): the advice walks the cache over
            # the whole span to find nothing to do, 4 ms of a channel's
            # 54 in a 2-channel restore of a guest-like 1 GiB.
            low, high = int(work.starts[0]) * PAGE_SIZE, int(work.ends[-1]) * PAGE_SIZE
            cached = (in_page_cache(self.fd, work.base + high - PAGE_SIZE, self.probe)
                      if self.can_probe_cache else None)
            self.can_probe_cache = cached is not None
            if not cached:
                os.posix_fadvise(self.fd, work.base + low, high - low, os.POSIX_FADV_WILLNEED)

    def _read_window(self, work: RestoreWindow, zero_clear: bool) -> None:
        started = time.perf_counter_ns()
        if work.send:
            sent = self._read_or_send(work)
        else:
            self._spans_io(_pread, "reading", work.words, work.starts.tolist(),
                           work.ends.tolist(), work.base)
            sent = 0
        zeroed = 0
        if zero_clear:
            clear_starts, clear_ends = page_runs(work.bits.clear_pages())
            self._zero(work.block, work.first, work.words, clear_starts.tolist(),
                       clear_ends.tolist())
            zeroed = int((clear_ends - clear_starts).sum())
        with self.accounting:  # two threads may read windows (_restore_side_by_side)
            row = self.counters
            row[PAGES_READ] += work.present_pages
            row[PAGES_SENT] += sent
            row[PAGES_ZEROED] += zeroed
            row[WRITE_CALLS] += work.starts.size
            # As the coordinator counts a pass's pages: all of them where
            # clear pages are zeroed, else those the image holds.
            row[PAGES_DONE] += work.own_pages if zero_clear else work.present_pages
            row[SHARDS_DONE] += 1
            row[BUSY_NS] += time.perf_counter_ns() - started
            if self.last_pass:
                self._let_go(work.block, work.first, work.first + work.words.shape[0],
                             work.own_pages)

    def _read_or_send(self, work: RestoreWindow) -> int:
        """Bring the window's present pages into the destination a step at
        a time: where it may, this thread has the kernel copy a step from
        the image into the destination's file (sendfile); else the step is
        read into this channel's mapping of it.  With a look-ahead thread,
        that thread reads steps from the window's end meanwhile.  Returns
        the pages sent.

        A page that the file gets is allocated without being zeroed first
        and is never mapped here, where a pread into the mapping takes a
        fault per page (allocate, zero, map, and unmap when the channel
        exits): a guest-like 1 GiB in 0.14-0.22 s by one process instead of
        0.25-0.36.  But writers to one tmpfs file queue for its inode lock
        (two processes sending took twice the CPU, in the same time), and
        the fault path takes none: so one channel at a time sends (Turns),
        and the others read meanwhile.  Restores of 1 GiB: guest-like at 1
        and 2 channels 0.26 -> 0.20 s and 0.22 -> 0.18 s, dense 0.60 ->
        0.45 s and 0.51 -> 0.39 s.  With more channels than CPUs, only as
        many read as leave the sender a CPU, and the rest wait for the turn
        (4 and 8 channels on 2 CPUs: guest-like 209 -> 191 and 243 -> 222
        ms, dense 498 -> 458 and 527 -> 509 ms)."""
        steps = _StepQueue(list(_steps(work.starts, work.ends, LAST_PASS_STEP_PAGES)))
        reader = (self.lookahead.submit(self._read_steps, work, steps)
                  if self.lookahead is not None else None)
        limited = self.turns is not None and self.turns.readers > 0
        sent = 0
        try:
            while (step := steps.first()) is not None:
                # Send if the turn is free now; else read, in a reader's
                # place where those are counted, or, with none free, wait
                # for the turn and send.  Short runs are always read.
                reading = 0  # the reader's place this step holds
                if (self._send_turn(work, *step, wait=False)
                        or (limited and not (reading := self.turns.take_reading())
                            and self._send_turn(work, *step, wait=True))):
                    sent += sum(step[1]) - sum(step[0])
                    continue
                try:
                    self._spans_io(_pread, "reading", work.words, *step, work.base)
                finally:
                    if reading:
                        self.turns.give_reading(reading)
        finally:
            if reader is not None:
                reader.result()
        return sent

    def _read_steps(self, work: RestoreWindow, steps: _StepQueue) -> None:
        """The look-ahead thread's share of a window: steps read into the
        mapping, from the window's last back."""
        while (step := steps.last()) is not None:
            self._spans_io(_pread, "reading", work.words, *step, work.base)

    def _send_turn(self, work: RestoreWindow, starts: list[int], ends: list[int],
                   wait: bool) -> bool:
        """Send a step if this channel may (its turn, where channels take
        turns: now, or once it comes with ``wait``); False if it was not
        sent."""
        mapped = self.blocks[work.block]
        if not self.can_send or len(starts) * MIN_SENT_RUN_PAGES > sum(ends) - sum(starts):
            return False
        if self.turns is None:
            return self._send_spans(mapped, work, starts, ends)
        if not self.turns.take(wait):
            return False
        try:
            return self._send_spans(mapped, work, starts, ends)
        finally:
            self.turns.give()

    def _send_spans(self, mapped: BlockMapping, work: RestoreWindow, starts: list[int],
                    ends: list[int]) -> bool:
        """Copy spans of pages from the image into the destination's file,
        at their place in it; False where that file cannot take it (nothing
        is then lost: the caller reads the spans instead)."""
        target = mapped.source.offset + work.first * PAGE_SIZE
        low = starts[0] * PAGE_SIZE
        try:
            for start, end in zip(starts, ends):
                low, high = start * PAGE_SIZE, end * PAGE_SIZE
                # This channel's own descriptor of the file (BlockMapping
                # opens one per channel): channels that are threads of one
                # process do not share its position.
                os.lseek(mapped.fd, target + low, os.SEEK_SET)
                while low < high:
                    done = os.sendfile(mapped.fd, self.fd, work.base + low, high - low)
                    if done == 0:
                        raise OSError(errno.EIO, "reading stopped short: the file "
                                      "ends inside the pages region")
                    low += done
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
                self.can_send = False  # hugetlbfs, say: read into the mapping
                return False
            raise OSError(error.errno, f"{error.strerror} (copying pages at offset "
                          f"{work.base + low} into {mapped.source.path})",
                          self.plan.image_name) from None
        return True

    def _zero(self, block: int, first: int, words: np.ndarray, starts: list[int],
              ends: list[int]) -> None:
        """Make these runs of a window zero by giving their pages back to
        the file (a hole reads as zero, and a sparse destination stays
        sparse); by writing zeros where the file system cannot."""
        mapped = self.blocks[block]
        for start, end in zip(starts, ends):
            if self.can_remove:
                try:
                    mapped.advise(mmap.MADV_REMOVE, first + start, end - start)
                    continue
                except OSError:
                    self.can_remove = False
            words[start:end] = 0


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def channel_main(channels: list[tuple[int, object]], plan: ChannelPlan,
                 forked_by_main_thread: bool = False,
                 handles: tuple[int, int, int] | None = None) -> None:
    """A channel process's whole life: it hosts ``channels`` (their numbers
    and connections), each on a thread of its own, the first on the main
    thread.  ``forked_by_main_thread``: the coordinator's main thread
    forked it (die_with_coordinator).  ``handles``: the image's, the
    control segment's and the claims pipe's descriptors, inherited from a
    coordinator that forked this process; else each channel receives them
    over its connection."""
    # As ps(1) and top(1) show it: a forked channel would otherwise bear
    # its coordinator's name.  Each thread is named after its channel.
    libc.set_process_name(f"ps channel {channels[0][0]}")
    die_with_coordinator(plan, forked_by_main_thread)
    # Ctrl-C reaches the whole process group; the coordinator alone decides
    # how to stop, so a channel never dies half-way through a write on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A channel that dies of a signal (SIGBUS: its block's file was cut
    # short) is reported by the coordinator with the cause; a fault
    # handler inherited from the parent (pytest's) would only add a dump.
    faulthandler.disable()
    hosted = HostedTurns()
    opened: list[Channel] = []
    # Daemons: a process that fails to start one exits at once (and its
    # coordinator reports it), without waiting for the others.
    threads = [threading.Thread(target=_serve,
                                args=(number, conn, plan, hosted, opened, handles),
                                name=f"ps channel {number}", daemon=True)
               for number, conn in channels[1:]]
    for thread in threads:
        thread.start()
    _serve(*channels[0], plan, hosted, opened, handles)
    for thread in threads:
        thread.join()
    # What is left (unmapping what the last pass kept mapped, the exit) is
    # work nobody waits for: at the lowest priority it yields the CPU to
    # the caller, whose call has just returned (a coordinator closing the
    # connections of a 2-channel save of 1 GiB on 2 cores was kept off the
    # CPU for 2-4 ms by channels starting to unmap; 0.5 ms at this one).
    os.setpriority(os.PRIO_PROCESS, 0, 19)
    # Only once every channel of the process is done: closing any
    # descriptor of the control segment drops every record lock the
    # process holds on it, another channel's turn included.
    for channel in opened:
        channel.close()


def _serve(number: int, conn, plan: ChannelPlan, hosted: HostedTurns,
           opened: list[Channel], handles: tuple[int, int, int] | None) -> None:
    """One channel: attach, then handle the coordinator's messages until
    told to stop (or the last pass is done).  An error is reported to the
    coordinator, which then stops every channel."""
    if threading.current_thread() is not threading.main_thread():
        libc.set_process_name(f"ps channel {number}")
    running = hosted.running if plan.passes_in_turn else contextlib.nullcontext()
    try:
        if handles is None:
            image_fd = reduction.recv_handle(conn)
            control_fd = reduction.recv_handle(conn)
            claims_fd = reduction.recv_handle(conn)
        else:
            # Each channel its own, as received ones are: it closes them.
            image_fd, control_fd, claims_fd = (os.dup(fd) for fd in handles)
        channel = Channel(number, plan, image_fd, control_fd, claims_fd, hosted)
        opened.append(channel)
        conn.send_bytes(pickle.dumps((READY,)))
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == STOP:
                break
            if message[0] == SWITCH:
                os.close(channel.fd)
                channel.fd = reduction.recv_handle(conn)
                channel.hash_table = message[1]
                continue  # no reply: the next pass's is the answer
            elif message[0] in (SAVE, RESTORE):
                with running:
                    if message[0] == SAVE:
                        channel.save(message[1], message[2], message[3])
                    else:
                        channel.restore(message[1], message[2], message[3], message[4])
            else:
                raise ValueError(f"unknown message {message[0]!r}")
            conn.send_bytes(pickle.dumps((DONE,)))
            if message[-1]:
                # The last pass: exit as after STOP, once the coordinator
                # has closed the connection (its stop(), the call's end).
                # Letting go of what the pass kept mapped takes CPU (about
                # 20 ms a GiB a channel), which the coordinator's last steps
                # (bitmaps, END, rename) would otherwise wait for on a
                # machine with no CPU to spare: 1-9 ms of a 2-channel save
                # of 1 GiB on 2 cores, 0.5 ms after.  Bounded, should a
                # process forked by another of the caller's threads hold a
                # copy of the coordinator's end.  It waits at the lowest
                # priority, the one its exit runs at (channel_main): woken
                # by the close, it does not take the CPU from the
                # coordinator closing the next connection.
                os.setpriority(os.PRIO_PROCESS, 0, 19)
                conn.poll(LAST_PASS_LINGER)
                break
    except (EOFError, BrokenPipeError):
        pass  # the coordinator is gone: nothing to report to
    except BaseException as error:  # noqa: BLE001 -- reported, then the coordinator stops us
        try:
            conn.send_bytes(pickle.dumps((ERROR, _describe(error),
                                         getattr(error, "errno", None))))
        except OSError:
            pass


def spawned_main(fds: str) -> None:
    """A channel process started as a new interpreter
    (channels.SpawnedChannel), on the connections ``fds`` (comma-separated
    descriptors, one per channel it hosts): each channel's number and the
    plan come first on its connection, from its parent."""
    from multiprocessing.connection import Connection

    channels = []
    for fd in fds.split(","):
        conn = Connection(int(fd))
        number, plan = pickle.loads(conn.recv_bytes())
        channels.append((number, conn))
    channel_main(channels, plan)
