"""Repeated checkpoints: warm channels, incremental A/B images, always one
good image (docs/DESIGN.md, checkpoints)."""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from qemu_support import (
    RAM_SIZE,
    file_bytes,
    load_into_qemu,
    require_mapped_ram_qemu,
    zero_file,
)

import parallel_save as ps
from bench.qemu import QemuVM
from parallel_save.checkpoint import IMAGE_NAMES
from parallel_save.format import PAGE_SIZE

PAGES = 2048  # 8 MiB


def restored(shm, directory: Path, like: ps.RamBlock) -> tuple[str, np.ndarray]:
    target = shm.block(like.name, like.pages, fill="garbage")
    path, _ = ps.restore_latest(directory, [target], channels=2)
    return os.path.basename(path), target.array.copy()


def change_pages(block: ps.RamBlock, rng: np.random.Generator, count: int) -> np.ndarray:
    """Write ``count`` random pages (some to zero); returns the dirty set."""
    pages = block.array.reshape(-1, PAGE_SIZE)
    dirty = np.zeros(block.pages, dtype=bool)
    for page in rng.choice(block.pages, size=count, replace=False):
        pages[page] = 0 if rng.random() < 0.3 else rng.integers(1, 256, dtype=np.uint8)
        dirty[page] = True
    return dirty


def test_each_checkpoint_restores_exactly_the_memory_at_that_checkpoint(shm, tmp_path):
    block = shm.block("ram0", PAGES, fill=0.5, seed=1)
    rng = np.random.default_rng(2)
    with ps.Checkpointer(tmp_path, [block], channels=3) as ckpt:
        first = ckpt.checkpoint()
        assert (first.image, first.generation, first.full) == \
            (str(tmp_path / "checkpoint-a.img"), 1, True)
        for number in range(2, 8):
            dirty = change_pages(block, rng, 40)
            stats = ckpt.checkpoint(dirty={"ram0": dirty})
            name, memory = restored(shm, tmp_path, block)
            assert name == IMAGE_NAMES[(number - 1) % 2]
            assert stats.generation == number
            assert np.array_equal(memory, block.array)
    # The second checkpoint wrote image b whole; from the third on, an image
    # gets the pages changed since it was last written: two dirty sets.
    assert [s.full for s in ckpt.checkpoints] == [True, True, False, False, False, False, False]
    for stats in ckpt.checkpoints[2:]:
        assert stats.dirty_pages <= 80
        assert stats.pages_written + stats.zero_pages == stats.dirty_pages


def test_a_page_turned_zero_is_cleared_in_the_image(shm, tmp_path):
    block = shm.block("ram0", 64, fill=0.0)
    with ps.Checkpointer(tmp_path, [block], channels=1) as ckpt:
        ckpt.checkpoint()
        ckpt.checkpoint()
        block.array[:PAGE_SIZE] = 0
        dirty = np.zeros(64, dtype=bool)
        dirty[0] = True
        ckpt.checkpoint(dirty={"ram0": dirty})
        ckpt.checkpoint(dirty={"ram0": np.zeros(64, dtype=bool)})
    for name in IMAGE_NAMES:  # both images caught up with the change
        with ps.open_image(tmp_path / name) as image:
            assert image.blocks["ram0"].pages_present == 63
            assert np.array_equal(image.read_block("ram0"), block.array)


def test_the_channels_stay_up_between_checkpoints(shm, tmp_path):
    block = shm.block("ram0", 256, fill=0.5)
    with ps.Checkpointer(tmp_path, [block], channels=2) as ckpt:
        ckpt.checkpoint()
        pids = [p.pid for p in ckpt._group.processes]
        ckpt.checkpoint()
        ckpt.checkpoint(dirty={"ram0": np.zeros(256, dtype=bool)})
        assert [p.pid for p in ckpt._group.processes] == pids


def test_the_hash_tracker_writes_only_pages_that_differ_from_the_image(shm, tmp_path):
    block = shm.block("ram0", PAGES, fill=0.5, seed=3)
    rng = np.random.default_rng(4)
    with ps.Checkpointer(tmp_path, [block], channels=2, tracker="hash") as ckpt:
        ckpt.checkpoint()
        ckpt.checkpoint()
        for _ in range(4):
            change_pages(block, rng, 25)
            stats = ckpt.checkpoint()
            _, memory = restored(shm, tmp_path, block)
            assert np.array_equal(memory, block.array)
            # At most this change and the one before: what this image lacks.
            assert stats.pages_unchanged >= PAGES - 50
            assert 0 < stats.pages_written + stats.zero_pages <= 50


