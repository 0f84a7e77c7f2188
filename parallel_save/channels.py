"""The channel group: the coordinator's side of the channels, and the one
owner of the wire between them.

Like QEMU's multifd.c, it owns the life of the channels (start, hand out
work, wait for a pass, stop) and everything that travels to them: the
control segment, the chunks of each pass (dealt out, or claimed a shard
at a time through the claims pipe), the messages, the counters and the
merged file bitmap.  Callers say what a pass covers (each block's dirty or
present pages); never how it reaches the channels.

A channel that raises or dies turns into a :class:`ChannelError` within
one wait interval, never a hang, and every other channel is stopped (like
``concurrent.futures``' BrokenProcessPool).  Channels are started with
``fork`` when this process has one thread (a channel is up in
milliseconds); once it has other threads, forking it is unsafe (a lock
another thread held stays taken in the child), so they are started as new
interpreters (fork and exec at once, with nothing run between): "spawn".
The caller may choose.  Either way the channel imports nothing of the
caller's: no ``if __name__ == "__main__"`` guard is needed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from multiprocess import reduction
from multiprocess.connection import Connection, wait

from . import background, libc
from .blocks import BlockSource
from .control import (
    BYTES_WRITTEN,
    CHUNK_PAGES,
    CLAIM_BYTES,
    DONE,
    ERROR,
    LONE_SHARD_CHUNKS,
    PAGES_DONE,
    PAGES_READ,
    PAGES_WRITTEN,
    PAGES_ZEROED,
    READY,
    RESTORE,
    SAVE,
    SHARD_CHUNKS,
    STOP,
    SWITCH,
    UNCHANGED_PAGES,
    ZERO_PAGES,
    ChannelPlan,
    ControlLayout,
    ControlSegment,
)
from .errors import ChannelError, OptionError
from .format import PAGE_SIZE
from .signals import TERMINATE_SIGNALS, signals_deferred
from .stats import ChannelStats
from .workers import channel as channel_process

# How often a waiting coordinator wakes to report progress.
PROGRESS_INTERVAL = 0.1
# How long a channel may take to exit after "stop" before it is killed.
STOP_GRACE = 2.0
# What the channels of a save or restore leave mapped, in all, after their
# last pass, for their exit to unmap once the caller has its result (the
# page tables of 1 GiB: 2 MiB); beyond it a channel unmaps as it goes.
LAST_PASS_KEPT_BYTES = 1 << 30
# Bitmap bytes handled per numpy call when loading a pass: bounded memory.
BITMAP_STEP = 1 << 20
START_METHODS = ("fork", "spawn")

# progress(pages handled in this pass, pages to handle in this pass)
PassProgress = Callable[[int, int], None]

# Why a channel may die of a signal no one sent on purpose.
_SIGNAL_HINTS = {
    signal.SIGBUS: " (a block's memory became unreadable: was its file truncated, "
                   "or its file system full?)",
}


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            number = signal.Signals(-exitcode)
        except ValueError:
            return f"was killed by signal {-exitcode}"
        return f"was killed by {number.name}{_SIGNAL_HINTS.get(number, '')}"
    return f"exited with status {exitcode}"


def _channel(channels: list[tuple[int, Connection]], plan: ChannelPlan,
             forked_by_main_thread: bool = False,
             handles: tuple[int, int, int] | None = None) -> None:
    """A channel process (hosting ``channels``: numbers and connections):
    forked while the coordinator held its stop signals back, it starts
    from the default handlers, not from the coordinator's."""
    for signum in TERMINATE_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    channel_process.channel_main(channels, plan, forked_by_main_thread, handles)


def choose_start_method(start_method: str | None) -> str:
    """``start_method`` checked, or the default: $PARALLEL_SAVE_START_METHOD
    if set, else fork while this process has a single thread (not counting
    ours: background.other_threads), spawn once it has more."""
    if start_method is None:
        start_method = os.environ.get("PARALLEL_SAVE_START_METHOD") or (
            "fork" if background.other_threads() == 0 else "spawn")
    if start_method not in START_METHODS:
        raise OptionError(f"start_method must be one of {START_METHODS}, "
                          f"not {start_method!r}")
    return start_method


