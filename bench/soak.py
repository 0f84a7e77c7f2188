"""Soak: hundreds of save and restore cycles with random faults, and a
count of every image that came out corrupted or lost (there must be none).

    python -m bench.soak --cycles 300 [--seed N] [--json FILE]

Each cycle saves a few RAM blocks (1 to 8 MiB in all) over a few passes of
random changes, to a disk directory or to a tmpfs too small for the larger
images, sometimes in place, sometimes with O_DIRECT, over whatever the last
cycle left at that path.  One fault is injected at a random moment:

    kill        SIGKILL a random channel
    interrupt   SIGINT to this process (KeyboardInterrupt, possibly
                landing in the cleanup of the save itself)
    terminate   SIGTERM to this process, under terminate_cleanly
    enospc      an image larger than the tmpfs it is saved to
    garbage     a malformed dirty set in the middle of the passes
    restore     SIGKILL a channel of the restore that checks the image
    coordinator SIGKILL the coordinator itself: the save runs in a process
                of its own, killed in any phase (setup, a pass, complete,
                the rename); nothing of it may survive: no channel, no
                segment in /dev/shm, no partial file

Then the cycle is judged.  A save that returned must restore exactly the
memory it saved.  A save that raised must have raised one of the errors a
failure may raise, and left at its path either the older image, byte for
byte, or (with no older image, or in place) an image that ``open_image``
reports as incomplete.  Nothing may be left behind: no channel process,
control segment, partial file or file descriptor.  A hang aborts the run
with every thread's traceback.

Interrupting the soak itself: Ctrl-\\ (SIGQUIT); Ctrl-C is one of the faults.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import parallel_save as ps
from parallel_save.signals import STOP_SIGNALS, terminate_cleanly

PAGE_SIZE = 4096
FAULTS = ("none", "kill", "interrupt", "terminate", "enospc", "garbage", "restore",
          "coordinator")
# The save that the "coordinator" fault kills: a process of its own.
SAVE_IN_A_PROCESS = """
import json, sys
import parallel_save as ps
image, blocks, options, passes = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), \
    int(sys.argv[4])
blocks = [ps.RamBlock.from_file(name, path) for name, path in blocks.items()]
with ps.Saver(image, blocks, **options) as saver:
    saver.setup()
    for _ in range(passes):
        saver.iterate()
    saver.complete()
