"""Signals during a save or restore: how a stop request becomes a clean stop.

Ctrl-C already raises KeyboardInterrupt, so ``with`` blocks stop the
channels and deal with the file being written.  SIGTERM (and SIGHUP) kill Python
outright by default, skipping all of that; :func:`terminate_cleanly` turns
them into ``SystemExit(128 + signal)`` for a command line program.  A
library does not install it on its own: the signal handlers of the process
belong to the application.

:func:`signals_deferred` holds these signals back while cleanup runs, so a
second Ctrl-C cannot cut the cleanup of the first in half.

Both swap handlers for a while.  A handler that raised in the middle of a
swap would leave some swapped for good (Ctrl-C ignored from then on), so a
swap runs with the signals blocked in this thread, once what was already
pending has run, and calls the C functions of ``_signal`` (the Python
wrappers of ``signal`` run Python code, where a pending handler may run).
What this cannot prevent: another thread of the process taking a signal
during those microseconds, or several signals arriving in them.
"""

from __future__ import annotations

import _signal
import signal
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TERMINATE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

Handler = Callable[[int, Any], Any] | int


def _swap(handlers: dict[int, Handler], replaced: dict[int, Handler]) -> None:
    """Install ``handlers`` all together, putting those they replace in
    ``replaced``.  A handler that runs meanwhile and raises (one pending
    before, or one arriving while blocked, run at the end with the new
    handlers) does not stop the swap: its error is raised once it is done.
    """
    error: BaseException | None = None
    were_blocked: set[int] = set()
    try:
        were_blocked = _signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except BaseException as raised:  # noqa: BLE001 (a pending handler, run once blocked)
        error = raised
    for number, handler in handlers.items():
        try:
            replaced[number] = _signal.signal(number, handler)
        except BaseException as raised:  # noqa: BLE001 (pending handlers run first)
            error = error or raised
            replaced[number] = _signal.signal(number, handler)
    try:
        _signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS) - were_blocked)
    except BaseException as raised:  # noqa: BLE001 (arrived meanwhile, run now)
        error = error or raised
    if error is not None:
        raise error


def _python_handled(numbers: tuple[int, ...]) -> tuple[int, ...]:
    # None: a handler installed outside Python, which we leave alone.
    return tuple(n for n in numbers if _signal.getsignal(n) is not None)


class _Swapped:
    """Some handlers in place of the process's while inside (main thread
    only: elsewhere Python can neither swap nor run signal handlers)."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.previous: dict[int, Handler] = {}
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if not self.active:
            return
        try:
            _swap(self.handlers, self.previous)
        except BaseException:
            # A signal raised with our handlers in place: put them back.
            _swap(self.previous, {})
            raise

    def __exit__(self, *exc_info: object) -> None:
        if self.active:
            _swap(self.previous, {})


class _Terminating(_Swapped):
    def __init__(self) -> None:
        super().__init__(dict.fromkeys(_python_handled(TERMINATE_SIGNALS), self._exit))

    def _exit(self, signum: int, frame: Any) -> None:
        # The process's handlers go back first: a handler runs when Python
        # next checks, which may be at the start of __exit__, and then the
        # SystemExit would keep __exit__ from putting them back.
        _swap(self.previous, {})
        raise SystemExit(128 + signum)


def terminate_cleanly() -> _Swapped:
    """While inside, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)``
    (the exit status a shell reports for the signal) in the main thread."""
    return _Terminating()


class _Deferred(_Swapped):
    # Nested deferrals swap nothing: the outermost holds for all.
    depth = 0

    def __init__(self) -> None:
        self.held: list[int] = []
        super().__init__(dict.fromkeys(_python_handled(STOP_SIGNALS), self._hold))
        self.active = self.active and _Deferred.depth == 0

    def _hold(self, signum: int, frame: Any) -> None:
        if signum not in self.held:
            self.held.append(signum)

    def __enter__(self) -> None:
        super().__enter__()
        _Deferred.depth += self.active

    def __exit__(self, *exc_info: object) -> None:
        if not self.active:
            return
        _Deferred.depth -= 1
        super().__exit__(*exc_info)
        # A termination first: Ctrl-C's KeyboardInterrupt would end the loop.
        for number in sorted(self.held, key=lambda n: n == signal.SIGINT):
            signal.raise_signal(number)


def signals_deferred() -> _Deferred:
    """Hold SIGINT, SIGTERM and SIGHUP back while inside; one that arrives
    meanwhile is raised again on the way out, to whatever handler was there.

    (Blocking the signals with pthread_sigmask alone would not do: the
    kernel hands a process's signal to any thread not blocking it, and
    Python then runs the handler in the main thread.)
    """
    return _Deferred()
