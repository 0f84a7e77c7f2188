"""Peak private memory of a save: the coordinator plus all its channels
(and, beside it, the peak of their page tables, which no Pss counts).

The image is a shared file mapping, counted in RssShmem, so RssAnon (from
/proc/PID/status) is exactly the memory a save costs beyond the image.  It
is summed over the process and every descendant; a forked channel's
copy-on-write pages that it still shares with the coordinator count in both,
so the sum is an upper bound.  smaps_rollup's Pss_Anon splits such shared
pages between the processes that map them: the memory the save really
costs.  Reading it walks the page tables (milliseconds per process), too
slow to sample continuously while timing, so it is read only when the
RssAnon sum reaches a new peak, which happens a handful of times per run.

A thread in the benchmark's own process samples the tree, so the sampling
never runs in, or competes for the GIL of, the processes it measures.
"""

from __future__ import annotations

import os
import threading
from typing import Self

# Sampling every 20 ms costs well under 1 % of a core; once the channels
# are up, the process tree is rescanned less often (they live for the whole
# save).
SAMPLE_INTERVAL = 0.02
RESCAN_EVERY = 10


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process (this kernel has no
    /proc/PID/task/TID/children, so the tree comes from /proc/*/stat)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                text = stat.read()
        except OSError:
            continue  # exited meanwhile
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = text[text.rindex(b")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_pids().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _proc_kib(pid: int, file: str, field: bytes) -> int:
    """A "Field:  N kB" line of /proc/PID/FILE, in bytes; 0 once the
    process has exited."""
    try:
        with open(f"/proc/{pid}/{file}", "rb") as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` in bytes."""
    return _proc_kib(pid, "status", b"RssAnon:")


def status_bytes(pid: int) -> tuple[int, int]:
    """RssAnon and VmPTE (its page tables) of ``pid`` in bytes, one read;
    zeros once the process has exited."""
    found = {b"RssAnon:": 0, b"VmPTE:": 0}
    try:
        with open(f"/proc/{pid}/status", "rb") as lines:
            for line in lines:
                key = line.split(maxsplit=1)[0] if line.strip() else b""
                if key in found:
                    found[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found[b"RssAnon:"], found[b"VmPTE:"]


def pss_anon(pid: int) -> int:
    """Pss_Anon of ``pid`` in bytes: shared copy-on-write pages split
    between their sharers."""
    return _proc_kib(pid, "smaps_rollup", b"Pss_Anon:")


class PeakRssAnon:
    """``with PeakRssAnon(pid) as peak: ...`` then ``peak.bytes``: the largest
    summed RssAnon of ``pid``'s tree seen; at that time, ``peak.processes``
    in the tree and ``peak.root_bytes`` of them in ``pid`` itself."""

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.root = root
        self.interval = interval
        self.bytes = 0
        self.processes = 0
        self.root_bytes = 0
        self.pss_bytes = 0  # the largest Pss_Anon sum, read at RssAnon peaks
        self.pte_bytes = 0  # the largest VmPTE sum: page tables, in no Pss
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        tree: list[int] = []
        settled = False
        while True:
            # Scan every sample until the channels have appeared and their
            # number held for one scan (they are forked all at once at
            # setup), then rarely: a scan costs ~2 ms of CPU.
            if not settled or self.samples % RESCAN_EVERY == 0:
                found = process_tree(self.root)
                settled = settled or (len(found) > 1 and len(found) == len(tree))
                tree = found
            sizes, tables = zip(*(status_bytes(pid) for pid in tree))
            self.pte_bytes = max(self.pte_bytes, sum(tables))
            self.samples += 1
            if sum(sizes) > self.bytes:
                self.bytes, self.processes, self.root_bytes = sum(sizes), len(tree), sizes[0]
                self.pss_bytes = max(self.pss_bytes, sum(pss_anon(pid) for pid in tree))
            if self._stop.wait(self.interval):
                return
