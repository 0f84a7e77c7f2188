"""Helpers for the tests that use real QEMU as the peer (test_qemu_interop.py).

Guest RAM here is always a file that both sides map shared: a block made by
the ``shm`` fixture is a file in /dev/shm, QEMU runs on that very file
(memory-backend-file, share=on), so "the guest's RAM" before a save and
after a load is exactly the bytes of a file the test can read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import parallel_save as ps
from bench.qemu import MAPPED_RAM_MIN_VERSION, QemuError, QemuVM, qemu_binary, qemu_version
from parallel_save.format import PAGE_SIZE

REQUIRE_QEMU = "PARALLEL_SAVE_REQUIRE_QEMU"

#: Guest RAM of every VM in these tests: big enough for several 2 MiB chunks
#: per channel and a multifd save that really spreads, small enough that a
#: QEMU save or load takes a fraction of a second.
RAM_SIZE = 32 << 20
RAM_PAGES = RAM_SIZE // PAGE_SIZE

#: Pages that are zero except for one byte, where a zero-page check that
#: samples (QEMU's buffer_is_zero looks at the ends first) or a check that
#: stops early would go wrong; both sides must see them as non-zero.
EDGE_PAGES = {1: 0, 2: PAGE_SIZE // 2, 3: PAGE_SIZE - 1}


def require_mapped_ram_qemu() -> None:
    """Skip unless a QEMU that has mapped-ram (>= 9.0) is on PATH, or fail
    when the environment demands it (CI sets PARALLEL_SAVE_REQUIRE_QEMU=1):
    there, a missing QEMU must not pass as a green run."""
    version = qemu_version()
    if version is not None and version >= MAPPED_RAM_MIN_VERSION:
        return
    needed = ".".join(map(str, MAPPED_RAM_MIN_VERSION[:2]))
    if qemu_binary() is None:
        reason = f"qemu-system-x86_64 not found on PATH (needs >= {needed} for mapped-ram)"
    elif version is None:
        reason = f"cannot tell the version of {qemu_binary()} (needs >= {needed})"
    else:
        found = ".".join(map(str, version))
        reason = f"qemu-system-x86_64 is {found}, mapped-ram needs >= {needed}"
    if os.environ.get(REQUIRE_QEMU) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_QEMU}=1 requires it", pytrace=False)
    pytest.skip(reason)


def qemu_children() -> list[str]:
    """QEMU processes that are children of this process (each test worker
    starts its own), as "pid comm" strings for a failure message."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = stat[stat.rindex(")") + 2:].split()[1]
        if ppid == me and comm.startswith(("qemu-system", "setpriv")):
            found.append(f"{entry} {comm}")
    return found


def plant_edge_pages(array: np.ndarray) -> None:
    """Make the pages of EDGE_PAGES zero but for one byte each."""
    pages = array.reshape(-1, PAGE_SIZE)
    for page, byte in EDGE_PAGES.items():
        pages[page] = 0
        pages[page, byte] = 0x80


def guest_ram(shm: Any, name: str, seed: int, pages: int = RAM_PAGES) -> ps.RamBlock:
    """A block of random pages, about half of them zero, plus the edge pages;
    its file (block.source.path) can be QEMU's memory-backend-file."""
    block = shm.block(name, pages, fill=0.5, seed=seed)
    plant_edge_pages(block.array)
    return block


def nonzero_pages(array: np.ndarray) -> np.ndarray:
    """One bool per page: True where the page holds a non-zero byte."""
    return array.reshape(-1, PAGE_SIZE).any(axis=1)


def zero_file(path: Path, size: int) -> Path:
    """A new all-zero (sparse) file: a destination's fresh RAM, as QEMU's
    load needs it (it skips pages whose bit is clear)."""
    with open(path, "xb") as f:
        f.truncate(size)
    return path


def file_bytes(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def random_bytes(seed: int, size: int, zero_pages: int = 0) -> np.ndarray:
    """``size`` random bytes, never a zero page, but the first ``zero_pages``."""
    data = np.random.default_rng(seed).integers(1, 256, size=size, dtype=np.uint8)
    data[:zero_pages * PAGE_SIZE] = 0
    return data


def load_into_qemu(vm: QemuVM, image: Path, **options: Any) -> dict[str, Any]:
    """QEMU loads ``image``; if it refuses, the test fails with QEMU's own
    words (its stderr tail travels in the QemuError), since a refusal of
    one of our files is explained nowhere else."""
    try:
        return vm.load(image, **options)
    except QemuError as error:
        pytest.fail(f"QEMU refused {image} ({options or 'no options'}):\n{error}",
                    pytrace=False)
