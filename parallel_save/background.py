"""Threads of ours that finish a call's work after the call has returned:
the last close of a replaced image (files.close_in_background), and the
wait for a finished save's or restore's channels to exit
(channels.ChannelGroup.stop).  Each does nothing but wait in system
calls, so it holds no lock that a process forked meanwhile could inherit
taken: the next save in the same process may still fork its channels
(other_threads).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

_ours: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def start(target: Callable[..., object], args: tuple, name: str,
          daemon: bool) -> threading.Thread:
    """Run ``target(*args)`` on a thread of its own (returned, started),
    which other_threads does not count.  ``daemon``: the interpreter may
    exit without waiting for it."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=daemon)
    _ours.add(thread)
    thread.start()
    return thread


def other_threads() -> int:
    """How many threads of this process, besides the calling one, could
    hold a lock at a fork: every thread but ours.  A save that replaced an
    image leaves one closing it, a finished save one waiting for its
    channels to exit, and the next save in the same process should still
    fork its channels (spawn costs a fresh interpreter per channel: a 1 GiB
    save at 8 channels took 2.0 s instead of 0.7 s)."""
    current = threading.current_thread()
    return sum(1 for thread in threading.enumerate()
               if thread is not current and thread not in _ours)
