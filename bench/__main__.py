"""``python -m bench`` (from a checkout of the repository): run every
contender, round after round, for each workload, size and regime, and
report medians, each contender's ratios to its peer and its floor, and the
issue's targets.

    python -m bench                      # 1 GiB, three workloads, 1 2 4 8 channels
    python -m bench --matrix             # 1, 4 and 8 GiB (long: an hour or more)
    python -m bench --quick              # a look in a minute or two

Contenders alternate within each round (round-robin), so slow drifts of
the disk or of the machine spread over all of them instead of hitting one
contender's runs together.  Before every run the file system is synced, so
every contender starts with no dirty pages of an earlier run to compete
with.  With ``--drop-caches`` (root) the page cache is dropped too before
every durable run, and restores are measured cold as a durable regime:
that empties the cache of the whole machine, everyone's, which is why it
is asked for and never the default (the image itself lives in tmpfs and
is never dropped).  With ``--steady-memory`` (root, on a virtual machine
that hands free memory back to its host) no contender meets memory the
host took back (bench/hostmemory.py).  With ``--memory-dir`` the image
lives in huge pages (a tmpfs mounted with huge=always, or a hugetlbfs),
for parallel-save's channels, QEMU and the floors alike.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import parallel_save as ps

from . import report
from .contenders import Contender, RunContext, lineup
from .hostmemory import SteadyMemory, reporting_state
from .probe import BLOCK
from .qemu import qemu_supports_mapped_ram
from .workload import (
    LAYOUTS,
    SHM_DIR,
    BenchError,
    Workload,
    build,
    can_drop_caches,
    memory_kind,
    parse_size,
    settle,
    size_text,
)

DEFAULT_SIZES = ["1G"]
MATRIX_SIZES = ["1G", "4G", "8G"]
DEFAULT_RUNS = 3
DEFAULT_CHANNELS = [1, 2, 4, 8]
QUICK_SIZE = "256M"
QUICK_RUNS = 1
QUICK_CHANNELS = [1, 4]
DIRTY_FRACTIONS = (0.01, 0.1, 0.5)
RESULTS = Path(__file__).resolve().parent / "results"


def _channel_list(values: list[str]) -> list[int]:
    try:
        channels = sorted({int(v) for value in values for v in value.split(",") if v})
    except ValueError:
        raise BenchError(f"--channels takes whole numbers, not {' '.join(values)!r}") from None
    if not channels or channels[0] < 1:
        raise BenchError("--channels needs channel counts of at least 1")
    return channels


def _names(values: list[str], known: tuple[str, ...], option: str) -> list[str]:
    names = [v for value in values for v in value.split(",") if v]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise BenchError(f"{option} takes some of {', '.join(known)}, not "
                         f"{' '.join(unknown or values)!r}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark parallel-save against QEMU's mapped-ram save/load and "
                    "measured floors (one writer, dd, memcpy) on images in shared memory.")
    parser.add_argument("--size", "--sizes", nargs="+", dest="sizes", metavar="SIZE",
                        help=f"image sizes, e.g. 256M 1G 4G (default "
                             f"{' '.join(DEFAULT_SIZES)}; {QUICK_SIZE} with --quick)")
    parser.add_argument("--matrix", action="store_true",
                        help=f"the issue's whole matrix: sizes {' '.join(MATRIX_SIZES)} and "
                             f"channels {' '.join(map(str, DEFAULT_CHANNELS))} (long)")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        help=f"image layouts, some of {', '.join(LAYOUTS)} (default all)")
    parser.add_argument("--zero-fraction", type=float, default=0.5,
                        help="fraction of zero pages of the random workload (default 0.5)")
    parser.add_argument("--regimes", nargs="+", metavar="NAME",
                        help="warm (no sync, page cache) and/or durable (sync=True; "
                             "QEMU + fdatasync) (default both)")
    parser.add_argument("--channels", nargs="+", metavar="N",
                        help="channel counts, e.g. 1 2 4 8 or 1,2,4,8 (default "
                             f"{','.join(map(str, DEFAULT_CHANNELS))}; "
                             f"{','.join(map(str, QUICK_CHANNELS))} with --quick)")
    parser.add_argument("--runs", type=int,
                        help=f"rounds; medians are over them (default {DEFAULT_RUNS}; "
                             f"{QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a quick look: a small image, one round, without the "
                             "incremental passes and numpy")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    parser.add_argument("--only", nargs="+", metavar="GLOB",
                        help="keep contenders whose name matches one of these shell "
                             "patterns, e.g. 'ps save*' 'qemu multifd' 'one *' (see --list)")
    parser.add_argument("--list", action="store_true",
                        help="print the contenders that would run, and exit")
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the whole machine's page cache before each durable run "
                             "and measure restores cold too (root; without it the file "
                             "system is only synced and the durable regime runs with a "
                             "warm cache)")
    parser.add_argument("--steady-memory", action="store_true",
                        help="stop this virtual machine from handing free memory back to "
                             "its host for the run (free page reporting; put back after) "
                             "and touch the free memory once, so that no contender pays "
                             "the host for pages another freed seconds before (root)")
    parser.add_argument("--outdir", type=Path, default=RESULTS,
                        help="where the JSON and PNG go (default bench/results/)")
    parser.add_argument("--workdir", type=Path,
                        help="parent of the temporary directory the contenders write "
                             "into (default /var/tmp, on the root disk); removed afterwards")
    parser.add_argument("--memory-dir", type=Path, default=SHM_DIR,
                        help="where the image and the restore destinations live: a tmpfs "
                             f"(default {SHM_DIR}) or a hugetlbfs; a tmpfs mounted with "
                             "huge=always or a hugetlbfs gives memory in huge pages, as "
                             "production VMs' often is (mount -t tmpfs -o huge=always "
                             "none DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images' bytes")
    args = parser.parse_args(argv)
    sizes = args.sizes or (MATRIX_SIZES if args.matrix else
                           [QUICK_SIZE] if args.quick else DEFAULT_SIZES)
    args.sizes = [parse_size(size) for size in sizes]
    args.runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    if args.runs < 1:
        raise BenchError("--runs must be at least 1")
    args.channels = (_channel_list(args.channels) if args.channels
                     else QUICK_CHANNELS if args.quick and not args.matrix
                     else DEFAULT_CHANNELS)
    args.workloads = _names(args.workloads, LAYOUTS, "--workloads") if args.workloads \
        else list(LAYOUTS)
    args.regimes = _names(args.regimes, ("warm", "durable"), "--regimes") if args.regimes \
        else ["warm", "durable"]
    memory_kind(args.memory_dir)  # a tmpfs or a hugetlbfs, found out before minutes of work
    return args


def _select(contenders: list[Contender], args: argparse.Namespace) -> list[Contender]:
    if args.quick:
        contenders = [c for c in contenders if c.core]
    if args.only:
        contenders = [c for c in contenders
                      if any(fnmatch.fnmatchcase(c.name, pattern) for pattern in args.only)]
    if not contenders:
        raise BenchError(f"no contender matches --only {' '.join(args.only or [])}")
    return contenders


def _lineup(args: argparse.Namespace, qemu: bool) -> list[Contender]:
    restore_regimes = ("warm",)
    if args.drop_caches and "durable" in args.regimes:
        restore_regimes += ("durable",)
    if "warm" not in args.regimes:
        restore_regimes = restore_regimes[1:]
    return _select(lineup(args.channels, qemu, tuple(args.regimes), restore_regimes,
                          passes=not args.quick), args)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _restore_source(workload: Workload) -> Path:
    """The image every restore contender reads: written once, by
    parallel-save, synced (QEMU loads it like its own)."""
    path = workload.workdir / "restore-source.img"
    ps.save(path, [ps.RamBlock.from_file(BLOCK, workload.image, writable=False)], channels=4)
    return path


def _run_rounds(workload: Workload, contenders: list[Contender], args: argparse.Namespace,
                ) -> list[dict[str, Any]]:
    restore_source = (_restore_source(workload) if any(c.side == "restore" for c in contenders)
                      else None)
    records = []
    for round_ in range(args.runs):
        context = RunContext(workload, restore_source, DIRTY_FRACTIONS, round_)
        # Each round starts elsewhere in the line-up: whatever the first
        # runs of a round pay (the disk still discarding the last round's
        # files) falls on a different contender every round.
        shift = round_ * len(contenders) // args.runs
        for contender in contenders[shift:] + contenders[:shift]:
            settle(args.drop_caches and contender.regime == "durable")
            base = {"round": round_, "workload": workload.label, "layout": workload.layout,
                    "size": workload.size, "regime": contender.regime,
                    "side": contender.side, "channels": contender.channels,
                    "peer": contender.peer, "floor": contender.floor}
            try:
                results = contender.run(context)
            # A benchmark of many minutes keeps going past one failing
            # contender; its error is reported in the table and the JSON.
            except Exception as error:  # noqa: BLE001
                results = {contender.name: {"error": f"{type(error).__name__}: {error}"}}
            for name, measurement in results.items():
                records.append({**base, "contender": name, **measurement})
                outcome = (f"{measurement['seconds']:.3f} s" if "seconds" in measurement
                           else measurement["error"].splitlines()[0])
                _log(f"{workload.label}  round {round_ + 1}/{args.runs}  "
                     f"{contender.regime:<7} {name:<20} "
                     f"ch {report.channels_text(contender.channels):>2}  {outcome}")
    return records


def _run_workloads(contenders: list[Contender], args: argparse.Namespace,
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """Every round of every workload: the records, the images, the machine."""
    records: list[dict[str, Any]] = []
    images: dict[str, dict[str, Any]] = {}
    machine: dict[str, Any] = {}
    for size in args.sizes:
        for layout in args.workloads:
            _log(f"building a {size_text(size)} {layout} image")
            workload = build(size, args.zero_fraction, args.workdir, args.seed, layout,
                             args.memory_dir)
            try:
                machine = machine or report.machine(workload.workdir, args.memory_dir)
                _log(f"image {workload.image} in {machine['memory_fs']['kind']}: "
                     f"{workload.zero_fraction:.0%} zero pages; "
                     f"files in {workload.workdir} ({machine['workdir_fs']['type']}); "
                     f"{len(contenders)} contenders x {args.runs} rounds")
                images[workload.label] = {
                    "layout": layout, "bytes": size, "pages": workload.pages,
                    "nonzero_pages": workload.nonzero_pages,
                    "zero_fraction": workload.zero_fraction,
                    "image_path": str(workload.image), "workdir": str(workload.workdir)}
                records += _run_rounds(workload, contenders, args)
            finally:
                workload.close()
    return records, images, machine


def run(args: argparse.Namespace, argv: list[str]) -> int:
    notes = []
    qemu = not args.no_qemu
    if qemu and not qemu_supports_mapped_ram():
        qemu = False
        notes.append("QEMU skipped: no qemu-system-x86_64 >= 9.0 with mapped-ram on PATH")
    if args.drop_caches and not can_drop_caches():
        raise BenchError("--drop-caches: /proc/sys/vm/drop_caches is not writable "
                         "(run as root, or leave the option out)")
    contenders = _lineup(args, qemu)
    if args.list:
        for contender in contenders:
            print(f"{contender.side:<8} {contender.regime:<8} {contender.name:<20} "
                  f"{report.channels_text(contender.channels)}")
        return 0
    if importlib.util.find_spec("matplotlib") is None:
        # Found out now, not after minutes of runs when the plot is drawn.
        raise BenchError("the plot needs matplotlib: pip install 'parallel-save[bench]'")
    notes.append("before every run: sync" + (
        "; before every durable run the page cache is dropped "
        "(echo 3 > /proc/sys/vm/drop_caches)" if args.drop_caches
        else "; the page cache is kept (no --drop-caches): the durable regime ran "
             "with a warm cache"))
    args.outdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    reporting = reporting_state()
    with contextlib.ExitStack() as stack:
        if args.steady_memory:
            _log("--steady-memory: touching the free memory once")
            steady = stack.enter_context(SteadyMemory())
            reporting["steady"] = steady.record()
            notes.append(
                f"--steady-memory: free page reporting stopped for the run; "
                f"{steady.touched / (1 << 30):.1f} GiB of free memory touched first, "
                f"{reporting['steady']['first_touch_us_per_page']} us per page "
                f"(again at once: {reporting['steady']['second_touch_us_per_page']} us)")
        elif reporting["active"]:
            notes.append(
                f"this machine hands free memory back to its host (free page reporting, "
                f"order {reporting['order']}): the first touch of a page freed seconds "
                f"before pays the host, unevenly, by what ran before (--steady-memory)")
        records, images, machine = _run_workloads(contenders, args)
    machine["free_page_reporting"] = reporting
    rows = report.summarise(records, {label: image["bytes"] for label, image in images.items()})
    targets = report.target_rows(records)
    stem = args.outdir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    document = {
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "argv": argv,
        "machine": machine,
        "config": {"sizes": args.sizes, "workloads": args.workloads,
                   "regimes": args.regimes, "zero_fraction": args.zero_fraction,
                   "channels": args.channels, "runs": args.runs, "quick": args.quick,
                   "qemu": qemu, "drop_caches": args.drop_caches,
                   "steady_memory": args.steady_memory, "only": args.only,
                   "seed": args.seed, "dirty_fractions": list(DIRTY_FRACTIONS),
                   "memory_dir": str(args.memory_dir),
                   "restore": "into fresh all-zero shared memory; parallel-save with "
                              "assume_zero=True (QEMU's own assumption)",
                   "timing": "parallel-save/floors/numpy: inside a fresh process, call to "
                             "return; QEMU save, warm: its total-time (which leaves out "
                             "the fdatasync QEMU does at the end); durable: wall time to "
                             "completion (its fdatasync included) plus an fdatasync of "
                             "its file; QEMU load: wall time; dd: wall time"},
        "images": images,
        "notes": notes, "runs": records, "summary": rows, "targets": targets,
    }
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    report.write_json(json_path, document)
    report.plot(rows, png_path, (
        f"{machine['workdir_fs']['type']} on {machine['workdir_fs']['device']}, "
        f"image in {machine['memory_fs']['kind']}, {machine['cores']} cores, "
        f"median of {args.runs}, "
        f"durable caches {'dropped' if args.drop_caches else 'kept'}"))
    print(report.format_table(rows))
    print()
    print(report.format_targets(targets))
    for note in notes:
        print(f"note: {note}")
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        return run(parse_args(argv), argv)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