def test_a_dirty_log_drives_the_checkpoints(shm, tmp_path):
    block = shm.block("ram0", 512, fill=0.5, seed=5)
    with ps.DirtyLog.create([block]) as log, \
            ps.Checkpointer(tmp_path, [block], channels=2, tracker=log) as ckpt:
        ckpt.checkpoint()
        block.array[7 * PAGE_SIZE:8 * PAGE_SIZE] = 9
        log.mark("ram0", 7 * PAGE_SIZE, PAGE_SIZE)
        ckpt.checkpoint()
        block.array[9 * PAGE_SIZE] = 1
        log.mark("ram0", 9 * PAGE_SIZE, 1)
        third = ckpt.checkpoint()
        assert (third.full, third.dirty_pages) == (False, 2)  # page 7 from the last, 9 now
        _, memory = restored(shm, tmp_path, block)
        assert np.array_equal(memory, block.array)


def test_an_earlier_runs_newest_image_is_written_over_last(shm, tmp_path):
    block = shm.block("ram0", 64, fill=0.5)
    with ps.Checkpointer(tmp_path, [block], channels=1) as ckpt:
        ckpt.checkpoint()
        ckpt.checkpoint()
        ckpt.checkpoint()  # a: 3, b: 2
    with ps.Checkpointer(tmp_path, [block], channels=1) as ckpt:
        stats = ckpt.checkpoint()
    assert (os.path.basename(stats.image), stats.generation, stats.full) == \
        ("checkpoint-b.img", 4, True)


def test_the_images_are_0600_and_refuse_a_planted_symlink(shm, tmp_path):
    block = shm.block("ram0", 16, fill=0.5)
    (tmp_path / "checkpoint-a.img").symlink_to(tmp_path / "elsewhere")
    with ps.Checkpointer(tmp_path, [block], channels=1) as ckpt, \
            pytest.raises(ps.DestinationError, match="is a symbolic link; refused"):
        ckpt.checkpoint()
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "checkpoint-a.img").unlink()
    with ps.Checkpointer(tmp_path, [block], channels=1) as ckpt:
        ckpt.checkpoint()
        ckpt.checkpoint()
    for name in IMAGE_NAMES:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


def test_latest_checkpoint_without_any_says_so(tmp_path):
    with pytest.raises(ps.ParallelSaveError, match="no complete checkpoint image"):
        ps.latest_checkpoint(tmp_path)


