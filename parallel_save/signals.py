"""Signals during a save or restore: how a stop request becomes a clean stop.

Ctrl-C already raises KeyboardInterrupt, so ``with`` blocks stop the
channels and deal with the partial file.  SIGTERM (and SIGHUP) kill Python
outright by default, skipping all of that; :func:`terminate_cleanly` turns
them into ``SystemExit(128 + signal)`` for a command line program.  A
library does not install it on its own: the signal handlers of the process
belong to the application.

:func:`signals_deferred` holds these signals back while cleanup runs, so a
second Ctrl-C cannot cut the cleanup of the first in half.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TERMINATE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)``
    (the exit status a shell reports for the signal) in the main thread.
    Elsewhere than the main thread this does nothing, since Python can
    only handle signals there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_exit) for s in TERMINATE_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT, SIGTERM and SIGHUP in this thread while inside; one
    that arrives meanwhile is delivered (and raises) on the way out."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
