"""Checkpoint benchmark: what repeated checkpoints cost with warm channels,
against a cold ``ps.save`` of the same memory, measured side by side.

    python -m bench.checkpoint --size 4G --channels 2 --runs 3 [--dir DIR] [--sync]
        [--steady-memory]

Each round, in turn: a cold ``ps.save`` (channels started, mappings and
file opened: everything paid again), a full checkpoint with warm channels
(every page), one checkpoint that brings the other image up to date (not
timed), and a checkpoint after 1 % of the pages changed (the image gets
the union of the last two dirty sets: about 2 % of its pages).  Medians of the rounds and the median of the per-round
ratios are printed; the targets are 1 % checkpoint <= 3 % of a cold save,
and a warm full checkpoint faster than a cold save.  Then a snapshot of a
private array of the same size: how long the caller is paused by the fork
(per GiB), and what the caller's own writes cost while the snapshot is
being written (copy-on-write), against the same writes with no snapshot.

Regime: warm page cache, no fdatasync, unless ``--sync`` (durable: every
checkpoint and save waits for the disk).  The memory is a /dev/shm file
(half its pages random, half zero); the images go to ``--dir`` (default: a
directory under /var/tmp, on the root disk).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

import parallel_save as ps

from .hostmemory import SteadyMemory

PAGE_SIZE = 4096
GIB = 1 << 30


def _fill(array: np.ndarray, seed: int) -> None:
    """Half the pages random, half zero, a slice at a time."""
    pages = array.reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(seed)
    step = 16384
    for first in range(0, pages.shape[0], step):
        chunk = pages[first:first + step]
        chunk[:] = rng.integers(0, 256, chunk.shape, dtype=np.uint8)
        chunk[rng.random(chunk.shape[0]) < 0.5] = 0


def _dirty(block: ps.RamBlock, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Change ``fraction`` of the pages; returns the dirty set."""
    dirty = rng.random(block.pages) < fraction
    pages = block.array.reshape(-1, PAGE_SIZE)
    pages[dirty, :8] = rng.integers(1, 1 << 62, (int(dirty.sum()), 1), dtype=np.int64
                                    ).view(np.uint8)
    return dirty


def _timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def run(size: int, channels: int, runs: int, directory: Path, sync: bool,
        fraction: float) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"cold save": [], "warm full checkpoint": [],
                                     f"{fraction:.0%} checkpoint": []}
    source = Path("/dev/shm") / f"bench-checkpoint-{uuid.uuid4().hex}.ram"
    with open(source, "wb") as file:
        file.truncate(size)
    try:
        with ps.RamBlock.from_file("ram0", source) as block:
            _fill(block.array, seed=1)
            rng = np.random.default_rng(2)
            saved = directory / "cold.img"
            checkpoints = directory / "ckpt"
            checkpoints.mkdir()
            with ps.Checkpointer(checkpoints, [block], channels, sync=sync) as ckpt:
                ckpt.checkpoint()
                ckpt.checkpoint()  # both images written once: warm from here
                for _ in range(runs):
                    seconds, _ = _timed(lambda: ps.save(saved, [block], channels, sync=sync))
                    times["cold save"].append(seconds)
                    # Its channels exit after it returns: not during the next.
                    ps.wait_channels()
                    seconds, _ = _timed(ckpt.checkpoint)
                    times["warm full checkpoint"].append(seconds)
                    # Unknown changes (a full checkpoint) leave the other image
                    # to be written whole: one checkpoint catches it up, then
                    # each image lacks the last two dirty sets.
                    ckpt.checkpoint(dirty={"ram0": _dirty(block, rng, fraction)})
                    dirty = _dirty(block, rng, fraction)
                    seconds, _ = _timed(lambda d=dirty: ckpt.checkpoint(dirty={"ram0": d}))
                    times[f"{fraction:.0%} checkpoint"].append(seconds)
    finally:
        source.unlink()
    return times


def snapshot(size: int, channels: int, directory: Path, sync: bool) -> dict[str, float]:
    """The caller's pause and the copy-on-write cost of its writes."""
    memory = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(memory, np.uint8)
    _fill(array, seed=3)
    block = ps.RamBlock.snapshot_of("ram0", array)
    checkpoints = directory / "snapshots"
    checkpoints.mkdir()
    words = array.view(np.uint64)
    write_alone, _ = _timed(lambda: words.__iadd__(1))  # every page, no snapshot running
    with ps.Checkpointer(checkpoints, [block], channels, sync=sync, snapshot=True) as ckpt:
        pending = ckpt.checkpoint(wait=False)
        write_during, _ = _timed(lambda: words.__iadd__(1))  # every page copied on write
        stats = pending.wait()
    return {"pause_seconds": stats.pause_seconds,
            "pause_ms_per_gib": 1000 * stats.pause_seconds * GIB / size,
            "write_alone_seconds": write_alone, "write_during_snapshot_seconds": write_during,
            "snapshot_checkpoint_seconds": stats.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="memory size: 1G, 4G (default 1G)")
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dirty", type=float, default=0.01,
                        help="fraction of pages changed between checkpoints (default 0.01)")
    parser.add_argument("--dir", default="/var/tmp", help="where the images go")
    parser.add_argument("--sync", action="store_true", help="durable regime (fdatasync)")
    parser.add_argument("--steady-memory", action="store_true",
                        help="stop free page reporting for the run and touch the free "
                             "memory first, as python -m bench --steady-memory (root)")
    args = parser.parse_args(argv)
    units = {"M": 1 << 20, "G": GIB}
    size = int(float(args.size[:-1]) * units[args.size[-1].upper()])
    directory = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        with SteadyMemory() if args.steady_memory else contextlib.nullcontext():
            times = run(size, args.channels, args.runs, directory, args.sync, args.dirty)
            snap = snapshot(size, args.channels, directory, args.sync)
    finally:
        shutil.rmtree(directory)
    regime = "durable (fdatasync)" if args.sync else "warm page cache, no fdatasync"
    steady = ", steady memory" if args.steady_memory else ""
    print(f"checkpoints of {args.size}, {args.channels} channels, {regime}{steady}, "
          f"median of {args.runs} alternating rounds")
    cold = times["cold save"]
    for name, values in times.items():
        ratios = [v / c for v, c in zip(values, cold)]
        print(f"  {name:24} {statistics.median(values):8.3f} s   "
              f"/ cold save {statistics.median(ratios):6.3f}")
    dirty_name = f"{args.dirty:.0%} checkpoint"
    dirty_ratio = statistics.median(v / c for v, c in zip(times[dirty_name], cold))
    full_ratio = statistics.median(v / c for v, c in zip(times["warm full checkpoint"], cold))
    print(f"  target: {dirty_name} <= 0.03 x cold save: "
          f"{'PASS' if dirty_ratio <= 0.03 else 'MISS'} ({dirty_ratio:.3f})")
    print(f"  target: warm full checkpoint < cold save: "
          f"{'PASS' if full_ratio < 1 else 'MISS'} ({full_ratio:.3f})")
    print(f"snapshot of a private array of {args.size}: caller paused "
          f"{1000 * snap['pause_seconds']:.1f} ms ({snap['pause_ms_per_gib']:.1f} ms per GiB); "
          f"writing every page took {snap['write_during_snapshot_seconds']:.3f} s during the "
          f"snapshot vs {snap['write_alone_seconds']:.3f} s alone (copy-on-write); the "
          f"snapshot checkpoint took {snap['snapshot_checkpoint_seconds']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