def lookahead(count: int) -> bool:
    """Whether ``count`` channels each work a window ahead on a second
    thread (a save's zero checks, a restore's mapping of the destination)
    while doing the file's I/O for the window before: only while there are
    more CPUs than channels (else the thread only takes a core from another
    channel)."""
    pinned = os.environ.get("PARALLEL_SAVE_LOOKAHEAD")
    if pinned:
        return pinned == "1"
    return count < len(os.sched_getaffinity(0))


def take_turns(count: int) -> bool:
    """Whether ``count`` channels of a buffered save or restore take turns
    at writing a file (workers/channel.py, Turns): whenever more than one
    writes.  The kernel lets one buffered writer at a time into a file
    anyway; with turns the others check their next pages for zeros (a
    save) or read into their mapping of the destination (a restore), or
    sleep, instead of spinning for it."""
    pinned = os.environ.get("PARALLEL_SAVE_TURNS")
    if pinned:
        return pinned == "1"
    return count > 1


def restore_readers(count: int) -> int:
    """How many of ``count`` restoring channels may read into their
    mappings beside the one whose turn it is to send (workers/channel.py,
    _read_or_send): with more channels than CPUs, as many as leave the
    sender a CPU, and the rest wait for the turn; else any number (0)."""
    cpus = len(os.sched_getaffinity(0))
    return max(1, cpus - 1) if count > cpus else 0


def passes_in_turn(direct_io: bool) -> bool:
    """Whether the channels one process hosts (channel_hosts) run their
    passes one at a time, the others waiting: a buffered save's or
    restore's.  Its channels beyond one per CPU only compete for the CPU,
    the file's turn and a reader's place (restore_readers): side by side
    they only add the switches and handovers between them.  Restores of
    1 GiB at 8 channels, medians of 8: guest-like 233 -> 214 ms, dense
    526 -> 471 ms in turn.  Saves (python -m bench.ab, two A/Bs of 12
    and 10 rounds, medians): random half-zero at 8 channels 650.6 ->
    594.5 and 648.2 -> 567.6 ms (faster in 12 of 12, 10 of 10), 654.3 ->
    618.9 at 4; dense at 8 319.2 -> 292.3 and 317.4 -> 305.0; guest-like
    at 8 227.3 -> 207.7 and 217.5 -> 225.1, 212.5 -> 210.9 at 4 (the
    same, within the machine's noise); the passes of a live
    save at 8 channels, guest-like, first 297 -> 266 ms, over 1 % of the
    pages 27.0 -> 19.9 ms, over 10 % 75.0 -> 58.1 ms.  (With an earlier
    engine, a save's were faster side by side, a channel checking zeros
    while it waited for the file's turn: guest-like 249-267 -> 263-283 ms
    in turn.)  With direct I/O a channel waits on the disk, and a sibling
    runs meanwhile.  $PARALLEL_SAVE_PASSES_IN_TURN pins it."""
    pinned = os.environ.get("PARALLEL_SAVE_PASSES_IN_TURN")
    if pinned:
        return pinned == "1"
    return not direct_io


def channel_hosts(count: int, method: str) -> list[list[int]]:
    """Which of ``count`` channels each channel process hosts: they share
    min(count, CPUs) processes (channel n in process n % processes), each
    channel on a thread of its own (a snapshot's have a process each).

    Beyond one per CPU, a process per channel only adds its cost: each
    forked Python costs about 6.5 ms of CPU to start, fault in and tear
    down (copy-on-write faults of the interpreter's pages, fork, exit; a
    spawned one, a new interpreter importing numpy, far more), and its
    own mappings and page tables, while the channels of one process, like
    QEMU's threads, share them and run side by side wherever numpy and
    the file's calls let go of the GIL (every zero check, write and read).
    $PARALLEL_SAVE_CHANNEL_PROCESSES pins the number of processes."""
    if method == "snapshot":
        return [[number] for number in range(count)]
    pinned = os.environ.get("PARALLEL_SAVE_CHANNEL_PROCESSES")
    if pinned and not (pinned.isdigit() and int(pinned) > 0):
        raise OptionError(f"$PARALLEL_SAVE_CHANNEL_PROCESSES must be a number of "
                          f"processes (1 or more), not {pinned!r}")
    processes = min(count, int(pinned) if pinned else len(os.sched_getaffinity(0)))
    return [list(range(first, count, processes)) for first in range(processes)]


