"""The engine's invariants (docs/DESIGN.md): exact round trips however the
pages change between passes, bitmaps that say exactly which pages are
non-zero, a sparse file that does not grow with the passes, no page bytes
through the pipes, nothing left behind."""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import multiprocess
import numpy as np
import pytest
from conftest import channel_processes, thread_names

import parallel_save as ps
from parallel_save import channels
from parallel_save.blocks import BlockMapping
from parallel_save.channels import ChannelGroup, passes_in_turn
from parallel_save.control import (
    CHUNK_PAGES,
    LONE_SHARD_CHUNKS,
    PAGES_DONE,
    PAGES_WRITTEN,
    SHARD_CHUNKS,
)
from parallel_save.format import PAGE_SIZE
from parallel_save.workers.channel import (
    HostedTurns,
    OwnBits,
    Turns,
    few_long_runs,
    page_runs,
    rows_nonzero,
    step_nonzero,
)

# Block sizes in pages: one page, less than a chunk (512 pages), a chunk and
# one page, and several chunks that do not end on a chunk boundary.
BLOCK_PAGES = {"tiny": 1, "small": 300, "odd": 513, "large": 1100}
# Bytes a file may allocate beyond its pages: each block's record and bitmap
# (a few file system blocks each) and the tail.
HEADER_MARGIN = 64 << 10
# SECTION_PART: u8 type, be32 section id, be64 EOS, u8 footer, be32 id.
SECTION_PART_SIZE = 18


