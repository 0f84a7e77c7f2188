"""Real QEMU as the peer, both ways (docs/QEMU.md).

QEMU -> us: a paused QEMU whose RAM is a file we wrote saves it with
mapped-ram; ps.restore and open_image().read_block must give back exactly
that RAM.  Us -> QEMU: parallel-save saves known RAM; a QEMU started with
``-incoming defer`` over a fresh zero file loads it, and that file must then
equal the RAM we saved.  Our files carry no device state and no
switchover-start command: QEMU's load accepting them is part of what is
proved here.

Every test that starts QEMU needs ``qemu-system-x86_64`` >= 9.0: it skips
without one, and fails instead when PARALLEL_SAVE_REQUIRE_QEMU=1 (CI).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from qemu_support import (
    EDGE_PAGES,
    RAM_PAGES,
    RAM_SIZE,
    REQUIRE_QEMU,
    file_bytes,
    guest_ram,
    load_into_qemu,
    nonzero_pages,
    qemu_children,
    random_bytes,
    require_mapped_ram_qemu,
    zero_file,
)

import parallel_save as ps
from bench.qemu import QemuVM
from parallel_save.format import PAGE_SIZE

#: Where a stream starts inside a caller's file: after a 1 MiB header, and
#: at an offset that is not even page aligned.
STREAM_STARTS = [0x100000, 12345]

#: -bios FILE makes QEMU's pc.bios block hold the bytes of FILE, so the test
#: knows a ROM block's content without asking QEMU.
BIOS_SIZE = 128 << 10


@pytest.fixture
def qemu_peer():
    """Gate the test on a mapped-ram QEMU, and check afterwards that every
    QEMU it started was reaped (a leak here would pile up under -n auto)."""
    require_mapped_ram_qemu()
    yield
    left = qemu_children()
    assert not left, f"QEMU processes left behind (not reaped): {left}"


def restore_targets(shm, image) -> list[ps.RamBlock]:
    """One block per block of ``image``, full of garbage, so that a restore
    must write (or zero) every page of it."""
    with ps.open_image(image) as opened:
        return [shm.block(name, block.pages, fill="garbage", seed=index)
                for index, (name, block) in enumerate(opened.blocks.items())]


def read_blocks(image, start: int = 0) -> dict[str, np.ndarray]:
    with ps.open_image(image, start=start) as opened:
        return {name: opened.read_block(name) for name in opened.blocks}


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_peer")
class TestQemuSavesWeRestore:
    """QEMU writes the file; parallel-save reads it."""

    @pytest.mark.parametrize("multifd, direct_io, channels", [
        (0, False, 4), (2, False, 1), (4, False, 3), (4, True, 2),
    ], ids=["no-multifd", "multifd-2", "multifd-4", "multifd-4-direct-io"])
    def test_restore_gives_the_ram_qemu_saved(self, shm, tmp_path, multifd, direct_io,
                                              channels):
        source = guest_ram(shm, "ram0", seed=multifd)
        image = tmp_path / "vm.img"
        with QemuVM(source.source.path, RAM_SIZE) as vm:
            vm.save(image, multifd_channels=multifd, direct_io=direct_io)
        target = shm.block("ram0", RAM_PAGES, fill="garbage")
        ps.restore(image, [target], channels=channels, direct_io=direct_io)
        assert np.array_equal(target.array, source.array)

    @pytest.mark.parametrize("multifd", [0, 2, 4])
    def test_read_block_gives_the_ram_qemu_saved(self, shm, tmp_path, multifd):
        source = guest_ram(shm, "ram0", seed=10 + multifd)
        image = tmp_path / "vm.img"
        with QemuVM(source.source.path, RAM_SIZE) as vm:
            vm.save(image, multifd_channels=multifd)
        assert np.array_equal(read_blocks(image)["ram0"], source.array)

    @pytest.mark.parametrize("multifd", [0, 4])
    def test_qemus_bitmap_is_exactly_the_non_zero_pages(self, shm, tmp_path, multifd):
        """QEMU's zero-page detection and ours agree, down to pages with a
        single non-zero byte at the start, middle or end."""
        source = guest_ram(shm, "ram0", seed=20 + multifd)
        image = tmp_path / "vm.img"
        with QemuVM(source.source.path, RAM_SIZE) as vm:
            counters = vm.save(image, multifd_channels=multifd)["ram"]
        expected = nonzero_pages(source.array)
        assert expected[list(EDGE_PAGES)].all()
        with ps.open_image(image) as opened:
            block = opened.blocks["ram0"]
            assert np.array_equal(block.bitmap, expected)
            assert (block.pages_present, block.pages_zero) == (
                counters["normal"], counters["duplicate"])

    @pytest.mark.parametrize("multifd", [0, 2, 4])
    def test_q35_restore_gives_every_block_qemu_saved(self, shm, tmp_path, multifd):
        """pc.ram is the file QEMU ran on, pc.bios the -bios file; the other
        ROM blocks (ACPI tables, option ROM, ...) are QEMU's own, so they are
        held to what open_image reads from the same file."""
        source = guest_ram(shm, "pc.ram", seed=30 + multifd)
        bios = random_bytes(30 + multifd, BIOS_SIZE, zero_pages=3)
        bios.tofile(tmp_path / "bios.bin")
        image = tmp_path / "vm.img"
        with QemuVM(source.source.path, RAM_SIZE, machine="q35",
                    extra_args=["-bios", str(tmp_path / "bios.bin")]) as vm:
            machine_blocks = vm.ram_blocks()
            vm.save(image, multifd_channels=multifd)
        targets = restore_targets(shm, image)
        ps.restore(image, targets, channels=3)
        restored = {block.name: block.array for block in targets}
        assert list(restored) == list(machine_blocks)
        assert len(restored) == 6
        assert np.array_equal(restored["pc.ram"], source.array)
        assert np.array_equal(restored["pc.bios"], bios)
        for name, data in read_blocks(image).items():
            assert np.array_equal(restored[name], data), f"block {name!r} differs"

    @pytest.mark.parametrize("start", STREAM_STARTS)
    def test_restore_reads_a_stream_at_an_offset(self, shm, tmp_path, start):
        source = guest_ram(shm, "ram0", seed=40)
        header = random_bytes(41, start).tobytes()
        image = tmp_path / "vm.img"
        image.write_bytes(header)
        with QemuVM(source.source.path, RAM_SIZE) as vm:
            vm.save(image, multifd_channels=2, offset=start)
        assert image.read_bytes()[:start] == header
        target = shm.block("ram0", RAM_PAGES, fill="garbage")
        ps.restore(image, [target], channels=2, start=start)
        assert np.array_equal(target.array, source.array)
        assert np.array_equal(read_blocks(image, start=start)["ram0"], source.array)


@pytest.mark.qemu
@pytest.mark.usefixtures("qemu_peer")
class TestWeSaveQemuLoads:
    """parallel-save writes the file; QEMU loads it into fresh zero RAM."""

    @pytest.mark.parametrize("channels, qemu_multifd", [(1, 0), (3, 4), (8, 2)])
    def test_qemu_loads_a_save(self, shm, tmp_path, channels, qemu_multifd):
        source = guest_ram(shm, "ram0", seed=channels)
        loaded = zero_file(shm.path(), RAM_SIZE)
        image = tmp_path / "vm.img"
        with QemuVM(loaded, RAM_SIZE, incoming=True) as vm:
            ps.save(image, [source], channels=channels, machine=vm.machine_type())
            load_into_qemu(vm, image, multifd_channels=qemu_multifd)
        assert np.array_equal(file_bytes(loaded), source.array)

    def test_qemu_loads_a_direct_io_save(self, shm, tmp_path):
        """O_DIRECT on both sides: our channels write, QEMU's read."""
        source = guest_ram(shm, "ram0", seed=50)
        loaded = zero_file(shm.path(), RAM_SIZE)
        image = tmp_path / "vm.img"
        with QemuVM(loaded, RAM_SIZE, incoming=True) as vm:
            ps.save(image, [source], channels=4, direct_io=True, machine=vm.machine_type())
            load_into_qemu(vm, image, multifd_channels=4, direct_io=True)
        assert np.array_equal(file_bytes(loaded), source.array)

    def test_qemu_loads_the_last_pass_of_an_iterated_save(self, shm, tmp_path):
        """Between passes, pages turn zero (their slots keep the old bytes,
        only their bits clear) and zero pages get content; QEMU must load
        the memory as it was at the last pass."""
        source = guest_ram(shm, "ram0", seed=60)
        pages = source.array.reshape(-1, PAGE_SIZE)
        rng = np.random.default_rng(60)
        first = nonzero_pages(source.array)
        loaded = zero_file(shm.path(), RAM_SIZE)
        image = tmp_path / "vm.img"
        with QemuVM(loaded, RAM_SIZE, incoming=True) as vm:
            with ps.Saver(image, [source], channels=3, machine=vm.machine_type()) as saver:
                saver.setup()
                saver.iterate()
                for last in (False, False, True):
                    dirty = rng.random(RAM_PAGES) < 0.25
                    zeroed = dirty & (rng.random(RAM_PAGES) < 0.5)
                    filled = dirty & ~zeroed
                    pages[zeroed] = 0
                    pages[filled] = rng.integers(0, 256, (int(filled.sum()), PAGE_SIZE),
                                                 dtype=np.uint8)
                    pages[filled, 0] |= 1
                    step = saver.complete if last else saver.iterate
                    step(dirty={"ram0": dirty})
            assert (~first & nonzero_pages(source.array)).any(), "no page turned non-zero"
            with ps.open_image(image) as opened:
                block = opened.blocks["ram0"]
                slots = np.fromfile(image, dtype=np.uint8, count=RAM_SIZE,
                                    offset=block.layout.pages_offset)
                stale = ~block.bitmap & nonzero_pages(slots)
            assert stale.any(), "no page turned zero after it was written"
            load_into_qemu(vm, image)
        assert np.array_equal(file_bytes(loaded), source.array)

    def test_qemu_loads_a_q35_stream_of_pc_ram_only(self, shm, tmp_path):
        """The five ROM blocks QEMU itself would save may be left out: QEMU
        loads the stream (but then its pc.bios and pc.rom stay empty, as an
        incoming QEMU expects them from the stream)."""
        source = guest_ram(shm, "pc.ram", seed=70)
        loaded = zero_file(shm.path(), RAM_SIZE)
        image = tmp_path / "vm.img"
        with QemuVM(loaded, RAM_SIZE, machine="q35", incoming=True) as vm:
            ps.save(image, [source], channels=2, machine=vm.machine_type())
            load_into_qemu(vm, image)
        assert np.array_equal(file_bytes(loaded), source.array)

    def test_qemu_takes_every_block_of_a_q35_stream(self, shm, tmp_path):
        """A stream with all six blocks of the machine: QEMU's ROM blocks then
        hold our bytes, as a save of the loaded VM shows.  The ROM blocks
        here have no zero page: QEMU writes no page whose bit is clear, and
        an incoming q35 builds its ACPI tables before the load, so a page
        the stream says is zero would keep QEMU's bytes there."""
        loaded = zero_file(shm.path(), RAM_SIZE)
        image, again = tmp_path / "vm.img", tmp_path / "again.img"
        with QemuVM(loaded, RAM_SIZE, machine="q35", incoming=True) as vm:
            blocks = [guest_ram(shm, name, seed=80) if name == "pc.ram"
                      else shm.block(name, length // PAGE_SIZE, fill="garbage", seed=81 + index)
                      for index, (name, length) in enumerate(vm.ram_blocks().items())]
            assert len(blocks) == 6
            ps.save(image, blocks, channels=3, machine=vm.machine_type())
            load_into_qemu(vm, image)
            vm.save(again)
        assert np.array_equal(file_bytes(loaded), blocks[0].array)
        resaved = read_blocks(again)
        for block in blocks:
            assert np.array_equal(resaved[block.name], block.array), \
                f"QEMU's block {block.name!r} differs from the stream's"

    @pytest.mark.parametrize("start", STREAM_STARTS)
    def test_qemu_loads_a_stream_at_an_offset(self, shm, tmp_path, start):
        """The caller's bytes before the stream stay as they were."""
        source = guest_ram(shm, "ram0", seed=90)
        header = random_bytes(91, start).tobytes()
        image = tmp_path / "vm.img"
        image.write_bytes(header)
        loaded = zero_file(shm.path(), RAM_SIZE)
        with QemuVM(loaded, RAM_SIZE, incoming=True) as vm:
            with ps.Saver(image, [source], channels=3, machine=vm.machine_type(),
                          start=start) as saver:
                saver.setup()
                saver.complete()
            assert image.read_bytes()[:start] == header
            load_into_qemu(vm, image, multifd_channels=2, offset=start)
        assert np.array_equal(file_bytes(loaded), source.array)

    @pytest.mark.parametrize("machine, block", [("none", "ram0"), ("q35", "pc.ram")])
    def test_qemu_loads_what_the_command_line_saves(self, shm, tmp_path, machine, block):
        """``--machine q35`` must name the machine type this QEMU demands."""
        source = guest_ram(shm, block, seed=100)
        loaded = zero_file(shm.path(), RAM_SIZE)
        image = tmp_path / "vm.img"
        saved = subprocess.run(
            [sys.executable, "-m", "parallel_save", "save", str(image),
             "--block", f"{block}={source.source.path}", "--machine", machine],
            capture_output=True, text=True, timeout=120, check=False)
        assert saved.returncode == 0, f"parallel-save save failed:\n{saved.stderr}"
        with QemuVM(loaded, RAM_SIZE, machine=machine, incoming=True) as vm:
            load_into_qemu(vm, image)
        assert np.array_equal(file_bytes(loaded), source.array)

    def test_a_refused_load_fails_with_qemus_reason(self, shm, tmp_path):
        """The failure message of a load QEMU refuses carries QEMU's stderr:
        here, a block this machine does not have."""
        blocks = [guest_ram(shm, "ram0", seed=110), shm.block("no-such-block", 16, fill=0.5)]
        loaded = zero_file(shm.path(), RAM_SIZE)
        image = tmp_path / "vm.img"
        with QemuVM(loaded, RAM_SIZE, incoming=True) as vm:
            ps.save(image, blocks, channels=2, machine=vm.machine_type())
            with pytest.raises(pytest.fail.Exception) as refused:
                load_into_qemu(vm, image)
        assert 'Unknown ramblock "no-such-block", cannot accept migration' in str(
            refused.value)


def test_without_qemu_the_interop_tests_skip(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE_QEMU, raising=False)
    with pytest.raises(pytest.skip.Exception, match="qemu-system-x86_64 not found on PATH"):
        require_mapped_ram_qemu()


def test_without_qemu_the_interop_tests_fail_where_required(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(REQUIRE_QEMU, "1")
    with pytest.raises(pytest.fail.Exception,
                       match="not found on PATH.*PARALLEL_SAVE_REQUIRE_QEMU=1 requires it"):
        require_mapped_ram_qemu()
