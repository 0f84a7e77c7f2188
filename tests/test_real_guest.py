"""A real Linux guest, migrated by QEMU, read by parallel-save.

Debian's kernel boots a busybox initramfs (guest_support.py) under QEMU
with TCG; its RAM is a memory-backend-file shared with the test, so "the
guest's RAM" is the bytes of a file.  The guest fills memory with a pattern
and prints a counter to the serial port.  Then:

- QEMU migrates the paused guest to a mapped-ram file (single channel, and
  multifd); parallel-save's restore of that file equals the guest's RAM at
  the moment of migration, byte for byte, and holds the workload's pattern;
- a new QEMU loads the same file (its RAM then equals our restore) and the
  guest keeps running: the counter goes on from where it stopped.

Slow (two boots under TCG), so marked ``peer``; it runs in CI, where
.ci/install-peers installs the kernel and busybox.
"""

from __future__ import annotations

import numpy as np
import pytest
from guest_support import (
    GUEST_RAM,
    KERNEL_ARGS,
    PATTERN_FILES,
    READY,
    build_initramfs,
    guest_kernel,
    pattern_lines,
    ticks,
    wait_for_ticks,
)
from qemu_support import QemuVM, qemu_children, require_mapped_ram_qemu

import parallel_save as ps
from parallel_save.format import PAGE_SIZE

pytestmark = [pytest.mark.peer, pytest.mark.qemu]

#: TCG boots the kernel in a few seconds alone; the CI machine is shared.
BOOT_TIMEOUT = 120


def guest_args(kernel, initramfs, serial) -> list[str]:
    return ["-accel", "tcg", "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append", KERNEL_ARGS, "-serial", f"file:{serial}", "-no-reboot"]


@pytest.fixture
def guest_files(tmp_path):
    require_mapped_ram_qemu()
    kernel = guest_kernel()
    initramfs = build_initramfs(tmp_path / "initramfs.cpio")
    yield kernel, initramfs
    left = qemu_children()
    assert not left, f"QEMU processes left behind (not reaped): {left}"


@pytest.mark.parametrize("multifd", [0, 2], ids=["plain", "multifd2"])
def test_qemu_migration_of_a_running_guest_restores_exactly_and_resumes(
        shm, tmp_path, guest_files, multifd):
    kernel, initramfs = guest_files
    ram_path, image = shm.path(), tmp_path / "guest.mig"
    serial = tmp_path / "serial-source.txt"
    with open(ram_path, "wb") as f:
        f.truncate(GUEST_RAM)
    ram_path.chmod(0o600)

    with QemuVM(ram_path, GUEST_RAM, machine="q35",
                extra_args=guest_args(kernel, initramfs, serial)) as source:
        source.qmp.execute("cont")
        alive = lambda: source.proc.poll() is None
        wait_for_ticks(serial, 2, timeout=BOOT_TIMEOUT, alive=alive)
        source.qmp.execute("stop")
        assert READY.encode() in serial.read_bytes()
        last_tick = ticks(serial)[-1]
        # Paused: nothing writes the RAM any more, so this is what QEMU saves.
        guest_ram = ram_path.read_bytes()
        blocks = source.ram_blocks()
        source.save(image, multifd_channels=multifd)

    with ps.open_image(image) as opened:
        assert opened.info.device_sections and opened.blocks.keys() == blocks.keys()
        assert {n: b.length for n, b in opened.blocks.items()} == blocks
    targets = [shm.block(name, length // PAGE_SIZE, fill="garbage")
               for name, length in blocks.items()]
    ps.restore(image, targets, channels=2)
    restored = {b.name: b.array for b in targets}
    assert np.array_equal(restored["pc.ram"], np.frombuffer(guest_ram, np.uint8))
    # The workload's memory is in it: all pattern files but the one the
    # guest may have been rewriting when it was paused.
    assert pattern_lines(guest_ram) > (PATTERN_FILES - 1) * 30000

    loaded_ram, resumed = shm.path(), tmp_path / "serial-destination.txt"
    with open(loaded_ram, "wb") as f:
        f.truncate(GUEST_RAM)
    with QemuVM(loaded_ram, GUEST_RAM, machine="q35", incoming=True,
                extra_args=guest_args(kernel, initramfs, resumed)) as destination:
        destination.load(image, multifd_channels=multifd)
        assert np.array_equal(np.fromfile(loaded_ram, np.uint8), restored["pc.ram"])
        destination.qmp.execute("cont")
        alive = lambda: destination.proc.poll() is None
        went_on = wait_for_ticks(resumed, last_tick + 2, timeout=60, alive=alive)
        # It resumed, it did not reboot: no second boot, the count goes on.
        assert READY.encode() not in resumed.read_bytes()
        assert ticks(resumed)[0] == last_tick + 1 and went_on > last_tick + 2
