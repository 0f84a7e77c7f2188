"""Memory in huge pages, as production VMs' often is: a hugetlbfs file
(QEMU's -mem-path /dev/hugepages, libvirt's <hugepages/>) or a tmpfs
mounted with huge=always (transparent huge pages).  Real mounts, made for
each test (root; a hugetlbfs also needs free pages in the machine's pool,
which .ci/run reserves).

A channel maps a block whole, shared, and populates and lets go of it in
whole chunks (2 MiB, aligned in the block), so the kernel maps such
memory with one entry per huge page instead of 512: next to no page
tables to build, which is where the speed of huge pages comes from
(docs/DESIGN.md, the paragraph on memory in huge pages).
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import channel_processes, mounted, need_huge_pages
from qemu_support import load_into_qemu, plant_edge_pages, require_mapped_ram_qemu

import parallel_save as ps
from bench.qemu import QemuVM
from parallel_save.cli import main

PAGE = 4096
HUGE_PAGE = 2 << 20
BLOCK_BYTES = 16 << 20
# A test holds at most a source and a destination, and two run at once.
MOUNT_BYTES = 2 * BLOCK_BYTES


@pytest.fixture(params=["hugetlbfs", "thp"])
def huge_memory(request, tmp_path) -> tuple[str, Path]:
    """A mount whose files are memory in 2 MiB pages."""
    if request.param == "hugetlbfs":
        need_huge_pages(MOUNT_BYTES // HUGE_PAGE)
        options = f"pagesize=2M,size={MOUNT_BYTES}"
    else:
        options = f"huge=always,size={MOUNT_BYTES}"
    fstype = "hugetlbfs" if request.param == "hugetlbfs" else "tmpfs"
    with mounted(tmp_path / request.param, fstype, options) as mount_point:
        yield request.param, mount_point


@pytest.fixture
def unlimited_hugetlbfs(tmp_path) -> Path:
    """A hugetlbfs mounted as /dev/hugepages is, without a size limit: it
    says it has 0 of 0 blocks, and takes its pages from the pool."""
    need_huge_pages(4)
    with mounted(tmp_path / "hugepages", "hugetlbfs", "pagesize=2M") as mount_point:
        yield mount_point


def _memory_file(path: Path, pages: np.ndarray | None = None) -> tuple[mmap.mmap, np.ndarray]:
    """A new file of BLOCK_BYTES at ``path``, mapped shared (a hugetlbfs
    file can only be written through a mapping), with ``pages`` in it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, BLOCK_BYTES)
        mapping = mmap.mmap(fd, BLOCK_BYTES, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    array = np.frombuffer(mapping, np.uint8)
    if pages is not None:
        array[:] = pages.reshape(-1)
    return mapping, array


def _half_zero(seed: int) -> tuple[np.ndarray, int]:
    """BLOCK_BYTES of pages, half of them zero at random places; the others
    start with zero words, so no check can stop at a page's first word."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(1, 256, (BLOCK_BYTES // PAGE, PAGE), dtype=np.uint8)
    pages[:, :1024] = 0
    zero = rng.random(len(pages)) < 0.5
    pages[zero] = 0
    return pages, int((~zero).sum())


def test_a_block_in_huge_pages_saves_and_restores_exactly(huge_memory, tmp_path):
    """Saved by three channels claiming their shards, restored by two into
    huge-page memory full of other bytes (so the zero pages must be
    cleared: a hugetlbfs destination cannot take sendfile, and is read
    into)."""
    _, mount_point = huge_memory
    pages, nonzero = _half_zero(seed=1)
    source, source_array = _memory_file(mount_point / "source.ram", pages)
    image = tmp_path / "huge.img"
    with ps.RamBlock.from_file("pc.ram", mount_point / "source.ram", writable=False) as block:
        stats = ps.save(image, [block], channels=3)
    assert stats.pages_written == nonzero
    with ps.open_image(image) as opened:
        assert opened.blocks["pc.ram"].pages_present == nonzero

    garbage = np.full(pages.shape, 0xA5, np.uint8)
    destination, destination_array = _memory_file(mount_point / "destination.ram", garbage)
    with ps.RamBlock.from_file("pc.ram", mount_point / "destination.ram") as block:
        restored = ps.restore(image, [block], channels=2)
    assert restored.pages_read == nonzero
    assert np.array_equal(destination_array, source_array)
    del source_array, destination_array
    source.close()
    destination.close()


def _long_runs(seed: int) -> tuple[np.ndarray, int]:
    """BLOCK_BYTES of pages in runs of data and of zero pages, 1 to 600
    pages long, as a guest's memory is laid out."""
    rng = np.random.default_rng(seed)
    pages = rng.integers(1, 256, (BLOCK_BYTES // PAGE, PAGE), dtype=np.uint8)
    at, data = 0, True
    while at < len(pages):
        length = int(rng.integers(1, 600))
        if not data:
            pages[at:at + length] = 0
        at, data = at + length, not data
    return pages, int(pages.any(axis=1).sum())


@pytest.mark.parametrize("destination_bytes", [0x00, 0xA5], ids=["zero", "other-bytes"])
def test_a_lone_channel_restores_into_huge_pages_on_both_its_threads(
        huge_memory, tmp_path, monkeypatch, destination_bytes):
    """One channel with its look-ahead thread (pinned: it has one wherever
    there are more CPUs than channels) restoring into a hugetlbfs reads
    whole windows on both threads, each taking the next window as it ends
    one (into a tmpfs of huge pages, it sends long runs by sendfile): every
    present page lands exactly once at its place, and every other page is
    zero, whether the destination was zero (the restore told so) or held
    other bytes."""
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", "1")
    _, mount_point = huge_memory
    pages, nonzero = _long_runs(seed=11)
    # Four blocks of 4 MiB carved out of one file: a window each, so both
    # threads have windows to take.
    quarters = [slice(at, at + BLOCK_BYTES // 4) for at in range(0, BLOCK_BYTES, BLOCK_BYTES // 4)]
    names = [f"ram{number}" for number in range(4)]
    source, source_array = _memory_file(mount_point / "source.ram", pages)
    image = tmp_path / "runs.img"
    blocks = [ps.RamBlock(name, memoryview(source)[part]) for name, part in zip(names, quarters)]
    assert ps.save(image, blocks, channels=1).pages_written == nonzero
    for block in blocks:
        block.close()

    destination, destination_array = _memory_file(
        mount_point / "destination.ram", np.full(pages.shape, destination_bytes, np.uint8))
    blocks = [ps.RamBlock(name, memoryview(destination)[part])
              for name, part in zip(names, quarters)]
    restored = ps.restore(image, blocks, channels=1, assume_zero=destination_bytes == 0)
    for block in blocks:
        block.close()
    assert restored.pages_read == nonzero
    assert np.array_equal(destination_array, source_array)
    del source_array, destination_array
    source.close()
    destination.close()


def test_a_live_save_of_huge_page_memory_clears_pages_zeroed_after_a_pass(huge_memory,
                                                                          tmp_path):
    """A page written by the first pass and zeroed before the last is not
    in the file; a page written only later is; huge pages change nothing of
    what each pass writes."""
    _, mount_point = huge_memory
    pages, nonzero = _half_zero(seed=2)
    mapping, array = _memory_file(mount_point / "live.ram", pages)
    words = array.reshape(-1, PAGE)
    was_data = np.flatnonzero(words.any(axis=1))
    was_zero = np.flatnonzero(~words.any(axis=1))
    zeroed, filled = was_data[:: 7], was_zero[:: 11]
    image = tmp_path / "live.img"
    with (ps.RamBlock.from_file("pc.ram", mount_point / "live.ram") as block,
          ps.Saver(image, [block], channels=2, sync=False) as saver):
        saver.setup()
        first = saver.iterate()
        words[zeroed] = 0
        words[filled] = 0x5A
        dirty = np.zeros(block.pages, dtype=bool)
        dirty[zeroed] = dirty[filled] = True
        last = saver.complete(dirty={"pc.ram": dirty})
    assert first.pages_written == nonzero
    assert last.passes[-1].pages_written == len(filled)
    with ps.open_image(image) as opened:
        present = opened.blocks["pc.ram"].bitmap
        assert not present[zeroed].any()
        assert present[filled].all()
        assert np.array_equal(opened.read_block("pc.ram"), array)
    del words, array
    mapping.close()


def _mapped_in_huge_pages(pid: int, kind: str) -> int:
    """Bytes of huge pages mapped by ``pid``: hugetlbfs pages, or a tmpfs's
    transparent huge pages mapped whole (one page-table entry each)."""
    field = "Shared_Hugetlb" if kind == "hugetlbfs" else "ShmemPmdMapped"
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", rollup, re.MULTILINE).group(1)) << 10


def test_channels_map_memory_in_huge_pages_with_huge_pages(huge_memory, tmp_path):
    """Between two checkpoints a checkpointer's channels keep their
    mappings: together they map the block's memory in 2 MiB pages, each
    channel its share.  (The same test over a tmpfs mounted huge=never
    finds ShmemPmdMapped 0: memory in 4 KiB pages, one page-table entry
    each.)"""
    kind, mount_point = huge_memory
    pages = np.ones((BLOCK_BYTES // PAGE, PAGE), np.uint8)  # every page data
    mapping, array = _memory_file(mount_point / "checkpointed.ram", pages)
    (tmp_path / "checkpoints").mkdir()
    with (ps.RamBlock.from_file("pc.ram", mount_point / "checkpointed.ram") as block,
          ps.Checkpointer(tmp_path / "checkpoints", [block], channels=2) as checkpointer):
        stats = checkpointer.checkpoint()
        assert stats.pages_written == BLOCK_BYTES // PAGE
        channels = [child.pid for child in channel_processes()]
        assert len(channels) == 2
        mapped = [_mapped_in_huge_pages(pid, kind) for pid in channels]
    assert sum(mapped) == BLOCK_BYTES, mapped
    assert all(mapped), mapped  # each channel its share
    del array
    mapping.close()


def test_a_block_that_begins_inside_a_huge_page_saves_and_restores_exactly(huge_memory,
                                                                            tmp_path):
    """A block carved out of a larger mapping 4 KiB into a huge page (and
    so ending inside one): a hugetlbfs maps only whole huge pages, so a
    channel maps from the huge page the block begins in (it used to fail
    with EINVAL from mmap), and the block's bytes are exactly its own."""
    _, mount_point = huge_memory
    pages, _ = _half_zero(seed=5)
    source, source_array = _memory_file(mount_point / "source.ram", pages)
    carved = slice(PAGE, PAGE + (BLOCK_BYTES >> 1))
    expected = int(source_array[carved].reshape(-1, PAGE).any(axis=1).sum())
    image = tmp_path / "carved.img"
    with ps.RamBlock("pc.ram", memoryview(source)[carved]) as block:
        assert ps.save(image, [block], channels=2).pages_written == expected

    destination, destination_array = _memory_file(
        mount_point / "destination.ram", np.full(pages.shape, 0xA5, np.uint8))
    with ps.RamBlock("pc.ram", memoryview(destination)[carved]) as block:
        assert ps.restore(image, [block], channels=2).pages_read == expected
    assert np.array_equal(destination_array[carved], source_array[carved])
    # Around the block, nothing was touched.
    assert (destination_array[:PAGE] == 0xA5).all()
    assert (destination_array[carved.stop:] == 0xA5).all()
    del source_array, destination_array
    source.close()
    destination.close()


def _saved_image(tmp_path: Path, length: int) -> tuple[Path, bytes]:
    """An image of one block of ``length`` bytes, half its pages zero."""
    memory = tmp_path / "memory.ram"
    pages, _ = _half_zero(seed=6)
    memory.write_bytes(pages.reshape(-1)[:length].tobytes())
    image = tmp_path / "vm.img"
    assert main(["save", "--quiet", "--block", f"pc.ram={memory}", str(image)]) == 0
    return image, memory.read_bytes()


def test_a_restore_into_a_hugetlbfs_without_a_size_limit_counts_the_pool(
        unlimited_hugetlbfs, tmp_path, capsys):
    """Its statvfs says 0 bytes free; the pool's free pages are what it has
    (the restore was refused: "no space left ... 0 bytes free")."""
    image, data = _saved_image(tmp_path, 2 * HUGE_PAGE)
    destination = unlimited_hugetlbfs / "pc.ram"
    status = main(["restore", "--quiet", "--block", f"pc.ram={destination}", str(image)])
    assert (status, capsys.readouterr().err) == (0, "")
    assert destination.read_bytes() == data


def test_a_block_that_is_not_whole_huge_pages_is_refused_naming_the_file(
        unlimited_hugetlbfs, tmp_path, capsys):
    """A hugetlbfs file holds whole huge pages: a block of 1 MiB cannot be
    restored into one, and the error says which file and why (it was
    "[Errno 22] Invalid argument"); the file made for it is removed."""
    image, _ = _saved_image(tmp_path, HUGE_PAGE // 2)
    destination = unlimited_hugetlbfs / "pc.ram"
    status = main(["restore", "--block", f"pc.ram={destination}", str(image)])
    assert (status, capsys.readouterr().err) == (1, (
        f"parallel-save: error: {destination}: cannot hold block 'pc.ram' of 1048576 "
        f"bytes: its file system takes only lengths in whole pages of 2048 KiB\n"))
    assert list(unlimited_hugetlbfs.iterdir()) == []


def test_a_block_file_made_in_a_hugetlbfs_must_be_whole_huge_pages(unlimited_hugetlbfs):
    """RamBlock.from_file(create=True) says why, naming the block and the
    file (it raised a bare "[Errno 22] Invalid argument", and left the
    empty file it had made)."""
    path = unlimited_hugetlbfs / "pc.ram"
    with pytest.raises(ps.BlockError) as caught:
        ps.RamBlock.from_file("pc.ram", path, length=HUGE_PAGE // 2, create=True)
    assert str(caught.value) == (
        f"block 'pc.ram': cannot make {path} 1048576 bytes long: its file system takes "
        f"only lengths in whole pages of 2048 KiB")
    assert not path.exists()  # the file it made for the block is gone again
    with ps.RamBlock.from_file("pc.ram", path, length=HUGE_PAGE, create=True) as block:
        assert block.length == HUGE_PAGE


@pytest.mark.qemu
def test_qemu_and_we_load_each_others_saves_of_huge_page_memory(huge_memory, tmp_path):
    """A guest whose RAM is a file of huge pages (QEMU's memory-backend-file
    over it, as -mem-path /dev/hugepages gives): QEMU's multifd save
    restores exactly into huge-page memory, and QEMU loads our save of that
    memory into a guest of huge pages exactly."""
    require_mapped_ram_qemu()
    _, mount_point = huge_memory
    pages, _ = _half_zero(seed=7)
    plant_edge_pages(pages.reshape(-1))
    guest, guest_array = _memory_file(mount_point / "guest.ram", pages)
    theirs = tmp_path / "qemu.img"
    with QemuVM(mount_point / "guest.ram", BLOCK_BYTES) as vm:
        vm.save(theirs, multifd_channels=2)
    loaded, loaded_array = _memory_file(mount_point / "loaded.ram",
                                        np.full(pages.shape, 0xA5, np.uint8))
    with ps.RamBlock.from_file("ram0", mount_point / "loaded.ram") as block:
        ps.restore(theirs, [block], channels=2)
    assert np.array_equal(loaded_array, guest_array)

    ours = tmp_path / "ours.img"
    loaded_array[:] = 0  # fresh RAM, as QEMU's load expects
    with (ps.RamBlock.from_file("ram0", mount_point / "guest.ram", writable=False) as block,
          QemuVM(mount_point / "loaded.ram", BLOCK_BYTES, incoming=True) as vm):
        ps.save(ours, [block], channels=3, machine=vm.machine_type())
        load_into_qemu(vm, ours, multifd_channels=2)
    assert np.array_equal(loaded_array, guest_array)
    del guest_array, loaded_array
    guest.close()
    loaded.close()


def test_the_uffd_tracker_over_huge_page_memory_misses_no_write(huge_memory, tmp_path):
    """Checkpoints tracked by userfaultfd write-protection: every write
    between two checkpoints reaches the image (the kernel write-protects a
    hugetlbfs page whole, so one written byte there saves its 512 pages)."""
    if ps.uffd_support() is not None:
        pytest.skip(f"userfaultfd write-protect: {ps.uffd_support()}")
    _, mount_point = huge_memory
    pages, _ = _half_zero(seed=8)
    mapping, array = _memory_file(mount_point / "tracked.ram", pages)
    words = array.reshape(-1, PAGE)
    (tmp_path / "checkpoints").mkdir()
    with (ps.RamBlock("ram0", memoryview(mapping)) as block, ps.UffdTracker([block]) as tracker,
          ps.Checkpointer(tmp_path / "checkpoints", [block], channels=2,
                          tracker=tracker) as checkpointer):
        checkpointer.checkpoint()
        checkpointer.checkpoint()  # both images written whole once
        for step, page in enumerate((5, 700, 3000)):
            words[page, 17] = step + 1
            stats = checkpointer.checkpoint()
            assert 1 <= stats.pages_written <= 2 * (HUGE_PAGE // PAGE)
            copy = np.zeros(block.length, np.uint8)
            with ps.open_image(stats.image) as image:
                image.read_block("ram0", out=copy)
            assert np.array_equal(copy, array)
    del words, array
    mapping.close()
