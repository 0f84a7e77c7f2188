"""Turning runs into answers: medians, ratios to peers and floors, the
issue's targets, the table, the JSON record and the plot.

A run record is a dict: ``round``, ``workload`` (layout and size),
``regime``, ``contender`` (the result's name), ``side``, ``channels`` (None
when the contender has no channel count), ``peer``, ``floor`` and either
``seconds`` (plus whatever the contender reports) or ``error``.

Ratios are taken per round (each run divided by its peer's or floor's run
of the same round, workload and regime, which met the same machine
weather) and summarised as the median over rounds.  GB/s is always bytes
of the image (1 GB = 10^9 bytes) per second, whatever the contender wrote:
dd copies only as many bytes as the image has non-zero pages, so its GB/s
is the image throughput no saver can beat with one stream.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import parallel_save

from .qemu import qemu_binary
from .workload import SHM_DIR, memory_kind, mount_of

MIB = 1 << 20
MEMORY_LIMIT = 150 * MIB
MEMORY_TARGET = "save peak Pss_Anon + page tables"


@dataclass(frozen=True)
class Target:
    """``numerator`` / ``denominator`` (medians of per-round ratios, same
    workload, regime and channel count) at most ``limit``; with
    ``per_byte``, times per byte written (a bandwidth ratio, inverted).
    ``bound``: a floor that no ``numerator`` can beat where its runs say
    ``bounds`` (the reader per CPU, into memory that takes no sendfile);
    where it is itself above ``limit`` times the denominator, the target
    is out of reach on the machine, and the verdict says so."""

    label: str
    regime: str
    numerator: str
    denominator: str
    limit: float
    per_byte: bool = False
    bound: str | None = None


TARGETS = (
    Target("warm save / QEMU multifd", "warm", "ps save", "qemu multifd", 1.0),
    Target("warm save / one-writer floor", "warm", "ps save", "one writer", 1.15),
    Target("durable save / QEMU multifd + fdatasync", "durable", "ps save", "qemu multifd",
           0.9),
    Target("direct save s/byte / dd direct s/byte", "durable", "ps save direct", "dd direct",
           1.25, per_byte=True),
    Target("restore / QEMU multifd load", "warm", "ps restore", "qemu load multifd", 0.8,
           bound="reader per CPU"),
    Target("warm save over an image / to a new path", "warm", "ps save over", "ps save", 1.1),
    Target("durable save over an image / to a new path", "durable", "ps save over", "ps save",
           1.1),
)

Key = tuple[int, str, str, str, int | None]  # round, workload, regime, contender, channels


def _timed(records: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    return {(r["round"], r["workload"], r["regime"], r["contender"], r["channels"]): r
            for r in records if "seconds" in r}


def _find(timed: dict[Key, dict[str, Any]], round_: int, workload: str, regime: str,
          name: str, channels: int | None) -> dict[str, Any] | None:
    """``name``'s run in that round at ``channels``, or its only run when it
    has no channel count (dd, the floors)."""
    found = timed.get((round_, workload, regime, name, channels))
    return found if found is not None else timed.get((round_, workload, regime, name, None))


def _ratio(timed: dict[Key, dict[str, Any]], record: dict[str, Any], other: str | None,
           per_byte: bool = False) -> float | None:
    if other is None:
        return None
    found = _find(timed, record["round"], record["workload"], record["regime"], other,
                  record["channels"])
    if found is None or not found["seconds"]:
        return None
    if per_byte:
        if not record.get("bytes_written") or not found.get("bytes_written"):
            return None
        return ((record["seconds"] / record["bytes_written"])
                / (found["seconds"] / found["bytes_written"]))
    return record["seconds"] / found["seconds"]


def _bound_ratio(timed: dict[Key, dict[str, Any]], record: dict[str, Any],
                 target: Target) -> float | None:
    """The target's bound over its denominator in ``record``'s round, where
    the bound's run says it bounds (else None)."""
    if target.bound is None:
        return None
    bound = _find(timed, record["round"], record["workload"], record["regime"],
                  target.bound, None)
    if bound is None or not bound.get("bounds"):
        return None
    return _ratio(timed, {**bound, "channels": record["channels"]}, target.denominator)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(records: list[dict[str, Any]], sizes: dict[str, int]) -> list[dict[str, Any]]:
    """One row per workload, regime, contender and channel count, in the
    order first run; ``sizes`` gives each workload's image bytes."""
    timed = _timed(records)
    groups: dict[tuple[str, str, str, int | None], list[dict[str, Any]]] = {}
    for record in records:
        key = (record["workload"], record["regime"], record["contender"], record["channels"])
        groups.setdefault(key, []).append(record)
    rows = []
    for (workload, regime, name, channels), group in groups.items():
        first = group[0]
        ok = [r for r in group if "seconds" in r]
        median = _median([r["seconds"] for r in ok])
        verified = [r["verified"] for r in group if "verified" in r]
        peaks = [r["peak_rss_anon"] for r in group if "peak_rss_anon" in r]
        pss_peaks = [r["peak_pss_anon"] for r in group if "peak_pss_anon" in r]
        rows.append({
            "workload": workload, "regime": regime, "contender": name, "side": first["side"],
            "channels": channels, "runs": len(ok),
            "errors": [r["error"] for r in group if "error" in r],
            "median_seconds": median,
            "gbps": sizes[workload] / median / 1e9 if median else None,
            "peer": first["peer"], "floor": first["floor"],
            "vs_peer": _median([_ratio(timed, r, first["peer"]) for r in ok]),
            "vs_floor": _median([_ratio(timed, r, first["floor"]) for r in ok]),
            "verified": all(verified) if verified else None,
            "peak_rss_anon": max(peaks) if peaks else None,
            "peak_pss_anon": max(pss_peaks) if pss_peaks else None,
            "peak_page_tables": max((r.get("peak_page_tables", 0) for r in ok), default=None),
        })
    return rows