def open_fds() -> set[str]:
    """This process's open file descriptors, by number, once the garbage of
    earlier tests (which may hold some) is collected.  A test compares
    with ``<=``: what it opened is closed again."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def nonzero_pages(block: ps.RamBlock) -> np.ndarray:
    return block.array.reshape(-1, PAGE_SIZE).any(axis=1)


def make_blocks(shm, seed: int) -> list[ps.RamBlock]:
    return [shm.block(name, pages, fill=0.4, seed=seed + i)
            for i, (name, pages) in enumerate(BLOCK_PAGES.items())]


def mutate(block: ps.RamBlock, rng: np.random.Generator) -> np.ndarray:
    """Change a random tenth of the block's pages the way memory changes:
    some turn zero, some turn non-zero, some get new bytes; returns the
    dirty set, which also holds pages that were touched but not changed."""
    pages = block.array.reshape(-1, PAGE_SIZE)
    dirty = rng.random(block.pages) < 0.1
    chosen = np.flatnonzero(dirty)
    kind = rng.integers(0, 3, size=chosen.size)
    pages[chosen[kind == 0]] = 0
    fresh = chosen[kind == 1]
    data = rng.integers(0, 256, size=(fresh.size, PAGE_SIZE), dtype=np.uint8)
    data[:, 0] |= 1
    pages[fresh] = data
    return dirty  # kind 2: touched, unchanged


def save_with_passes(path, blocks: list[ps.RamBlock], passes: int, seed: int,
                     **options) -> ps.SaveStats:
    """setup, a full first pass, ``passes - 1`` passes over random changes,
    complete over the last changes."""
    rng = np.random.default_rng(seed)
    with ps.Saver(path, blocks, **options) as saver:
        saver.setup()
        saver.iterate()
        for _ in range(passes - 1):
            saver.iterate({b.name: mutate(b, rng) for b in blocks})
        return saver.complete({b.name: mutate(b, rng) for b in blocks})


def assert_restores_exactly(path, blocks: list[ps.RamBlock], shm, channels: int,
                            **options) -> None:
    targets = [shm.block(b.name, b.pages, fill="garbage", seed=7) for b in blocks]
    ps.restore(path, targets, channels=channels, **options)
    for source, target in zip(blocks, targets):
        assert np.array_equal(target.array, source.array), source.name


@pytest.mark.parametrize("channels", range(1, 9))
def test_round_trip_is_exact_after_random_passes(shm, tmp_path, channels):
    blocks = make_blocks(shm, seed=channels)
    path = tmp_path / "vm.img"
    save_with_passes(path, blocks, passes=6, seed=channels, channels=channels)
    assert_restores_exactly(path, blocks, shm, channels=9 - channels)


@pytest.mark.parametrize("pages, sliced", [
    (np.arange(0, 600), True),                                   # one long run
    (np.concatenate([np.arange(i, i + 40) for i in range(0, 4000, 400)]), True),
    (np.arange(0, 4000, 400), False),                           # single pages
    (np.concatenate([np.arange(i, i + 40) for i in range(0, 8000, 400)]), False),  # 20 runs
])
def test_only_a_few_long_runs_are_sliced(pages, sliced):
    """Each sliced run costs numpy calls and, where channels take turns, a
    turn: single pages are gathered instead."""
    assert few_long_runs(pages, page_runs(pages)) is sliced


@pytest.mark.parametrize("pages, own", [
    (16 * CHUNK_PAGES, [0, 5, 6, 15]),      # a whole window; two own chunks side by side
    (16 * CHUNK_PAGES, list(range(16))),    # one channel: every chunk its own
    (3 * CHUNK_PAGES + 300, [1, 3]),        # a block's last window, ending inside a chunk
    (16 * CHUNK_PAGES, [4, 5, 6]),          # own chunks side by side, from inside the window
    (3 * CHUNK_PAGES + 300, [2, 3]),        # ... to the end of a short last chunk
    (300, [0]),                             # a block smaller than a chunk
    (8 * CHUNK_PAGES, []),
])
def test_a_channel_works_on_the_bits_of_its_own_chunks_only(pages, own):
    """OwnBits gives and stores exactly what the whole window's bits would,
    inside the channel's chunks, and leaves every other bit alone."""
    rng = np.random.default_rng(pages + len(own))
    row = np.packbits(rng.random(pages + 64) < 0.5, bitorder="little")
    bits = row[:-(-pages // 8)]  # the window's bytes, a view as in a bitmap row
    before_row = row.copy()
    own = np.array(own, dtype=np.int64)
    mask = np.zeros(pages, dtype=bool)
    for chunk in own:
        mask[chunk * CHUNK_PAGES:(chunk + 1) * CHUNK_PAGES] = True
    window = np.unpackbits(bits, count=pages, bitorder="little").view(bool)
    owned = OwnBits(bits, own, pages)
    assert owned.set_pages().tolist() == np.flatnonzero(window & mask).tolist()
    starts, ends = owned.set_runs()
    expected_starts, expected_ends = page_runs(np.flatnonzero(window & mask))
    assert (starts.tolist(), ends.tolist()) == (expected_starts.tolist(),
                                                expected_ends.tolist())
    assert owned.clear_pages().tolist() == np.flatnonzero(~window & mask).tolist()
    assert owned.count() == int(mask.sum())

    dirty = np.flatnonzero(mask & (rng.random(pages) < 0.6))
    written = dirty[rng.random(dirty.size) < 0.5]
    owned.store(cleared=OwnBits.of_pages(dirty, own, pages), set_=written)
    expected = window.copy()
    expected[dirty] = False
    expected[written] = True
    after = np.unpackbits(row, count=pages, bitorder="little").view(bool)
    assert after.tolist() == expected.tolist()
    # The padding bits of the last byte and the bytes after the window: untouched.
    assert np.unpackbits(row, bitorder="little")[pages:].tolist() == \
        np.unpackbits(before_row, bitorder="little")[pages:].tolist()


def _step(kinds: str) -> np.ndarray:
    """A step of pages, one per letter: z zero, d data (first word set),
    l only its last word set, m only a word in its middle set."""
    words = np.zeros((len(kinds), PAGE_SIZE // 8), dtype=np.uint64)
    for page, kind in enumerate(kinds):
        if kind == "d":
            words[page] = np.arange(1, PAGE_SIZE // 8 + 1)
        elif kind == "l":
            words[page, -1] = 1 << 63
        elif kind == "m":
            words[page, 300] = 7
    return words


@pytest.mark.parametrize("kinds", [
    "d" * 64,                    # data: the first words say it all
    "d" * 60 + "zlmz",           # a few pages to read in full, gathered
    "zzldmzzd" * 16,             # many: the sample of first words sends it whole
    ("d" + "lzmzzzz") * 16,      # the sample sees data, the first words say otherwise
    "lzzzzzzz" * 8,
    "m",
    "",
])
def test_the_zero_check_finds_every_non_zero_word(kinds):
    """Whichever way a step is read (first words, gathered pages, the whole
    step at once), a page is zero only if all its words are."""
    words = _step(kinds)
    expected = np.array([kind != "z" for kind in kinds], dtype=bool)
    assert step_nonzero(words).tolist() == expected.tolist()
    assert rows_nonzero(words).tolist() == expected.tolist()


def test_a_last_pass_writes_in_larger_steps_than_one_that_may_be_written_over(
        shm, tmp_path):
    """ext4 makes a buffered write's new page cache folios as large as the
    write, and later writes into a folio cost in proportion to its size: a
    pass that later passes may write over goes 512 KiB (128 pages) at a
    time, the last pass (all of a one-pass save) 2 MiB."""
    block = shm.block("ram0", 4096, fill="garbage")  # dense, 16 MiB
    stats = ps.save(tmp_path / "one-pass.img", [block], channels=1)
    assert sum(c.write_calls for c in stats.channel_stats) == 4096 // 512
    with ps.Saver(tmp_path / "passes.img", [block], channels=1) as saver:
        saver.setup()
        saver.iterate()
        assert sum(c.write_calls for c in saver.stats.channel_stats) == 4096 // 128
        saver.complete({})
    for name in ("one-pass.img", "passes.img"):
        assert_restores_exactly(tmp_path / name, [block], shm, channels=1)


@pytest.mark.parametrize("channels", [2, 8])
def test_passes_over_windows_of_many_chunks_write_exactly_the_non_zero_dirty_pages(
        shm, tmp_path, channels):
    """A block of several windows (at 8 channels a window is 64 chunks,
    8 of them a channel's own): a full pass, a sparse pass of single pages
    (gathered) and a pass of a few long runs per window (checked and
    written a step at a time), each writing exactly its non-zero dirty
    pages, and the image restores byte for byte."""
    block = shm.block("ram0", 200 << 8, fill=0.4, seed=channels)  # 200 MiB
    pages = block.array.reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(channels)
    sparse = rng.random(block.pages) < 0.01
    runs = np.zeros(block.pages, bool)
    for start in range(1000, block.pages, 9000):
        runs[start:start + 700] = True
    with ps.Saver(tmp_path / "vm.img", [block], channels=channels) as saver:
        saver.setup()
        first = saver.iterate()
        assert (first.pages_written, first.zero_pages) == (
            int(nonzero_pages(block).sum()), block.pages - int(nonzero_pages(block).sum()))
        for dirty in (sparse, runs):
            chosen = np.flatnonzero(dirty)
            pages[chosen[::3]] = 0
            pages[chosen[1::3], 0] = 7
            passed = saver.iterate({"ram0": dirty})
            expected = int((dirty & nonzero_pages(block)).sum())
            assert passed.dirty_pages == int(dirty.sum())
            assert (passed.pages_written, passed.zero_pages) == (
                expected, int(dirty.sum()) - expected)
        saver.complete({})
    assert_restores_exactly(tmp_path / "vm.img", [block], shm, channels=channels)


@pytest.mark.parametrize("lookahead", ["0", "1"], ids=["one-thread", "look-ahead"])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact_with_or_without_the_look_ahead_thread(
        shm, tmp_path, monkeypatch, channels, lookahead):
    """A channel with a core to spare works a window ahead on a second
    thread (a save's zero checks; a restore's mapping of a destination
    known to be zero, by storing zeros into it).  Pinned either way, the
    pages, the counts and a zero destination's holes come out the same."""
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", lookahead)
    blocks = make_blocks(shm, seed=50 + channels)
    path = tmp_path / "vm.img"
    stats = save_with_passes(path, blocks, passes=4, seed=channels, channels=channels)
    present = sum(int(nonzero_pages(b).sum()) for b in blocks)
    assert stats.zero_pages + stats.pages_written >= present
    assert_restores_exactly(path, blocks, shm, channels=channels)
    fresh = [shm.block(b.name, b.pages) for b in blocks]
    restored = ps.restore(path, fresh, channels=channels, assume_zero=True)
    assert (restored.pages_read, restored.pages_zeroed) == (present, 0)
    for block, copy in zip(blocks, fresh):
        # Only the pages that got bytes were allocated: the holes stay.
        # (Checked first: reading a hole of tmpfs through a mapping would
        # allocate it.)
        allocated = os.stat(copy.source.path).st_blocks * 512
        assert allocated == int(nonzero_pages(block).sum()) * PAGE_SIZE, block.name
        assert np.array_equal(copy.array, block.array), block.name


@pytest.mark.parametrize("turns", ["0", "1"], ids=["free-for-all", "turns"])
def test_round_trip_is_exact_whether_channels_take_turns_or_not(shm, tmp_path, monkeypatch,
                                                                 turns):
    monkeypatch.setenv("PARALLEL_SAVE_TURNS", turns)
    blocks = make_blocks(shm, seed=60)
    path = tmp_path / "vm.img"
    stats = save_with_passes(path, blocks, passes=3, seed=60, channels=4)
    assert stats.pages_written >= sum(int(nonzero_pages(b).sum()) for b in blocks)
    assert_restores_exactly(path, blocks, shm, channels=2)


def taken_by_another_process(fd: int) -> bool:
    """Whether a process of its own (forked) finds the turn on ``fd`` taken."""
    context = multiprocess.get_context("fork")

    def try_turn(queue) -> None:
        queue.put(Turns(fd).take(wait=False))

    queue = context.Queue()
    process = context.Process(target=try_turn, args=(queue,))
    process.start()
    answer = queue.get(timeout=30)
    process.join()
    return not answer


def test_a_channel_waits_for_its_turn_while_another_has_it(tmp_path):
    """Turns are a record lock each channel process owns on its own: a
    second process cannot take a turn held by the first, and can once it
    is given back (or the holder dies)."""
    fd = os.memfd_create("turns")
    os.ftruncate(fd, 4096)
    turns = Turns(fd)
    assert turns.take(wait=False)
    try:
        assert taken_by_another_process(fd)
        turns.give()
        assert not taken_by_another_process(fd)  # and its turn ended with its process
        assert turns.take(wait=False)
    finally:
        os.close(fd)


def test_channels_of_one_process_take_turns_among_themselves():
    """A record lock belongs to the process: the kernel would grant a
    second channel (thread) of the holder's process its turn at once.
    The channels of one process exclude each other through what they
    share, at the turn and at a restore's reader places, and still
    exclude other processes."""
    fd = os.memfd_create("turns")
    os.ftruncate(fd, 4096)
    hosted = HostedTurns()
    first, second = (Turns(fd, readers=2, hosted=hosted) for _ in range(2))
    try:
        assert first.take(wait=False)
        assert not second.take(wait=False)
        assert taken_by_another_process(fd)
        waited: list[bool] = []
        waiter = threading.Thread(target=lambda: waited.append(second.take(wait=True)))
        waiter.start()
        waiter.join(0.2)
        assert waited == []  # waits while the first holds the turn...
        first.give()
        waiter.join(30)
        assert waited == [True]  # ...and has it once given
        assert taken_by_another_process(fd)
        second.give()
        assert not taken_by_another_process(fd)
        # Reader places: one per channel, as if each were a process.
        assert (first.take_reading(), second.take_reading(), first.take_reading()) == (1, 2, 0)
        second.give_reading(2)
        assert first.take_reading() == 2
    finally:
        os.close(fd)


def test_a_one_pass_saves_channels_claim_shards_as_they_become_free(shm, tmp_path,
                                                                    monkeypatch):
    # A channel frozen (SIGSTOP) through a one-pass save claims no shard of
    # it: the other claims them all and handles every page before the
    # frozen one resumes (woken from the progress report that shows the
    # pass done, or after 10 s: dealt out by number, half the chunks would
    # wait for it).  The same for a restore.
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "2")
    block = shm.block("ram0", 4 * SHARD_CHUNKS * CHUNK_PAGES, fill=0.5, seed=71)
    path = tmp_path / "vm.img"
    frozen: list[int] = []
    frozen_at = [0.0]

    reports = []

    def resume(phase: str, done: int, total: int) -> None:
        reports.append((phase, done, total))
        if frozen and (done == total or time.monotonic() - frozen_at[0] > 10):
            os.kill(frozen.pop(), signal.SIGCONT)

    def freeze(group: ChannelGroup, channel: int) -> None:
        frozen.append(group.processes[channel].pid)
        frozen_at[0] = time.monotonic()
        os.kill(frozen[0], signal.SIGSTOP)

    with ps.Saver(path, [block], channels=2, on_progress=resume) as saver:
        saver.setup()
        freeze(saver._group, 0)
        stats = saver.complete()
    assert not frozen
    assert [row.pages_written for row in stats.channel_stats] == [0, stats.pages_written]
    assert stats.pages_written == int(nonzero_pages(block).sum())

    target = shm.block("ram0", block.pages)
    launch = ChannelGroup.launch

    def launch_frozen(*args, **options) -> ChannelGroup:
        group = launch(*args, **options)
        freeze(group, 1)
        return group

    monkeypatch.setattr(ChannelGroup, "launch", launch_frozen)
    restored = ps.restore(path, [target], channels=2, assume_zero=True,
                          on_progress=resume)
    assert not frozen
    assert [row.pages_read for row in restored.channel_stats] == [restored.pages_read, 0]
    assert np.array_equal(target.array, block.array)
    # Progress counts what the restore's total counts: the pages it reads.
    assert reports[-1] == ("restore", restored.pages_read, restored.pages_read)


def test_passes_after_the_first_deal_each_chunk_to_the_same_channel(shm, tmp_path):
    # Chunk g to channel g % N in every pass but a one-pass save's (or a
    # restore's): a channel's mappings of its chunks stay warm, and its
    # bits of their pages are the last pass's (the OR merge rests on it).
    block = shm.block("ram0", 5 * SHARD_CHUNKS * CHUNK_PAGES, fill=0.0)  # every page written
    rng = np.random.default_rng(72)
    chunk_of_page = np.arange(block.pages) // CHUNK_PAGES
    with ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver:
        saver.setup()
        for dirty in (None, rng.random(block.pages) < 0.1):
            written = saver._group.control.counters[:, PAGES_WRITTEN].copy()
            saver.iterate(None if dirty is None else {"ram0": dirty})
            pages = np.ones(block.pages, bool) if dirty is None else dirty
            assert list(saver._group.control.counters[:, PAGES_WRITTEN] - written) == [
                int(pages[chunk_of_page % 2 == n].sum()) for n in range(2)]
        stats = saver.complete({"ram0": np.zeros(block.pages, bool)})
    assert stats.pages_present == block.pages


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_channels_hosted_by_fewer_processes_save_and_restore_exactly(shm, tmp_path,
                                                                     monkeypatch, method):
    """Five channels in two processes (threads: three and two), taking
    turns; every channel does its share, and the round trip is exact
    into three channels hosted by one process."""
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "2")
    monkeypatch.setenv("PARALLEL_SAVE_TURNS", "1")
    monkeypatch.setenv("PARALLEL_SAVE_START_METHOD", method)
    blocks = make_blocks(shm, seed=70)
    path = tmp_path / "vm.img"
    rng = np.random.default_rng(70)
    with ps.Saver(path, blocks, channels=5) as saver:
        saver.setup()
        hosts = {process.pid: process for process in saver._group.processes}
        assert sorted(len(process.numbers) for process in hosts.values()) == [2, 3]
        saver.iterate()
        stats = saver.complete({b.name: mutate(b, rng) for b in blocks})
    assert [row.channel for row in stats.channel_stats] == list(range(5))
    assert sum(row.pages_written for row in stats.channel_stats) == stats.pages_written
    assert stats.pages_written >= sum(int(nonzero_pages(b).sum()) for b in blocks)
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "1")
    for in_turn in ("1", "0"):  # the threads running their passes one at a time, or not
        monkeypatch.setenv("PARALLEL_SAVE_PASSES_IN_TURN", in_turn)
        assert_restores_exactly(path, blocks, shm, channels=3)


@contextlib.contextmanager
def watching_done(control):
    """A thread of ours reading each channel's count of pages done from the
    control segment over and over while the ``with`` block runs; yields the list
    of what it saw.  (Not at the coordinator's wake-ups: two channels
    that find no work left reply together, and a pass may end between
    two of its progress reports.)"""
    seen = []
    running = threading.Event()
    running.set()

    def watch() -> None:
        while running.is_set():
            seen.append(control.counters[:, PAGES_DONE].copy())
            time.sleep(0.0002)  # a few hundred looks a pass, not a GIL held throughout

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen
    finally:
        running.clear()
        watcher.join()


def most_partly_done(seen: list[np.ndarray], before: np.ndarray, after: np.ndarray) -> int:
    """The most channels seen part-way through their share of a pass at
    once (``before`` and ``after``: their counts of pages done around it)."""
    during = [done for done in seen if before.sum() < done.sum() < after.sum()]
    assert len(during) >= 10  # the pass was watched, not only before and after
    return max(int(((before < done) & (done < after)).sum()) for done in during)


def partly_done_together(path, targets: list[ps.RamBlock], channels: int) -> int:
    """Restore ``path`` into ``targets`` through a channel group, watched:
    the most channels seen part-way through their share at once."""
    with ps.open_image(path) as image:
        blocks = list(image.blocks.values())
        group = ChannelGroup.launch(
            channels, image.fileno(), str(path), writing=False, direct_io=False,
            sources=[target.source for target in targets],
            pages_offsets=[b.layout.pages_offset for b in blocks])
        try:
            before = group.control.counters[:, PAGES_DONE].copy()
            with watching_done(group.control) as seen:
                group.restore_pass([b.data_bitmap() for b in blocks], True, None, last=True)
            return most_partly_done(seen, before, group.control.counters[:, PAGES_DONE].copy())
        finally:
            group.stop(force=True)


def test_a_buffered_restores_hosted_channels_run_their_passes_in_turn(shm, tmp_path,
                                                                      monkeypatch):
    """Three channels hosted by one process: at most one of them is ever
    part-way through its pass, and the bytes are exact."""
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "1")
    block = shm.block("ram0", 32768, fill=0.6, seed=71)
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=2)
    target = shm.block("ram0", 32768, fill="garbage", seed=72)
    assert partly_done_together(path, [target], channels=3) <= 1  # side by side: 2-3
    assert np.array_equal(target.array, block.array)