"""
# Larger images do not fit on the small tmpfs with an older one beside them.
SMALL_TMPFS = 6 << 20
# A cycle that takes longer than this is a hang.
HANG_SECONDS = 120
# A fault lands at a random moment within this many times the usual
# duration of a save (or restore), measured as the soak goes.
FAULT_SPREAD = 1.2
# Errors that a failed save or restore may raise: anything else is a bug.
LOUD = (ps.ChannelError, OSError, KeyboardInterrupt, SystemExit)


@dataclass
class Known:
    """What the soak knows is at an image path: a complete image (its
    bytes' digest and the memory it holds) or nothing loadable."""

    digest: str | None = None
    blocks: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Tally:
    cycles: int = 0
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    slowest_failure: float = 0.0
    context: str = ""  # the cycle's fault and options

    def problem(self, cycle: int, text: str) -> None:
        self.problems.append(f"cycle {cycle} ({self.context}): {text}")
        print(f"PROBLEM {self.problems[-1]}", file=sys.stderr, flush=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def channel_pids() -> list[int]:
    """Our channel processes, as the kernel lists this thread's children
    (channels are bare forks: multiprocess does not know of them)."""
    children = Path(f"/proc/self/task/{os.getpid()}/children").read_text()
    return [int(pid) for pid in children.split()]


class Fault:
    """A fault fired from a timer thread at a random moment."""

    def __init__(self, kind: str, rng: np.random.Generator) -> None:
        self.kind = kind
        self.fired_at: float | None = None
        self._rng = rng
        self._timer: threading.Timer | None = None

    def arm(self, usual_seconds: float) -> None:
        if self.kind in ("kill", "interrupt", "terminate"):
            self._start(usual_seconds, self._fire)

    def arm_for_restore(self, usual_seconds: float) -> None:
        if self.kind == "restore":
            self._start(usual_seconds, self._kill_a_channel)

    def _start(self, usual_seconds: float, action) -> None:
        delay = float(self._rng.uniform(0, FAULT_SPREAD * usual_seconds))
        self._timer = threading.Timer(delay, action)
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
            self._timer = None
        time.sleep(0.001)  # a signal sent just now is raised here, not later

    def _fire(self) -> None:
        if self.kind == "kill":
            self._kill_a_channel()
        else:
            self.fired_at = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT if self.kind == "interrupt" else signal.SIGTERM)

    def _kill_a_channel(self) -> None:
        pids = channel_pids()
        if pids:
            self.fired_at = time.monotonic()
            try:
                os.kill(pids[int(self._rng.integers(len(pids)))], signal.SIGKILL)
            except ProcessLookupError:
                pass


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except FileNotFoundError:
        return "gone"


def garbage_dirty(rng: np.random.Generator, blocks: list[ps.RamBlock]) -> object:
    block = blocks[int(rng.integers(len(blocks)))]
    return [
        [True] * block.pages,
        {"no such block": np.ones(block.pages, bool)},
        {block.name: np.ones(block.pages + 1, bool)},
        {block.name: np.ones(block.pages, float)},
        {block.name: "every page"},
    ][int(rng.integers(5))]


class Soak:
    def __init__(self, root: Path, small: Path | None, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.shm = Path("/dev/shm") / f"parallel-save-soak-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.shm.mkdir()
        self.paths = [root / "disk.img"] + ([small / "small.img"] if small else [])
        self.known = {path: Known() for path in self.paths}
        self.tally = Tally()
        self.fds = self._open_fds()
        self.handlers = self._handlers()
        # Moving averages of the duration of a save and of a restore.
        self.usual = {"save": 0.1, "restore": 0.05}

    def close(self) -> None:
        shutil.rmtree(self.shm, ignore_errors=True)

    @staticmethod
    def _handlers() -> dict[int, object]:
        return {number: signal.getsignal(number) for number in STOP_SIGNALS}

    @staticmethod
    def _open_fds() -> set[str]:
        gc.collect()
        return set(os.listdir("/proc/self/fd"))

    # --- memory ---

    def _blocks(self, total_pages: int, zero: float) -> list[ps.RamBlock]:
        """Three blocks of ``total_pages`` in all, up to ``zero`` of their
        pages zero."""
        cuts = np.sort(self.rng.choice(np.arange(1, total_pages), size=2, replace=False))
        sizes = np.diff(np.concatenate(([0], cuts, [total_pages])))
        blocks = []
        for number, pages in enumerate(sizes):
            block = ps.RamBlock.from_file(f"ram{number}", self.shm / f"ram{number}",
                                          length=int(pages) * PAGE_SIZE, create=True)
            self._scribble(block, np.ones(block.pages, bool), float(self.rng.uniform(0, zero)))
            blocks.append(block)
        return blocks

    def _scribble(self, block: ps.RamBlock, where: np.ndarray, zero: float) -> None:
        """New bytes for the pages ``where``: zero with probability ``zero``."""
        pages = block.array.reshape(-1, PAGE_SIZE)
        chosen = np.flatnonzero(where)
        zeroed = self.rng.random(chosen.size) < zero
        pages[chosen[zeroed]] = 0
        filled = chosen[~zeroed]
        pages[filled] = self.rng.integers(1, 256, size=(filled.size, PAGE_SIZE), dtype=np.uint8)

    def _changes(self, blocks: list[ps.RamBlock]) -> dict[str, np.ndarray]:
        """Change some pages of each block; the dirty set says which (and
        a few that were touched without changing)."""
        dirty = {}
        for block in blocks:
            changed = self.rng.random(block.pages) < self.rng.uniform(0, 0.3)
            self._scribble(block, changed, 0.4)
            dirty[block.name] = changed | (self.rng.random(block.pages) < 0.02)
        return dirty

    # --- one cycle ---

    def cycle(self, number: int) -> None:
        kind = FAULTS[int(self.rng.integers(len(FAULTS)))]
        if kind == "enospc" and len(self.paths) == 1:
            kind = "none"
        path = self.paths[-1] if kind == "enospc" else self.paths[int(self.rng.integers(
            len(self.paths)))]
        on_disk = path == self.paths[0]
        if kind == "enospc":  # at least 5.6 MiB of data for a 6 MiB disk
            blocks = self._blocks(int(self.rng.integers(2048, 3072)), zero=0.3)
        elif on_disk and self.rng.random() < 0.5:
            blocks = self._blocks(int(self.rng.integers(1024, 2048)), zero=0.9)
        else:
            blocks = self._blocks(int(self.rng.integers(3, 256)), zero=0.9)
        options = {"channels": int(self.rng.integers(1, 9)),
                   "in_place": bool(self.rng.random() < 0.2),
                   "direct_io": bool(on_disk and self.rng.random() < 0.3),
                   "sync": bool(self.rng.random() < 0.5)}
        old = self.known[path]
        self.tally.context = (f"{kind}, {path.name}, {sum(b.pages for b in blocks)} pages, "
                              + ", ".join(f"{k}={v}" for k, v in options.items()))
        fault = Fault(kind, self.rng)
        if kind == "coordinator":
            self._kill_the_coordinator(number, path, blocks, options, old, fault)
            return
        error: BaseException | None = None
        expected: dict[str, np.ndarray] = {}
        started = time.monotonic()
        # terminate_cleanly outside the fault's timer: a SIGTERM that fires
        # just after the save must not kill the soak.
        with terminate_cleanly():
            try:
                try:
                    fault.arm(self.usual["save"])
                    with ps.Saver(path, blocks, **options) as saver:
                        saver.setup()
                        saver.iterate()
                        for _ in range(int(self.rng.integers(0, 4))):
                            dirty = self._changes(blocks)
                            if kind == "garbage":
                                self._refused(number, saver, garbage_dirty(self.rng, blocks))
                            saver.iterate(dirty)
                        dirty = self._changes(blocks)
                        expected = {b.name: b.array.copy() for b in blocks}
                        saver.complete(dirty)
                finally:
                    fault.disarm()
            except LOUD as raised:
                error = raised
                if isinstance(raised, (KeyboardInterrupt, SystemExit)) and fault.fired_at is None:
                    raise  # not ours: the soak itself is being stopped
        if error is None:
            self.tally.outcomes[f"save [{kind}]: completed"] += 1
            self._learn("save", time.monotonic() - started)
        else:
            self.tally.outcomes[f"save [{kind}]: failed ({type(error).__name__})"] += 1
            since = fault.fired_at if fault.fired_at is not None else started
            self.tally.slowest_failure = max(self.tally.slowest_failure,
                                             time.monotonic() - since)
        failed = error is not None
        error = None  # its traceback holds the pass's frames, and they a mapping
        self._check_leftovers(number, path)
        self._judge(number, path, old, expected, options["in_place"], failed, fault)
        for block in blocks:
            os.unlink(block.source.path)

    def _kill_the_coordinator(self, number: int, path: Path, blocks: list[ps.RamBlock],
                              options: dict, old: Known, fault: Fault) -> None:
        """The save in a process of its own (its own process group, so that
        whatever it started can be found), SIGKILLed at a random moment."""
        expected = {b.name: b.array.copy() for b in blocks}
        command = [sys.executable, "-c", SAVE_IN_A_PROCESS, str(path),
                   json.dumps({b.name: b.source.path for b in blocks}), json.dumps(options),
                   str(int(self.rng.integers(0, 3)))]
        started = time.monotonic()
        process = subprocess.Popen(command, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        delay = float(self.rng.uniform(0, FAULT_SPREAD * (self.usual["save"] + 0.3)))
        try:
            process.wait(delay)
        except subprocess.TimeoutExpired:
            fault.fired_at = time.monotonic()
            process.kill()
        _, err = process.communicate()
        if process.returncode not in (0, -signal.SIGKILL):
            self.tally.problem(number, f"the save process failed on its own: "
                                       f"{err.decode(errors='replace')[-300:]}")
        deadline = time.monotonic() + 5
        while True:  # its channels die with it, whatever they were doing
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            if time.monotonic() > deadline:
                self.tally.problem(number, "processes of a killed save survived it")
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        self._named_leftovers(number, path, process.pid)
        killed = fault.fired_at is not None
        self.tally.outcomes[f"save [coordinator]: {'killed' if killed else 'completed'}"] += 1
        if not killed:
            self._learn("save", time.monotonic() - started)
        self._judge(number, path, old, expected, options["in_place"],
                    process.returncode != 0, fault)
        for block in blocks:
            os.unlink(block.source.path)

    def _refused(self, number: int, saver: ps.Saver, dirty: object) -> None:
        try:
            saver.iterate(dirty)
        except ps.BlockError:
            return
        self.tally.problem(number, f"a malformed dirty set was accepted: {dirty!r:.80}")

    def _judge(self, number: int, path: Path, old: Known, saved: dict[str, np.ndarray],
               in_place: bool, failed: bool, fault: Fault) -> None:
        """What is at ``path`` now, and whether it may be there: after a
        save that returned, the image it saved; after one that raised, the
        older image intact (unless in place), or an incomplete one, or the
        new one if the fault landed after the rename."""
        keeps_old = failed and old.digest is not None and not in_place
        try:
            with ps.open_image(path) as image:
                names = sorted(image.blocks)
        except (ps.IncompleteImageError, FileNotFoundError) as error:
            if not failed:
                self.tally.problem(number, f"a save that returned left no image: {error}")
            elif keeps_old:
                self.tally.problem(number, f"LOST: a failed save destroyed the older "
                                           f"image at {path}: {error}")
            else:
                self._left(f"{type(error).__name__} ({'in place' if in_place else 'no older image'})")
            self.known[path] = Known()
            return
        except ps.FormatError as error:
            self.tally.problem(number, f"UNREADABLE, not even incomplete: {error}")
            self.known[path] = Known()
            return
        if failed and old.digest is not None and digest(path) == old.digest:
            # In place too: a save killed before it touched the file.
            self._left("the older image, byte for byte")
            return
        if not saved or sorted(saved) != names:
            self.tally.problem(number, f"CORRUPT: a complete image at {path} that is "
                                       f"neither the older one nor the one saved")
            return
        if self._holds(path, saved):
            if failed:  # the fault landed once the image was in place
                self._left("the new image, complete")
            self.known[path] = Known(digest(path), saved)
            self._restore_under_fire(number, path, saved, fault)
        else:
            self.tally.problem(number, f"CORRUPT: {path} does not restore what was saved")

    def _left(self, what: str) -> None:
        self.tally.outcomes[f"a failed save left: {what}"] += 1

    def _holds(self, path: Path, blocks: dict[str, np.ndarray]) -> bool:
        targets = {name: self._garbage(name, data.size) for name, data in blocks.items()}
        ps.restore(path, targets, channels=int(self.rng.integers(1, 9)))
        return all(np.array_equal(targets[n].array, blocks[n]) for n in blocks)

    def _restore_under_fire(self, number: int, path: Path, saved: dict[str, np.ndarray],
                            fault: Fault) -> None:
        if fault.kind != "restore":
            return
        before = digest(path)
        targets = {name: self._garbage(name, data.size) for name, data in saved.items()}
        started = time.monotonic()
        try:
            fault.arm_for_restore(self.usual["restore"])
            try:
                ps.restore(path, targets, channels=int(self.rng.integers(1, 9)))
            finally:
                fault.disarm()
            self._learn("restore", time.monotonic() - started)
        except ps.ChannelError:
            self.tally.outcomes["restore [kill]: failed (ChannelError)"] += 1
        else:
            self.tally.outcomes["restore [kill]: completed"] += 1
            if not all(np.array_equal(targets[n].array, saved[n]) for n in saved):
                self.tally.problem(number, "CORRUPT: a restore that returned is not exact")
        self._check_leftovers(number, path)
        if digest(path) != before:
            self.tally.problem(number, "a restore changed the image")

    def _learn(self, what: str, seconds: float) -> None:
        self.usual[what] = 0.9 * self.usual[what] + 0.1 * seconds

    def _garbage(self, name: str, length: int) -> ps.RamBlock:
        block = ps.RamBlock.from_file(name, self.shm / f"target-{name}", length=length,
                                      create=True)
        block.array[:] = self.rng.integers(1, 256, size=length, dtype=np.uint8)
        return block

    def _check_leftovers(self, number: int, path: Path) -> None:
        left = channel_pids()
        if left:
            states = {pid: _state(pid) for pid in left}
            self.tally.problem(number, f"channel processes left: {states}")
        self._named_leftovers(number, path, os.getpid())

    def _named_leftovers(self, number: int, path: Path, pid: int) -> None:
        """Segments of the save's process in /dev/shm, partial files beside
        its image: none may be left."""
        segments = [n for n in os.listdir("/dev/shm") if n.startswith(f"parallel-save-{pid}-")]
        if segments:
            self.tally.problem(number, f"segments left: {segments}")
        partials = [n for n in os.listdir(path.parent) if n.endswith(".partial")]
        if partials:
            self.tally.problem(number, f"partial files left: {partials}")

    def check_process(self, number: int) -> None:
        """Between cycles, when the cycle's blocks (each a mapping, and so
        a descriptor) are gone: no descriptor left open, no signal handler
        left swapped (Ctrl-C or SIGTERM ignored from then on)."""
        opened = self._open_fds() - self.fds
        if opened:
            targets = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in sorted(opened)}
            self.tally.problem(number, f"file descriptors left open: {targets}")
            self.fds |= opened  # reported once
        swapped = {n: h for n, h in self._handlers().items() if h != self.handlers[n]}
        if swapped:
            self.tally.problem(number, f"signal handlers left swapped: {swapped}")
            for signum in swapped:  # put back, so that later cycles still test them
                signal.signal(signum, self.handlers[signum])


def mount_small_tmpfs(where: Path) -> str | None:
    """Mount a small tmpfs; returns why it could not be, or None."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_TMPFS}", "tmpfs",
                           str(where)], capture_output=True, text=True, check=False)
    if done.returncode:
        return done.stderr.strip() or "mount failed"
    return None


def run(cycles: int, seed: int, directory: str | None) -> Tally:
    root = Path(tempfile.mkdtemp(prefix="parallel-save-soak-", dir=directory))
    small = root / "small"
    why = mount_small_tmpfs(small)
    if why:
        print(f"no enospc faults: cannot mount a tmpfs ({why})", file=sys.stderr)
    soak = Soak(root / "disk", None if why else small, seed)
    (root / "disk").mkdir()
    started = time.monotonic()
    try:
        for number in range(1, cycles + 1):
            faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
            soak.cycle(number)
            soak.check_process(number)
            soak.tally.cycles = number
            if number % 50 == 0:
                print(f"{number} cycles, {len(soak.tally.problems)} problems, "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
        soak.close()
        if not why:
            subprocess.run(["umount", "-l", str(small)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    return soak.tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed (default: a new one, printed)")
    parser.add_argument("--dir", default=None,
                        help="where the disk images go (default: the temporary directory)")
    parser.add_argument("--json", metavar="FILE", help="also write the counts as JSON")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    print(f"soak: {args.cycles} cycles, seed {seed}", file=sys.stderr)
    started = time.monotonic()
    tally = run(args.cycles, seed, args.dir)
    result = {"cycles": tally.cycles, "seed": seed, "seconds": round(time.monotonic() - started, 1),
              "outcomes": dict(sorted(tally.outcomes.items())), "problems": tally.problems,
              "slowest_failure_seconds": round(tally.slowest_failure, 3)}
    for outcome, count in sorted(tally.outcomes.items()):
        print(f"{count:6d}  {outcome}")
    print(f"{len(tally.problems)} problems (corrupted, lost or leaked) in {tally.cycles} "
          f"cycles; slowest failure {tally.slowest_failure:.3f} s after its fault")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