def target_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target at each workload and channel count where both sides
    were measured, plus the memory target of every parallel-save save."""
    timed = _timed(records)
    rows = []
    workloads = list(dict.fromkeys(r["workload"] for r in records))
    for workload in workloads:
        for target in TARGETS:
            per_channels: dict[int | None, list[float]] = {}
            bounds: dict[int | None, list[float]] = {}
            for record in timed.values():
                if (record["workload"], record["regime"], record["contender"]) != (
                        workload, target.regime, target.numerator):
                    continue
                ratio = _ratio(timed, record, target.denominator, target.per_byte)
                if ratio is not None:
                    per_channels.setdefault(record["channels"], []).append(ratio)
                bound = _bound_ratio(timed, record, target)
                if bound is not None:
                    bounds.setdefault(record["channels"], []).append(bound)
            for channels in sorted(per_channels, key=lambda c: -1 if c is None else c):
                ratio = statistics.median(per_channels[channels])
                row = {"workload": workload, "target": target.label,
                       "channels": channels, "value": ratio, "unit": "x",
                       "limit": target.limit, "per_round": per_channels[channels],
                       "pass": ratio <= target.limit}
                if channels in bounds:
                    reach = statistics.median(bounds[channels])
                    row.update(bound=target.bound, bound_value=reach,
                               out_of_reach=reach > target.limit)
                rows.append(row)
        # Pss_Anon summed over coordinator and channels (shared pages split)
        # plus their page tables (mapping the image costs those, and no Pss
        # counts them): what a save costs beyond the image.
        peaks: dict[int, int] = {}
        for record in records:
            if (record["workload"] == workload and record["contender"].startswith("ps save")
                    and "peak_pss_anon" in record):
                channels = record["channels"]
                peak = record["peak_pss_anon"] + record.get("peak_page_tables", 0)
                peaks[channels] = max(peaks.get(channels, 0), peak)
        for channels, peak in sorted(peaks.items()):
            rows.append({"workload": workload, "target": MEMORY_TARGET,
                         "channels": channels, "value": peak / MIB, "unit": "MiB",
                         "limit": MEMORY_LIMIT / MIB, "pass": peak < MEMORY_LIMIT})
    return rows


def channels_text(channels: int | None) -> str:
    return "-" if channels is None else str(channels)


def _vs(value: float | None, name: str | None) -> str:
    return f"{value:.2f}x {name}" if value is not None else ""


def format_table(rows: list[dict[str, Any]]) -> str:
    """Per workload and regime: each contender's median, GB/s of image and
    its ratios to its peer and its floor."""
    lines = []
    heading = None
    for row in rows:
        if (row["workload"], row["regime"]) != heading:
            heading = (row["workload"], row["regime"])
            if lines:
                lines.append("")
            lines.append(f"== {row['workload']}, {row['regime']} ==")
            lines.append(f"{'side':<8} {'contender':<20} {'ch':>3} {'median s':>9} "
                         f"{'GB/s':>7}  {'vs peer':<26} vs floor")
        median = row["median_seconds"]
        if median is None:
            lines.append(f"{row['side']:<8} {row['contender']:<20} "
                         f"{channels_text(row['channels']):>3}    failed: {row['errors'][0]}")
            continue
        flags = []
        if row["verified"] is False:
            flags.append("WRONG BYTES")
        if row["errors"]:
            flags.append(f"{len(row['errors'])} failed")
        # A pass moves a fraction of the image: its image GB/s would mislead.
        gbps = "" if row["contender"].startswith("ps pass") else f"{row['gbps']:.2f}"
        lines.append(f"{row['side']:<8} {row['contender']:<20} "
                     f"{channels_text(row['channels']):>3} {median:>9.3f} {gbps:>7}  "
                     f"{_vs(row['vs_peer'], row['peer']):<26} "
                     f"{_vs(row['vs_floor'], row['floor'])}"
                     f"{'  ' + ', '.join(flags) if flags else ''}".rstrip())
    return "\n".join(lines)


def format_targets(rows: list[dict[str, Any]]) -> str:
    """One line per target: what was measured, then the verdict with the
    target it was held to (a ratio of medians, or a memory ceiling)."""
    lines = [f"{'workload':<14} {'target':<42} {'ch':>3} {'value':>10}  result (target)"]
    for row in rows:
        if row["unit"] == "x":
            value, limit = f"{row['value']:.3f}x", f"ratio <= {row['limit']:g}x"
        else:
            value, limit = f"{row['value']:.0f} MiB", f"below {row['limit']:g} MiB"
        verdict = "PASS" if row["pass"] else "MISS"
        if not row["pass"] and row.get("out_of_reach"):
            verdict += f", out of reach: the {row['bound']} floor takes {row['bound_value']:.3f}x"
        lines.append(f"{row['workload']:<14} {row['target']:<42} "
                     f"{channels_text(row['channels']):>3} {value:>10}  "
                     f"{verdict} (target: {limit})")
    return "\n".join(lines)


# --- the machine -----------------------------------------------------------


def _first_line(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def machine(workdir: Path, memory_dir: Path = SHM_DIR) -> dict[str, Any]:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        memory = int(meminfo.readline().split()[1]) * 1024  # MemTotal comes first
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    binary = qemu_binary()
    repository = Path(parallel_save.__file__).resolve().parent.parent
    return {
        "cores": os.cpu_count(), "cpu": cpu, "memory_bytes": memory,
        "workdir_fs": mount_of(workdir),
        "memory_fs": {**mount_of(memory_dir), "kind": memory_kind(memory_dir).text},
        "kernel": platform.release(),
        "qemu": _first_line([binary, "--version"]) if binary else None,
        "python": platform.python_version(), "numpy": np.__version__,
        "parallel_save": parallel_save.__version__,
        "commit": _first_line(["git", "-C", str(repository), "rev-parse", "HEAD"]),
    }


# --- files -------------------------------------------------------------------


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Throughput against channels, one line per contender; contenders
    without a channel count (floors) are horizontal lines.  A row of panels
    per workload: warm save, durable save, restore."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in a test worker
    import matplotlib.pyplot as plt

    # More series than the default ten colours: tab20's strong shades first.
    colours = plt.cm.tab20.colors[0::2] + plt.cm.tab20.colors[1::2]
    panels = (("save", "warm"), ("save", "durable"), ("restore", "warm"))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    figure, axes = plt.subplots(len(workloads), len(panels), squeeze=False,
                                figsize=(16, 4.5 * len(workloads)))
    channel_ticks = sorted({r["channels"] for r in rows if r["channels"] is not None})
    for line_axes, workload in zip(axes, workloads):
        for axis, (side, regime) in zip(line_axes, panels):
            lines: dict[str, list[tuple[int, float]]] = {}
            for row in rows:
                if (row["workload"], row["side"], row["regime"]) != (workload, side, regime) \
                        or row["gbps"] is None or row["contender"].startswith("ps pass"):
                    continue
                if row["channels"] is None:
                    axis.axhline(row["gbps"], linestyle="--", linewidth=1,
                                 color=colours[len(axis.lines) % 20], label=row["contender"])
                else:
                    lines.setdefault(row["contender"], []).append(
                        (row["channels"], row["gbps"]))
            for name, points in lines.items():
                points.sort()
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                          color=colours[len(axis.lines) % 20], label=name)
            if channel_ticks:
                axis.set_xscale("log", base=2)
                axis.set_xticks(channel_ticks, [str(c) for c in channel_ticks])
            axis.set_title(f"{workload}: {side}, {regime}", fontsize=9)
            axis.set_xlabel("channels")
            axis.set_ylabel("GB/s of image (median)")
            axis.set_ylim(bottom=0)
            axis.grid(True, alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
