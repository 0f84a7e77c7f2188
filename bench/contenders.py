"""What is measured, and how each contender is timed.

Timing, per kind (every one starts after caches were settled, and none
includes starting its process):

- parallel-save and numpy: inside a fresh probe process (bench/probe.py),
  from before ``Saver``/``restore``/``tofile`` to its return: channel start
  up, every pass, bitmaps and (with ``sync``) fdatasync included;
- QEMU save: QEMU's own ``total-time``; the wall time around ``migrate``
  until completion is recorded beside it;
- QEMU load: wall time from ``migrate-incoming`` until completion (an
  incoming QEMU reports no total-time);
- dd: wall time of the dd process.

A restore goes into fresh all-zero shared memory, which is what QEMU
assumes of a load, so parallel-save restores with ``assume_zero=True``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
    the incremental passes.  ``reference`` is the contender its "vs" column
    divides by; ``core`` ones are what ``--quick`` keeps and what the
    targets need."""

    name: str
    side: str                  # "save" or "restore"
    channels: int | None       # None: no channel count (dd, numpy, QEMU without multifd)
    run: Callable[[RunContext], dict[str, Measurement]]
    reference: str | None = None
    core: bool = False


def pass_name(fraction: float) -> str:
    return f"ps pass {fraction * 100:g}%"


# --- runners ---------------------------------------------------------------


