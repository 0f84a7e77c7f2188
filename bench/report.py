"""Turning runs into answers: medians, the headline ratios against the
issue's targets, the table, the JSON record and the plot.

A run record is a dict: ``round``, ``contender`` (the result's name),
``side``, ``channels`` (None when the contender has no channel count),
``reference`` and either ``seconds`` (plus whatever the contender reports)
or ``error``.

Ratios are taken per round (each parallel-save run divided by its peer's
run of the same round, which met the same disk weather) and summarised as
the median over rounds.  GB/s is always bytes of the image (1 GB = 10^9
bytes) per second, whatever the contender wrote: dd copies only the
non-zero bytes, so its GB/s is the image throughput no saver can beat.
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

MIB = 1 << 20
MEMORY_LIMIT = 150 * MIB


@dataclass(frozen=True)
class Target:
    label: str
    numerator: str
    denominator: str
    limit: float


TARGETS = (
    Target("save / QEMU multifd (buffered, no sync)", "ps save", "qemu multifd", 0.8),
    Target("save / dd ceiling", "ps save", "dd", 1.25),
    Target("direct-io save / QEMU direct-io", "ps save direct", "qemu multifd direct", 0.3),
    Target("restore / QEMU multifd load", "ps restore", "qemu load multifd", 0.8),
    Target("1% pass / full save", "ps pass 1%", "ps save", 0.03),
)


def _timed(records: list[dict[str, Any]]) -> dict[tuple[int, str, int | None], float]:
    return {(r["round"], r["contender"], r["channels"]): r["seconds"]
            for r in records if "seconds" in r}


def _lookup(timed: dict, round_: int, name: str, channels: int | None) -> float | None:
    """``name``'s time in ``round_`` at ``channels``, or its only time when
    it has no channel count (dd)."""
    found = timed.get((round_, name, channels))
    return found if found is not None else timed.get((round_, name, None))


def summarise(records: list[dict[str, Any]], image_bytes: int) -> list[dict[str, Any]]:
    """One row per contender and channel count, in the order first run."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["contender"], record["channels"]), []).append(record)
    medians = {key: statistics.median(r["seconds"] for r in group if "seconds" in r)
               for key, group in groups.items() if any("seconds" in r for r in group)}
    rows = []
    for (name, channels), group in groups.items():
        first = group[0]
        median = medians.get((name, channels))
        reference = first["reference"]
        base = None
        if reference is not None:
            base = medians.get((reference, channels), medians.get((reference, None)))
        verified = [r["verified"] for r in group if "verified" in r]
        peaks = [r["peak_rss_anon"] for r in group if "peak_rss_anon" in r]
        pss_peaks = [r["peak_pss_anon"] for r in group if "peak_pss_anon" in r]
        rows.append({
            "contender": name, "side": first["side"], "channels": channels,
            "runs": sum("seconds" in r for r in group),
            "errors": [r["error"] for r in group if "error" in r],
            "median_seconds": median,
            "gbps": image_bytes / median / 1e9 if median else None,
            "reference": reference,
            "vs_reference": median / base if median is not None and base else None,
            "verified": all(verified) if verified else None,
            "peak_rss_anon": max(peaks) if peaks else None,
            "peak_pss_anon": max(pss_peaks) if pss_peaks else None,
        })
    return rows