def test_a_buffered_saves_hosted_channels_run_their_passes_in_turn(shm, tmp_path,
                                                                   monkeypatch):
    """Three channels hosted by one process, in a pass that deals each of
    them its chunks (a live save's first): at most one of them is ever
    part-way through its share, and the image restores exactly."""
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "1")
    monkeypatch.delenv("PARALLEL_SAVE_PASSES_IN_TURN", raising=False)
    block = shm.block("ram0", 32768, fill=0.6, seed=73)
    path = tmp_path / "vm.img"
    with ps.Saver(path, [block], channels=3) as saver:
        saver.setup()
        control = saver._group.control
        before = control.counters[:, PAGES_DONE].copy()
        with watching_done(control) as seen:
            saver.iterate()
        after = control.counters[:, PAGES_DONE].copy()
        assert (after > before).all()  # each had its share
        assert most_partly_done(seen, before, after) <= 1  # side by side: 2-3
        saver.complete(dirty={})
    assert_restores_exactly(path, [block], shm, channels=2)


def test_only_direct_io_channels_hosted_by_one_process_run_side_by_side(monkeypatch):
    """Where a channel waits on the disk and a sibling can run meanwhile;
    a buffered save's or restore's only compete for the CPU."""
    monkeypatch.delenv("PARALLEL_SAVE_PASSES_IN_TURN", raising=False)
    assert passes_in_turn(direct_io=False)
    assert not passes_in_turn(direct_io=True)
    monkeypatch.setenv("PARALLEL_SAVE_PASSES_IN_TURN", "1")
    assert passes_in_turn(direct_io=True)
    monkeypatch.setenv("PARALLEL_SAVE_PASSES_IN_TURN", "0")
    assert not passes_in_turn(direct_io=False)


