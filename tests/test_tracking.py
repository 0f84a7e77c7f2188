"""Dirty-page tracking for live saves (parallel_save/tracking): the dirty
log shared with writer processes, the hash tracker, the userfaultfd
tracker, and Saver.run.  The stress tests keep writers busy during every
pass and check the one promise that matters: the restored image is the
memory as the writers left it."""

from __future__ import annotations

import json
import mmap
import os
import queue
import threading
import uuid
from typing import Self

import multiprocess
import numpy as np
import pytest

import parallel_save as ps
from parallel_save.blocks import BlockMapping
from parallel_save.format import PAGE_SIZE
from parallel_save.tracking.dirtylog import ACTIVE_OFFSET
from parallel_save.tracking.hashing import PageHasher, draw_keys

STRESS_PAGES = 2048  # 8 MiB
uffd_missing = ps.uffd_support()
needs_uffd = pytest.mark.skipif(uffd_missing is not None, reason=str(uffd_missing))


def collected_pages(dirty: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {name: np.flatnonzero(pages).tolist() for name, pages in dirty.items()}


def restored(path, block: ps.RamBlock, shm) -> np.ndarray:
    target = shm.block(block.name, block.pages, fill="garbage", seed=3)
    ps.restore(path, [target], channels=2)
    return target.array


# --- writers: change random pages the way memory changes ---

def change_pages(pages: np.ndarray, rng: np.random.Generator, count: int,
                 earlier: dict[int, np.ndarray]):
    """Change ``count`` random pages, one at a time: zero over data, fresh
    data, one byte, or back to what the page held before (A-B-A).
    Yields (page, first byte changed, bytes changed) after each write."""
    for _ in range(count):
        page = int(rng.integers(pages.shape[0]))
        kind = int(rng.integers(4))
        before = pages[page].copy()
        offset, length = 0, PAGE_SIZE
        if kind == 0:
            pages[page] = 0
        elif kind == 1:
            pages[page] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        elif kind == 2:
            offset, length = int(rng.integers(PAGE_SIZE)), 1
            pages[page, offset] ^= int(rng.integers(1, 256))
        else:
            pages[page] = earlier.get(page, 0)
        earlier[page] = before
        yield page, offset, length


def write_process(source, log_name: str | None, seed: int, started, stop) -> None:
    """A writer process: maps the block itself, writes until ``stop``, and
    marks each write in the dirty log (when given one) after writing it."""
    array = BlockMapping(source, writable=True).array
    log = ps.DirtyLog.attach(log_name) if log_name else None
    write_until(array.reshape(-1, PAGE_SIZE), log, seed, started, stop)


def write_until(pages: np.ndarray, log: ps.DirtyLog | None, seed: int, started, stop) -> None:
    rng = np.random.default_rng(seed)
    earlier: dict[int, np.ndarray] = {}
    while True:
        for page, offset, length in change_pages(pages, rng, 32, earlier):
            if log is not None:
                log.mark("ram0", page * PAGE_SIZE + offset, length)
        if started is not None:
            started.put(True)
            started = None
        if stop.is_set():
            return


class Writers:
    """Two writers, processes or threads, busy from construction until
    ``stop`` (or the end of the ``with``), which keeps in ``left`` a copy of
    the memory as they left it."""

    def __init__(self, block: ps.RamBlock, seed: int, *, log: ps.DirtyLog | None = None,
                 threads: bool = False) -> None:
        self.block = block
        self.left = None
        if threads:
            self.event, started = threading.Event(), queue.Queue()
            pages = block.array.reshape(-1, PAGE_SIZE)
            self.workers = [threading.Thread(target=write_until, daemon=True,
                                             args=(pages, None, seed + i, started, self.event))
                            for i in range(2)]
        else:
            context = multiprocess.get_context("fork")
            self.event, started = context.Event(), context.Queue()
            self.workers = [context.Process(target=write_process, name="tracking test writer",
                                            args=(block.source, log and log.name, seed + i,
                                                  started, self.event), daemon=True)
                            for i in range(2)]
        for worker in self.workers:
            worker.start()
        try:
            for _ in self.workers:  # each has written: the first pass runs among writes
                started.get(timeout=30)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        if self.left is not None:
            return
        self.event.set()
        for worker in self.workers:
            worker.join()
        for worker in self.workers:
            assert getattr(worker, "exitcode", 0) == 0, "a writer failed"
        self.left = self.block.array.copy()


# --- the dirty log ---

def test_log_collects_each_marked_page_once(shm):
    block = shm.block("ram0", 64)
    with ps.DirtyLog.create([block]) as log:
        log.mark("ram0", 5 * PAGE_SIZE, PAGE_SIZE)
        log.mark_pages("ram0", [9, 40])
        assert collected_pages(log.collect()) == {"ram0": [5, 9, 40]}
        assert collected_pages(log.collect()) == {"ram0": []}


def test_log_marks_every_page_a_byte_range_touches(shm):
    block = shm.block("ram0", 640)
    with ps.DirtyLog.create([block]) as log:
        log.mark("ram0", 3 * PAGE_SIZE - 1, 2)        # last byte of 2, first of 3
        log.mark("ram0", 10 * PAGE_SIZE + 7, 3 * PAGE_SIZE)
        log.mark("ram0", 20 * PAGE_SIZE, 600 * PAGE_SIZE)    # longer than 2 MiB
        assert collected_pages(log.collect()) == {"ram0": [2, 3, 10, 11, 12, 13,
                                                           *range(20, 620)]}


def test_log_takes_a_page_mask(shm):
    block = shm.block("ram0", 64)
    with ps.DirtyLog.create([block]) as log:
        mask = np.zeros(64, dtype=bool)
        mask[[0, 63]] = True
        log.mark_pages("ram0", mask)
        assert collected_pages(log.collect()) == {"ram0": [0, 63]}


def test_log_keeps_blocks_apart(shm):
    blocks = [shm.block("ram0", 16), shm.block("ram1", 32)]
    with ps.DirtyLog.create(blocks) as log:
        log.mark_pages("ram1", [0])
        log.mark_pages("ram0", [15])
        assert collected_pages(log.collect()) == {"ram0": [15], "ram1": [0]}


def test_log_marks_from_another_process_reach_the_collector(shm):
    block = shm.block("ram0", 64)
    with ps.DirtyLog.create([block]) as log:
        def writer(name):
            with ps.DirtyLog.attach(name) as attached:
                attached.mark_pages("ram0", [1, 2, 3])
        process = multiprocess.get_context("fork").Process(target=writer, args=(log.name,))
        process.start()
        process.join()
        assert process.exitcode == 0
        assert collected_pages(log.collect()) == {"ram0": [1, 2, 3]}


def stale_mark(log: ps.DirtyLog, active: int, page: int) -> None:
    """Mark ``page`` by hand in buffer ``active``, as a writer in another
    language would (through the file, by the documented layout)."""
    with open(log.path, "r+b") as file, mmap.mmap(file.fileno(), 0) as raw:
        raw[log.buffer_offsets[active] + page] = 1


def active_index(log: ps.DirtyLog) -> int:
    with open(log.path, "rb") as file:
        return file.read(ACTIVE_OFFSET + 1)[ACTIVE_OFFSET]


def test_log_mark_of_a_writer_that_read_the_index_before_the_flip_is_collected_later(shm):
    block = shm.block("ram0", 64)
    with ps.DirtyLog.create([block]) as log:
        before_flip = active_index(log)
        assert collected_pages(log.collect()) == {"ram0": []}
        stale_mark(log, before_flip, 7)    # lands in the buffer just collected
        assert collected_pages(log.collect()) == {"ram0": []}
        assert collected_pages(log.collect()) == {"ram0": [7]}


def test_log_final_collect_reads_both_buffers(shm):
    block = shm.block("ram0", 64)
    with ps.DirtyLog.create([block]) as log:
        before_flip = active_index(log)
        log.collect()
        stale_mark(log, before_flip, 7)
        log.mark_pages("ram0", [8])
        assert collected_pages(log.collect(final=True)) == {"ram0": [7, 8]}


def test_log_refuses_a_mark_outside_its_block(shm):
    block = shm.block("ram0", 4)
    with ps.DirtyLog.create([block]) as log:
        with pytest.raises(ps.BlockError, match=r"bytes \[16380, 16388\) are outside "
                                                r"block 'ram0' \(16384 bytes\)"):
            log.mark("ram0", 16380, 8)
        with pytest.raises(ps.BlockError, match=r"page numbers of block 'ram0' must be "
                                                r"in \[0, 4\), got \[2, 4\]"):
            log.mark_pages("ram0", [2, 4])


def test_log_refuses_an_unknown_block(shm):
    with ps.DirtyLog.create([shm.block("ram0", 4)]) as log, \
            pytest.raises(ps.BlockError, match=r"the dirty log has no block 'pc\.ram' "
                                               r"\(it has \['ram0'\]\)"):
        log.mark("pc.ram", 0, 1)


def test_log_file_is_removed_by_its_owner_at_close(shm):
    log = ps.DirtyLog.create([shm.block("ram0", 4)])
    path = log.path
    assert os.path.exists(path)
    log.close()
    assert not os.path.exists(path)
    with pytest.raises(ps.TrackingError, match="no dirty log named"):
        ps.DirtyLog.attach(log.name)


def test_log_closed_in_a_forked_child_stays_for_its_owner(shm):
    with ps.DirtyLog.create([shm.block("ram0", 4)]) as log:
        process = multiprocess.get_context("fork").Process(target=log.close)
        process.start()
        process.join()
        assert os.path.exists(log.path)


def test_log_attach_takes_a_name_not_a_path(shm):
    with pytest.raises(ps.TrackingError, match=r"'/dev/shm/x' is not a dirty log name "
                                               r"\(use log.name\)"):
        ps.DirtyLog.attach("/dev/shm/x")


def test_log_attach_refuses_a_file_that_is_not_a_log():
    name = f"parallel-save-test-not-a-log-{uuid.uuid4().hex}"
    with open(os.path.join("/dev/shm", name), "wb") as file:
        file.write(bytes(8192))
    try:
        with pytest.raises(ps.TrackingError, match=f"/dev/shm/{name} is not a dirty log"):
            ps.DirtyLog.attach(name)
    finally:
        os.unlink(os.path.join("/dev/shm", name))


# --- the hash ---

def test_zero_page_hashes_to_zero_whatever_the_keys():
    hasher = PageHasher(draw_keys())
    assert hasher.hash(np.zeros(PAGE_SIZE, np.uint8)).tolist() == [[0, 0]]


def test_hash_sees_top_bit_flips_in_two_words():
    # The change that a multilinear hash over 64-bit words misses half the
    # time: the top bit of two words.
    hasher = PageHasher(draw_keys())
    page = np.random.default_rng(1).integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    flipped = page.copy()
    flipped.view(np.uint64)[[3, 200]] ^= np.uint64(1 << 63)
    assert (hasher.hash(page) != hasher.hash(flipped)).all()


def test_hash_of_each_page_of_a_run_is_its_own():
    hasher = PageHasher(draw_keys())
    pages = np.random.default_rng(2).integers(0, 256, (100, PAGE_SIZE), dtype=np.uint8)
    together = hasher.hash(pages.reshape(-1))
    alone = np.concatenate([hasher.hash(page) for page in pages])
    assert np.array_equal(together, alone)


# --- the hash tracker in the Saver ---

def test_hash_pass_writes_nothing_when_memory_did_not_change(shm, tmp_path):
    block = shm.block("ram0", 1100, fill=0.3, seed=4)
    with ps.Saver(tmp_path / "vm.img", [block], channels=2, tracker="hash") as saver:
        saver.setup()
        saver.iterate()
        again = saver.iterate()
        saver.complete()
    assert (again.dirty_pages, again.pages_unchanged, again.pages_written,
            again.zero_pages) == (1100, 1100, 0, 0)


def test_hash_pass_writes_exactly_the_changed_pages(shm, tmp_path):
    block = shm.block("ram0", 1100, fill=0.0, seed=5)
    pages = block.array.reshape(-1, PAGE_SIZE)
    path = tmp_path / "vm.img"
    with ps.Saver(path, [block], channels=3, tracker="hash") as saver:
        saver.setup()
        saver.iterate()
        pages[[10, 600]] ^= 1
        pages[1000] = 0
        changed = saver.iterate()
        saver.complete()
    assert (changed.pages_written, changed.zero_pages, changed.pages_unchanged) == (2, 1, 1097)
    assert np.array_equal(restored(path, block, shm), block.array)


def test_hash_pass_over_a_scattered_dirty_set_looks_only_at_those_pages(shm, tmp_path):
    block = shm.block("ram0", 1100, fill=0.0, seed=8)
    pages = block.array.reshape(-1, PAGE_SIZE)
    path = tmp_path / "vm.img"
    dirty = np.zeros(1100, dtype=bool)
    dirty[::3] = True  # hundreds of one-page runs
    with ps.Saver(path, [block], channels=2, tracker="hash") as saver:
        saver.setup()
        saver.iterate()
        pages[[0, 3, 4, 999]] ^= 1    # 0, 3 and 999 are in the dirty set
        scattered = saver.iterate({"ram0": dirty})
        saver.complete()
    assert (scattered.dirty_pages, scattered.pages_written, scattered.pages_unchanged) == \
        (367, 3, 364)
    assert np.array_equal(restored(path, block, shm), block.array)


def test_hash_tracker_skips_a_page_changed_and_changed_back(shm, tmp_path):
    block = shm.block("ram0", 64, fill=0.0, seed=6)
    pages = block.array.reshape(-1, PAGE_SIZE)
    path = tmp_path / "vm.img"
    with ps.Saver(path, [block], channels=2, tracker="hash") as saver:
        saver.setup()
        saver.iterate()
        original = pages[9].copy()
        pages[9] = 0
        pages[9] = original
        back = saver.iterate()
        saver.complete()
    assert back.pages_written == 0
    assert np.array_equal(restored(path, block, shm), block.array)


def test_hash_tracker_clears_the_bit_of_a_page_turned_zero(shm, tmp_path):
    block = shm.block("ram0", 64, fill=0.0, seed=7)
    path = tmp_path / "vm.img"
    with ps.Saver(path, [block], channels=2, tracker="hash") as saver:
        saver.setup()
        saver.iterate()
        block.array.reshape(-1, PAGE_SIZE)[20] = 0
        saver.complete()
    with ps.open_image(path) as image:
        bitmap = image.blocks["ram0"].bitmap
    assert not bitmap[20] and bitmap.sum() == 63


def test_saver_refuses_an_unknown_tracker(shm, tmp_path):
    with pytest.raises(ps.OptionError, match=r"tracker must be a DirtyTracker \(DirtyLog, "
                                             r"UffdTracker, HashTracker\) or 'hash', "
                                             r"not 'crc'"):
        ps.Saver(tmp_path / "vm.img", [shm.block("ram0", 4)], tracker="crc")


# --- userfaultfd ---

@needs_uffd
def test_uffd_reports_the_pages_this_process_wrote(shm):
    block = shm.block("ram0", 600, fill=0.5, seed=8)
    pages = block.array.reshape(-1, PAGE_SIZE)
    with ps.UffdTracker([block]) as tracker:
        pages[3, 100] = 1
        pages[[200, 201, 599]] = 7
        assert collected_pages(tracker.collect()) == {"ram0": [3, 200, 201, 599]}


@needs_uffd
def test_uffd_reports_a_page_again_only_once_written_again(shm):
    block = shm.block("ram0", 64)
    pages = block.array.reshape(-1, PAGE_SIZE)
    with ps.UffdTracker([block]) as tracker:
        pages[5] = 1
        tracker.collect()
        assert collected_pages(tracker.collect()) == {"ram0": []}
        pages[5, 9] = 2
        assert collected_pages(tracker.collect()) == {"ram0": [5]}


@needs_uffd
def test_uffd_start_forgets_earlier_writes(shm):
    block = shm.block("ram0", 64)
    with ps.UffdTracker([block]) as tracker:
        block.array[:] = 1
        tracker.start()
        assert collected_pages(tracker.collect()) == {"ram0": []}


@needs_uffd
def test_uffd_does_not_see_writes_of_other_processes(shm):
    block = shm.block("ram0", 64)
    with ps.UffdTracker([block]) as tracker:
        pid = os.fork()
        if pid == 0:
            block.array[PAGE_SIZE * 4] = 1
            os._exit(0)
        os.waitpid(pid, 0)
        assert block.array[PAGE_SIZE * 4] == 1
        assert collected_pages(tracker.collect()) == {"ram0": []}


@needs_uffd
def test_uffd_refuses_memory_it_cannot_write_protect(shm):
    path = shm.path()
    ps.RamBlock.from_file("ram0", path, length=16 * PAGE_SIZE, create=True)
    read_only = ps.RamBlock.from_file("ram0", path, writable=False)
    with pytest.raises(ps.TrackingError, match="block 'ram0': its memory cannot be "
                                               "write-protected with userfaultfd: "
                                               "Operation not permitted"):
        ps.UffdTracker([read_only])


# --- trackers in the Saver ---

def test_iterate_and_complete_collect_a_log_given_as_the_dirty_set(shm, tmp_path):
    block = shm.block("ram0", 600, fill=0.5, seed=9)
    pages = block.array.reshape(-1, PAGE_SIZE)
    path = tmp_path / "vm.img"
    with ps.DirtyLog.create([block]) as log, ps.Saver(path, [block], channels=2) as saver:
        saver.setup()
        saver.iterate()
        pages[[1, 2]] = 5
        log.mark_pages("ram0", [1, 2])
        second = saver.iterate(dirty=log)
        pages[550] = 0
        log.mark("ram0", 550 * PAGE_SIZE, PAGE_SIZE)
        stats = saver.complete(dirty=log)
    assert second.dirty_pages == 2 and stats.passes[-1].dirty_pages == 1
    assert np.array_equal(restored(path, block, shm), block.array)


def test_tracker_of_other_blocks_is_refused_and_keeps_its_marks(shm, tmp_path):
    block, other = shm.block("ram0", 64), shm.block("ram1", 64)
    with ps.DirtyLog.create([other]) as log, \
            ps.Saver(tmp_path / "vm.img", [block], channels=1) as saver:
        saver.setup()
        log.mark_pages("ram1", [3])
        with pytest.raises(ps.BlockError, match=r"the tracker follows blocks \{'ram1': 64\} "
                                                r"\(name: pages\), the save has \{'ram0': 64\}"):
            saver.iterate(dirty=log)
        assert collected_pages(log.collect()) == {"ram1": [3]}


def test_run_needs_a_tracker_or_the_hash_tracker(shm, tmp_path):
    with ps.Saver(tmp_path / "vm.img", [shm.block("ram0", 4)], channels=1) as saver, \
            pytest.raises(ValueError, match="run needs a tracker"):
        saver.run()


def test_run_completes_once_the_dirty_set_is_small_enough(shm, tmp_path):
    block = shm.block("ram0", 600, fill=0.5, seed=10)
    with ps.DirtyLog.create([block]) as log, \
            ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver:
        stats = saver.run(log, max_passes=10, dirty_pages_limit=0)
    assert [p.dirty_pages for p in stats.passes] == [600, 0]


def test_run_spends_at_most_max_passes_then_stops_the_writers(shm, tmp_path):
    block = shm.block("ram0", 600, fill=0.5, seed=11)
    pages = block.array.reshape(-1, PAGE_SIZE)
    calls = []

    def dirty_between_passes(phase, done, total):
        if done == total:  # end of a pass: the writers are never done
            pages[done % 600] += 1
            log.mark_pages("ram0", [done % 600])

    with ps.DirtyLog.create([block]) as log, \
            ps.Saver(tmp_path / "vm.img", [block], channels=2,
                     on_progress=dirty_between_passes) as saver:
        stats = saver.run(log, max_passes=3, dirty_pages_limit=0,
                          stop_writers=lambda: calls.append(len(saver.stats.passes)))
    assert calls == [3] and len(stats.passes) == 4


def test_run_with_the_hash_tracker_stops_when_a_pass_changed_little(shm, tmp_path):
    block = shm.block("ram0", 600, fill=0.5, seed=12)
    with ps.Saver(tmp_path / "vm.img", [block], channels=2, tracker="hash") as saver:
        stats = saver.run(max_passes=10, dirty_pages_limit=0)
    assert [(p.dirty_pages, p.pages_unchanged) for p in stats.passes][1:] == \
        [(600, 600), (600, 600)]


# --- live saves with busy writers ---

SEEDS = range(4)


def live_save(tmp_path, shm, block: ps.RamBlock, seed: int, run_with: ps.DirtyTracker | None,
              writers: dict, **options) -> tuple[np.ndarray, np.ndarray]:
    """A live save among busy writers: (what restoring it gives, the memory
    as the writers left it)."""
    path = tmp_path / "vm.img"
    with Writers(block, 100 * seed, **writers) as busy, \
            ps.Saver(path, [block], channels=1 + seed % 3, **options) as saver:
        stats = saver.run(run_with, max_passes=5, dirty_pages_limit=-1, stop_writers=busy.stop)
    assert len(stats.passes) == 6  # five passes among the writes, then complete
    return restored(path, block, shm), busy.left


@pytest.mark.parametrize("seed", SEEDS)
def test_live_save_with_a_dirty_log_restores_memory_as_the_writers_left_it(shm, tmp_path, seed):
    block = shm.block("ram0", STRESS_PAGES, fill=0.5, seed=seed)
    with ps.DirtyLog.create([block]) as log:
        image, left = live_save(tmp_path, shm, block, seed, log, {"log": log})
    assert np.array_equal(image, left)


@pytest.mark.parametrize("seed", SEEDS)
def test_live_save_with_the_hash_tracker_restores_memory_as_the_writers_left_it(shm, tmp_path,
                                                                                 seed):
    block = shm.block("ram0", STRESS_PAGES, fill=0.5, seed=seed)
    image, left = live_save(tmp_path, shm, block, seed, None, {}, tracker="hash",
                            direct_io=seed == 0)
    assert np.array_equal(image, left)


@pytest.mark.parametrize("seed", SEEDS)
def test_live_save_with_a_dirty_log_and_the_hash_tracker_restores_memory_as_left(shm, tmp_path,
                                                                                  seed):
    block = shm.block("ram0", STRESS_PAGES, fill=0.5, seed=seed)
    with ps.DirtyLog.create([block]) as log:
        image, left = live_save(tmp_path, shm, block, seed, log, {"log": log}, tracker="hash")
    assert np.array_equal(image, left)


@needs_uffd
@pytest.mark.parametrize("seed", SEEDS)
def test_live_save_with_uffd_restores_memory_as_the_writer_threads_left_it(shm, tmp_path, seed):
    block = shm.block("ram0", STRESS_PAGES, fill=0.5, seed=seed)
    with ps.UffdTracker([block]) as tracker:
        image, left = live_save(tmp_path, shm, block, seed, tracker, {"threads": True})
    assert np.array_equal(image, left)


# --- the benchmark ---

def test_tracking_benchmark_reports_every_number(tmp_path):
    from bench.tracking import main

    report = tmp_path / "tracking.json"
    assert main(["--size", "8M", "--rounds", "1", "--workdir", str(tmp_path),
                 "--json", str(report)]) == 0
    results = json.loads(report.read_text())["results"]
    assert set(results["dirty log"]) == {"mark_ns", "marks_per_second", "mark_64k_range_ns",
                                         "mark_pages_ns_per_page", "collect_s_per_gib"}
    assert set(results["passes"]) == {"plain_first_pass_s_per_gib",
                                      "plain_second_pass_s_per_gib",
                                      "hash_first_pass_s_per_gib",
                                      "hash_unchanged_pass_s_per_gib"}
    assert all(value > 0 for section in ("dirty log", "hash", "passes")
               for value in results[section].values())