def target_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target at each channel count where both sides were measured,
    plus the memory target for every channel count of a parallel-save save."""
    timed = _timed(records)
    rows = []
    for target in TARGETS:
        channel_counts = sorted({c for (_, name, c) in timed if name == target.numerator},
                                key=lambda c: -1 if c is None else c)
        for channels in channel_counts:
            per_round = []
            for round_ in sorted({r for (r, _, _) in timed}):
                numerator = timed.get((round_, target.numerator, channels))
                denominator = _lookup(timed, round_, target.denominator, channels)
                if numerator is not None and denominator:
                    per_round.append(numerator / denominator)
            if per_round:
                ratio = statistics.median(per_round)
                rows.append({"target": target.label, "channels": channels, "value": ratio,
                             "unit": "x", "limit": target.limit, "per_round": per_round,
                             "pass": ratio <= target.limit})
    # Two readings of the memory target: RssAnon summed (counts the
    # coordinator's pages that forked channels share once per process: an
    # upper bound) and Pss_Anon summed (shares split: what the save costs).
    for key, label in (("peak_rss_anon", "peak RssAnon (upper bound), coordinator + channels"),
                       ("peak_pss_anon", "peak Pss_Anon, coordinator + channels")):
        peaks: dict[int, int] = {}
        for record in records:
            if record["contender"].startswith("ps save") and key in record:
                channels = record["channels"]
                peaks[channels] = max(peaks.get(channels, 0), record[key])
        for channels, peak in sorted(peaks.items()):
            rows.append({"target": label, "channels": channels,
                         "value": peak / MIB, "unit": "MiB", "limit": MEMORY_LIMIT / MIB,
                         "pass": peak < MEMORY_LIMIT})
    return rows


def channels_text(channels: int | None) -> str:
    return "-" if channels is None else str(channels)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (f"{'side':<8} {'contender':<26} {'ch':>3} {'median s':>9} {'GB/s':>7}  "
              f"vs (ratio of medians)")
    lines = [header]
    for row in rows:
        median = row["median_seconds"]
        if median is None:
            lines.append(f"{row['side']:<8} {row['contender']:<26} "
                         f"{channels_text(row['channels']):>3}    failed: {row['errors'][0]}")
            continue
        vs = (f"{row['vs_reference']:.3f}x {row['reference']}"
              if row["vs_reference"] is not None else "")
        flags = []
        if row["verified"] is False:
            flags.append("WRONG BYTES")
        if row["errors"]:
            flags.append(f"{len(row['errors'])} failed")
        # A pass moves a fraction of the image: its image GB/s would mislead.
        gbps = "" if row["contender"].startswith("ps pass") else f"{row['gbps']:.2f}"
        lines.append(f"{row['side']:<8} {row['contender']:<26} "
                     f"{channels_text(row['channels']):>3} {median:>9.3f} {gbps:>7}  "
                     f"{vs}{'  ' + ', '.join(flags) if flags else ''}")
    return "\n".join(lines)


def format_targets(rows: list[dict[str, Any]]) -> str:
    """One line per target: what was measured, then the verdict with the
    target it was held to (a ratio of medians, or a memory ceiling)."""
    lines = [f"{'target':<42} {'ch':>3} {'value':>10}  result (target)"]
    for row in rows:
        if row["unit"] == "x":
            value, limit = f"{row['value']:.3f}x", f"ratio <= {row['limit']:g}x"
        else:
            value, limit = f"{row['value']:.0f} MiB", f"below {row['limit']:g} MiB"
        verdict = "PASS" if row["pass"] else "MISS"
        lines.append(f"{row['target']:<42} {channels_text(row['channels']):>3} {value:>10}  "
                     f"{verdict} (target: {limit})")
    return "\n".join(lines)


# --- the machine -----------------------------------------------------------


def _file_system(path: Path) -> dict[str, str]:
    """Type and device of the mount holding ``path`` (the longest mount
    point that contains it)."""
    real = os.path.realpath(path)
    best = {"type": "unknown", "device": "unknown", "mount": "/"}
    best_length = -1
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            device, mount, fstype = line.split()[:3]
            inside = real == mount or real.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > best_length:
                best, best_length = {"type": fstype, "device": device, "mount": mount}, len(mount)
    return best


def _first_line(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def machine(workdir: Path) -> dict[str, Any]:
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
        "workdir_fs": _file_system(workdir), "kernel": platform.release(),
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
    without a channel count are horizontal lines.  Save and restore panels."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in a test worker
    import matplotlib.pyplot as plt

    # More series than the default ten colours: tab20's strong shades first.
    colours = plt.cm.tab20.colors[0::2] + plt.cm.tab20.colors[1::2]
    sides = ("save", "restore")
    figure, axes = plt.subplots(1, len(sides), figsize=(13, 5.5))
    channel_ticks = sorted({r["channels"] for r in rows if r["channels"] is not None})
    for axis, side in zip(axes, sides):
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if row["side"] != side or row["gbps"] is None or row["contender"].startswith(
                    "ps pass"):
                continue
            if row["channels"] is None:
                axis.axhline(row["gbps"], linestyle="--", linewidth=1,
                             color=colours[len(axis.lines) % 20], label=row["contender"])
            else:
                lines.setdefault(row["contender"], []).append((row["channels"], row["gbps"]))
        for name, points in lines.items():
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                      color=colours[len(axis.lines) % 20], label=name)
        if channel_ticks:
            axis.set_xscale("log", base=2)
            axis.set_xticks(channel_ticks, [str(c) for c in channel_ticks])
        axis.set_title(side)
        axis.set_xlabel("channels")
        axis.set_ylabel("GB/s of image (median)")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
