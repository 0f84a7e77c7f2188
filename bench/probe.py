"""One timed operation in a fresh process: a parallel-save save, restore or
incremental passes, or one of the floors they are held to:

- ``write_floor``: one process pwriting exactly the runs of the image's
  non-zero pages at their offsets in a new file, from a mapping already
  populated (as a VM's memory is), nothing else: no zero check, no
  bitmap, no header (runs found before the clock starts), each run in
  pieces of at most 2 MiB, the largest write of a one-pass save (ext4
  gives a buffered write folios as large as the write; an image written
  as one 1 GiB run waited for large folios: the "floor" ran slower than a
  save);
- ``read_floor``: the same runs pread from the restore source into a
  fresh all-zero shared-memory destination, by one thread, or by one per
  CPU, each its share of the pages;
- ``allocation_floor``: a process per CPU storing a zero into its share of
  the restore source's present pages of a fresh shared-memory destination:
  what any restore pays to have those pages at all, before a byte is
  copied (a page of shared memory is allocated and zeroed on its first
  write);
- ``memcpy``: a plain copy of as many bytes as the image has non-zero
  pages (from its start) into populated memory, the memory floor of
  anything that copies them once.

    python -m bench.probe '{"op": "save", "image": ..., "out": ..., ...}'

A fresh process per run, like the fresh QEMU each of its runs needs: no run
inherits another's warm state, and the process tree whose memory is
sampled holds nothing but the operation (the benchmark's own bookkeeping
would otherwise count as coordinator memory, and be copied into every
forked channel).  The clock starts after the imports; the result is one
JSON line on stdout.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import parallel_save as ps

BLOCK = "ram0"  # QEMU's name for the RAM of "-M none" with backend id ram0
PAGE_SIZE = 4096
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23
# The floors' first page goes 1 MiB into their file, where an image's
# pages region of a first block starts (1 MiB aligned, after the header):
# the same alignment, so the same folios.
_FLOOR_BASE = 1 << 20
# The one-writer floor's largest write: 2 MiB (see write_floor above).
_FLOOR_PIECE_PAGES = 512
# The memory floor's target: far larger than any cache.
_COPY_BUFFER = 512 << 20


def _import_now() -> None:
    """parallel-save imports its saver and restorer lazily: resolve them
    before any clock starts (a fresh process per run pays it every time)."""
    for name in ("save", "restore", "Saver", "open_image"):
        getattr(ps, name)


def _image_block(spec: dict[str, Any]) -> ps.RamBlock:
    return ps.RamBlock.from_file(BLOCK, spec["image"], length=spec["size"], writable=False)


def save(spec: dict[str, Any]) -> dict[str, Any]:
    block = _image_block(spec)
    started = time.perf_counter()
    stats = ps.save(spec["out"], [block], spec["channels"], direct_io=spec["direct_io"],
                    sync=spec["sync"])
    seconds = time.perf_counter() - started
    ps.wait_channels()  # their exits done before the next contender starts
    return {"seconds": seconds, "phases": stats.phases,
            "pages_written": stats.pages_written, "zero_pages": stats.zero_pages,
            "bytes_written": stats.bytes_written,
            "write_calls": sum(c.write_calls for c in stats.channel_stats),
            "control_bytes": stats.control_bytes}


def passes(spec: dict[str, Any]) -> dict[str, Any]:
    """A first pass over every page, then one pass per dirty fraction, each
    over random pages (the memory itself is unchanged: what is timed is
    finding and rewriting the dirty pages)."""
    block = _image_block(spec)
    rng = np.random.default_rng(spec["seed"])
    timed = {}
    with ps.Saver(spec["out"], [block], spec["channels"], direct_io=spec["direct_io"],
                  sync=spec["sync"]) as saver:
        started = time.perf_counter()
        saver.setup()
        saver.iterate()
        first = time.perf_counter() - started
        for fraction in spec["fractions"]:
            dirty = rng.random(block.pages) < fraction
            started = time.perf_counter()
            saver.iterate(dirty={BLOCK: dirty})
            timed[str(fraction)] = time.perf_counter() - started
    return {"first_pass": first, "passes": timed}


def restore(spec: dict[str, Any]) -> dict[str, Any]:
    """Into a fresh, all-zero destination, so ``assume_zero`` (QEMU's own
    assumption on load) holds."""
    target = ps.RamBlock.from_file(BLOCK, spec["destination"], length=spec["size"])
    started = time.perf_counter()
    stats = ps.restore(spec["source"], [target], spec["channels"],
                       direct_io=spec["direct_io"], assume_zero=True)
    seconds = time.perf_counter() - started
    ps.wait_channels()
    return {"seconds": seconds, "pages_read": stats.pages_read,
            "pages_zeroed": stats.pages_zeroed, "control_bytes": stats.control_bytes}


def tofile(spec: dict[str, Any]) -> dict[str, Any]:
    image = np.memmap(spec["image"], dtype=np.uint8, mode="r", shape=(spec["size"],))
    started = time.perf_counter()
    image.tofile(spec["out"])
    return {"seconds": time.perf_counter() - started}


def _nonzero_runs(image: np.ndarray) -> tuple[list[int], list[int]]:
    """Runs of non-zero pages of an image mapped as uint64 rows, a page a row."""
    step = 8192
    nonzero = np.concatenate([image[i:i + step].max(axis=1) != 0
                              for i in range(0, image.shape[0], step)])
    edges = np.diff(np.concatenate(([0], nonzero.view(np.int8), [0])))
    return np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()


def _map(path: str, size: int, write: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED,
                         mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))
    finally:
        os.close(fd)


def write_floor(spec: dict[str, Any]) -> dict[str, Any]:
    mapping = _map(spec["image"], spec["size"], write=False)
    runs = _nonzero_runs(np.frombuffer(mapping, np.uint64).reshape(-1, 512))
    starts = [piece for start, end in zip(*runs)
              for piece in range(start, end, _FLOOR_PIECE_PAGES)]
    ends = [min(piece + _FLOOR_PIECE_PAGES, end) for start, end in zip(*runs)
            for piece in range(start, end, _FLOOR_PIECE_PAGES)]
    mapping.madvise(_MADV_POPULATE_READ, 0, spec["size"])
    view = memoryview(mapping)
    fd = os.open(os.path.dirname(spec["out"]), os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        started = time.perf_counter()
        for start, end in zip(starts, ends):
            low, high = start * PAGE_SIZE, end * PAGE_SIZE
            done = os.pwrite(fd, view[low:high], _FLOOR_BASE + low)
            if done != high - low:
                raise OSError(f"short write at {low}")
        if spec["sync"]:
            os.fdatasync(fd)
        seconds = time.perf_counter() - started
    finally:
        os.close(fd)
    return {"seconds": seconds, "write_calls": len(starts),
            "bytes_written": sum(ends) * PAGE_SIZE - sum(starts) * PAGE_SIZE}


def _present_runs(source: str) -> tuple[int, list[int], list[int]]:
    """The restore source's pages offset and its runs of present pages."""
    with ps.open_image(source) as image:
        info = image.blocks[BLOCK]
        offset = info.layout.pages_offset
        edges = np.diff(np.concatenate(([0], info.bitmap.view(np.int8), [0])))
    return (offset, np.flatnonzero(edges == 1).tolist(),
            np.flatnonzero(edges == -1).tolist())


