"""A channel: one worker process of a save or restore, like a QEMU multifd
channel.

It maps the RAM blocks and the control segment itself, opens the image
file itself (with O_DIRECT when asked), then loops over small messages from
the coordinator: each names a pass and the chunks to handle.  Page bytes
go straight between the shared mappings and the file; nothing but chunk
numbers and one-line replies crosses the pipe.

Messages (pickled tuples):
    ("save", chunks)               write the dirty pages of these chunks
    ("restore", chunks, zero)      read the present pages, zero the rest if `zero`
    ("stop",)                      close everything and exit
Replies: ("ready",) once attached, ("done",) per pass, ("error", text).
"""

from __future__ import annotations

import ctypes
import mmap
import errno
import os
import pickle
import signal
import time
import numpy as np

from parallel_save.blocks import attach
from parallel_save.control import (BUSY_NS, BYTES_WRITTEN, CHUNK_PAGES, PAGES_DONE,
                                   PAGES_READ, PAGES_WRITTEN, PAGES_ZEROED, SHARDS_DONE,
                                   WRITE_CALLS, ZERO_PAGES, ChannelPlan, ControlSegment)
from parallel_save.format import PAGE_SIZE, bit_runs as runs

_WORDS_PER_PAGE = PAGE_SIZE // 8
_PR_SET_PDEATHSIG = 1
# madvise advice (Linux >= 5.14): fault a range of pages in with one call.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23


def _die_with_parent() -> None:
    """Ask the kernel to kill us if the coordinator dies, so that even a
    SIGKILLed coordinator leaves no channel behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def nonzero_pages(words: np.ndarray, dirty_runs: tuple[np.ndarray, np.ndarray]
                  ) -> np.ndarray:
    """Which dirty pages are non-zero (``words``: one row of uint64 per page).

    Vectorised over whole runs, never page by page in Python.  A page whose
    first word is non-zero needs no more reading; only the others are
    scanned in full, so mostly non-zero memory costs one cache line a page.
    """
    nonzero = np.zeros(words.shape[0], dtype=bool)
    for start, end in zip(*dirty_runs):
        run = words[start:end]
        found = run[:, 0] != 0
        maybe_zero = np.flatnonzero(~found)
        if maybe_zero.size:
            found[maybe_zero] = run[maybe_zero].max(axis=1) != 0
        nonzero[start:end] = found
    return nonzero


def direct_io_spans(dirty_runs: tuple[np.ndarray, np.ndarray], written: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For O_DIRECT: one span per dirty run, from its first to its last
    non-zero page.  The zero pages inside go along (their bits stay clear),
    which turns thousands of small O_DIRECT writes into a few large ones;
    only pages of this pass are ever rewritten."""
    pages = np.flatnonzero(written)
    if not pages.size:
        return pages, pages
    run_of = np.searchsorted(dirty_runs[0], pages, side="right") - 1
    boundary = run_of[1:] != run_of[:-1]
    firsts = pages[np.concatenate(([True], boundary))]
    lasts = pages[np.concatenate((boundary, [True]))]
    return firsts, lasts + 1