def mapped_kib(address: int) -> int:
    """How much of the mapping of this process that starts at ``address``
    is mapped in (its Rss in /proc/self/smaps), in KiB."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            return next(int(row.split()[1]) for row in lines[index + 1:]
                        if row.startswith("Rss:"))
    raise AssertionError(f"no mapping at {address:#x}")


def test_a_channel_lets_go_of_its_mapping_and_the_block_keeps_the_pages(shm):
    """After its last pass a channel drops each window's pages from its
    mapping of the block (madvise DONTNEED), which is only safe because
    that mapping is the block's file, shared: the pages it wrote (as a
    restore does) stay in the block, and only the channel's page tables go."""
    block = shm.block("ram0", 512, fill="garbage", seed=3)
    mapped = BlockMapping(block.source, writable=True)
    address = mapped.array.ctypes.data - mapped.skip
    try:
        written = np.random.default_rng(4).integers(0, 256, 256 * PAGE_SIZE, dtype=np.uint8)
        mapped.array[:written.size] = written  # as a restore's pread would
        assert mapped_kib(address) >= 256 * PAGE_SIZE // 1024
        mapped.advise(mmap.MADV_DONTNEED, 0, 512)
        assert mapped_kib(address) == 0
        assert np.array_equal(block.array[:written.size], written)
    finally:
        mapped.close()


