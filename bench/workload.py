"""The workload: one image in shared memory, the files contenders write,
and an equal start for every run.

The image is a file in shared memory, /dev/shm (tmpfs) unless asked
otherwise, so it is RAM that both a parallel-save channel and QEMU's
``memory-backend-file`` can map, and dropping the page cache never evicts
it.  Asked for, it lives in huge pages instead, as production VMs' memory
often does: in a tmpfs mounted with ``huge=always`` (transparent huge
pages) or in a hugetlbfs (:func:`memory_kind`); it is then written through
a mapping, the only way into a hugetlbfs file.  Its layout is one of
:data:`LAYOUTS`:

- ``random``: a chosen fraction of the pages zero (half by default), at
  random places, the rest random bytes: the worst case, runs of about two
  pages, a write call per two pages;
- ``dense``: no zero page at all: one long run per chunk;
- ``guest``: laid out like the RAM of a booted guest: long runs of zero
  pages (memory never touched) between runs of data pages (a lognormal of
  run lengths, drawn from the seed), and data pages that often start with
  zero words (page tables, sparse structures), so the zero check cannot
  stop at the first word.

No data page is zero by chance; the same seed gives the same bytes.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parallel_save.files import free_bytes

PAGE_SIZE = 4096
SHM_DIR = Path("/dev/shm")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

# Pages are generated this many at a time, so building a many-GiB image
# never needs a second image's worth of private memory.
_FILL_PAGES = 16384

LAYOUTS = ("random", "dense", "guest")
# Guest runs, in pages: zero runs are long (untouched memory), data runs
# shorter; both lognormal, median and spread chosen so that about two
# thirds of the pages are zero, as in a freshly booted 1-8 GiB Linux guest.
_GUEST_ZERO_MEDIAN, _GUEST_DATA_MEDIAN, _GUEST_SIGMA = 96, 48, 1.6
_GUEST_MAX_RUN = 1 << 16

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


def shm_bytes_needed(size: int) -> int:
    """The image and one restore destination live in shared memory at the
    same time (the floors read as many bytes as the image has non-zero
    pages from the image's start: no second copy)."""
    return size * 2 + (64 << 20)


@dataclass(frozen=True)
class MemoryKind:
    """The shared memory a directory's files are made of."""

    fstype: str        # tmpfs or hugetlbfs
    mount: str
    page_bytes: int    # a file's size must be a multiple of it
    huge: bool         # huge pages (hugetlbfs, or tmpfs with huge=always/within_size)

    @property
    def text(self) -> str:
        if self.fstype == "hugetlbfs":
            return f"hugetlbfs ({self.page_bytes >> 20} MiB pages) at {self.mount}"
        if self.huge:
            return f"tmpfs with transparent huge pages at {self.mount}"
        return f"tmpfs (4 KiB pages) at {self.mount}"


def mount_of(path: str | os.PathLike) -> dict[str, str]:
    """Device, mount point, type and options of the mount holding ``path``
    (the longest mount point that contains it)."""
    real = os.path.realpath(path)
    best = {"type": "unknown", "device": "unknown", "mount": "/", "options": ""}
    best_length = -1
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            device, mount, fstype, options = line.split()[:4]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > best_length:
                best = {"type": fstype, "device": device, "mount": mount, "options": options}
                best_length = len(mount)
    return best


def memory_kind(directory: Path) -> MemoryKind:
    """What the files in ``directory`` are made of: its mount must be a
    tmpfs or a hugetlbfs, memory that both parallel-save's channels and
    QEMU map shared."""
    found = mount_of(directory)
    if found["type"] not in ("tmpfs", "hugetlbfs"):
        raise BenchError(f"--memory-dir {directory}: a {found['type']}, not shared memory "
                         f"(a tmpfs or a hugetlbfs)")
    if found["type"] == "hugetlbfs":
        return MemoryKind("hugetlbfs", found["mount"], os.statvfs(directory).f_bsize, True)
    huge = any(option in ("huge=always", "huge=within_size")
               for option in found["options"].split(","))
    return MemoryKind("tmpfs", found["mount"], PAGE_SIZE, huge)


def check_room(size: int, directory: Path = SHM_DIR) -> None:
    """Refuse, before minutes of filling, an image this machine cannot hold
    (shared memory is RAM, and the written files fill the page cache too;
    a hugetlbfs holds only as many huge pages as are reserved for it)."""
    needed = shm_bytes_needed(size)
    kind = memory_kind(directory)
    if size % kind.page_bytes:
        raise BenchError(f"a {size_text(size)} image is not a whole number of the "
                         f"{kind.page_bytes >> 10} KiB pages of {kind.text}")
    free = free_bytes(str(directory))
    if kind.fstype == "hugetlbfs":
        if needed > free:
            hint = ("its size= limit" if os.statvfs(directory).f_blocks else
                    f"raise /proc/sys/vm/nr_hugepages by "
                    f"{-(-(needed - free) // kind.page_bytes)}")
            raise BenchError(
                f"a {size_text(size)} image needs {needed / 2**30:.2f} GiB of huge pages "
                f"in {kind.text}; {free / 2**30:.2f} GiB are free ({hint})")
        return
    available = _mem_available()
    if needed > free or needed > available * 0.8:
        raise BenchError(f"a {size_text(size)} image needs {needed / 2**30:.2f} GiB "
                         f"of shared memory; {directory} has {free / 2**30:.2f} GiB free and "
                         f"{available / 2**30:.2f} GiB of memory is available")


@dataclass
class Workload:
    """The image and where everything goes; ``close`` removes all of it."""

    size: int
    zero_fraction: float  # asked for (random); measured, once built
    layout: str
    shm_dir: Path      # image, restore destinations
    workdir: Path      # every file a contender writes
    image: Path
    nonzero_pages: int

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def nonzero_bytes(self) -> int:
        return self.nonzero_pages * PAGE_SIZE

    @property
    def label(self) -> str:
        return f"{self.layout} {size_text(self.size)}"

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
          seed: int = 0, layout: str = "random", memory_dir: Path = SHM_DIR) -> Workload:
    """Create the image in shared memory and the work directory on disk.

    ``workdir`` is the parent of a new directory that is removed by
    :meth:`Workload.close` (default: /var/tmp, on the root disk rather than
    a tmpfs /tmp); ``memory_dir`` (a tmpfs or hugetlbfs) holds a new
    directory for the image and the restore destinations.
    """
    if not 0.0 <= zero_fraction < 1.0:
        raise BenchError(f"the zero fraction must be in [0, 1), not {zero_fraction}")
    if layout not in LAYOUTS:
        raise BenchError(f"unknown workload {layout!r} (one of {', '.join(LAYOUTS)})")
    check_room(size, memory_dir)
    parent = Path(workdir) if workdir is not None else Path("/var/tmp")
    parent.mkdir(parents=True, exist_ok=True)
    shm_dir = memory_dir / f"parallel-save-bench-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    shm_dir.mkdir()
    work = Path(tempfile.mkdtemp(prefix="parallel-save-bench-", dir=parent))
    workload = Workload(size, zero_fraction, layout, shm_dir, work, shm_dir / "image.ram", 0)
    try:
        rng = np.random.default_rng(seed)
        zero = zero_pages(layout, workload.pages, zero_fraction, rng)
        workload.nonzero_pages = _fill(workload, zero, rng, sparse_data=layout == "guest")
        workload.zero_fraction = 1 - workload.nonzero_pages / workload.pages
    except BaseException:
        workload.close()
        raise
    return workload