class Channel:
    def __init__(self, number: int, plan: ChannelPlan) -> None:
        self.number = number
        self.plan = plan
        self.control = ControlSegment.attach(plan.control, plan.control_path)
        self.counters = self.control.counters[number]
        self.file_bits = self.control.file_bitmaps[number]
        self.mappings = []
        self.pages = []
        self.skips = []
        for source in plan.sources:
            mapping, array = attach(source, writable=not plan.writing)
            self.mappings.append(mapping)
            self.pages.append(array)
            self.skips.append(source.offset % mmap.ALLOCATIONGRANULARITY)
        self.can_populate = True
        flags = os.O_WRONLY if plan.writing else os.O_RDONLY
        if plan.direct_io:
            flags |= os.O_DIRECT
        self.fd = os.open(plan.image_path, flags)
        self.chunk_bases = np.asarray(plan.control.chunk_bases)
        self.block_pages = plan.control.block_pages
        self.bitmap_bases = plan.control.bitmap_bases

    def close(self) -> None:
        os.close(self.fd)

    def _chunk(self, chunk: int) -> tuple[int, int, int]:
        """(block, first page, page count) of a global chunk number."""
        block = int(np.searchsorted(self.chunk_bases, chunk, side="right")) - 1
        first = (chunk - int(self.chunk_bases[block])) * CHUNK_PAGES
        return block, first, min(CHUNK_PAGES, self.block_pages[block] - first)

    def _populate(self, block: int, first: int, end: int, write: bool) -> None:
        """Map pages [first, end) of a block in one system call.  A channel's
        mapping starts empty, and faulting it in page by page costs twice
        as much as the zero detection itself."""
        if not self.can_populate:
            return
        try:
            self.mappings[block].madvise(
                _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ,
                self.skips[block] + first * PAGE_SIZE, (end - first) * PAGE_SIZE)
        except OSError:
            self.can_populate = False  # an older kernel: let the pages fault

    def _bit_slice(self, block: int, first: int, count: int) -> slice:
        # Chunks start on a multiple of 8 pages, so their bits are whole bytes.
        base = self.bitmap_bases[block] + first // 8
        return slice(base, base + (count + 7) // 8)

    # --- save ---

    def save(self, chunks: np.ndarray) -> None:
        for chunk in chunks:
            started = time.perf_counter_ns()
            block, first, count = self._chunk(int(chunk))
            bits = self._bit_slice(block, first, count)
            dirty = np.unpackbits(self.control.pass_bitmap[bits], count=count,
                                  bitorder="little").view(bool)
            pages = self.pages[block][first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            dirty_runs = runs(dirty)
            for start, end in zip(*dirty_runs):
                self._populate(block, first + start, first + end, write=False)
            written = nonzero_pages(pages.view(np.uint64).reshape(count, _WORDS_PER_PAGE),
                                    dirty_runs)
            # This channel always handles this chunk, so its bits here are
            # the latest: written pages set, dirty pages found zero cleared.
            old = np.unpackbits(self.file_bits[bits], count=count,
                                bitorder="little").view(bool)
            self.file_bits[bits] = np.packbits((old & ~dirty) | written,
                                               bitorder="little")
            if self.plan.direct_io:
                span_starts, span_ends = direct_io_spans(dirty_runs, written)
            else:
                span_starts, span_ends = runs(written)
            nbytes = self._spans_io(os.pwrite, "writing", pages, span_starts.tolist(),
                                    span_ends.tolist(),
                                    self.plan.pages_offsets[block] + first * PAGE_SIZE)
            done = int(np.count_nonzero(dirty))
            wrote = int(np.count_nonzero(written))
            row = self.counters
            row[PAGES_WRITTEN] += wrote
            row[ZERO_PAGES] += done - wrote
            row[BYTES_WRITTEN] += nbytes
            row[WRITE_CALLS] += len(span_starts)
            row[PAGES_DONE] += done
            row[SHARDS_DONE] += 1
            row[BUSY_NS] += time.perf_counter_ns() - started

    def _spans_io(self, io, verb: str, pages: np.ndarray, starts: list[int],
                  ends: list[int], base: int) -> int:
        """Move each span of pages between memory and its fixed offset in
        the file with one call (``io`` is a pwrite or a pread).  The hot
        loop of a save or restore: nothing per span but slice and call."""
        view = memoryview(pages)
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
                          f"{base + low})", self.plan.image_path) from None
        return total

    # --- restore ---

    def restore(self, chunks: np.ndarray, zero_clear: bool) -> None:
        for chunk in chunks:
            started = time.perf_counter_ns()
            block, first, count = self._chunk(int(chunk))
            present = np.unpackbits(self.control.pass_bitmap[self._bit_slice(block, first, count)],
                                    count=count, bitorder="little").view(bool)
            pages = self.pages[block][first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            base = self.plan.pages_offsets[block] + first * PAGE_SIZE
            starts, ends = (r.tolist() for r in runs(present))
            if zero_clear:
                self._populate(block, first, first + count, write=True)
            for start, end in zip(starts, ends):
                # Only the pages that get bytes: a destination known to be
                # zero keeps its holes.
                if not zero_clear:
                    self._populate(block, first + start, first + end, write=True)
            if starts and not self.plan.direct_io:
                # One readahead for the chunk's whole span: the disk then
                # reads it in large requests instead of one per run.
                low, high = starts[0] * PAGE_SIZE, ends[-1] * PAGE_SIZE
                os.posix_fadvise(self.fd, base + low, high - low, os.POSIX_FADV_WILLNEED)
            self._spans_io(_pread, "reading", pages, starts, ends, base)
            read = int(np.count_nonzero(present))
            zeroed = 0
            if zero_clear:
                for start, end in zip(*runs(~present)):
                    pages[start * PAGE_SIZE:end * PAGE_SIZE] = 0
                zeroed = count - read
            row = self.counters
            row[PAGES_READ] += read
            row[PAGES_ZEROED] += zeroed
            row[WRITE_CALLS] += len(starts)
            row[PAGES_DONE] += count
            row[SHARDS_DONE] += 1
            row[BUSY_NS] += time.perf_counter_ns() - started


def _pread(fd: int, buffer: memoryview, offset: int) -> int:
    return os.preadv(fd, [buffer], offset)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror}"
    return f"{type(error).__name__}: {error}"


def channel_main(number: int, conn, plan: ChannelPlan) -> None:
    """The channel process's whole life."""
    # Ctrl-C reaches the whole process group; the coordinator alone decides
    # how to stop, so a channel never dies half-way through a write on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    channel = None
    try:
        channel = Channel(number, plan)
        conn.send_bytes(pickle.dumps(("ready",)))
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == "stop":
                break
            if message[0] == "save":
                channel.save(message[1])
            elif message[0] == "restore":
                channel.restore(message[1], message[2])
            else:
                raise ValueError(f"unknown message {message[0]!r}")
            conn.send_bytes(pickle.dumps(("done",)))
    except (EOFError, BrokenPipeError):
        pass  # the coordinator is gone: nothing to report to
    except BaseException as error:  # reported, then the coordinator stops us
        try:
            conn.send_bytes(pickle.dumps(("error", _describe(error))))
        except OSError:
            pass
    finally:
        if channel is not None:
            channel.close()