@pytest.mark.qemu
def test_qemu_loads_both_images(shm, tmp_path):
    require_mapped_ram_qemu()
    block = shm.block("ram0", RAM_SIZE // PAGE_SIZE, fill=0.5, seed=6)
    rng = np.random.default_rng(7)
    with ps.Checkpointer(tmp_path, [block], channels=2) as ckpt:
        ckpt.checkpoint()
        ckpt.checkpoint()
        ckpt.checkpoint(dirty={"ram0": change_pages(block, rng, 100)})
        memory_a = block.array.copy()
        ckpt.checkpoint(dirty={"ram0": change_pages(block, rng, 100)})
    for name, memory in (("checkpoint-a.img", memory_a), ("checkpoint-b.img", block.array)):
        loaded = zero_file(shm.path(), RAM_SIZE)
        with QemuVM(loaded, RAM_SIZE, incoming=True) as vm:
            load_into_qemu(vm, tmp_path / name)
        assert np.array_equal(file_bytes(loaded), memory)


# --- crashes at random moments ---

CHECKPOINT_FOREVER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import parallel_save as ps

    directory, source, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    block = ps.RamBlock.from_file("ram0", source)
    pages = block.array.reshape(-1, 4096)
    rng = np.random.default_rng(seed)
    with ps.Checkpointer(directory, [block], channels=2) as ckpt:
        while True:
            dirty = np.zeros(block.pages, dtype=bool)
            for page in rng.choice(block.pages, 64, replace=False):
                pages[page] = 0 if rng.random() < 0.3 else rng.integers(1, 256, dtype=np.uint8)
                dirty[page] = True
            # What the next generation holds, for the judge: in place before
            # the checkpoint starts.
            memory = os.path.join(directory, f"memory-{ckpt.generation + 1}.npy")
            np.save(memory + ".tmp.npy", block.array)
            os.rename(memory + ".tmp.npy", memory)
            stats = ckpt.checkpoint(dirty={"ram0": dirty})
            print(stats.generation, flush=True)
""")


@pytest.mark.parametrize("victim", ["coordinator", "channel"])
def test_a_sigkill_at_any_moment_leaves_the_previous_checkpoint_restorable(
        shm, tmp_path, victim):
    script = tmp_path / "checkpoint_forever.py"
    script.write_text(CHECKPOINT_FOREVER)
    block = shm.block("ram0", 1024, fill=0.5, seed=8)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    chance = random.Random(9)
    for round_ in range(6):
        process = subprocess.Popen([sys.executable, str(script), str(directory),
                                    block.source.path, str(round_)],
                                   stdout=subprocess.PIPE, text=True)
        done = [int(process.stdout.readline()) for _ in range(2)]
        time.sleep(chance.uniform(0, 0.05))
        if victim == "coordinator":
            process.kill()
        else:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            if children.split():
                os.kill(int(children.split()[0]), signal.SIGKILL)
            time.sleep(0.2)
            process.kill()
        process.wait(timeout=30)
        path, generation = ps.latest_checkpoint(directory)
        assert generation >= done[-1]
        memory = np.load(directory / f"memory-{generation}.npy")
        target = shm.block("ram0", 1024, fill="garbage")
        ps.restore(path, [target], channels=2)
        assert np.array_equal(target.array, memory)


# --- snapshots of private memory ---


def private_array(pages: int, seed: int) -> np.ndarray:
    """A plain numpy array (private memory), page aligned, random pages."""
    memory = mmap.mmap(-1, pages * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(memory, np.uint8)
    array[:] = np.random.default_rng(seed).integers(0, 256, array.size, dtype=np.uint8)
    array.reshape(-1, PAGE_SIZE)[::3] = 0
    return array


def test_a_snapshot_holds_the_memory_at_the_call_while_the_caller_writes_on(shm, tmp_path):
    array = private_array(4096, seed=10)
    block = ps.RamBlock.snapshot_of("ram0", array)
    assert block.private
    with ps.Checkpointer(tmp_path, [block], channels=2, snapshot=True) as ckpt:
        at_the_call = array.copy()
        pending = ckpt.checkpoint(wait=False)
        array[:] = 0xAB  # every page changes under the running checkpoint
        stats = pending.wait()
    assert stats.full and stats.pause_seconds < stats.seconds
    _, memory = restored(shm, tmp_path, block)
    assert np.array_equal(memory, at_the_call)


def test_snapshots_with_userfaultfd_write_only_what_changed(shm, tmp_path):
    if ps.uffd_support() is not None:
        pytest.skip(f"userfaultfd write-protect: {ps.uffd_support()}")
    array = private_array(1024, seed=11)
    block = ps.RamBlock.snapshot_of("ram0", array)
    with ps.UffdTracker([block]) as tracker, \
            ps.Checkpointer(tmp_path, [block], channels=2, snapshot=True,
                            tracker=tracker) as ckpt:
        ckpt.checkpoint()
        ckpt.checkpoint()
        array[5 * PAGE_SIZE:7 * PAGE_SIZE] = 3
        third = ckpt.checkpoint()
        array[100 * PAGE_SIZE] = 9
        fourth = ckpt.checkpoint()
        assert (third.full, third.dirty_pages) == (False, 2)
        assert (fourth.full, fourth.dirty_pages) == (False, 3)  # 5, 6 for this image, and 100
        _, memory = restored(shm, tmp_path, block)
        assert np.array_equal(memory, array)


def test_private_memory_is_refused_outside_a_snapshot(tmp_path):
    block = ps.RamBlock.snapshot_of("ram0", private_array(16, seed=12))
    with pytest.raises(ps.BlockError, match="private memory; the channels .* cannot see it"):
        ps.save(tmp_path / "vm.img", [block], channels=1)
    with pytest.raises(ps.BlockError, match="private memory"):
        ps.Checkpointer(tmp_path, [block], channels=1)
    assert os.listdir(tmp_path) == []