@pytest.mark.parametrize("pinned", ["0", "two", "-1"])
def test_a_bad_number_of_channel_processes_is_refused_naming_the_variable(
        shm, tmp_path, monkeypatch, pinned):
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", pinned)
    block = shm.block("ram0", 64, fill=0.5)
    with pytest.raises(ps.OptionError, match=rf"^\$PARALLEL_SAVE_CHANNEL_PROCESSES must be a "
                                             rf"number of processes \(1 or more\), not '{pinned}'$"):
        ps.save(tmp_path / "vm.img", [block], channels=2)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("late_pages", [3, 200])
def test_pages_whose_first_words_are_zero_are_saved(shm, tmp_path, late_pages):
    """The zero check reads a page's first word, then in full only the pages
    where it is zero: a page whose only non-zero byte is its last must be
    saved, whether such pages are few in a step (gathered) or many (the
    whole step read)."""
    block = shm.block("ram0", 4096, fill="garbage", seed=5)  # every byte non-zero
    pages = block.array.reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(late_pages)
    late = rng.choice(4096, size=late_pages * 16, replace=False)
    pages[late] = 0
    pages[late, -1] = 9
    zero = rng.choice(np.setdiff1d(np.arange(4096), late), size=100, replace=False)
    pages[zero] = 0
    path = tmp_path / "vm.img"
    stats = ps.save(path, [block], channels=2)
    assert (stats.pages_written, stats.zero_pages) == (4096 - 100, 100)
    assert_restores_exactly(path, [block], shm, channels=2)


@pytest.mark.parametrize("channels", [1, 3, 8])
def test_round_trip_is_exact_with_direct_io(shm, tmp_path, channels):
    blocks = make_blocks(shm, seed=10 + channels)
    path = tmp_path / "vm.img"  # tmp_path is on a disk file system (ext4 here)
    save_with_passes(path, blocks, passes=6, seed=channels, channels=channels,
                     direct_io=True)
    assert_restores_exactly(path, blocks, shm, channels=channels, direct_io=True)


