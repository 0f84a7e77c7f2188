"""A real Linux guest for the peer tests (test_real_guest.py, test_libvirt.py).

The guest is Debian's kernel (package linux-image-amd64, in /boot) with an
initramfs built here from busybox-static: its /init fills part of the RAM
with a known pattern (files in a tmpfs) and then prints a counter to the
serial port, rewriting a pattern file on every tick, forever.  A guest that
"keeps running" after a save and a load is one whose counter goes on from
where it was.  .ci/install-peers installs both packages.

QEMU runs it with TCG: the /dev/kvm of some hosts (kvm-pvm) does not boot a
stock kernel, and TCG boots this one in seconds.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import time
from pathlib import Path

import pytest

#: Set by .ci/run: a missing kernel, busybox or libvirt fails the peer
#: tests instead of skipping them.
REQUIRE_PEERS = "PARALLEL_SAVE_REQUIRE_PEERS"

#: Guest RAM: the kernel and busybox need about 40 MiB; the workload fills
#: PATTERN_FILES MiB more with its pattern (2^15 lines per file).
GUEST_RAM = 128 << 20
PATTERN_FILES = 16
#: The line the pattern files are made of, with the file number; counted in
#: the saved RAM to prove the workload's memory is in it.
PATTERN = "parallel-save guest pattern {}\n"
READY = "workload ready"
TICK = re.compile(rb"tick (\d+)\r?\n")
KERNEL_ARGS = "console=ttyS0 panic=-1 quiet rdinit=/init"

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=64m tmpfs /mnt
# fill N: /mnt/patternN becomes 2^15 pattern lines (about 1 MiB), written
# by doubling a file: a few large writes, not one per line (TCG is slow).
fill() {{
    echo "{PATTERN.format("$1").rstrip()}" > /mnt/part
    k=0
    while [ $k -lt 15 ]; do
        cat /mnt/part /mnt/part > /mnt/double
        mv /mnt/double /mnt/part
        k=$((k + 1))
    done
    mv /mnt/part /mnt/pattern$1
}}
i=0
while [ $i -lt {PATTERN_FILES} ]; do
    fill $i
    i=$((i + 1))
done
echo "{READY} after $(cut -d" " -f1 /proc/uptime) s of uptime"
n=0
while true; do
    n=$((n + 1))
    fill $((n % {PATTERN_FILES}))
    echo "tick $n"
    sleep 0.2
done
"""


def peer_missing(reason: str) -> None:
    """Skip, or fail where the peers must be there (CI)."""
    if os.environ.get(REQUIRE_PEERS) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_PEERS}=1 requires it", pytrace=False)
    pytest.skip(reason)


def guest_kernel() -> Path:
    """The newest Debian kernel in /boot (PARALLEL_SAVE_GUEST_KERNEL overrides)."""
    chosen = os.environ.get("PARALLEL_SAVE_GUEST_KERNEL")
    if chosen:
        return Path(chosen)
    kernels = sorted(glob.glob("/boot/vmlinuz-*"), key=os.path.getmtime)
    readable = [k for k in kernels if os.access(k, os.R_OK)]
    if not readable:
        peer_missing("no readable kernel in /boot (install linux-image-amd64: "
                     ".ci/install-peers)")
    return Path(readable[-1])


def static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.is_file() and _is_static(path):
            return path
    found = shutil.which("busybox")
    if found and _is_static(Path(found)):
        return Path(found)
    peer_missing("no statically linked busybox (install busybox-static: .ci/install-peers)")
    raise AssertionError  # not reached


def _is_static(path: Path) -> bool:
    """An ELF with no PT_INTERP program header runs with no loader: static."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize, phnum = (int.from_bytes(data[54 + 2 * i:56 + 2 * i], "little")
                        for i in range(2))
    return all(int.from_bytes(data[phoff + i * phentsize:][:4], "little") != 3
               for i in range(phnum))


def _newc(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
          ino: int = 0) -> bytes:
    """One entry of a "newc" cpio archive, the kernel's initramfs format."""
    raw = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0]
    header = b"070701" + b"".join(f"{v:08x}".encode() for v in fields)
    entry = header + raw
    entry += bytes(-len(entry) % 4) + data
    return entry + bytes(-len(entry) % 4)


def build_initramfs(path: Path) -> Path:
    """The guest's initramfs: busybox, /init, and /dev/console (the kernel
    opens it for init's stdio, and devtmpfs is not mounted in an initramfs)."""
    entries = [("dev", 0o40755), ("bin", 0o40755), ("proc", 0o40755), ("sys", 0o40755),
               ("mnt", 0o40755)]
    archive = b"".join(_newc(name, mode, ino=i + 1) for i, (name, mode) in enumerate(entries))
    archive += _newc("dev/console", 0o20600, rdev=(5, 1), ino=10)
    archive += _newc("bin/busybox", 0o100755, static_busybox().read_bytes(), ino=11)
    archive += _newc("init", 0o100755, INIT.encode(), ino=12)
    archive += _newc("TRAILER!!!", 0)
    path.write_bytes(archive + bytes(-len(archive) % 512))
    return path


def ticks(serial: Path) -> list[int]:
    """The counter values the guest printed so far."""
    try:
        return [int(n) for n in TICK.findall(serial.read_bytes())]
    except FileNotFoundError:
        return []


def wait_for_ticks(serial: Path, above: int, *, timeout: float, alive=lambda: True) -> int:
    """Wait until the guest printed a tick greater than ``above``; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = ticks(serial)
        if seen and seen[-1] > above:
            return seen[-1]
        if not alive():
            break
        time.sleep(0.1)
    tail = serial.read_bytes()[-2000:].decode(errors="replace") if serial.exists() else ""
    raise AssertionError(f"the guest printed no tick above {above} within {timeout} s; "
                         f"its serial output ends with:\n{tail}")


def pattern_lines(ram: bytes) -> int:
    """How many whole pattern lines the RAM holds (a file has 2^15, a few
    of them split where the tmpfs pages are not contiguous)."""
    return sum(ram.count(PATTERN.format(i).encode()) for i in range(PATTERN_FILES))
