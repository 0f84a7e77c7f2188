"""``python -m bench.tracking``: what dirty-page tracking costs.

- the dirty log: a writer's mark (ns per call, marks per second) and the
  saver's collect (per GiB of image);
- the hash tracker: the page hash alone on one core (seconds per GiB), and
  whole passes with the Saver: a plain pass, a hash pass that writes every
  page (the first), a hash pass that finds nothing changed;
- userfaultfd: protecting the image, the extra cost of the first write to
  a protected page, and the scan that collects and re-protects (per GiB).

Every number is the best of ``--rounds`` runs (the machine's other work
only ever makes a run slower).  The image lives in /dev/shm, the save's
file in ``--workdir`` (default /var/tmp, a disk).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import parallel_save as ps
from parallel_save.format import PAGE_SIZE
from parallel_save.tracking.hashing import PageHasher, draw_keys

from .probe import BLOCK
from .workload import BenchError, build, parse_size, settle, size_text

GIB = 1 << 30
MARKS = 200_000
# Pages per call of mark_pages, and the share of pages marked before a collect.
PAGES_PER_CALL = 1024
COLLECT_FRACTION = 0.01
HASH_WINDOW_PAGES = 1024


def best(run: Callable[[], float], rounds: int) -> float:
    """The least time of ``rounds`` calls of ``run`` (which returns seconds)."""
    return min(run() for _ in range(rounds))


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def per_gib(seconds: float, size: int) -> float:
    return seconds * GIB / size


def measure_log(size: int, rounds: int) -> dict[str, float]:
    pages = size // PAGE_SIZE
    rng = np.random.default_rng(0)
    offsets = (rng.integers(0, pages, MARKS) * PAGE_SIZE).tolist()
    batches = [np.sort(rng.choice(pages, PAGES_PER_CALL, replace=False)) for _ in range(64)]
    with ps.DirtyLog.create({BLOCK: size}) as log:
        def marks() -> float:
            mark = log.mark
            started = time.perf_counter()
            for offset in offsets:
                mark(BLOCK, offset, PAGE_SIZE)
            return time.perf_counter() - started

        def ranges() -> float:
            mark = log.mark
            started = time.perf_counter()
            for offset in offsets:
                mark(BLOCK, offset // 16, 16 * PAGE_SIZE)
            return time.perf_counter() - started

        def page_batches() -> float:
            return timed(lambda: [log.mark_pages(BLOCK, batch) for batch in batches])

        def collect() -> float:
            log.mark_pages(BLOCK, rng.random(pages) < COLLECT_FRACTION)
            return timed(log.collect)

        mark_seconds = best(marks, rounds)
        result = {
            "mark_ns": mark_seconds / MARKS * 1e9,
            "marks_per_second": MARKS / mark_seconds,
            "mark_64k_range_ns": best(ranges, rounds) / MARKS * 1e9,
            "mark_pages_ns_per_page": best(page_batches, rounds)
            / (len(batches) * PAGES_PER_CALL) * 1e9,
            "collect_s_per_gib": per_gib(best(collect, rounds), size),
        }
    return result


def measure_hash(block: ps.RamBlock, rounds: int) -> dict[str, float]:
    """The hash alone, one core, over the image (not a cache-sized buffer)."""
    hasher = PageHasher(draw_keys())
    words = block.array.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    out = np.empty((HASH_WINDOW_PAGES, 2), dtype=np.uint64)
    copy = np.empty((HASH_WINDOW_PAGES, PAGE_SIZE // 8), dtype=np.uint64)

    def hash_all(copying: bool) -> float:
        started = time.perf_counter()
        for first in range(0, words.shape[0], HASH_WINDOW_PAGES):
            window = words[first:first + HASH_WINDOW_PAGES]
            count = window.shape[0]
            if copying:
                np.copyto(copy[:count], window)
                window = copy[:count]
            hasher.hash_into(window, out[:count])
        return time.perf_counter() - started

    def zero_check() -> float:
        return timed(lambda: [words[first:first + HASH_WINDOW_PAGES].max(axis=1)
                              for first in range(0, words.shape[0], HASH_WINDOW_PAGES)])

    return {"hash_s_per_gib": per_gib(best(lambda: hash_all(False), rounds), block.length),
            "copy_and_hash_s_per_gib": per_gib(best(lambda: hash_all(True), rounds),
                                               block.length),
            "zero_check_s_per_gib": per_gib(best(zero_check, rounds), block.length)}


def measure_passes(block: ps.RamBlock, workdir: Path, channels: int,
                   rounds: int) -> dict[str, float]:
    """Seconds per GiB of a pass over every page, two passes in a row
    (memory left alone): plain (zero check and write) into a new file, then
    again over the written file; hashed and all written (the first pass),
    then hashed with nothing changed."""
    def two_passes(tracker: str | None) -> tuple[float, float]:
        out = workdir / f"tracking-{tracker}.img"
        settle(False)
        with ps.Saver(out, [block], channels, sync=False, tracker=tracker) as saver:
            saver.setup()
            first = saver.iterate().seconds
            second = saver.iterate().seconds
        out.unlink(missing_ok=True)
        return first, second

    plain, hashed = [], []
    for _ in range(rounds):
        plain.append(two_passes(None))
        hashed.append(two_passes("hash"))
    def lowest(runs: list[tuple[float, float]], which: int) -> float:
        return per_gib(min(run[which] for run in runs), block.length)

    return {"plain_first_pass_s_per_gib": lowest(plain, 0),
            "plain_second_pass_s_per_gib": lowest(plain, 1),
            "hash_first_pass_s_per_gib": lowest(hashed, 0),
            "hash_unchanged_pass_s_per_gib": lowest(hashed, 1)}


def measure_uffd(block: ps.RamBlock, rounds: int) -> dict[str, float]:
    reason = ps.uffd_support()
    if reason is not None:
        return {"unavailable": reason}
    first_bytes = block.array.reshape(-1, PAGE_SIZE)[:, 0]

    def touch() -> float:  # one byte of every page
        return timed(lambda: np.add(first_bytes, 1, out=first_bytes))

    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        started = time.perf_counter()
        with ps.UffdTracker([block]) as tracker:
            samples = {"protect": time.perf_counter() - started,
                       "scan_clean": timed(tracker.collect),
                       "touch_protected": touch(),
                       "touch_writable": touch(),
                       "scan_all_written": timed(tracker.collect)}
        for name, seconds in samples.items():
            results.setdefault(name, []).append(seconds)
    low = {name: min(values) for name, values in results.items()}
    pages = block.pages
    return {"protect_s_per_gib": per_gib(low["protect"], block.length),
            "scan_clean_s_per_gib": per_gib(low["scan_clean"], block.length),
            "scan_all_written_s_per_gib": per_gib(low["scan_all_written"], block.length),
            "write_fault_ns_per_page":
                (low["touch_protected"] - low["touch_writable"]) / pages * 1e9}


def format_results(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in results.items():
        lines.append(f"{section}:")
        for name, value in values.items():
            text = f"{value:,.4g}" if isinstance(value, float) else str(value)
            lines.append(f"  {name:<34} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--channels", type=int, default=2, help="channels of the passes")
    parser.add_argument("--rounds", type=int, default=3, help="runs per number (best kept)")
    parser.add_argument("--workdir", help="where the save's file goes (default /var/tmp)")
    parser.add_argument("--json", type=Path, help="also write the results there")
    args = parser.parse_args(argv)
    try:
        size = parse_size(args.size)
        workload = build(size, 0.25, args.workdir)
    except BenchError as error:
        print(f"bench.tracking: {error}", file=sys.stderr)
        return 2
    try:
        block = ps.RamBlock.from_file(BLOCK, workload.image, length=size)
        print(f"image {size_text(size)} ({workload.nonzero_pages} non-zero pages), "
              f"{args.channels} channels, best of {args.rounds}", flush=True)
        results = {"dirty log": measure_log(size, args.rounds),
                   "hash": measure_hash(block, args.rounds),
                   "passes": measure_passes(block, workload.workdir, args.channels,
                                            args.rounds),
                   "userfaultfd": measure_uffd(block, args.rounds)}
    finally:
        workload.close()
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps({"size": size, "channels": args.channels,
                                         "rounds": args.rounds, "results": results},
                                        indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
