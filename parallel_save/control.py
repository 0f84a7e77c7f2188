"""The wire between the coordinator and its channels: the control segment
(shared memory holding counters and bitmaps), the messages, and what a
channel is told at start.  Both sides import it; only the channel group
(channels.py) and the channel process (workers/channel.py) use it.

It holds, for a save or restore with N channels over blocks of P pages:

- ``counters[N, COUNTERS]`` (int64): each channel adds to its own row only,
  so the coordinator can read progress at any time without a lock;
- ``file_bitmaps[N, bitmap bytes]``: each channel's own view of which pages
  it left in the file (set) or found zero (clear);
- ``pass_bitmap[bitmap bytes]``: written by the coordinator before a pass:
  the dirty pages of a save pass, or the present pages of a restore;
- with the hash tracker only (tracking/hashing.py): ``hash_keys[2, 1024]``
  (uint64), drawn by the coordinator for this save, and
  ``page_hashes[tables, pages, 2]`` (uint64, every block's pages end to
  end): the hash of what the file holds for each page, kept by the channel
  that handles the page; one table per image file (a checkpointer's two
  images).

Bitmaps are packed little-endian bits, each block's at its own 8-byte
aligned base, exactly QEMU's on-disk words, so merging them and writing
them out needs no conversion.

The segment is a memfd: it has no name anywhere, so nothing can be
planted in its place or left behind by a killed save; the channels get
its descriptor, not a path.

Work comes in chunks of ``CHUNK_PAGES`` pages.  In most passes chunk g
goes to channel ``g % N``, always the same channel: its mappings of the
chunk stay warm from pass to pass, and its bits for the chunk's pages are
the ones from the last pass that handled them.  But in a channel group's
first pass when it is also its last (a one-pass save, a restore: every
page, nothing warm), the channels claim the pass's chunks a shard at a
time (``shard_chunks`` consecutive chunk numbers: SHARD_CHUNKS, or more
for a huge image), each as it becomes free, from the claims pipe: the
coordinator writes every shard's number into it (CLAIM_BYTES each, all in
one write), and a channel reads one number per claim until the pipe is
empty (the kernel hands each number to one reader).  So a channel with
cheap pages (zero, say) takes more of them, and the channels end their
pass together, where chunks dealt out by number left one channel working
while another waited.  Since a claimed pass comes first, every row of the
file bitmaps is empty before it, and last, no pass follows: either way
each page's bit is set in one row at most, and merging the rows is a
plain OR (docs/DESIGN.md, invariant 2).  A chunk is a multiple of 64
pages, so no two channels ever write the same byte, nor the same 64-bit
word, of any bitmap.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from .blocks import BlockSource
from .format import bitmap_size

# 2 MiB of 4 KiB pages: large enough that a full pass is a few hundred
# messages per GiB and each write is large, small enough to spread a
# clustered dirty set over every channel.
CHUNK_PAGES = 512
if CHUNK_PAGES % 64:
    # The OR merge of the channels' bitmaps relies on it (module docstring).
    raise ImportError(f"CHUNK_PAGES ({CHUNK_PAGES}) must be a multiple of 64")
# A shard, a channel's claim and window of work in a claimed pass: 16 MiB,
# what a window holds of a channel's own chunks in a pass that deals them
# (workers/channel.py, WINDOW_PAGES); a lone channel's are twice that
# (channels.shard_chunks).
SHARD_CHUNKS = 8
LONE_SHARD_CHUNKS = 16
# A shard's number in the claims pipe: little-endian int32.
CLAIM_BYTES = 4

# Messages, coordinator to channel (pickled tuples of a few hundred bytes:
# chunk numbers, never page bytes).
SAVE = "save"          # (SAVE, chunks, claim, last): write the dirty pages of these
                       # chunks (claim: of the shards of them it claims)
RESTORE = "restore"    # (RESTORE, chunks, zero_clear, claim, last): read the present pages
                       # (last: the channel exits once it has answered, as after STOP)
STOP = "stop"          # (STOP,): close everything and exit
SWITCH = "switch"      # (SWITCH, hash table), then a descriptor on the connection:
                       # work on this image file from now on (a checkpoint's other
                       # image), hashing against that table
# Replies, channel to coordinator.
READY = "ready"        # (READY,): attached, waiting for work
DONE = "done"          # (DONE,): the pass's chunks are handled
ERROR = "error"        # (ERROR, one-line cause, errno or None)

# Counter columns of a channel's row.
PAGES_WRITTEN = 0    # non-zero pages written to the file
ZERO_PAGES = 1       # dirty pages found zero (not written, bit cleared)
BYTES_WRITTEN = 2    # bytes passed to pwrite (more than pages with direct I/O gaps)
WRITE_CALLS = 3      # pwrite/pwritev system calls
PAGES_READ = 4       # restore: pages read from the file
PAGES_ZEROED = 5     # restore: clear pages zeroed in the destination
PAGES_DONE = 6       # pages handled so far (dirty pages of a save, all of a restore)
BUSY_NS = 7          # time spent working on shards
SHARDS_DONE = 8
UNCHANGED_PAGES = 9  # hash tracker: dirty pages skipped, their hash unchanged
PAGES_SENT = 10      # restore: of PAGES_READ, copied into the destination's file
COUNTERS = 11

# The hash tracker's page hash: lanes of 64 bits over 32-bit words.
HASH_LANES = 2
HASH_WORDS = 1024


@dataclass(frozen=True)
class ControlLayout:
    """Sizes and offsets of the control segment; the same on both sides."""

    channels: int
    block_pages: tuple[int, ...]
    hash_tables: int = 0     # page hash tables: one per image file hashed against

    @property
    def bitmap_bases(self) -> tuple[int, ...]:
        bases, offset = [], 0
        for pages in self.block_pages:
            bases.append(offset)
            offset += bitmap_size(pages)
        return tuple(bases)

    @property
    def bitmap_bytes(self) -> int:
        return sum(bitmap_size(p) for p in self.block_pages)

    @property
    def chunk_bases(self) -> tuple[int, ...]:
        """Global number of each block's first chunk."""
        bases, count = [], 0
        for pages in self.block_pages:
            bases.append(count)
            count += -(-pages // CHUNK_PAGES)
        return tuple(bases)

    @property
    def chunks(self) -> int:
        return sum(-(-p // CHUNK_PAGES) for p in self.block_pages)

    @property
    def page_bases(self) -> tuple[int, ...]:
        """Index of each block's first page in ``page_hashes``."""
        bases, count = [], 0
        for pages in self.block_pages:
            bases.append(count)
            count += pages
        return tuple(bases)

    @property
    def hashes_offset(self) -> int:
        return self.channels * COUNTERS * 8 + (self.channels + 1) * self.bitmap_bytes

    @property
    def size(self) -> int:
        return self.hashes_offset + (
            0 if not self.hashing
            else (HASH_WORDS + self.hash_tables * sum(self.block_pages)) * HASH_LANES * 8)

    @property
    def hashing(self) -> bool:
        return self.hash_tables > 0


class ControlSegment:
    """The mapped control segment, as numpy views."""

    def __init__(self, layout: ControlLayout, fd: int, mapping: mmap.mmap) -> None:
        self.layout = layout
        self.fd = fd
        self._mapping = mapping
        n, width = layout.channels, layout.bitmap_bytes
        counters_size = n * COUNTERS * 8
        self.counters = np.frombuffer(mapping, np.int64, n * COUNTERS).reshape(n, COUNTERS)
        self.file_bitmaps = np.frombuffer(mapping, np.uint8, n * width,
                                          counters_size).reshape(n, width)
        self.pass_bitmap = np.frombuffer(mapping, np.uint8, width,
                                         counters_size + n * width)
        self.hash_keys = self.page_hashes = None
        if layout.hashing:
            keys = layout.hashes_offset
            self.hash_keys = np.frombuffer(mapping, np.uint64, HASH_LANES * HASH_WORDS,
                                           keys).reshape(HASH_LANES, HASH_WORDS)
            pages = sum(layout.block_pages)
            self.page_hashes = np.frombuffer(
                mapping, np.uint64, layout.hash_tables * pages * HASH_LANES,
                keys + HASH_LANES * HASH_WORDS * 8).reshape(layout.hash_tables, pages,
                                                            HASH_LANES)

    @classmethod
    def create(cls, layout: ControlLayout) -> ControlSegment:
        """A new, zeroed segment: an unnamed memfd."""
        fd = os.memfd_create("parallel-save-control", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.size)
            mapping = mmap.mmap(fd, layout.size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return cls(layout, fd, mapping)

    @classmethod
    def attach(cls, layout: ControlLayout, fd: int) -> ControlSegment:
        """Map the segment whose descriptor a channel was handed."""
        if os.fstat(fd).st_size != layout.size:
            raise ValueError(f"the control segment is {os.fstat(fd).st_size} bytes, "
                             f"expected {layout.size}")
        return cls(layout, fd, mmap.mmap(fd, layout.size, mmap.MAP_SHARED))

    def close(self) -> None:
        """Drop the descriptor; the numpy views keep the mapping alive until
        they go too."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def block_bits(self, row: np.ndarray, block: int) -> np.ndarray:
        """One block's packed bitmap inside a bitmap row (a view)."""
        base = self.layout.bitmap_bases[block]
        return row[base:base + bitmap_size(self.layout.block_pages[block])]

    def merged_file_bitmap(self) -> np.ndarray:
        """The OR of the channels' file bitmaps (see the module docstring)."""
        return np.bitwise_or.reduce(self.file_bitmaps, axis=0)


@dataclass(frozen=True)
class ChannelPlan:
    """Everything a channel needs besides its two descriptors (the image
    file and the control segment, passed over its connection): sent once
    at start, a few hundred bytes."""

    image_name: str                  # the image as the user named it, for messages
    writing: bool                    # save (True) or restore (False)
    direct_io: bool
    sources: tuple[BlockSource, ...]
    pages_offsets: tuple[int, ...]   # each block's pages region in the file
    control: ControlLayout
    coordinator: int                 # pid of the coordinator: the channel dies with it
    parent: int                      # pid the channel's parent must have: the
                                     # coordinator, or a snapshot's holder
    lookahead: bool = False          # a second thread a window ahead (channels.lookahead)
    turns: bool = False              # channels take turns at the file (channels.take_turns)
    readers: int = 0                 # a restore's readers beside the sender, at most
                                     # (0: no bound; channels.restore_readers)
    passes_in_turn: bool = False     # a process's channels run their passes one at a
                                     # time (channels.passes_in_turn)
    kept_pages: int = 0              # of its last pass, what a channel leaves mapped
                                     # for its exit (channels.LAST_PASS_KEPT_BYTES)
    shard_chunks: int = SHARD_CHUNKS  # chunk numbers per shard (channels.shard_chunks)
