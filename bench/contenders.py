"""What is measured, and how each contender is timed.

Two regimes, each with its own contenders, peers and floors:

- *warm*: no sync, the written file stays in the page cache; the result
  is there as soon as the call returns;
- *durable*: the call returns when the data is on disk (``sync=True``;
  QEMU's time plus an fdatasync of its file, which QEMU does not do).

Timing, per kind (every one starts after caches were settled, and none
includes starting its process):

- parallel-save, the floors and numpy: inside a fresh probe process
  (bench/probe.py), from before ``save``/``restore`` to its return:
  channel start up, every pass, bitmaps and (with ``sync``) fdatasync
  included;
- QEMU save, warm: QEMU's own ``total-time``.  QEMU 10 fdatasyncs each
  multifd channel's file when it closes it, *after* ``total-time`` is
  taken, and before the migration reads as completed: total-time is QEMU
  without that sync, the warm regime's measure;
- QEMU save, durable: wall time from ``migrate`` until the migration is
  completed (its own fdatasync included), plus an fdatasync of its file
  (what is left, usually nothing);
- QEMU load: wall time from ``migrate-incoming`` until completion (an
  incoming QEMU reports no total-time);
- dd: wall time of the dd process.

Every contender names its *peer* (what it competes with: QEMU at the same
channel count) and its *floor* (what no contender of its kind can beat on
this machine, measured in the same round); the report divides by both.

Memory (a save's peak Pss_Anon and page tables, coordinator and channels)
comes from one more run of each new-path parallel-save save in the first
round, not timed: sampling /proc while a run is timed slowed it.

A restore goes into fresh all-zero shared memory, which is what QEMU
assumes of a load, so parallel-save restores with ``assume_zero=True``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parallel_save.channels import QUIET_BLAS

from .memory import PeakRssAnon
from .qemu import QemuVM
from .workload import BenchError, Workload, remove

Measurement = dict[str, Any]


@dataclass(frozen=True)
class RunContext:
    workload: Workload
    restore_source: Path | None  # the image every restore contender reads
    fractions: tuple[float, ...]
    round: int             # also seeds the incremental passes' dirty pages

    @property
    def verify(self) -> bool:
        """Check, in the first round, that a restore produced the image's bytes."""
        return self.round == 0

    @property
    def timeout(self) -> float:
        # QEMU's direct-io save ran at ~100 MB/s here; allow far slower.
        return max(300.0, self.workload.size / 2e6)


@dataclass(frozen=True)
class Contender:
    """One thing timed per round.  ``run`` returns a measurement (with at
    least ``seconds``) per result name: usually just ``name``, several for
    the incremental passes.  ``peer`` and ``floor`` name the contenders (of
    the same regime; at the same channel count, or without one) its time
    is divided by; ``core`` ones are what ``--quick`` keeps."""

    name: str
    side: str                  # "save" or "restore"
    regime: str                # "warm" or "durable"
    channels: int | None       # None: no channel count (dd, floors, QEMU without multifd)
    run: Callable[[RunContext], dict[str, Measurement]]
    peer: str | None = None
    floor: str | None = None
    core: bool = False


def pass_name(fraction: float) -> str:
    return f"ps pass {fraction * 100:g}%"


# --- runners ---------------------------------------------------------------


def probe_environment(checkout: Path | None = None) -> dict[str, str]:
    """The environment a probe runs in: no BLAS threads (see run_probe), and
    with ``checkout`` that checkout alone on the import path."""
    extra = {"PYTHONPATH": str(checkout.resolve())} if checkout is not None else {}
    return {**os.environ, **QUIET_BLAS, **extra}


