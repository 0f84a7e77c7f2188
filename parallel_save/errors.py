"""The exceptions parallel-save raises: one small hierarchy, so callers can
catch everything with :class:`ParallelSaveError` or one kind precisely."""

from __future__ import annotations

import os


class ParallelSaveError(Exception):
    """Base of every error parallel-save raises on purpose."""


class FormatError(ParallelSaveError):
    """The file is not a valid mapped-ram image: says where and what.

    ``offset`` is the absolute byte position in the file where the bad
    field starts, so a reader can look at it with ``xxd -s``.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None,
                 offset: int | None = None) -> None:
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.offset = offset
        where = []
        if self.path is not None:
            where.append(self.path)
        if offset is not None:
            where.append(f"offset {offset} (0x{offset:x})")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class IncompleteImageError(FormatError):
    """The stream stops before the RAM section's END (or before EOF): the
    save that wrote it never completed, so its bitmaps cannot be trusted."""


class BlockError(ParallelSaveError, ValueError):
    """A RAM block that cannot be saved or restored as given (bad length,
    bad name, a buffer the channels cannot attach to, a size mismatch)."""


class DirectIOError(ParallelSaveError):
    """``direct_io=True`` was asked for but the file system refuses it."""


class ChannelError(ParallelSaveError):
    """A channel (a worker thread of a channel process) failed: it raised,
    or its process died.

    ``channel`` is the channel number, ``cause`` a one-line description
    (the worker's exception, or how the process ended), ``errno`` the
    error number of a failed system call (``errno.ENOSPC``...), else None.
    """

    def __init__(self, channel: int, cause: str, errno: int | None = None) -> None:
        self.channel = channel
        self.cause = cause
        self.errno = errno
        super().__init__(f"channel {channel} failed: {cause}")


class SaveStateError(ParallelSaveError):
    """A Saver method was called out of order (iterate before setup, ...)."""


class FileError(ParallelSaveError, OSError):
    """A file cannot be used as asked: missing, not a regular file (a FIFO,
    a device...), a symbolic link where none was expected, refused by the
    system.  ``filename`` is the path, ``strerror`` the reason, ``errno``
    the error number when a system call failed (else None)."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}" if self.filename else str(self.strerror)


class ImageNotFoundError(FileError, FileNotFoundError):
    """The image file does not exist (also a :class:`FileNotFoundError`)."""


class ClosedImageError(ParallelSaveError, ValueError):
    """An :class:`~parallel_save.Image` was read after ``close()``."""


class DestinationError(ParallelSaveError):
    """A file cannot be written safely where it was asked for: a save's path
    is a symbolic link (not followed unless asked) or a special file, or
    was replaced by another process while the save put its image there; a
    restore's destinations put two blocks into one file, name a missing
    directory, lack the space, or were replaced while it was prepared."""


class ImageWriteError(ParallelSaveError, OSError):
    """The coordinator's own write, sync or rename of the image failed.
    An ``OSError`` too: ``errno`` says why (``errno.ENOSPC``...), and the
    message names the file."""


class OptionError(ParallelSaveError, ValueError):
    """An argument out of its range: a channel count, a mode, a start
    method, a tracker.  A ``ValueError`` too."""