@pytest.mark.parametrize("direct_io", [False, True])
def test_final_bitmap_is_set_exactly_for_nonzero_pages(shm, tmp_path, direct_io):
    blocks = make_blocks(shm, seed=20)
    path = tmp_path / "vm.img"
    save_with_passes(path, blocks, passes=8, seed=20, channels=3, direct_io=direct_io)
    with ps.open_image(path) as image:
        for block in blocks:
            assert np.array_equal(image.blocks[block.name].bitmap, nonzero_pages(block))


def test_page_written_then_zero_ends_clear_in_the_bitmap(shm, tmp_path):
    block = shm.block("ram0", 2048, fill=0.0, seed=1)  # every page non-zero
    pages = block.array.reshape(-1, PAGE_SIZE)
    path = tmp_path / "vm.img"
    turned_zero = np.zeros(block.pages, dtype=bool)
    turned_zero[[0, 511, 512, 1500, 2047]] = True
    with ps.Saver(path, [block], channels=3) as saver:
        saver.setup()
        saver.iterate()                                # pass 1: written
        saver.iterate({"ram0": np.zeros(block.pages, dtype=bool)})
        pages[turned_zero] = 0
        saver.complete({"ram0": turned_zero})          # pass 3: found zero
    with ps.open_image(path) as image:
        assert np.array_equal(image.blocks["ram0"].bitmap, ~turned_zero)
    assert_restores_exactly(path, [block], shm, channels=2)


def test_restore_into_garbage_zeroes_the_clear_pages(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.9, seed=3)
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=2)
    assert_restores_exactly(path, [block], shm, channels=4)


def test_file_is_sparse(shm, tmp_path):
    block = shm.block("ram0", 4096, fill=0.75, seed=4)
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=4)
    data_bytes = int(nonzero_pages(block).sum()) * PAGE_SIZE
    allocated = os.stat(path).st_blocks * 512
    assert data_bytes <= allocated <= data_bytes + HEADER_MARGIN
    assert os.stat(path).st_size > block.length  # the holes are inside the file


def test_file_size_does_not_grow_with_passes(shm, tmp_path):
    sizes = {}
    for passes in (1, 20):
        blocks = make_blocks(shm, seed=5)
        path = tmp_path / f"{passes}.img"
        save_with_passes(path, blocks, passes=passes, seed=5, channels=4)
        with ps.open_image(path) as image:
            assert image.info.passes == passes
        sizes[passes] = os.stat(path)
    ram = sum(pages * PAGE_SIZE for pages in BLOCK_PAGES.values())
    grown = sizes[20].st_size - sizes[1].st_size
    # One SECTION_PART per extra pass, and a digit more in the description.
    assert 19 * SECTION_PART_SIZE <= grown <= 19 * SECTION_PART_SIZE + 8
    assert sizes[20].st_blocks * 512 <= ram + HEADER_MARGIN


def test_page_bytes_never_cross_a_pipe(shm, tmp_path):
    control = {}
    for pages in (1024, 16384):  # 4 MiB and 64 MiB of non-zero pages
        block = shm.block("ram0", pages)
        block.array[:] = 0x5A
        stats = ps.save(tmp_path / f"{pages}.img", [block], channels=4, sync=False)
        assert stats.bytes_written == block.length
        target = shm.block("ram0", pages)
        restored = ps.restore(tmp_path / f"{pages}.img", [target], channels=4)
        assert restored.bytes_read == block.length
        control[pages] = (stats.control_bytes, restored.control_bytes)
    for save_bytes, restore_bytes in control.values():
        assert 0 < save_bytes < 64 << 10 and 0 < restore_bytes < 64 << 10
    # 60 MiB more adds 30 chunk numbers (4 bytes each) to each channel's
    # message (every channel gets the pass's chunks: control.py).
    assert control[16384][0] - control[1024][0] < 1024
    assert control[16384][1] - control[1024][1] < 1024


def test_close_leaves_no_process_segment_or_fd(shm, tmp_path, monkeypatch):
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", "0")  # no threads but the channels'
    block = shm.block("ram0", 1024, fill=0.5)
    before = open_fds()
    saver = ps.Saver(tmp_path / "vm.img", [block], channels=4)
    saver.setup()
    saver.iterate()
    # A process per CPU at most, hosting a channel per thread, each named
    # as ps(1) and top(1) show it, not after the coordinator.
    processes = channel_processes()
    assert len(processes) == min(4, len(os.sched_getaffinity(0)))
    assert sorted(name for process in processes for name in thread_names(process.pid)) == [
        f"ps channel {n}" for n in range(4)]
    saver.close()
    assert channel_processes() == []
    assert open_fds() <= before
    # conftest's autouse fixture checks the control segment


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt], ids=["exception", "ctrl-c"])
def test_exception_mid_pass_leaves_no_process_or_fd(shm, tmp_path, error):
    # A KeyboardInterrupt is what Ctrl-C does to the coordinator while it
    # waits for the channels; test_faults.py sends the real signal to a
    # separate process.
    block = shm.block("ram0", 1024, fill=0.5)
    before = open_fds()

    def fail(*progress):
        raise error

    # Raised fresh each time: an exception kept alive keeps its traceback,
    # and with it the frames that hold the control segment's descriptor.
    with (pytest.raises(error),
          ps.Saver(tmp_path / "vm.img", [block], channels=4, on_progress=fail) as saver):
        saver.setup()
        saver.iterate()
    assert channel_processes() == []
    assert open_fds() <= before
    # No older image: a failed save leaves nothing (its file had no name).
    assert os.listdir(tmp_path) == []


