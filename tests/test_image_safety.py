"""Reading hostile and odd files (issue 15, items 10 and 11; issue 13's lazy
bitmaps): an image costs at most what the file really holds, a FIFO or a
device is refused at once, and the image is read through the one
descriptor that was validated.

The bombs are sparse files: a size that is free to claim (a hole), a few
KiB of real data.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import parallel_save as ps
from parallel_save import files, libc
from parallel_save.blocks import BlockMapping
from parallel_save.cli import main
from parallel_save.files import data_runs, hole_runs, open_regular
from parallel_save.format import (
    PAGE_SIZE,
    encode_setup,
    encode_tail,
    pack_bitmap,
    plan_layout,
)
from parallel_save.image import clear_bits

MiB = 1 << 20


def sparse_image(path: Path, blocks: list[tuple[str, int]], *, bitmap_fill: int | None = None,
                 bitmap_bytes: dict[str, tuple[int, bytes]] | None = None,
                 pages: dict[str, dict[int, bytes]] | None = None) -> ps.Image:
    """An image whose page slots and bitmaps are holes unless given:
    ``bitmap_fill`` writes every bitmap byte (0xFF: every page present),
    ``bitmap_bytes`` writes bytes at an offset into a block's bitmap,
    ``pages`` writes some pages.  Returns the layout."""
    layout = plan_layout(blocks)
    with open(path, "wb") as f:
        for offset, data in encode_setup(layout):
            f.seek(offset)
            f.write(data)
        for block in layout.blocks:
            if bitmap_fill is not None:
                assert block.pages % 64 == 0, "no padding bit to leave clear"
                f.seek(block.bitmap_offset)
                f.write(bytes([bitmap_fill]) * block.bitmap_size)
            for name, (offset, data) in (bitmap_bytes or {}).items():
                if name == block.name:
                    f.seek(block.bitmap_offset + offset)
                    f.write(data)
            for page, data in (pages or {}).get(block.name, {}).items():
                f.seek(block.page_offset(page))
                f.write(data)
        f.seek(layout.tail_offset)
        f.write(encode_tail(layout, 1, {"parallel_save": {"test": True}}))
    return layout


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --- data runs ---


def test_data_runs_are_the_written_ranges_and_hole_runs_the_rest(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(b"a" * PAGE_SIZE)
        f.seek(MiB)
        f.write(b"b" * 2 * PAGE_SIZE)
        f.truncate(4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(data_runs(fd, 0, 4 * MiB)) == [(0, PAGE_SIZE), (MiB, MiB + 2 * PAGE_SIZE)]
        assert list(data_runs(fd, 100, MiB + 10)) == [(100, PAGE_SIZE), (MiB, MiB + 10)]
        assert list(data_runs(fd, 2 * MiB, 8 * MiB)) == []
        assert list(hole_runs(fd, 0, 4 * MiB)) == [(PAGE_SIZE, MiB),
                                                    (MiB + 2 * PAGE_SIZE, 4 * MiB)]
    finally:
        os.close(fd)


def test_a_failed_c_library_call_reports_its_errno_and_file(tmp_path):
    """The C library's calls are bound once (parallel_save/libc.py); a
    failed one's error is the errno it left, naming the file asked for."""
    ctypes.set_errno(0)
    assert libc.renameat2(-1, b"first", -1, b"second", 0) == -1
    error = libc.last_error(str(tmp_path / "second"))
    assert (error.errno, error.filename) == (errno.EBADF, str(tmp_path / "second"))
    assert str(error) == f"[Errno {errno.EBADF}] Bad file descriptor: '{tmp_path / 'second'}'"


