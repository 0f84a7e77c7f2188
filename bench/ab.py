"""Two versions of parallel-save side by side: the same save or restore of
the same image, by two checkouts of this repository, in alternating fresh
processes (A B, B A, ...), and the median of each and of their per-round
ratio.  What a change did, measured on a shared and noisy machine: runs of
the whole benchmark an hour apart move by as much as most changes.

    python -m bench.ab OLD_CHECKOUT NEW_CHECKOUT --op save --layout guest \\
        --channels 2 --rounds 12

Each run is bench/probe.py of the checkout it measures (its own
parallel_save and workers), started in that checkout with only it on the
import path.  The image is built once, in shared memory (or
``--memory-dir``); a restore's source is saved from it once, by this
process's parallel-save.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import parallel_save as ps

from .contenders import probe_environment, run_probe
from .probe import BLOCK
from .workload import LAYOUTS, SHM_DIR, BenchError, build, parse_size, remove, size_text

OPERATIONS = ("save", "restore")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description="The same save or restore by two checkouts of parallel-save, in "
                    "alternating fresh processes: medians and their ratio.")
    parser.add_argument("checkouts", nargs=2, type=Path, metavar="CHECKOUT",
                        help="the two versions (A, B): directories holding parallel_save/ "
                             "and bench/")
    parser.add_argument("--op", choices=OPERATIONS, default="save",
                        help="a one-pass save (no sync) or a restore into fresh memory "
                             "(default save)")
    parser.add_argument("--layout", choices=LAYOUTS, default="guest",
                        help="the image's layout (default guest)")
    parser.add_argument("--size", default="1G", help="the image's size (default 1G)")
    parser.add_argument("--channels", type=int, default=2, help="channels (default 2)")
    parser.add_argument("--rounds", type=int, default=12,
                        help="rounds, each one run of both (default 12)")
    parser.add_argument("--memory-dir", type=Path, default=SHM_DIR,
                        help="a tmpfs or hugetlbfs for the image and restore destinations")
    parser.add_argument("--workdir", help="parent of the directory of the written files "
                                          "(default /var/tmp)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image's bytes")
    args = parser.parse_args(argv)
    for checkout in args.checkouts:
        if not (checkout / "parallel_save").is_dir() or not (checkout / "bench").is_dir():
            parser.error(f"CHECKOUT {checkout}: not a checkout of parallel-save "
                         f"(no parallel_save/ and bench/ in it)")
    if args.rounds < 1 or args.channels < 1:
        parser.error("--rounds and --channels take a positive number")
    try:
        args.size = parse_size(args.size)
    except BenchError as error:
        parser.error(f"--size: {error}")
    return args


def _check_imports(checkout: Path) -> None:
    """Refuse a checkout whose probe would import another parallel-save
    (an installed one shadowing it)."""
    found = subprocess.run(
        [sys.executable, "-c", "import parallel_save; print(parallel_save.__file__)"],
        check=False, cwd=checkout, env=probe_environment(checkout), capture_output=True, text=True)
    where = Path(found.stdout.strip()).resolve() if found.returncode == 0 else None
    if where is None or checkout.resolve() not in where.parents:
        raise BenchError(f"{checkout}: its parallel_save is not the one imported there "
                         f"({where or found.stderr.strip()[-500:]})")


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """{"A": seconds per round, "B": ...}, the rounds alternating which
    runs first."""
    for checkout in args.checkouts:
        _check_imports(checkout)
    workload = build(args.size, 0.5, args.workdir, seed=args.seed, layout=args.layout,
                     memory_dir=args.memory_dir)
    try:
        source = workload.output("source")  # a restore's, saved once
        if args.op == "restore":
            with ps.RamBlock.from_file(BLOCK, workload.image, length=workload.size,
                                       writable=False) as block:
                ps.save(source, [block], channels=args.channels)
        seconds: dict[str, list[float]] = {"A": [], "B": []}
        arms = list(zip("AB", args.checkouts))
        for round_ in range(args.rounds):
            for label, checkout in arms if round_ % 2 == 0 else arms[::-1]:
                if args.op == "save":
                    out = workload.output(label)
                    spec = {"op": "save", "image": str(workload.image),
                            "size": workload.size, "out": str(out),
                            "channels": args.channels, "direct_io": False, "sync": False}
                else:
                    out = workload.destination()
                    spec = {"op": "restore", "source": str(source),
                            "destination": str(out), "size": workload.size,
                            "channels": args.channels, "direct_io": False}
                try:
                    seconds[label].append(run_probe(spec, checkout=checkout)["seconds"])
                finally:
                    remove(out)
        return seconds
    finally:
        workload.close()


def report(args: argparse.Namespace, seconds: dict[str, list[float]]) -> str:
    ratios = [b / a for a, b in zip(seconds["A"], seconds["B"])]
    lines = [(f"{args.op} of a {size_text(args.size)} {args.layout} image, "
              f"{args.channels} channel(s), {args.rounds} alternating rounds")]
    for label, checkout in zip("AB", args.checkouts):
        runs = seconds[label]
        lines.append(f"{label} {checkout}: median {statistics.median(runs) * 1000:.1f} ms "
                     f"(rounds {min(runs) * 1000:.1f}-{max(runs) * 1000:.1f})")
    lines.append(f"B/A: median of the rounds' ratios {statistics.median(ratios):.3f} "
                 f"({min(ratios):.3f}-{max(ratios):.3f}); B faster in "
                 f"{sum(r < 1 for r in ratios)} of {len(ratios)} rounds")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(report(args, measure(args)))
    except BenchError as error:
        print(f"python -m bench.ab: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