def guest_like_block(shm, pages: int, seed: int) -> ps.RamBlock:
    """Runs of 64 data pages between runs of 64 zero pages, and a stretch
    of pages zero at random (short runs, which are read, not sent)."""
    block = shm.block("ram0", pages, fill="garbage", seed=seed)
    rows = block.array.reshape(-1, PAGE_SIZE)
    rows[(np.arange(pages) // 64) % 2 == 1] = 0
    rows[: pages // 4][np.random.default_rng(seed).random(pages // 4) < 0.5] = 0
    return block


@pytest.mark.parametrize("assume_zero", [True, False], ids=["fresh", "over-garbage"])
def test_restoring_channels_take_turns_sending_pages_into_the_destination_file(
        shm, tmp_path, monkeypatch, assume_zero):
    """With more than one channel and no look-ahead thread, the channel
    whose turn it is has the kernel copy a step of pages into the
    destination's file; the others read theirs into their mappings
    meanwhile.  Byte for byte the restore of either way alone."""
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", "0")
    block = guest_like_block(shm, 32 * 512, seed=31)
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=2)
    present = int(nonzero_pages(block).sum())
    target = shm.block("ram0", block.pages, **({} if assume_zero else {"fill": "garbage"}))
    stats = ps.restore(path, [target], channels=2, assume_zero=assume_zero)
    assert np.array_equal(target.array, block.array)
    sent = sum(channel.pages_sent for channel in stats.channel_stats)
    assert stats.pages_read == present
    assert 0 < sent < present  # the first window's short runs are read
    assert stats.pages_zeroed == (0 if assume_zero else block.pages - present)


def test_a_restore_with_more_channels_than_cpus_sends_and_reads_exactly(shm, tmp_path):
    """With more channels than CPUs, a restore's channels read beside the
    sender only while a CPU is left for each (here one CPU: the sender and
    one reader), and the others wait for the turn to send: byte for byte
    the same restore.  (How the steps fall is the scheduler's choice.)
    The process's CPUs, which the channels inherit, are cut to one."""
    block = guest_like_block(shm, 64 * 512, seed=33)  # two windows at 4 channels
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=2)
    target = shm.block("ram0", block.pages)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        stats = ps.restore(path, [target], channels=4, assume_zero=True)
    finally:
        os.sched_setaffinity(0, cpus)
    assert np.array_equal(target.array, block.array)
    present = int(nonzero_pages(block).sum())
    assert stats.pages_read == present
    assert 0 < sum(channel.pages_sent for channel in stats.channel_stats) < present


def test_sent_pages_land_at_their_block_s_offset_in_a_shared_file(shm, tmp_path):
    """Two blocks sliced from one shared file (the second 32 MiB into it):
    each restore sends into the file at its block's place, and the bytes
    of the file outside the block restored are left as they were."""
    pages = 16 * 512
    with ps.RamBlock.from_file("all", shm.path(), length=2 * pages * PAGE_SIZE,
                               create=True) as whole:
        rows = whole.array.reshape(-1, PAGE_SIZE)
        rows[:] = np.random.default_rng(34).integers(1, 256, size=rows.shape, dtype=np.uint8)
        rows[(np.arange(2 * pages) // 64) % 2 == 1] = 0
        del rows  # a view: the file's mapping closes with the block
        before = whole.array.copy()
        path = tmp_path / "vm.img"
        with ps.RamBlock("ram1", whole.array[pages * PAGE_SIZE:]) as source:
            ps.save(path, [source], channels=2)
        whole.array[pages * PAGE_SIZE:] = 0  # the place the restore fills
        with ps.RamBlock("ram1", whole.array[pages * PAGE_SIZE:]) as target:
            stats = ps.restore(path, [target], channels=2, assume_zero=True)
        assert sum(channel.pages_sent for channel in stats.channel_stats) > 0
        assert np.array_equal(whole.array, before)


@pytest.mark.parametrize("lookahead, direct_io, sent", [
    ("0", False, "all"),    # alone: every step of long runs sent
    ("1", False, "some"),   # the look-ahead thread reads steps from the window's end
    ("0", True, "none"),    # O_DIRECT reads never go through the page cache
], ids=["alone", "look-ahead", "direct-io"])
def test_a_lone_channel_sends_what_its_look_ahead_thread_does_not_read(
        shm, tmp_path, monkeypatch, lookahead, direct_io, sent):
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", lookahead)
    block = guest_like_block(shm, 32 * 512, seed=32)
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=2)
    present = int(nonzero_pages(block).sum())
    target = shm.block("ram0", block.pages)
    stats = ps.restore(path, [target], channels=1, assume_zero=True, direct_io=direct_io)
    assert np.array_equal(target.array, block.array)
    assert stats.pages_read == present
    pages_sent = stats.channel_stats[0].pages_sent
    if sent == "all":  # but the first window's, whose runs are short
        assert pages_sent == int(nonzero_pages(block)[LONE_SHARD_CHUNKS * CHUNK_PAGES:].sum())
    elif sent == "none":
        assert pages_sent == 0
    else:  # how the two threads share the steps is the scheduler's choice
        assert 0 <= pages_sent <= present


def test_restore_leaves_no_process_or_fd(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.5)
    ps.save(tmp_path / "vm.img", [block], channels=2)
    target = shm.block("ram0", 1024)
    before = open_fds()
    ps.restore(tmp_path / "vm.img", [target], channels=4)
    assert ps.wait_channels(timeout=30)
    assert channel_processes() == []
    assert open_fds() <= before


def test_a_finished_call_returns_before_its_channels_exit_and_they_are_reaped(
        shm, tmp_path, monkeypatch):
    # A polite stop (a checkpointer's close here; every finished save and
    # restore ends with one) returns once the channels are told.  A thread
    # of ours reaps them, and kills one still there after STOP_GRACE: here
    # a channel frozen with SIGSTOP, which cannot exit by itself.
    monkeypatch.setattr(channels, "STOP_GRACE", 1.0)
    block = shm.block("ram0", 256, fill=0.5)
    before = open_fds()
    checkpointer = ps.Checkpointer(tmp_path, [block], channels=2)
    checkpointer.checkpoint()
    frozen = checkpointer._group.processes[0].pid
    os.kill(frozen, signal.SIGSTOP)
    checkpointer.close()
    assert frozen in [process.pid for process in channel_processes()]
    assert not ps.wait_channels(timeout=0)
    assert ps.wait_channels(timeout=30)
    assert channel_processes() == []
    assert open_fds() <= before


def _held_inodes(pid: int) -> set[int]:
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            held.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return held


def test_a_forked_channel_holds_no_end_of_another_channels_connection(shm, tmp_path,
                                                                      monkeypatch):
    # A channel done with its last pass lets go of its memory once its
    # coordinator closes their connection, which it sees only if no other
    # process holds the coordinator's end: a channel process forked after
    # it would, but for closing its copies.
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "2")
    block = shm.block("ram0", 256, fill=0.5)
    with ps.Saver(tmp_path / "vm.img", [block], channels=2, start_method="fork") as saver:
        saver.setup()
        ends = {os.fstat(connection.fileno()).st_ino for connection in saver._group.connections}
        processes = saver._group.processes
        assert len(processes) == 2 and len(ends) == 2
        for process in processes:
            assert not _held_inodes(process.pid) & ends, process.pid
        saver.complete()
    assert_restores_exactly(tmp_path / "vm.img", [block], shm, channels=2)


def test_channels_done_with_their_last_pass_exit_while_another_process_holds_their_ends(
        shm, tmp_path, monkeypatch):
    # A process forked by another thread of the caller during a save holds
    # copies of the coordinator's ends of the connections: the channels do
    # not wait for it beyond LAST_PASS_LINGER (workers/channel.py; the
    # reaper, which would kill them, is given far longer here).
    monkeypatch.setattr(channels, "STOP_GRACE", 60.0)
    block = shm.block("ram0", 256, fill=0.5)
    release_read, release_write = os.pipe()
    with ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver:
        saver.setup()
        holder = os.fork()
        if holder == 0:
            os.read(release_read, 1)
            os._exit(0)
        try:
            saver.complete()
            assert ps.wait_channels(timeout=30)
            assert os.waitpid(holder, os.WNOHANG) == (0, 0)  # it held them all along
        finally:
            os.write(release_write, b"x")
            os.waitpid(holder, 0)
            os.close(release_read)
            os.close(release_write)


@pytest.mark.parametrize("kept_mib", [0, 64])
def test_a_last_pass_leaves_at_most_its_share_mapped_for_the_exit(shm, tmp_path, monkeypatch,
                                                                  kept_mib):
    # The channels' exit unmaps what their last pass kept mapped, up to
    # LAST_PASS_KEPT_BYTES in all; beyond it a channel unmaps its oldest
    # windows as it goes, so its page tables stay bounded whatever the
    # block's size.  Seen from /proc while one channel saves 256 MiB
    # (mapped: its RssShmem) with 0 or 64 MiB kept: at most that plus the
    # window it works on and the one its look-ahead thread checks.
    monkeypatch.setattr(channels, "LAST_PASS_KEPT_BYTES", kept_mib << 20)
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", "1")
    block = shm.block("ram0", 65536, fill=0.0)  # every page written
    peak_kib = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for process in channel_processes():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    # A process that has exited (a zombie) has no memory lines.
                    peak_kib.extend(int(line.split()[1]) for line in status.splitlines()
                                    if line.startswith("RssShmem:"))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        stats = ps.save(tmp_path / "vm.img", [block], channels=1)
        assert ps.wait_channels(timeout=30)
    finally:
        done.set()
        sampler.join()
    assert stats.pages_written == 65536
    bound_kib = (kept_mib << 10) + 2 * LONE_SHARD_CHUNKS * CHUNK_PAGES * PAGE_SIZE // 1024 + 1024
    assert 0 < max(peak_kib) <= bound_kib


def test_status_board_counts_each_pass_as_it_ends(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.5, seed=3)
    name = f"ps-test-{uuid.uuid4().hex}"
    with ps.Saver(tmp_path / "vm.img", [block], channels=2, status_board=name) as saver:
        saver.setup()
        first = saver.iterate()
        board = ps.read_status(name)  # read in the publishing process itself
        assert (board["status"], board["passes"]) == ("active", 1)
        assert board["pages_written"] == first.pages_written
        saver.complete(dirty={})
    with pytest.raises(ps.ParallelSaveError, match=f"no status board named '{name}'"):
        ps.read_status(name)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_round_trip_is_exact_whatever_the_start_method(shm, tmp_path, start_method):
    blocks = make_blocks(shm, seed=40)
    path = tmp_path / "vm.img"
    with ps.Saver(path, blocks, channels=3, start_method=start_method) as saver:
        saver.setup()
        saver.iterate()
        saver.complete(dirty={})
    copies = [shm.block(b.name, b.pages, fill="garbage") for b in blocks]
    ps.restore(path, copies, channels=2, start_method=start_method)
    for block, copy in zip(blocks, copies):
        assert np.array_equal(block.array, copy.array)
