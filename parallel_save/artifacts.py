"""Named files that a save puts in shared places, and their cleanup.

Most of what a save uses has no name at all (the control segment is a
memfd, the image being written is an unnamed O_TMPFILE where the file
system allows), so a killed save leaves nothing.  What must have a name,
because other processes find it by name, is made here:

- status boards and dirty logs in /dev/shm,
  ``parallel-save-PID-KIND-RANDOM`` (a board's segment is ``sm_`` + that);
- where the image's file system has no O_TMPFILE, the partial image beside
  the image, ``.IMAGE.PID-RANDOM.partial``.

Each is created exclusively (O_EXCL: a name planted by someone else makes
the create fail, it is never taken over), mode 0600, and carries the pid
of the process that made it, so that :func:`clean` can tell a dead save's
leftovers from a running one's.  Opening one by name checks that it is a
regular file of ours, never another user's.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Iterable

from .errors import ParallelSaveError

SEGMENT_DIR = "/dev/shm"

_SEGMENT = re.compile(r"(?:sm_)?parallel-save-(\d+)-[a-z]+-[0-9a-f]+")
_PARTIAL = re.compile(r"\..+\.(\d+)-[0-9a-f]+\.partial")


def segment_name(kind: str) -> str:
    """A fresh name for a shared segment of this process: ``kind`` is
    ``board`` or ``dirty``."""
    return f"parallel-save-{os.getpid()}-{kind}-{uuid.uuid4().hex[:16]}"


def partial_name(image_name: str) -> str:
    """A fresh name for a partial image beside ``image_name``."""
    return f".{image_name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"


def check_ours(fd: int, path: str, what: str) -> os.stat_result:
    """Refuse a named file that another user could have planted: it must
    be a regular file owned by us and writable by nobody else."""
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        raise ParallelSaveError(f"{path}: not a {what} (not a regular file)")
    if found.st_uid != os.geteuid():
        raise ParallelSaveError(f"{path}: the {what} belongs to user {found.st_uid}, "
                                f"not to us ({os.geteuid()}): refused")
    if found.st_mode & 0o022:
        raise ParallelSaveError(f"{path}: the {what} is writable by other users "
                                f"(mode {found.st_mode & 0o777:o}): refused")
    return found


def open_ours(path: str, flags: int, what: str) -> tuple[int, os.stat_result]:
    """Open a named file that must be ours (see :func:`check_ours`), never
    through a link, never waiting on a FIFO.  A missing file raises
    ``FileNotFoundError`` (the caller says what that means), any other
    refusal a :class:`ParallelSaveError` naming the path."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ParallelSaveError(f"{path}: cannot open the {what}: {error.strerror}") from None
    try:
        return fd, check_ours(fd, path, what)
    except BaseException:
        os.close(fd)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def stale_files(directories: Iterable[str] = ()) -> list[str]:
    """Leftovers of dead saves of this user: segments in /dev/shm and
    partial images in ``directories``."""
    found = []
    for directory, pattern in [(SEGMENT_DIR, _SEGMENT),
                               *((d, _PARTIAL) for d in directories)]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if not match or _alive(int(match.group(1))):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                found.append(entry.path)
    return sorted(found)


def clean(directories: Iterable[str] = ()) -> list[str]:
    """Remove the leftovers of dead saves of this user (see
    :func:`stale_files`); returns what was removed."""
    removed = []
    for path in stale_files(directories):
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed
