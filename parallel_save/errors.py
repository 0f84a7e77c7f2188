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
    """A channel (worker process) failed: it raised, or it died.

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
    """A destination of a restore cannot be used as given: two blocks into
    one file, a missing directory, not enough space, a file replaced while
    the restore was prepared."""