def shard_chunks(chunks: int, channels: int, capacity: int) -> int:
    """Chunk numbers per shard, for ``chunks`` chunks in all: SHARD_CHUNKS
    (LONE_SHARD_CHUNKS for a lone channel, which claims every shard anyway
    and works a window ahead on its look-ahead thread: guest-like 1 GiB,
    276 -> 258 ms with the larger windows), doubled until the number of every
    shard fits in the claims pipe at once (``capacity`` bytes; 64 KiB holds
    16384 shards, 256 GiB): the coordinator offers a pass's shards before
    its channels claim any."""
    width = LONE_SHARD_CHUNKS if channels == 1 else SHARD_CHUNKS
    while -(-chunks // width) * CLAIM_BYTES > capacity:
        width *= 2
    return width


# A channel never multiplies matrices, but numpy's BLAS starts a thread per
# CPU when imported, which spins for about 0.1 s looking for work: a core
# taken from the channels at the start of their pass.
QUIET_BLAS = {"OPENBLAS_NUM_THREADS": "1"}


class SpawnedChannel:
    """A channel process started as a new interpreter, with the few methods
    of a ``multiprocess.Process`` that the group uses.  Its connections
    (one per channel it hosts) are socket pairs inherited through exec;
    its sentinel a pidfd."""

    inherits_handles = False  # a new interpreter: they come over its connections

    # The new interpreter imports the very parallel_save this one runs.
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from parallel_save.workers.channel import spawned_main; "
             "spawned_main(sys.argv[2])")

    def __init__(self, numbers: list[int], plan: ChannelPlan) -> None:
        self.name = f"parallel-save channel {numbers[0]}"
        self.numbers = numbers
        pairs = [socket.socketpair() for _ in numbers]
        theirs = [pair[1].fileno() for pair in pairs]
        try:
            # -P: not the working directory first on the import path, which
            # may be a directory others can write (/tmp).
            self._popen = subprocess.Popen(
                [sys.executable, "-P", "-c", self._BOOT, self._ROOT, ",".join(map(str, theirs))],
                pass_fds=theirs, stdin=subprocess.DEVNULL, env={**os.environ, **QUIET_BLAS})
        except BaseException:
            for ours, _ in pairs:
                ours.close()
            raise
        finally:
            for _, end in pairs:
                end.close()
        self.pid = self._popen.pid
        self.sentinel = os.pidfd_open(self.pid)
        self.connections = [Connection(ours.detach()) for ours, _ in pairs]
        for number, connection in zip(numbers, self.connections):
            try:
                connection.send_bytes(pickle.dumps((number, plan)))
            except OSError:
                pass  # it died at once: the group's wait reports how

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        # Woken by its pidfd: Popen.wait(timeout) polls, sleeping up to 50 ms.
        if self.sentinel < 0 or select.select([self.sentinel], [], [], timeout)[0]:
            self._popen.wait()

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _fork_channel(number: int, pairs: list, plan: ChannelPlan, report: int) -> int:
    """In a snapshot's holder: fork channel ``number`` on its end of
    ``pairs``; returns its pid.  The channel closes the holder's ``report``
    pipe, which the coordinator reads to its end."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        os.close(report)
        for index, (ours, theirs) in enumerate(pairs):
            ours.close()
            if index != number:
                theirs.close()
        _channel([(number, Connection(pairs[number][1].detach()))], plan)
        status = 0
    finally:
        os._exit(status)


class ForeignChannel:
    """A channel that is not our child (a snapshot's holder forked it), with
    the few methods of a ``multiprocess.Process`` the group uses: it is
    watched and killed through a pidfd; how it ended is not ours to see."""

    inherits_handles = False  # forked by a holder: they come over its connection

    def __init__(self, number: int, pid: int) -> None:
        self.name = f"parallel-save channel {number}"
        self.numbers = [number]  # the channels it hosts
        self.pid = pid
        self.sentinel = os.pidfd_open(pid)

    exitcode = None  # not ours to see: "stopped answering"

    def is_alive(self) -> bool:
        return self.sentinel >= 0 and not select.select([self.sentinel], [], [], 0)[0]

    def kill(self) -> None:
        if self.is_alive():
            signal.pidfd_send_signal(self.sentinel, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        if self.sentinel >= 0:
            select.select([self.sentinel], [], [], timeout)

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class ForkedChannel(ForeignChannel):
    """A channel forked from this process: a foreign channel that is ours
    to reap, and whose exit status is ours to see.  Forked directly, not
    as a ``multiprocess.Process``, whose bookkeeping (pipes, finalizers,
    after-fork hooks) cost each channel about 1 ms of CPU in the child and
    as much again here: at 8 channels on 2 cores, setup took 22-27 ms
    instead of 26-31.  ``handles`` (the image's, the control segment's
    and the claims pipe's descriptors) it inherits, and attaches at once,
    instead of waiting for them to come over its connection after every
    other channel process has been forked."""

    inherits_handles = True

    def __init__(self, numbers: list[int], plan: ChannelPlan,
                 siblings: Sequence[Connection] = (),
                 handles: tuple[int, int, int] | None = None) -> None:
        # What this process has buffered would be written twice, if the
        # child ever flushed its copy (a traceback on stderr).
        for stream in (sys.stdout, sys.stderr):
            if stream is not None and not stream.closed:
                stream.flush()
        pairs = []
        try:
            for _ in numbers:
                pairs.append(socket.socketpair())
            by_main_thread = threading.current_thread() is threading.main_thread()
            pid = os.fork()
        except BaseException:
            for pair in pairs:
                for end in pair:
                    end.close()
            raise
        if pid == 0:
            status = 1
            try:
                # Our ends of the channels forked before it, too: a
                # channel sees its coordinator close the connection (the
                # call's end) only once no other process holds its end.
                for ours in [*(ours for ours, _ in pairs), *siblings]:
                    ours.close()
                _channel([(number, Connection(theirs.detach()))
                          for number, (_, theirs) in zip(numbers, pairs)], plan, by_main_thread,
                         handles)
                status = 0
            except BaseException:  # noqa: BLE001 -- what the channel could not report
                traceback.print_exc()
            finally:
                os._exit(status)
        for _, theirs in pairs:
            theirs.close()
        self._exitcode: int | None = None
        try:
            super().__init__(numbers[0], pid)
        except BaseException:  # no pidfd (out of descriptors): no channel
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            for ours, _ in pairs:
                ours.close()
            raise
        self.numbers = numbers
        self.connections = [Connection(ours.detach()) for ours, _ in pairs]

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None  # reaped by someone else's wait: not ours to see
            if pid:
                self._exitcode = os.waitstatus_to_exitcode(status)
        return self._exitcode

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        self.exitcode  # noqa: B018 -- reaps it once it has ended


@dataclass(frozen=True)
class PassCounts:
    """What one pass did, summed over the channels."""

    pages_written: int
    zero_pages: int
    bytes_written: int
    pages_unchanged: int
    pages_read: int
    pages_zeroed: int


# The threads of polite stops, each reaping a group's channel processes.
_reapers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def _reap(processes: list) -> None:
    """Wait for ``processes``, told to stop or killed, to exit (killing any
    still there after STOP_GRACE), reap them and close their pidfds."""
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
        process.close()


def wait_channels(timeout: float | None = None) -> bool:
    """Wait until the channels of every save and restore this process has
    finished have exited: a finished call returns before its channels let
    go of their memory (ChannelGroup.stop).  Returns whether they all have
    (False: ``timeout`` seconds passed first).  For whoever measures the
    machine right after a call: a benchmark's next contender, a test that
    counts processes or descriptors."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in list(_reapers):
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in list(_reapers))


class ChannelGroup:
    """N channels of one save or restore, over one image file, in up to N
    processes (channel_hosts)."""

    def __init__(self, count: int, plan: ChannelPlan, control: ControlSegment,
                 claims: tuple[int, int]) -> None:
        self.count = count
        self.plan = plan
        self.control = control
        # The claims pipe (control.py): its read end, which the channels
        # share (non-blocking: an empty pipe is the end of a pass), and the
        # write end, the coordinator's.
        self.claims_read, self.claims_write = claims
        self.processes: list = []
        self.connections: list = []
        # Every byte that crosses a pipe, both ways: the proof that pages don't.
        self.bytes_sent = 0
        self.bytes_received = 0
        self._ready = False                   # every channel said READY
        self._passes = 0                      # passes run
        self.exiting = False                  # sent their last pass: no STOP needed
        self.holder: int | None = None        # a snapshot's holder process
        self.snapshot_pause = 0.0             # seconds the caller was stopped for it

    @classmethod
    def launch(cls, count: int, image_fd: int, image_name: str, *, writing: bool,
               direct_io: bool, sources: Sequence[BlockSource],
               pages_offsets: Sequence[int], hash_keys: np.ndarray | None = None,
               hash_tables: int = 1,
               start_method: str | None = None) -> ChannelGroup:
        """Start ``count`` channels on the image open as ``image_fd`` (each
        gets that descriptor, never a path) and wait until all have
        attached.  ``image_name`` is how errors name the file.
        ``hash_keys``: the channels run the hash tracker with these keys
        (tracking/hashing.py), against ``hash_tables`` tables of page hashes
        (one per image file they will write: :meth:`switch_file`)."""
        method = choose_start_method(start_method)
        if any(not source.path for source in sources):
            method = "snapshot"  # private memory: only forked channels see it
        layout = ControlLayout(count, tuple(s.length // PAGE_SIZE for s in sources),
                               hash_tables if hash_keys is not None else 0)
        control = ControlSegment.create(layout)
        if hash_keys is not None:
            control.hash_keys[:] = hash_keys
        claims = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(claims[0], False)
        capacity = fcntl.fcntl(claims[1], fcntl.F_GETPIPE_SZ)
        plan = ChannelPlan(image_name, writing, direct_io, tuple(sources),
                           tuple(pages_offsets), layout, os.getpid(), os.getpid(),
                           lookahead=lookahead(count),
                           turns=not direct_io and take_turns(count),
                           readers=0 if writing else restore_readers(count),
                           passes_in_turn=passes_in_turn(direct_io),
                           kept_pages=LAST_PASS_KEPT_BYTES // PAGE_SIZE // count,
                           shard_chunks=shard_chunks(layout.chunks, count, capacity))
        group = cls(count, plan, control, claims)
        group.start(method, image_fd)
        return group

    def start(self, method: str, image_fd: int) -> None:
        try:
            # A Ctrl-C raised inside fork's Python hooks would be swallowed
            # there ("Exception ignored"), and leave logging's lock taken:
            # it waits until the channels are started.
            with signals_deferred():
                if method == "snapshot":
                    self._start_snapshot()
                else:
                    self._start_processes(method, image_fd)
                for ours, process in zip(self.connections, self.processes):
                    # Over the connection's socket (SCM_RIGHTS), unless
                    # inherited: the channel works on the very file the
                    # coordinator checked.
                    if process.inherits_handles:
                        continue
                    try:
                        reduction.send_handle(ours, image_fd, process.pid)
                        reduction.send_handle(ours, self.control.fd, process.pid)
                        reduction.send_handle(ours, self.claims_read, process.pid)
                    except OSError:
                        pass  # it died: the wait below reports how
            if method != "snapshot":  # a snapshot's caller goes on at once
                self._wait_ready()
        except BaseException:
            self.stop(force=True)
            raise

    def _start_processes(self, method: str, image_fd: int) -> None:
        """Start the channel processes; ``processes`` and ``connections``
        are indexed by channel number (one process may appear for several)."""
        hosts = channel_hosts(self.count, method)
        self.processes = [None] * self.count
        self.connections = [None] * self.count
        try:
            for numbers in hosts:
                if method == "spawn":
                    process = SpawnedChannel(numbers, self.plan)
                else:
                    process = ForkedChannel(
                        numbers, self.plan,
                        [connection for connection in self.connections if connection],
                        (image_fd, self.control.fd, self.claims_read))
                for number, connection in zip(numbers, process.connections):
                    self.processes[number] = process
                    self.connections[number] = connection
        finally:
            # Those started, in channel order (what stop() walks).
            self.processes = [p for p in self.processes if p is not None]
            self.connections = [c for c in self.connections if c is not None]

    def _wait_ready(self) -> None:
        self._wait_all(READY, None)  # a failure stops every channel
        self._ready = True

    def _start_snapshot(self) -> None:
        """Channels that see this process's memory as it is now, however
        it changes next: one fork (the caller's only pause) of a holder,
        the copy-on-write snapshot, which forks the channels from itself.
        Their connections are made before, so they reach this process."""
        pairs = [socket.socketpair() for _ in range(self.count)]
        report_read, report_write = os.pipe()
        self.snapshot_pause = time.perf_counter()
        holder = os.fork()
        if holder == 0:  # the holder: its memory is the snapshot
            status = 1
            try:
                libc.set_process_name("ps snapshot")
                os.close(report_read)
                plan = dataclasses.replace(self.plan, parent=os.getpid())
                pids = [_fork_channel(number, pairs, plan, report_write)
                        for number in range(self.count)]
                os.write(report_write, " ".join(map(str, pids)).encode())
                os.close(report_write)
                for ours, theirs in pairs:
                    ours.close()
                    theirs.close()
                channel_process.die_with_coordinator(self.plan)
                for pid in pids:
                    os.waitpid(pid, 0)
                status = 0
            finally:
                os._exit(status)
        self.snapshot_pause = time.perf_counter() - self.snapshot_pause
        self.holder = holder
        os.close(report_write)
        with os.fdopen(report_read, "rb") as report:
            pids = [int(pid) for pid in report.read().split()]
        if len(pids) != self.count:
            raise ChannelError(len(pids), "the snapshot could not start its channels")
        for number, ((ours, theirs), pid) in enumerate(zip(pairs, pids)):
            theirs.close()
            self.processes.append(ForeignChannel(number, pid))
            self.connections.append(Connection(ours.detach()))

    # --- passes ---

    def save_pass(self, dirty: Sequence[np.ndarray | None],
                  progress: PassProgress | None = None, last: bool = False) -> PassCounts:
        """Write each block's dirty pages (one bool per page; None: none)
        at their fixed offsets, and wait until every channel is done.
        After the ``last`` pass the channels exit by themselves: awake
        already, they tear down while the coordinator finishes the file,
        instead of being woken again by stop() (a round trip: ~2 ms at 2
        channels; at 8, tearing down their mappings dominates either way)."""
        total = self._load_pass_bitmap([None if d is None else np.packbits(d, bitorder="little")
                                        for d in dirty])
        chunks = self._chunks_with_bits()
        return self._run(lambda shards, claim: (SAVE, shards, claim, last), chunks,
                         progress, total, last)

    def restore_pass(self, present: Sequence[np.ndarray], zero_clear: bool,
                     progress: PassProgress | None = None, last: bool = False) -> PassCounts:
        """Read each block's present pages (``present``: the image's packed
        bitmaps, as on disk) into the destinations; zero the clear pages
        unless the destinations are known to be zero.  ``last`` as for
        save_pass."""
        present_pages = self._load_pass_bitmap(present)
        if zero_clear:
            chunks = np.arange(self.control.layout.chunks, dtype=np.int32)
            total = sum(self.control.layout.block_pages)
        else:  # only chunks with pages to read: an empty image costs nothing
            chunks, total = self._chunks_with_bits(), present_pages
        return self._run(lambda shards, claim: (RESTORE, shards, zero_clear, claim, last),
                         chunks, progress, total, last)

    def file_bitmaps(self) -> list[np.ndarray]:
        """Each block's bitmap of pages in the file, in QEMU's packed words:
        the OR of the channels' own (see control.py), merged once."""
        merged = self.control.merged_file_bitmap()
        return [self.control.block_bits(merged, block).copy()
                for block in range(len(self.control.layout.block_pages))]

    def switch_file(self, image_fd: int, file_bitmaps: Sequence[np.ndarray],
                    hash_table: int = 0) -> None:
        """Make every channel work on another image file from now on, whose
        bitmaps (packed, one per block) say which pages it holds: what a
        checkpointer does when it turns from one image to the other.  Each
        channel gets the bits of the chunks dealt to it, as if it had
        written them (see control.py: the OR merge rests on it).  With the
        hash tracker, ``hash_table`` holds the hashes of what that file
        holds."""
        control = self.control
        for index, bits in enumerate(file_bitmaps):
            chunk_of_byte = (control.layout.chunk_bases[index]
                             + np.arange(bits.size) // (CHUNK_PAGES // 8))
            owner = chunk_of_byte % self.count
            for number in range(self.count):
                row = control.block_bits(control.file_bitmaps[number], index)
                row[:bits.size] = np.where(owner == number, bits, 0)
                row[bits.size:] = 0
        for number in range(self.count):
            self._send(number, (SWITCH, hash_table))
            try:
                reduction.send_handle(self.connections[number], image_fd,
                                      self.processes[number].pid)
            except OSError:
                pass  # it died; the next pass reports how

    def forget_hashes(self, hash_table: int) -> None:
        """The file of this table holds nothing yet: every page hashes as
        a zero page's (0), so every non-zero page is written."""
        self.control.page_hashes[hash_table] = 0

    def channel_stats(self) -> list[ChannelStats]:
        return [ChannelStats.from_row(i, row) for i, row in enumerate(self.control.counters)]

    def _load_pass_bitmap(self, packed: Sequence[np.ndarray | None]) -> int:
        """Put a pass's packed bitmaps in the control segment; returns the
        number of set bits.  Step by step, and only the steps that changed
        are written: a huge, mostly empty bitmap costs the segment no
        memory."""
        control = self.control
        total = 0
        for index, bits in enumerate(packed):
            target = control.block_bits(control.pass_bitmap, index)
            if bits is None:
                bits = np.zeros(0, dtype=np.uint8)
            if bits.size > target.size:
                raise OptionError(f"block {index}: {bits.size} bitmap bytes, "
                                  f"expected at most {target.size}")
            for at in range(0, target.size, BITMAP_STEP):
                new = bits[at:at + BITMAP_STEP]
                old = target[at:at + BITMAP_STEP]
                if new.size < old.size:
                    new = np.concatenate((new, np.zeros(old.size - new.size, np.uint8)))
                if not np.array_equal(old, new):
                    old[:] = new
            # Bits past the block's last page are not pages.
            spare = target.size * 8 - control.layout.block_pages[index]
            if spare:
                target[-1] &= 0xFF >> spare
            total += sum(int(np.bitwise_count(target[at:at + BITMAP_STEP]).sum(dtype=np.int64))
                         for at in range(0, target.size, BITMAP_STEP))
        return total

    def _chunks_with_bits(self) -> np.ndarray:
        """The chunks holding at least one set bit of the pass bitmap."""
        control = self.control
        bytes_per_chunk = CHUNK_PAGES // 8
        found = []
        for index, base in enumerate(control.layout.chunk_bases):
            bits = control.block_bits(control.pass_bitmap, index)
            chunks = -(-bits.size // bytes_per_chunk)
            padded = np.zeros(chunks * bytes_per_chunk, dtype=np.uint8)
            padded[:bits.size] = bits
            found.append(base + np.flatnonzero(padded.reshape(chunks, -1).any(axis=1)))
        return np.concatenate(found).astype(np.int32)

    def _offer(self, chunks: np.ndarray) -> None:
        """Put the number of every shard holding these chunks in the claims
        pipe, in one write (shard_chunks sized them to fit).  Only a group's
        first pass is claimed, so the pipe is empty."""
        numbers = chunks // self.plan.shard_chunks  # ascending, as the chunks
        # (np.unique would do, but its first call imports for 10-15 ms.)
        shards = numbers[np.flatnonzero(np.diff(numbers, prepend=-1))].astype("<i4").tobytes()
        if shards and os.write(self.claims_write, shards) != len(shards):
            raise OSError(f"the claims pipe took part of {len(shards)} bytes")

    def _run(self, message: Callable[[np.ndarray, bool], tuple], chunks: np.ndarray,
             progress: PassProgress | None, total: int, last: bool) -> PassCounts:
        """A pass over ``chunks``: each channel gets ``message(its chunks,
        claim)``.  The group's first pass, when it is also its last (a
        one-pass save, a restore), has every channel claim shards of all of
        them from the claims pipe as it becomes free; any other pass deals
        chunk g to channel g % N, the same channel every time, whose
        mappings of it are then warm (control.py)."""
        if not self._ready:
            self._wait_ready()
        self.exiting = last
        counters = self.control.counters
        before = counters.sum(axis=0)

        def report() -> None:
            if progress is not None:
                progress(int(counters[:, PAGES_DONE].sum() - before[PAGES_DONE]), total)

        claim = last and not self._passes
        self._passes += 1
        if claim:
            self._offer(chunks)
            for number in range(self.count):
                self._send(number, message(chunks, True))
        else:
            owners = chunks % self.count
            for number in range(self.count):
                self._send(number, message(chunks[owners == number], False))
        self._wait_all(DONE, report)
        report()
        delta = counters.sum(axis=0) - before
        return PassCounts(int(delta[PAGES_WRITTEN]), int(delta[ZERO_PAGES]),
                          int(delta[BYTES_WRITTEN]), int(delta[UNCHANGED_PAGES]),
                          int(delta[PAGES_READ]), int(delta[PAGES_ZEROED]))

    # --- process life ---

    def _send(self, number: int, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.bytes_sent += len(data)
        try:
            self.connections[number].send_bytes(data)
        except OSError:
            pass  # it died; _wait_all reports how

    def _wait_all(self, expected: str, progress: Callable[[], None] | None) -> None:
        waiting = set(range(self.count))
        # A process hosting several channels is waited on once (its
        # sentinel), for each of its channels still waiting.
        by_handle: dict = {}
        for number in waiting:
            by_handle[self.connections[number]] = [number]
            by_handle.setdefault(self.processes[number].sentinel, []).append(number)
        while waiting:
            handles = [self.connections[n] for n in waiting]
            handles += list({self.processes[n].sentinel for n in waiting})
            ready = wait(handles, timeout=PROGRESS_INTERVAL)
            if progress is not None:
                progress()
            for handle in ready:
                for number in by_handle[handle]:
                    if number in waiting:
                        self._take_reply(number, expected, waiting)

    def _take_reply(self, number: int, expected: str, waiting: set[int]) -> None:
        """Channel ``number``'s reply, if it has one; else, if its process
        is gone, the pass fails."""
        connection = self.connections[number]
        if connection.poll():
            try:
                data = connection.recv_bytes()
            except (EOFError, OSError):
                self._fail(number, None)
            self.bytes_received += len(data)
            reply = pickle.loads(data)
            if reply[0] == ERROR:
                self._fail(number, reply[1], reply[2])
            if reply[0] != expected:
                self._fail(number, f"unexpected reply {reply[0]!r}")
            waiting.discard(number)
        elif not self.processes[number].is_alive():
            self._fail(number, None)

    def _fail(self, number: int, cause: str | None, errno: int | None = None):
        process = self.processes[number]
        if cause is None:
            process.join(STOP_GRACE)
            whose = ("the process" if len(process.numbers) == 1 else
                     f"the process of channels {', '.join(map(str, process.numbers))}")
            cause = f"{whose} {_exit_description(process.exitcode)}"
        self.stop(force=True)
        raise ChannelError(number, cause, errno)

    def __del__(self) -> None:
        # Dropped unstopped (a signal between launch and the caller's try):
        # its channels would outlive it.
        if getattr(self, "processes", None):
            self.stop(force=True)

    def stop(self, force: bool = False) -> None:
        """Stop every channel: politely (they finish their pass), or at
        once with ``force`` (after a failure, when their work is moot).
        A polite stop returns once every channel has been told: a channel
        then lets go of its memory (what its last pass left mapped, its
        interpreter's) on its own time, and a thread of ours reaps it
        (wait_channels waits for that).  Idempotent, and not cut short by
        Ctrl-C: that waits until it is done."""
        with signals_deferred():
            for number, process in enumerate(self.processes):
                if process.is_alive():
                    if force:
                        process.kill()
                    elif not self.exiting:
                        self._send(number, (STOP,))
            processes = list(dict.fromkeys(self.processes))  # one per process
            if processes and not force and self.holder is None:
                # Nothing the caller waits for is left in them: their exit
                # unmaps the pages its last pass kept mapped (20 ms of a
                # 1 GiB save at 2 or 8 channels, measured).  The thread
                # that reaps them starts before the connections close:
                # closing them lets channels done with their last pass go,
                # and their letting go of their memory then takes the CPUs
                # the thread's start waits for (0.3-9 ms of a 2-channel
                # save of 1 GiB on 2 cores, measured).
                _reapers.add(background.start(_reap, (processes,), "ps reap channels",
                                              daemon=False))
            for connection in self.connections:
                connection.close()  # a stop already sent is read all the same
            self.processes, self.connections = [], []
            self.control.close()
            for fd in (self.claims_read, self.claims_write):
                if fd >= 0:
                    os.close(fd)
            self.claims_read = self.claims_write = -1
            if force or self.holder is not None:
                _reap(processes)
            if self.holder is not None:
                os.waitpid(self.holder, 0)  # it ends once its channels have
                self.holder = None
