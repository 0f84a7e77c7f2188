"""The workload: one image in shared memory, the files contenders write,
and an equal start for every run.

The image is a /dev/shm file (tmpfs), so it is RAM that both a
parallel-save channel and QEMU's ``memory-backend-file`` can map, and
dropping the page cache never evicts it.  A chosen fraction of its pages is
zero, the rest random bytes (no page zero by chance), at random places.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE_SIZE = 4096
SHM_DIR = Path("/dev/shm")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

# Pages are generated this many at a time, so building a many-GiB image
# never needs a second image's worth of private memory.
_FILL_PAGES = 16384

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class BenchError(Exception):
    """The benchmark cannot run as asked (no room, bad option, a failed tool)."""


def parse_size(text: str) -> int:
    """``"2G"``, ``"256M"``, ``"512MiB"``, ``"1.5G"`` or plain bytes, to bytes
    (binary units: the image is RAM).  Must come out as whole pages."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise BenchError(f"cannot read the size {text!r} (examples: 2G, 256M, 1.5GiB)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0 or size % PAGE_SIZE:
        raise BenchError(f"the size must be a positive multiple of {PAGE_SIZE} bytes, "
                         f"not {size}")
    return size


def size_text(size: int) -> str:
    """``2 GiB``, ``256 MiB``, ``1.5 GiB``: an image size for people."""
    unit, scale = ("GiB", 1 << 30) if size >= 1 << 30 else ("MiB", 1 << 20)
    return f"{size / scale:.4g} {unit}"


def _mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def shm_bytes_needed(size: int, zero_fraction: float) -> int:
    """The image, the dd source (its non-zero bytes) and one restore
    destination live in shared memory at the same time."""
    return int(size * (2 + (1 - zero_fraction))) + (64 << 20)


def check_room(size: int, zero_fraction: float) -> None:
    """Refuse, before minutes of filling, an image this machine cannot hold
    (shared memory is RAM, and the written files fill the page cache too)."""
    needed = shm_bytes_needed(size, zero_fraction)
    stat = os.statvfs(SHM_DIR)
    free = stat.f_bavail * stat.f_frsize
    available = _mem_available()
    if needed > free or needed > available * 0.8:
        raise BenchError(f"a {size_text(size)} image needs {needed / 2**30:.2f} GiB "
                         f"of shared memory; {SHM_DIR} has {free / 2**30:.2f} GiB free and "
                         f"{available / 2**30:.2f} GiB of memory is available")


@dataclass
class Workload:
    """The image and where everything goes; ``close`` removes all of it."""

    size: int
    zero_fraction: float
    shm_dir: Path      # image, dd source, restore destinations
    workdir: Path      # every file a contender writes
    image: Path
    nonzero_source: Path
    nonzero_pages: int

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def nonzero_bytes(self) -> int:
        return self.nonzero_pages * PAGE_SIZE

    def output(self, label: str) -> Path:
        """A path for one run's file, in the work directory, not yet existing."""
        return self.workdir / f"{label}-{uuid.uuid4().hex[:8]}.img"

    def destination(self) -> Path:
        """A new all-zero shared-memory file of the image's size: fresh RAM,
        as QEMU assumes a load starts from."""
        path = self.shm_dir / f"restore-{uuid.uuid4().hex[:8]}.ram"
        with open(path, "wb") as file:
            file.truncate(self.size)
        return path

    def close(self) -> None:
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def build(size: int, zero_fraction: float, workdir: str | os.PathLike | None,
          seed: int = 0) -> Workload:
    """Create the image in shared memory and the work directory on disk.

    ``workdir`` is the parent of a new directory that is removed by
    :meth:`Workload.close` (default: /var/tmp, on the root disk rather than
    a tmpfs /tmp).
    """
    if not 0.0 <= zero_fraction < 1.0:
        raise BenchError(f"the zero fraction must be in [0, 1), not {zero_fraction}")
    check_room(size, zero_fraction)
    parent = Path(workdir) if workdir is not None else Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    shm_dir = SHM_DIR / f"parallel-save-bench-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    shm_dir.mkdir()
    work = Path(tempfile.mkdtemp(prefix="parallel-save-bench-", dir=parent))
    workload = Workload(size, zero_fraction, shm_dir, work, shm_dir / "image.ram",
                        shm_dir / "nonzero.ram", 0)
    try:
        workload.nonzero_pages = _fill(workload, np.random.default_rng(seed))
    except BaseException:
        workload.close()
        raise
    return workload


def _fill(workload: Workload, rng: np.random.Generator) -> int:
    """Write the image and, beside it, its non-zero pages back to back (the
    bytes ``dd`` copies for the ceiling); returns how many pages are non-zero."""
    words = PAGE_SIZE // 8
    nonzero_pages = 0
    with open(workload.image, "wb") as image, open(workload.nonzero_source, "wb") as nonzero:
        for first in range(0, workload.pages, _FILL_PAGES):
            count = min(_FILL_PAGES, workload.pages - first)
            pages = rng.integers(0, 2**64, size=(count, words), dtype=np.uint64)
            pages[:, 0] |= 1  # no page is zero by chance
            zero = rng.random(count) < workload.zero_fraction
            pages[zero] = 0
            image.write(pages.data)
            nonzero.write(pages[~zero].data)
            nonzero_pages += count - int(zero.sum())
    return nonzero_pages


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def settle(drop_caches: bool) -> None:
    """An equal start for the next run: no dirty pages of earlier runs still
    being written back, and (when asked) no file read from the cache."""
    os.sync()
    if drop_caches:
        DROP_CACHES.write_text("3\n")


def remove(path: Path) -> None:
    """Delete a run's file (and the hidden partial a failed save may leave)."""
    path.unlink(missing_ok=True)
    for partial in path.parent.glob(f".{path.name}.*.partial"):
        partial.unlink(missing_ok=True)