def test_start_writeback_reaches_the_system_call(tmp_path):
    """A durable save starts writeback during its passes with
    sync_file_range(2), bound through ctypes: the binding must exist on
    Linux and pass its arguments through (a bad descriptor comes back as
    EBADF, a bad flag as EINVAL), and it writes nothing itself."""
    assert libc.sync_file_range is not None
    ctypes.set_errno(0)
    assert libc.sync_file_range(-1, 0, 0, files._SYNC_FILE_RANGE_WRITE) == -1
    assert ctypes.get_errno() == errno.EBADF
    path = tmp_path / "dirty"
    path.write_bytes(b"x" * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        assert libc.sync_file_range(fd, 0, 0, 1 << 10) == -1
        assert ctypes.get_errno() == errno.EINVAL
        files.start_writeback(fd)
        assert os.pread(fd, 16, MiB - 16) == b"x" * 16
    finally:
        os.close(fd)


def test_in_page_cache_tells_a_cached_page_from_one_on_disk_only(tmp_path, shm):
    """A restore advises readahead of a window only where its pages are
    not in the page cache (files.in_page_cache, one RWF_NOWAIT read): a
    page just written is cached; once the file is synced and its cache
    dropped, it is not, and reading it brings it back.  A tmpfs (on
    kernels up to 6.18 at least) refuses RWF_NOWAIT: None, "cannot say",
    where a restore advises readahead as before, which costs a tmpfs
    nothing.  It reads into the buffer given, nothing else."""
    path = tmp_path / "image"
    path.write_bytes(b"x" * MiB)
    probe = bytearray(PAGE_SIZE)
    last = MiB - PAGE_SIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        assert files.in_page_cache(fd, last, probe) is True
        assert probe == b"x" * PAGE_SIZE
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, MiB, os.POSIX_FADV_DONTNEED)
        if files.in_page_cache(fd, last, probe) is not False:
            pytest.skip(f"{tmp_path} keeps its pages cached after POSIX_FADV_DONTNEED")
        os.pread(fd, PAGE_SIZE, last)
        assert files.in_page_cache(fd, last, probe) is True
    finally:
        os.close(fd)
    memory = shm.path()
    memory.write_bytes(b"y" * MiB)
    fd = os.open(memory, os.O_RDONLY)
    try:
        cached = files.in_page_cache(fd, 0, probe)
        assert cached is None or (cached is True and probe == b"y" * PAGE_SIZE)
    finally:
        os.close(fd)


def test_a_block_mapping_advises_exactly_the_pages_asked(shm):
    """Channels call madvise(2) through ctypes (BlockMapping.advise), which
    lets go of the GIL where mmap.madvise holds it: the binding must reach
    the pages asked, no others (MADV_REMOVE of pages 3-4 of a block with
    data in every page makes exactly those read as zero), and report a
    refusal."""
    block = shm.block("ram0", 8, fill="garbage")
    before = block.array.copy()
    mapped = BlockMapping(block.source, writable=True)
    try:
        mapped.advise(mmap.MADV_REMOVE, 3, 2)
        with pytest.raises(OSError) as refused:
            mapped.advise(-1, 0, 1)
        assert refused.value.errno == errno.EINVAL
    finally:
        mapped.close()
    pages = block.array.reshape(8, PAGE_SIZE)
    assert not pages[3:5].any()
    expected = before.reshape(8, PAGE_SIZE)
    assert np.array_equal(pages[:3], expected[:3]) and np.array_equal(pages[5:], expected[5:])


@pytest.mark.parametrize("first, end", [(0, 1), (0, 8), (3, 5), (5, 19), (7, 64), (8, 16),
                                        (9, 63), (0, 70)])
def test_clear_bits_clears_exactly_the_range(first, end):
    bits = np.ones(72, dtype=bool)
    packed = np.frombuffer(pack_bitmap(bits), dtype=np.uint8).copy()
    clear_bits(packed, first, end)
    bits[first:end] = False
    assert packed.tobytes() == pack_bitmap(bits)


# --- lazy, packed bitmaps ---


def test_packed_bitmap_is_exactly_the_files_bytes(tmp_path):
    raw = bytes(range(1, 17))  # 128 pages' bits, the last word's padding clear
    layout = sparse_image(tmp_path / "vm.img", [("ram0", 128 * PAGE_SIZE)],
                          bitmap_bytes={"ram0": (0, raw)})
    with ps.open_image(tmp_path / "vm.img") as image:
        block = image.blocks["ram0"]
        packed = block.packed_bitmap()
        assert (packed.dtype, packed.tobytes()) == (np.uint8, raw)
        assert block.pages_present == sum(b.bit_count() for b in raw)
        # The slots are holes: no page's bytes are in the file.
        assert not block.data_bitmap().any()
        assert not block.bitmap.any()
    assert layout.blocks[0].bitmap_size == len(raw)