def _probe(spec: dict[str, Any]) -> Measurement:
    """Run bench/probe.py on ``spec`` and sample its memory while it runs."""
    process = subprocess.Popen([sys.executable, "-m", "bench.probe", json.dumps(spec)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRssAnon(process.pid) as peak:
        out, err = process.communicate()
    if process.returncode != 0:
        raise BenchError(f"probe {spec['op']} exited with status {process.returncode}: "
                         f"{err.strip()[-2000:]}")
    result: Measurement = json.loads(out.splitlines()[-1])
    result.update(peak_rss_anon=peak.bytes, peak_processes=peak.processes,
                  peak_rss_anon_coordinator=peak.root_bytes, peak_pss_anon=peak.pss_bytes)
    return result


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


def run_ps_save(ctx: RunContext, *, name: str, channels: int, direct_io: bool,
                sync: bool) -> dict[str, Measurement]:
    out = ctx.workload.output("ps")
    try:
        return {name: _probe({"op": "save", "image": str(ctx.workload.image),
                              "size": ctx.workload.size, "out": str(out),
                              "channels": channels, "direct_io": direct_io, "sync": sync})}
    finally:
        remove(out)


def run_ps_passes(ctx: RunContext, *, channels: int) -> dict[str, Measurement]:
    out = ctx.workload.output("ps-pass")
    try:
        result = _probe({"op": "passes", "image": str(ctx.workload.image),
                         "size": ctx.workload.size, "out": str(out), "channels": channels,
                         "direct_io": False, "sync": False,
                         "fractions": list(ctx.fractions), "seed": ctx.round})
    finally:
        remove(out)
    return {pass_name(fraction): {"seconds": result["passes"][str(fraction)],
                                  "first_pass": result["first_pass"],
                                  "peak_rss_anon": result["peak_rss_anon"],
                                  "peak_pss_anon": result["peak_pss_anon"]}
            for fraction in ctx.fractions}


def run_ps_restore(ctx: RunContext, *, name: str, channels: int,
                   direct_io: bool) -> dict[str, Measurement]:
    destination = ctx.workload.destination()
    try:
        result = _probe({"op": "restore", "source": str(ctx.restore_source),
                         "destination": str(destination), "size": ctx.workload.size,
                         "channels": channels, "direct_io": direct_io})
        return {name: _restored(ctx, destination, result)}
    finally:
        destination.unlink(missing_ok=True)


def run_tofile(ctx: RunContext, *, name: str) -> dict[str, Measurement]:
    out = ctx.workload.output("numpy")
    try:
        return {name: _probe({"op": "tofile", "image": str(ctx.workload.image),
                              "size": ctx.workload.size, "out": str(out)})}
    finally:
        remove(out)


def run_qemu_save(ctx: RunContext, *, name: str, channels: int,
                  direct_io: bool) -> dict[str, Measurement]:
    out = ctx.workload.output("qemu")
    try:
        with QemuVM(ctx.workload.image, ctx.workload.size) as vm:
            started = time.perf_counter()
            info = vm.save(out, multifd_channels=channels, direct_io=direct_io,
                           timeout=ctx.timeout)
            wall = time.perf_counter() - started
    finally:
        remove(out)
    ram = info.get("ram", {})
    return {name: {"seconds": info["total-time"] / 1000, "wall_seconds": wall,
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
    """The ceiling: the image's non-zero bytes, one sequential stream."""
    out = ctx.workload.output("dd")
    try:
        return {name: _dd(f"if={ctx.workload.nonzero_source}", f"of={out}", *flags)}
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


def _save_contenders(n: int, qemu: bool) -> list[Contender]:
    def ps_save(name: str, direct_io: bool, sync: bool, reference: str,
                core: bool = False) -> Contender:
        run = functools.partial(run_ps_save, name=name, channels=n, direct_io=direct_io,
                                sync=sync)
        return Contender(name, "save", n, run, reference, core)

    found = [ps_save("ps save", False, False, "dd", core=True),
             ps_save("ps save sync", False, True, "dd fdatasync"),
             ps_save("ps save direct", True, False, "dd direct", core=True),
             ps_save("ps save direct sync", True, True, "dd direct")]
    if qemu:
        for name, direct_io, reference in (("qemu multifd", False, "dd"),
                                           ("qemu multifd direct", True, "dd direct")):
            run = functools.partial(run_qemu_save, name=name, channels=n, direct_io=direct_io)
            found.append(Contender(name, "save", n, run, reference, core=True))
    found.append(Contender("ps pass", "save", n, functools.partial(run_ps_passes, channels=n),
                           "ps save", core=True))
    return found


def _restore_contenders(n: int, qemu: bool) -> list[Contender]:
    found = []
    for name, direct_io, core in (("ps restore", False, True),
                                  ("ps restore direct", True, False)):
        run = functools.partial(run_ps_restore, name=name, channels=n, direct_io=direct_io)
        found.append(Contender(name, "restore", n, run, "dd read", core))
    if qemu:
        for name, direct_io, core in (("qemu load multifd", False, True),
                                      ("qemu load multifd direct", True, False)):
            run = functools.partial(run_qemu_load, name=name, channels=n, direct_io=direct_io)
            found.append(Contender(name, "restore", n, run, "dd read", core))
    return found


def lineup(channels: list[int], qemu: bool) -> list[Contender]:
    """Every contender, in the order of one round: each channel count's
    contenders side by side, then those without a channel count."""
    found = []
    for n in channels:
        found += _save_contenders(n, qemu)
    if qemu:
        found.append(Contender("qemu save", "save", None, functools.partial(
            run_qemu_save, name="qemu save", channels=0, direct_io=False), "dd"))
    for name, flags, core in (("dd", (), True), ("dd fdatasync", ("conv=fdatasync",), False),
                              ("dd direct", ("oflag=direct",), False)):
        found.append(Contender(name, "save", None,
                               functools.partial(run_dd, name=name, flags=flags),
                               None if name == "dd" else "dd", core))
    found.append(Contender("numpy tofile", "save", None,
                           functools.partial(run_tofile, name="numpy tofile"), "dd", core=True))
    for n in channels:
        found += _restore_contenders(n, qemu)
    if qemu:
        found.append(Contender("qemu load", "restore", None, functools.partial(
            run_qemu_load, name="qemu load", channels=0, direct_io=False), "dd read"))
    found.append(Contender("dd read", "restore", None,
                           functools.partial(run_dd_read, name="dd read"), core=True))
    return found