def run_probe(spec: dict[str, Any], sample_memory: bool = False,
           checkout: Path | None = None) -> Measurement:
    """Run bench/probe.py on ``spec`` (that of ``checkout``, run there and
    importing its own parallel-save, where one is given: bench/ab.py);
    with ``sample_memory``, sample the memory of its process tree while it
    runs.  A sampled run is not a
    timed one: the sampler reads /proc of every process of the tree every
    20 ms, which slowed an 8-channel save by 15 % (0.544 -> 0.631 s) and
    would load process-based contenders more than QEMU's threads.

    The probe is started as the ``parallel-save`` command starts itself,
    without BLAS threads (parallel_save/__main__.py): numpy's spin for
    work in the first 0.1 s after its import would otherwise fall inside
    the timed call, which a long-running caller never sees."""
    process = subprocess.Popen([sys.executable, "-m", "bench.probe", json.dumps(spec)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=checkout, env=probe_environment(checkout))
    if sample_memory:
        with PeakRssAnon(process.pid) as peak:
            out, err = process.communicate()
    else:
        out, err = process.communicate()
    if process.returncode != 0:
        where = f"{checkout}: " if checkout is not None else ""
        raise BenchError(f"{where}probe {spec['op']} exited with status "
                         f"{process.returncode}: {err.strip()[-2000:]}")
    result: Measurement = json.loads(out.splitlines()[-1])
    if sample_memory:
        result.update(peak_rss_anon=peak.bytes, peak_processes=peak.processes,
                      peak_rss_anon_coordinator=peak.root_bytes, peak_pss_anon=peak.pss_bytes,
                      peak_page_tables=peak.pte_bytes)
    return result


_MEMORY_FIELDS = ("peak_rss_anon", "peak_processes", "peak_rss_anon_coordinator",
                  "peak_pss_anon", "peak_page_tables")


def _same_bytes(path: Path, image: Path, size: int) -> bool:
    chunk = 256 << 20
    got = np.memmap(path, dtype=np.uint8, mode="r", shape=(size,))
    want = np.memmap(image, dtype=np.uint8, mode="r", shape=(size,))
    return all(np.array_equal(got[i:i + chunk], want[i:i + chunk])
               for i in range(0, size, chunk))


def _restored(ctx: RunContext, destination: Path, result: Measurement) -> Measurement:
    if ctx.verify:
        result["verified"] = _same_bytes(destination, ctx.workload.image, ctx.workload.size)
    return result


def _old_image(ctx: RunContext, path: Path) -> None:
    """An older image at ``path`` for a save to replace: as many allocated
    bytes as the image's non-zero pages, on disk before the clock starts."""
    with open(ctx.workload.image, "rb") as source, open(path, "wb") as old:
        left = ctx.workload.nonzero_bytes
        while left:
            piece = source.read(min(left, 4 << 20))
            if not piece:
                raise BenchError(f"{ctx.workload.image} ends before {left} more bytes")
            left -= old.write(piece)
        old.flush()
        os.fsync(old.fileno())


def run_ps_save(ctx: RunContext, *, name: str, channels: int, direct_io: bool,
                sync: bool, over: bool = False) -> dict[str, Measurement]:
    out = ctx.workload.output("ps")
    try:
        if over:
            _old_image(ctx, out)
        spec = {"op": "save", "image": str(ctx.workload.image), "size": ctx.workload.size,
                "out": str(out), "channels": channels, "direct_io": direct_io, "sync": sync}
        result = run_probe(spec)
        if ctx.round == 0 and not over:
            # Memory: from one more, untimed, run of the same save.
            remove(out)
            sampled = run_probe(spec, sample_memory=True)
            result.update({field: sampled[field] for field in _MEMORY_FIELDS})
        return {name: result}
    finally:
        remove(out)


def run_ps_passes(ctx: RunContext, *, channels: int) -> dict[str, Measurement]:
    out = ctx.workload.output("ps-pass")
    try:
        result = run_probe({"op": "passes", "image": str(ctx.workload.image),
                         "size": ctx.workload.size, "out": str(out), "channels": channels,
                         "direct_io": False, "sync": False,
                         "fractions": list(ctx.fractions), "seed": ctx.round})
    finally:
        remove(out)
    return {pass_name(fraction): {"seconds": result["passes"][str(fraction)],
                                  "first_pass": result["first_pass"]}
            for fraction in ctx.fractions}


def run_write_floor(ctx: RunContext, *, name: str, sync: bool) -> dict[str, Measurement]:
    out = ctx.workload.output("floor")  # the probe writes an unnamed file beside it
    return {name: run_probe({"op": "write_floor", "image": str(ctx.workload.image),
                          "size": ctx.workload.size, "out": str(out), "sync": sync})}


def run_ps_restore(ctx: RunContext, *, name: str, channels: int,
                   direct_io: bool) -> dict[str, Measurement]:
    destination = ctx.workload.destination()
    try:
        result = run_probe({"op": "restore", "source": str(ctx.restore_source),
                         "destination": str(destination), "size": ctx.workload.size,
                         "channels": channels, "direct_io": direct_io})
        return {name: _restored(ctx, destination, result)}
    finally:
        destination.unlink(missing_ok=True)


def run_read_floor(ctx: RunContext, *, name: str, readers: int = 1) -> dict[str, Measurement]:
    destination = ctx.workload.destination()
    try:
        result = run_probe({"op": "read_floor", "source": str(ctx.restore_source),
                            "destination": str(destination), "size": ctx.workload.size,
                            "readers": readers})
        if "takes_sendfile" in result:
            # Into memory that takes no sendfile (a hugetlbfs), nothing
            # fills the pages faster than the CPUs preading into them.
            result["bounds"] = not result["takes_sendfile"]
        return {name: _restored(ctx, destination, result)}
    finally:
        destination.unlink(missing_ok=True)


def run_allocation_floor(ctx: RunContext, *, name: str) -> dict[str, Measurement]:
    destination = ctx.workload.destination()
    try:
        return {name: run_probe({"op": "allocation_floor", "source": str(ctx.restore_source),
                              "destination": str(destination), "size": ctx.workload.size})}
    finally:
        destination.unlink(missing_ok=True)


def run_memcpy(ctx: RunContext, *, name: str) -> dict[str, Measurement]:
    return {name: run_probe({"op": "memcpy", "source": str(ctx.workload.image),
                          "bytes": ctx.workload.nonzero_bytes})}


def run_tofile(ctx: RunContext, *, name: str) -> dict[str, Measurement]:
    out = ctx.workload.output("numpy")
    try:
        return {name: run_probe({"op": "tofile", "image": str(ctx.workload.image),
                              "size": ctx.workload.size, "out": str(out)})}
    finally:
        remove(out)


def _fdatasync(path: Path) -> float:
    """Seconds to make ``path``'s data durable (what QEMU leaves undone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        os.fdatasync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def run_qemu_save(ctx: RunContext, *, name: str, channels: int, direct_io: bool,
                  sync: bool) -> dict[str, Measurement]:
    out = ctx.workload.output("qemu")
    try:
        with QemuVM(ctx.workload.image, ctx.workload.size) as vm:
            started = time.perf_counter()
            info = vm.save(out, multifd_channels=channels, direct_io=direct_io,
                           timeout=ctx.timeout)
            wall = time.perf_counter() - started
        synced = _fdatasync(out) if sync else 0.0
    finally:
        remove(out)
    ram = info.get("ram", {})
    seconds = wall + synced if sync else info["total-time"] / 1000
    return {name: {"seconds": seconds, "total_time": info["total-time"] / 1000,
                   "wall_seconds": wall, "sync_seconds": synced,
                   "pages_written": ram.get("normal"), "zero_pages": ram.get("duplicate"),
                   "bytes_transferred": ram.get("transferred")}}


def run_qemu_load(ctx: RunContext, *, name: str, channels: int,
                  direct_io: bool) -> dict[str, Measurement]:
    destination = ctx.workload.destination()
    try:
        with QemuVM(destination, ctx.workload.size, incoming=True) as vm:
            info = vm.load(ctx.restore_source, multifd_channels=channels,
                           direct_io=direct_io, timeout=ctx.timeout)
        return {name: _restored(ctx, destination, {"seconds": info["wall-time"] / 1000})}
    finally:
        destination.unlink(missing_ok=True)


def run_dd(ctx: RunContext, *, name: str, flags: tuple[str, ...]) -> dict[str, Measurement]:
    """A disk floor: as many bytes as the image has non-zero pages (read
    from its start), one sequential stream."""
    out = ctx.workload.output("dd")
    try:
        result = _dd(f"if={ctx.workload.image}", f"of={out}",
                     f"count={ctx.workload.nonzero_bytes}", "iflag=count_bytes", *flags)
        result["bytes_written"] = ctx.workload.nonzero_bytes
        return {name: result}
    finally:
        remove(out)


def run_dd_read(ctx: RunContext, *, name: str) -> dict[str, Measurement]:
    return {name: _dd(f"if={ctx.restore_source}", "of=/dev/null")}


def _dd(*operands: str) -> Measurement:
    started = time.perf_counter()
    done = subprocess.run(["dd", "bs=4M", "status=none", *operands],
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"dd {' '.join(operands)} failed: {done.stderr.strip()}")
    return {"seconds": seconds}


# --- the line-up -----------------------------------------------------------

WRITE_FLOOR = "one writer"
READ_FLOOR = "one reader"
READERS_FLOOR = "reader per CPU"
ALLOCATION_FLOOR = "allocate pages"
MEMORY_FLOOR = "memcpy"


def _save_contenders(n: int, regime: str, qemu: bool, passes: bool) -> list[Contender]:
    sync = regime == "durable"

    def ps_save(name: str, direct_io: bool, peer: str, floor: str) -> Contender:
        run = functools.partial(run_ps_save, name=name, channels=n, direct_io=direct_io,
                                sync=sync)
        return Contender(name, "save", regime, n, run, peer if qemu else None, floor,
                         core=True)

    def qemu_save(name: str, direct_io: bool, floor: str) -> Contender:
        run = functools.partial(run_qemu_save, name=name, channels=n, direct_io=direct_io,
                                sync=sync)
        return Contender(name, "save", regime, n, run, None, floor, core=True)

    found = [ps_save("ps save", False, "qemu multifd", WRITE_FLOOR)]
    # The same save over an older image: its peer is the save to a new path.
    found.append(Contender("ps save over", "save", regime, n, functools.partial(
        run_ps_save, name="ps save over", channels=n, direct_io=False, sync=sync, over=True),
        "ps save", WRITE_FLOOR, core=True))
    if qemu:
        found.append(qemu_save("qemu multifd", False, WRITE_FLOOR))
    if sync:
        found.append(ps_save("ps save direct", True, "qemu multifd direct", "dd direct"))
        if qemu:
            found.append(qemu_save("qemu multifd direct", True, "dd direct"))
    elif passes:
        found.append(Contender("ps pass", "save", regime, n,
                               functools.partial(run_ps_passes, channels=n),
                               None, "ps save"))
    return found


def _restore_contenders(n: int, regime: str, qemu: bool) -> list[Contender]:
    found = [Contender("ps restore", "restore", regime, n, functools.partial(
        run_ps_restore, name="ps restore", channels=n, direct_io=False),
        "qemu load multifd" if qemu else None, READ_FLOOR, core=True)]
    if qemu:
        found.append(Contender("qemu load multifd", "restore", regime, n, functools.partial(
            run_qemu_load, name="qemu load multifd", channels=n, direct_io=False),
            None, READ_FLOOR, core=True))
    return found


def _floors(regime: str) -> list[Contender]:
    sync = regime == "durable"
    writer = Contender(WRITE_FLOOR, "save", regime, None, functools.partial(
        run_write_floor, name=WRITE_FLOOR, sync=sync), None,
        "dd fdatasync" if sync else MEMORY_FLOOR, core=True)
    if sync:
        disks = [("dd fdatasync", ("conv=fdatasync",)), ("dd direct", ("oflag=direct",))]
    else:
        disks = [("dd", ())]
    found = [writer] + [Contender(name, "save", regime, None, functools.partial(
        run_dd, name=name, flags=flags), None, None, core=True) for name, flags in disks]
    if not sync:
        found.append(Contender(MEMORY_FLOOR, "save", regime, None, functools.partial(
            run_memcpy, name=MEMORY_FLOOR), None, None, core=True))
        found.append(Contender("numpy tofile", "save", regime, None, functools.partial(
            run_tofile, name="numpy tofile"), None, "dd"))
    return found


def _restore_floors(regime: str) -> list[Contender]:
    return [Contender(READ_FLOOR, "restore", regime, None, functools.partial(
                run_read_floor, name=READ_FLOOR), None, "dd read", core=True),
            Contender(READERS_FLOOR, "restore", regime, None, functools.partial(
                run_read_floor, name=READERS_FLOOR, readers=len(os.sched_getaffinity(0))),
                None, READ_FLOOR, core=True),
            Contender("dd read", "restore", regime, None, functools.partial(
                run_dd_read, name="dd read"), None, None, core=True),
            Contender(ALLOCATION_FLOOR, "restore", regime, None, functools.partial(
                run_allocation_floor, name=ALLOCATION_FLOOR), None, None, core=True)]


def lineup(channels: list[int], qemu: bool, regimes: tuple[str, ...] = ("warm", "durable"),
           restore_regimes: tuple[str, ...] = ("warm",),
           passes: bool = True) -> list[Contender]:
    """Every contender, in the order of one round: per regime, each channel
    count's contenders side by side, then the floors; restores after the
    saves (only in ``restore_regimes``: a durable restore differs from a
    warm one only when the caches are dropped)."""
    found = []
    for regime in regimes:
        for n in channels:
            found += _save_contenders(n, regime, qemu, passes)
        found += _floors(regime)
    for regime in restore_regimes:
        for n in channels:
            found += _restore_contenders(n, regime, qemu)
        found += _restore_floors(regime)
    return found