def test_opening_a_terabyte_image_allocates_no_memory_per_page(tmp_path):
    path = tmp_path / "big.img"
    sparse_image(path, [("ram0", 1 << 40)], bitmap_bytes={"ram0": (12345, b"\x0f")})
    tracemalloc.start()
    try:
        with ps.open_image(path) as image:
            described = ps.describe_image(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert described["pages_present"] == 4
    assert described["pages"] == (1 << 40) // PAGE_SIZE
    assert peak < 4 * MiB, peak


def test_8kib_file_claiming_8tib_inspects_in_bounded_memory(capsys, tmp_path):
    """The bomb of issue 15: 2.3 GiB of memory to inspect, 8 KiB on disk."""
    path = tmp_path / "bomb.img"
    layout = sparse_image(path, [("ram0", 8 << 40)])
    assert allocated(path) <= 16 << 10
    assert layout.blocks[0].bitmap_size == 256 * MiB
    tracemalloc.start()
    try:
        status = main(["inspect", str(path), "--json"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = json.loads(capsys.readouterr().out)
    assert (status, out["pages_present"], out["pages_zero"]) == (0, 0, (8 << 40) // PAGE_SIZE)
    assert peak < 4 * MiB, peak


def child_peak_rss(script: str, *args: str) -> int:
    """Run ``script`` in a fresh interpreter; its peak RSS in bytes.  From
    VmHWM, the high-water mark of the process's own memory: ru_maxrss
    would carry over the forking test worker's (kept across exec)."""
    done = subprocess.run([sys.executable, "-c", script + "\nimport re\n"
                           "print(re.search(r'VmHWM:\\s+(\\d+) kB', "
                           "open('/proc/self/status').read())[1])", *args],
                          check=True, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    return int(done.stdout.split()[-1]) * 1024


def test_packed_bitmap_of_a_bitmap_in_a_hole_costs_no_resident_memory(tmp_path):
    path = tmp_path / "bomb.img"
    sparse_image(path, [("ram0", 8 << 40)])
    baseline = child_peak_rss("import parallel_save, sys")
    peak = child_peak_rss("import sys, parallel_save as ps\n"
                          "with ps.open_image(sys.argv[1]) as image:\n"
                          "    packed = image.blocks['ram0'].packed_bitmap()\n"
                          "    assert packed.size == 256 << 20 and not packed[::4096].any()\n",
                          str(path))
    assert peak - baseline < 32 * MiB, (peak, baseline)


def test_72kib_file_of_present_pages_in_a_hole_reads_as_zero_without_writing(tmp_path):
    """The other bomb: every bit set, the pages a hole.  A page whose bytes
    are a hole is read as a clear page: nothing to write."""
    path = tmp_path / "bomb.img"
    sparse_image(path, [("ram0", 2 << 30)], bitmap_fill=0xFF)
    assert allocated(path) <= 128 << 10
    peak = child_peak_rss("import sys, parallel_save as ps\n"
                          "with ps.open_image(sys.argv[1]) as image:\n"
                          "    block = image.blocks['ram0']\n"
                          "    assert block.pages_present == block.pages\n"
                          "    assert not block.data_bitmap().any()\n"
                          "    data = image.read_block('ram0')\n"
                          "    assert data.size == 2 << 30\n"
                          "    assert not data[:4096].any() and not data[1 << 30:][:4096].any()\n",
                          str(path))
    assert peak < 256 * MiB, peak


def test_restore_of_the_72kib_bomb_writes_nothing_and_leaves_sparse_files(capsys, tmp_path):
    path = tmp_path / "bomb.img"
    sparse_image(path, [("ram0", 2 << 30)], bitmap_fill=0xFF)
    out = tmp_path / "out"
    assert main(["restore", str(path), "--outdir", str(out), "--quiet"]) == 0
    restored = out / "ram0"
    assert restored.stat().st_size == 2 << 30
    assert allocated(restored) < MiB
    fd = os.open(restored, os.O_RDONLY)
    try:
        assert list(data_runs(fd, 0, 2 << 30)) == []
    finally:
        os.close(fd)


def test_present_pages_partly_in_holes_read_back_exactly(tmp_path):
    """A real image's pages are data: reading by data runs changes nothing.
    Page 3's second half is a hole: it reads as zero."""
    page = {i: bytes([i + 1]) * PAGE_SIZE for i in (0, 1, 5)}
    page[3] = b"\x09" * (PAGE_SIZE // 2)
    sparse_image(tmp_path / "vm.img", [("ram0", 8 * PAGE_SIZE)],
                 bitmap_bytes={"ram0": (0, bytes([0b00101011]))}, pages={"ram0": page})
    with ps.open_image(tmp_path / "vm.img") as image:
        data = image.read_block("ram0")
        into = np.full(8 * PAGE_SIZE, 0xEE, dtype=np.uint8)
        image.read_block("ram0", out=into)
    expected = np.zeros((8, PAGE_SIZE), dtype=np.uint8)
    for i in (0, 1, 5):
        expected[i] = i + 1
    expected[3, :PAGE_SIZE // 2] = 9
    assert np.array_equal(data, expected.reshape(-1))
    assert np.array_equal(into, expected.reshape(-1))


# --- special files: refused at once, never waited on ---


def special_file(tmp_path: Path, kind: str) -> tuple[str, str]:
    if kind == "fifo":
        path = tmp_path / "pipe.img"
        os.mkfifo(path)
        return str(path), "a FIFO"
    if kind == "directory":
        return str(tmp_path), "a directory"
    if kind == "device":
        return "/dev/null", "a character device"
    path = tmp_path / "sock.img"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()
    return str(path), "a socket"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "socket"])
def test_special_file_is_refused_at_once_naming_it(tmp_path, kind):
    path, what = special_file(tmp_path, kind)
    with pytest.raises(ps.FileError) as caught:
        ps.open_image(path)
    assert str(caught.value) == f"{path}: not a regular file: {what}"
    assert isinstance(caught.value, ps.ParallelSaveError)


def test_missing_image_is_a_parallel_save_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(ps.ImageNotFoundError) as caught:
        ps.open_image(tmp_path / "nope.img")
    assert isinstance(caught.value, ps.ParallelSaveError)
    assert isinstance(caught.value, FileNotFoundError)
    assert (caught.value.errno, str(caught.value)) == (
        errno.ENOENT, f"{tmp_path}/nope.img: no such image file")


def test_open_regular_refuses_a_symlink_only_when_asked(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"x")
    (tmp_path / "link").symlink_to(target)
    os.close(open_regular(tmp_path / "link"))
    with pytest.raises(ps.FileError) as caught:
        open_regular(tmp_path / "link", follow_symlinks=False)
    assert str(caught.value) == (f"{tmp_path}/link: is a symbolic link (refused: it could "
                                 f"point anywhere)")


# --- one file, one descriptor ---


def test_image_reads_the_file_it_validated_even_if_the_path_is_replaced(tmp_path):
    path = tmp_path / "vm.img"
    sparse_image(path, [("ram0", 8 * PAGE_SIZE)], pages={"ram0": {0: b"\x01" * PAGE_SIZE}},
                 bitmap_bytes={"ram0": (0, b"\x01")})
    with ps.open_image(path) as image:
        validated = os.fstat(image.fileno())
        other = tmp_path / "other.img"
        sparse_image(other, [("ram0", 8 * PAGE_SIZE)])
        os.rename(other, path)
        now = os.fstat(image.fileno())
        assert (now.st_dev, now.st_ino) == (validated.st_dev, validated.st_ino)
        assert image.read_block("ram0")[0] == 1
    with pytest.raises(ps.ClosedImageError):
        image.fileno()
    with pytest.raises(ps.ClosedImageError):
        image.blocks["ram0"].packed_bitmap()


def test_image_descriptor_is_close_on_exec_and_blocking(tmp_path):
    sparse_image(tmp_path / "vm.img", [("ram0", PAGE_SIZE)])
    with ps.open_image(tmp_path / "vm.img") as image:
        assert not os.get_inheritable(image.fileno())
        assert os.get_blocking(image.fileno())


def test_cli_commands_on_a_fifo_fail_within_seconds(tmp_path):
    fifo = tmp_path / "pipe.img"
    os.mkfifo(fifo)
    source = tmp_path / "ram0"
    source.write_bytes(bytes(PAGE_SIZE))
    for command in (["inspect", fifo], ["restore", fifo, "--outdir", tmp_path / "out"],
                    ["verify", fifo, "--block", f"ram0={source}"]):
        # The timeout is the proof: before, the open waited for a writer forever.
        done = subprocess.run([sys.executable, "-m", "parallel_save", *map(str, command)],
                              check=False, capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parent.parent)
        assert (done.returncode, done.stdout, done.stderr) == (
            1, "", f"parallel-save: error: {fifo}: not a regular file: a FIFO\n"), command
    assert not (tmp_path / "out").exists()