def zero_pages(layout: str, pages: int, zero_fraction: float,
               rng: np.random.Generator) -> np.ndarray:
    """Which pages of the image are zero (bool per page), for a layout."""
    if layout == "dense":
        return np.zeros(pages, dtype=bool)
    if layout == "random":
        return rng.random(pages) < zero_fraction
    # guest: alternating runs, zero first (low memory is mostly free early on)
    zero = np.zeros(pages, dtype=bool)
    position = 0
    while position < pages:
        zero_runs, data_runs = (
            np.clip(rng.lognormal(np.log(median), _GUEST_SIGMA, 4096), 1, _GUEST_MAX_RUN
                    ).astype(np.int64)
            for median in (_GUEST_ZERO_MEDIAN, _GUEST_DATA_MEDIAN))
        for zero_run, data_run in zip(zero_runs.tolist(), data_runs.tolist()):
            if position >= pages:
                break
            zero[position:position + zero_run] = True
            position += zero_run + data_run
    return zero


def _fill(workload: Workload, zero: np.ndarray, rng: np.random.Generator,
          sparse_data: bool) -> int:
    """Write the image; returns how many pages are non-zero.  With
    ``sparse_data`` a third of the data pages start with 1-3 KiB of zero
    words."""
    words = PAGE_SIZE // 8
    nonzero_pages = 0
    fd = os.open(workload.image, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, workload.size)
        image = mmap.mmap(fd, workload.size, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    with image:
        for first in range(0, workload.pages, _FILL_PAGES):
            count = min(_FILL_PAGES, workload.pages - first)
            pages = rng.integers(0, 2**64, size=(count, words), dtype=np.uint64)
            pages[:, -1] |= 1  # no page is zero by chance
            if sparse_data:
                # 128-383 words (1-3 KiB), never the whole page: a page
                # zeroed here would be counted as data.
                leading = (rng.integers(0, 3, count) == 0) * rng.integers(128, 384, count)
                pages[np.arange(words) < leading[:, None]] = 0
            here = zero[first:first + count]
            pages[here] = 0  # stored all the same: every page of the image is allocated
            image[first * PAGE_SIZE:(first + count) * PAGE_SIZE] = pages.data
            nonzero_pages += count - int(here.sum())
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
