"""The coordinator's side of the channels: start them, deal out chunks,
wait for a pass, notice a channel that died, stop them all.

Like QEMU's multifd.c: it owns the life of the channels and nothing of the
byte layout.  A channel that raises or dies turns into a
:class:`ChannelError` within one wait interval, never a hang, and every
other channel is stopped (like ``concurrent.futures``' BrokenProcessPool).
"""

from __future__ import annotations

import pickle
import signal
import time
from collections.abc import Callable

import multiprocess
import numpy as np
from multiprocess.connection import wait

from .blocks import BlockSource
from .control import ChannelPlan, ControlLayout, ControlSegment
from .errors import ChannelError
from .format import PAGE_SIZE
from .signals import TERMINATE_SIGNALS, signals_deferred
from .workers import channel as channel_process

# How often a waiting coordinator wakes to report progress.
PROGRESS_INTERVAL = 0.1
# How long a channel may take to exit after "stop" before it is killed.
STOP_GRACE = 2.0


# Why a channel may die of a signal no one sent on purpose.
_SIGNAL_HINTS = {
    signal.SIGBUS: " (a block's memory became unreadable: was its file truncated?)",
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


def _channel(number: int, connection, plan: ChannelPlan) -> None:
    """A channel process: forked while the coordinator held its stop signals
    back, it starts from the default handlers, not from the coordinator's."""
    for signum in TERMINATE_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    channel_process.channel_main(number, connection, plan)


class ChannelGroup:
    """N channel processes of one save or restore."""

    def __init__(self, count: int, plan: ChannelPlan, control: ControlSegment) -> None:
        self.count = count
        self.plan = plan
        self.control = control
        self.processes: list = []
        self.connections: list = []
        # Every byte that crosses a pipe, both ways: the proof that pages don't.
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    def launch(cls, count: int, image_path: str, *, writing: bool, direct_io: bool,
               sources: list[BlockSource], pages_offsets: list[int],
               hashing: bool = False) -> ChannelGroup:
        """Create the control segment, start ``count`` channels on it and
        wait until all have attached; the segment's name is gone on return.
        ``hashing``: the channels run the hash tracker (tracking/hashing.py)."""
        layout = ControlLayout(count, tuple(s.length // PAGE_SIZE for s in sources), hashing)
        control = ControlSegment.create(layout)
        try:
            plan = ChannelPlan(image_path, writing, direct_io, tuple(sources),
                               tuple(pages_offsets), layout, control.path)
            group = cls(count, plan, control)
            group.start()
        finally:
            control.unlink()
        return group

    def start(self) -> None:
        # fork: a channel is up in milliseconds, and it maps everything it
        # needs by path, so it would work the same under spawn.
        context = multiprocess.get_context("fork")
        try:
            # A Ctrl-C raised inside fork's Python hooks would be swallowed
            # there ("Exception ignored"), and leave logging's lock taken:
            # it waits until the channels are forked.
            with signals_deferred():
                for number in range(self.count):
                    ours, theirs = context.Pipe(duplex=True)
                    process = context.Process(target=_channel, args=(number, theirs, self.plan),
                                              name=f"parallel-save channel {number}", daemon=True)
                    process.start()
                    theirs.close()
                    self.processes.append(process)
                    self.connections.append(ours)
            self._wait_all("ready", None)
        except BaseException:
            self.stop(force=True)
            raise

    def _send(self, number: int, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.bytes_sent += len(data)
        try:
            self.connections[number].send_bytes(data)
        except OSError:
            pass  # it died; _wait_all reports how

    def run_pass(self, messages: list[tuple], progress: Callable[[], None] | None = None
                 ) -> None:
        """Send each channel its message and wait until all are done."""
        for number, message in enumerate(messages):
            self._send(number, message)
        self._wait_all("done", progress)

    def _wait_all(self, expected: str, progress: Callable[[], None] | None) -> None:
        waiting = set(range(self.count))
        by_handle = {}
        for number in waiting:
            by_handle[self.connections[number]] = number
            by_handle[self.processes[number].sentinel] = number
        while waiting:
            handles = [self.connections[n] for n in waiting]
            handles += [self.processes[n].sentinel for n in waiting]
            ready = wait(handles, timeout=PROGRESS_INTERVAL)
            if progress is not None:
                progress()
            for handle in ready:
                number = by_handle[handle]
                if number not in waiting:
                    continue
                connection = self.connections[number]
                if connection.poll():
                    try:
                        data = connection.recv_bytes()
                    except (EOFError, OSError):
                        self._fail(number, None)
                    self.bytes_received += len(data)
                    reply = pickle.loads(data)
                    if reply[0] == "error":
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
            cause = f"the process {_exit_description(process.exitcode)}"
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
        Idempotent, and not cut short by Ctrl-C: that waits until it is done."""
        with signals_deferred():
            for number, process in enumerate(self.processes):
                if process.is_alive():
                    if force:
                        process.kill()
                    else:
                        self._send(number, ("stop",))
            deadline = time.monotonic() + STOP_GRACE
            for process in self.processes:
                process.join(max(0.0, deadline - time.monotonic()))
            for process in self.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
            for connection in self.connections:
                connection.close()
            for process in self.processes:
                process.close()
            self.processes, self.connections = [], []


def deal_chunks(chunks: np.ndarray, channels: int) -> list[np.ndarray]:
    """Each channel's share of these chunk numbers: chunk g always goes to
    channel g % channels, which is what makes an OR merge correct."""
    return [chunks[chunks % channels == c].astype(np.int32) for c in range(channels)]
