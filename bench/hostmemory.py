"""Memory the host takes back: free page reporting, and ``--steady-memory``.

A virtual machine whose balloon device reports free pages (virtio_balloon's
free page reporting: the project's own machines do) hands every block of
free memory of at least 2^order pages back to its host about two seconds
after it was freed.  The guest keeps the page; the host drops what backed
it, and the next first touch of that page traps to the host, which finds
and zeroes a new one.  Measured here: 6.6 us per 4 KiB page the first time
(18 GiB in 27 s), 2.0-2.3 us once backed (the guest's own fault and
zeroing).

Whatever allocates memory pays that: the page cache a save writes into,
QEMU's RAM on a load, a restore's destination.  How much a contender pays
depends on what ran before it: memory freed a moment ago is still backed,
memory freed seconds ago is not.  A dense 1 GiB save that takes 0.37-0.42 s
right after another took 1.0-1.3 s after 8 s of quiet.  That is a property
of the machine, not of the software, and it swamps the differences a
benchmark looks for, so ``--steady-memory`` (root) stops the reporting for
the run, by raising its order above the largest block the kernel has, and
touches the free memory once, so that every contender finds it backed.
The order is put back afterwards; memory freed from then on is reported
again.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any, Self

import numpy as np

from .workload import BenchError

REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
BUDDY_INFO = Path("/proc/buddyinfo")
MEMINFO = Path("/proc/meminfo")
PAGE_SIZE = mmap.PAGESIZE
# Free memory left untouched by the touch, for everything else running.
RESERVE = 1 << 30


def largest_order(buddy_info: Path = BUDDY_INFO) -> int:
    """The largest order of a free block the kernel keeps: /proc/buddyinfo
    has a column per order, after "Node N, zone NAME"."""
    line = buddy_info.read_text(encoding="ascii").splitlines()[0]
    return len(line.split()) - 4 - 1


def reporting_state(parameter: Path = REPORTING_ORDER,
                    buddy_info: Path = BUDDY_INFO) -> dict[str, Any]:
    """Whether this machine reports free memory to a host, and from which
    order (for the JSON record): ``active`` when the order is one the
    kernel's free blocks can reach."""
    try:
        order = int(parameter.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return {"order": None, "active": False}
    return {"order": order, "active": order <= largest_order(buddy_info)}


def free_bytes(meminfo: Path = MEMINFO) -> int:
    for line in meminfo.read_text(encoding="ascii").splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"{meminfo}: no MemFree line")


def touch(size: int) -> float:
    """Touch ``size`` bytes of new anonymous memory, a byte per page, all
    held at once (memory given back and taken again would be the same
    pages); returns the seconds per page."""
    pages = size // PAGE_SIZE
    if pages <= 0:
        return 0.0
    memory = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = np.frombuffer(memory, dtype=np.uint8)
        started = time.perf_counter()
        view[::PAGE_SIZE] = 1
        seconds = time.perf_counter() - started
        del view
    finally:
        memory.close()
    return seconds / pages


class SteadyMemory:
    """For the ``with`` block, no free page is handed to the host, and the
    free memory (less ``reserve``) has been touched once: no contender
    meets a page its host took back.  ``first_touch`` and ``second_touch``
    are the seconds per page the touch took, and the same again at once
    (backed) on a sample: the cost the machine would otherwise have spread
    over the runs."""

    def __init__(self, parameter: Path = REPORTING_ORDER, buddy_info: Path = BUDDY_INFO,
                 reserve: int = RESERVE, size: int | None = None) -> None:
        self.parameter = parameter
        self.buddy_info = buddy_info
        self.reserve = reserve
        self.size = size  # None: the free memory less the reserve
        self.saved: str | None = None
        self.first_touch = self.second_touch = 0.0
        self.touched = 0

    def __enter__(self) -> Self:
        if not os.access(self.parameter, os.W_OK):
            raise BenchError(f"--steady-memory: {self.parameter} is not writable (run as root "
                             "on a machine with free page reporting, or leave the option out)")
        self.saved = self.parameter.read_text(encoding="ascii").strip()
        above = str(largest_order(self.buddy_info) + 1)
        try:
            self.parameter.write_text(above + "\n", encoding="ascii")
        except OSError as error:
            raise BenchError(f"--steady-memory: cannot set {self.parameter} to {above}: "
                             f"{error.strerror}") from None
        try:
            self.touched = (self.size if self.size is not None
                            else max(0, free_bytes() - self.reserve))
            self.first_touch = touch(self.touched)
            self.second_touch = touch(min(self.touched, 256 << 20))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.saved is not None:
            self.parameter.write_text(self.saved + "\n", encoding="ascii")
            self.saved = None

    def record(self) -> dict[str, Any]:
        return {"touched_bytes": self.touched,
                "first_touch_us_per_page": round(self.first_touch * 1e6, 3),
                "second_touch_us_per_page": round(self.second_touch * 1e6, 3)}