def _shares(starts: list[int], ends: list[int], count: int) -> list[list[tuple[int, int]]]:
    """The runs [start, end) cut into ``count`` shares of as near equal
    pages as whole pages allow, in order: a run is cut only where a share
    ends."""
    total = sum(ends) - sum(starts)
    shares: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    done = 0
    for start, end in zip(starts, ends):
        while start < end:
            share = done * count // total  # the share of page number ``done``
            share_end = -(-(share + 1) * total // count)
            take = min(end - start, share_end - done)
            shares[share].append((start, start + take))
            start, done = start + take, done + take
    return shares


def _takes_sendfile(destination: str, source_fd: int, offset: int, first: int) -> bool:
    """Whether the destination's file system takes sendfile (a tmpfs does,
    a hugetlbfs does not): tried with the present page ``first``, sent to
    its own place, which the floor then reads over with the same bytes."""
    fd = os.open(destination, os.O_WRONLY)
    try:
        os.lseek(fd, first * PAGE_SIZE, os.SEEK_SET)
        os.sendfile(fd, source_fd, offset + first * PAGE_SIZE, PAGE_SIZE)
        return True
    except OSError as error:
        if error.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            return False
        raise
    finally:
        os.close(fd)


def read_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """``readers`` threads (1 unless given), each preading its share of
    the runs; with more than one, also whether the destination took
    sendfile: where it does not, nothing can fill it faster than preads
    into a mapping, and this floor bounds every restore into it."""
    offset, starts, ends = _present_runs(spec["source"])
    readers = spec.get("readers", 1)
    shares = _shares(starts, ends, readers) if starts else [[]]
    mapping = _map(spec["destination"], spec["size"], write=True)
    view = memoryview(mapping)
    fd = os.open(spec["source"], os.O_RDONLY)
    found: dict[str, Any] = {"pages_read": sum(ends) - sum(starts), "readers": readers}

    def read(share: list[tuple[int, int]]) -> None:
        for start, end in share:
            low, high = start * PAGE_SIZE, end * PAGE_SIZE
            if os.preadv(fd, [view[low:high]], offset + low) != high - low:
                raise OSError(f"short read at {offset + low}")

    try:
        if readers > 1 and starts:
            found["takes_sendfile"] = _takes_sendfile(spec["destination"], fd, offset,
                                                      starts[0])
        started = time.perf_counter()
        if readers == 1:
            read(shares[0])
        else:
            with ThreadPoolExecutor(readers) as pool:
                list(pool.map(read, shares))
        found["seconds"] = time.perf_counter() - started
    finally:
        os.close(fd)
        view.release()
        mapping.close()
    return found


def allocation_floor(spec: dict[str, Any]) -> dict[str, Any]:
    _, starts, ends = _present_runs(spec["source"])
    pages = np.concatenate([np.arange(start, end) for start, end in zip(starts, ends)]
                           or [np.zeros(0, np.int64)])
    cpus = len(os.sched_getaffinity(0))
    shares = np.array_split(pages, cpus)  # each process its own part of the file
    mapping = _map(spec["destination"], spec["size"], write=True)
    destination = np.frombuffer(mapping, np.uint8)
    started = time.perf_counter()
    children = []
    for share in shares:
        child = os.fork()
        if child == 0:
            status = 1
            try:
                destination[share * PAGE_SIZE] = 0
                status = 0
            finally:
                os._exit(status)
        children.append(child)
    failed = [pid for pid in children if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]
    seconds = time.perf_counter() - started
    del destination
    mapping.close()
    if failed:
        raise OSError(f"{len(failed)} of {cpus} processes failed to touch their pages")
    return {"seconds": seconds, "pages_touched": int(pages.size), "processes": cpus}


def memcpy(spec: dict[str, Any]) -> dict[str, Any]:
    """Into a populated buffer of at most _COPY_BUFFER bytes, piece after
    piece (a many-GiB image leaves no room for a second copy of it)."""
    total = spec["bytes"]
    if not total:
        return {"seconds": 0.0}
    source = _map(spec["source"], total, write=False)
    source.madvise(_MADV_POPULATE_READ, 0, total)
    piece = min(total, _COPY_BUFFER)
    target = mmap.mmap(-1, piece)
    target.madvise(_MADV_POPULATE_WRITE, 0, piece)
    into, data = np.frombuffer(target, np.uint8), np.frombuffer(source, np.uint8)
    started = time.perf_counter()
    for low in range(0, total, piece):
        part = data[low:low + piece]
        np.copyto(into[:part.size], part)
    return {"seconds": time.perf_counter() - started}


OPERATIONS = {"save": save, "passes": passes, "restore": restore, "tofile": tofile,
              "write_floor": write_floor, "read_floor": read_floor,
              "allocation_floor": allocation_floor, "memcpy": memcpy}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    _import_now()
    print(json.dumps(OPERATIONS[spec["op"]](spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
