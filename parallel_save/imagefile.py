"""The image file a save writes: who creates it, how, and how it takes the
place of an older image.

One file, one inode.  The file is opened once, here; the channels get its
descriptor, never its path.  A new image is an unnamed file (O_TMPFILE)
in the image's directory: until it is complete it has no name that anyone
could swap, read or find left over after a crash.  Completing links it
under a fresh hidden name and renames that over the image, then checks
that the name now leads to this very file.  Where the file system has no
O_TMPFILE, a hidden partial file is created exclusively beside the image
(artifacts.py names it; a later ``clean`` removes it if this save dies).

Files holding memory are created 0600 (``mode`` widens it); an image saved
over an older one keeps the older one's mode and owner where it can.  The
path is taken as given: a symbolic link or a special file (``/dev/null``)
at it is refused unless ``follow_symlinks`` (then the link is resolved
once, at the start).

Replacing an older image frees it when its last link goes, which on some
file systems takes longer than the save (ext4 with discard): the old file
is held open across the rename and let go in a background thread, off the
caller's critical path.  The rename is an exchange of the two names where
the system can (then the old name is unlinked): ext4 makes a rename over
an existing file write the new file out first.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

import numpy as np

from . import libc
from .artifacts import partial_name
from .directio import check_direct_io_fd
from .errors import DestinationError, FormatError, ImageWriteError
from .files import close_in_background, file_kind, start_writeback, unlink_if_ours
from .format import StreamLayout, decode_stream, encode_setup

DEFAULT_MODE = 0o600


_RENAME_EXCHANGE = 2


def _exchange(dir_fd: int, first: str, second: str) -> bool:
    """Swap two names of a directory in one step (renameat2 with
    RENAME_EXCHANGE); False where the C library, kernel or file system
    cannot, or ``second`` is gone."""
    if libc.renameat2 is None:
        return False
    if libc.renameat2(dir_fd, os.fsencode(first), dir_fd, os.fsencode(second),
                      _RENAME_EXCHANGE) == 0:
        return True
    error = libc.last_error(second)
    if error.errno in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
        return False
    raise error


class ImageFile:
    """The file being written, open once.  ``fd`` is for the coordinator's
    own writes (headers, bitmaps), ``channel_fd`` for the channels (the
    same file reopened with O_DIRECT when asked)."""

    def __init__(self, path: str | os.PathLike, *, in_place: bool = False,
                 mode: int | None = None, follow_symlinks: bool = False,
                 direct_io: bool = False) -> None:
        self.path = os.fspath(path)
        target = os.path.realpath(self.path) if follow_symlinks else os.path.abspath(self.path)
        directory, self.name = os.path.split(target)
        self.in_place = in_place
        self.fd = self.channel_fd = -1
        self.partial: str | None = None  # the hidden name, without O_TMPFILE
        try:
            self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise ImageWriteError(error.errno, f"cannot open the image's directory: "
                          f"{error.strerror}", directory) from None
        try:
            old = self._existing()
            if in_place:
                self._open_in_place(mode)
            else:
                self._create(mode if mode is not None else
                             (stat.S_IMODE(old.st_mode) if old else DEFAULT_MODE), old)
            self.channel_fd = self.fd
            if direct_io:
                self.channel_fd = check_direct_io_fd(self.fd, self.path)
        except BaseException:
            self.discard()
            raise

    def _existing(self) -> os.stat_result | None:
        try:
            found = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(found.st_mode):
            raise DestinationError(f"{self.path}: is a symbolic link; refused (give "
                                   f"follow_symlinks=True, --follow-symlinks, to save "
                                   f"where it leads)")
        if not stat.S_ISREG(found.st_mode):
            raise DestinationError(f"{self.path}: is {file_kind(found.st_mode)}, not a "
                                   f"regular file; refused")
        return found

    def _open_in_place(self, mode: int | None) -> None:
        try:
            self.fd = os.open(self.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                              | os.O_NONBLOCK, DEFAULT_MODE, dir_fd=self.dir_fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise DestinationError(f"{self.path}: became a symbolic link; "
                                       f"refused") from None
            raise ImageWriteError(error.errno, error.strerror, self.path) from None
        found = os.fstat(self.fd)
        if not stat.S_ISREG(found.st_mode):
            raise DestinationError(f"{self.path}: is {file_kind(found.st_mode)}, not a "
                                   f"regular file; refused")
        if mode is not None:
            os.fchmod(self.fd, mode)

    def _create(self, mode: int, old: os.stat_result | None) -> None:
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, DEFAULT_MODE,
                              dir_fd=self.dir_fd)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise ImageWriteError(error.errno, error.strerror, self.path) from None
            self.partial = partial_name(self.name)
            try:
                self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                  | os.O_NOFOLLOW | os.O_CLOEXEC, DEFAULT_MODE,
                                  dir_fd=self.dir_fd)
            except OSError as error:
                raise ImageWriteError(error.errno, error.strerror, self.path) from None
        # Exactly this mode, whatever the umask; the old image's owner too,
        # where we may (root may; anyone may keep their own).
        os.fchmod(self.fd, mode)
        if old is not None:
            try:
                os.fchown(self.fd, old.st_uid, old.st_gid)
            except PermissionError:
                pass

    # --- writing ---

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(fd, *args)`` on the image file; its error names the
        image (errors of calls on a bare descriptor name nothing)."""
        try:
            return function(self.fd, *args)
        except OSError as error:
            raise ImageWriteError(error.errno, error.strerror, self.path) from None

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = self.call(os.pwrite, view, offset)
            view, offset = view[written:], offset + written

    def start_writeback(self) -> None:
        """Start writing what the channels wrote so far to disk (see
        files.start_writeback); for durable saves, during their passes."""
        start_writeback(self.fd)

    def cut_old_stream(self, start: int, sync: bool) -> None:
        """Before a stream is written over an older one in place: the older
        one's END goes first (cut at its tail, it reads as an incomplete
        stream, not as "not an image"), made durable with ``sync`` before
        anything else is written.  :meth:`write_setup` then cuts the rest."""
        if os.fstat(self.fd).st_size <= start:
            return
        try:
            old_tail = decode_stream(self.fd, self.path, start).layout.tail_offset
        except FormatError:
            old_tail = start  # not a stream: nothing to keep readable
        self.call(os.ftruncate, old_tail)
        if sync:
            self.call(os.fdatasync)

    def write_setup(self, layout: StreamLayout) -> None:
        """The setup phase's bytes: the stream's header first, then
        everything after it is cut (an older stream's pages held memory),
        then the block records and the RAM section's EOS."""
        (offset, header), *rest = encode_setup(layout)
        self.pwrite(header, offset)
        self.call(os.ftruncate, offset + len(header))
        for offset, data in rest:
            self.pwrite(data, offset)

    def finish(self, layout: StreamLayout, bitmaps: list[np.ndarray], tail: bytes,
               sync: bool) -> None:
        """Complete the stream once its pages are written: the bitmaps,
        then the tail (END, EOF, description) that makes them count.  With
        ``sync`` the pages are on disk before the bitmaps claim them, and,
        in place (where no rename follows to publish the file at once),
        the bitmaps before the END that makes them count."""
        if sync:
            self.call(os.fdatasync)
        for bits, block in zip(bitmaps, layout.blocks):
            self.pwrite(bits.tobytes(), block.bitmap_offset)
        if sync and self.in_place:
            self.call(os.fdatasync)
        self.pwrite(tail, layout.tail_offset)
        self.call(os.ftruncate, layout.tail_offset + len(tail))
        if sync:
            self.call(os.fdatasync)

    def commit(self, sync: bool) -> None:
        """Give the complete file the image's name (not in place)."""
        if self.in_place:
            return
        temporary = self.partial
        if temporary is None:
            while True:
                temporary = partial_name(self.name)
                try:
                    os.link(f"/proc/self/fd/{self.fd}", temporary, dst_dir_fd=self.dir_fd)
                    break
                except FileExistsError:
                    continue
        old = None
        try:
            old = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                          | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            pass  # none, or not one we may open: then it is freed in the rename
        try:
            if old is not None and _exchange(self.dir_fd, temporary, self.name):
                # Renamed over another file, ext4 writes the new one out
                # first (auto_da_alloc: half a second a GiB, in the caller's
                # time, sync or not).  Exchanged, the older image takes the
                # hidden name instead, and goes with its unlink (its blocks
                # are freed when ``old`` is let go).
                try:
                    os.unlink(temporary, dir_fd=self.dir_fd)
                except OSError:
                    pass  # a hidden leftover, for clean; the image is in place
            else:
                os.rename(temporary, self.name, src_dir_fd=self.dir_fd,
                          dst_dir_fd=self.dir_fd)
        except OSError as error:
            if old is not None:
                os.close(old)
            raise ImageWriteError(error.errno, error.strerror, self.path) from None
        self.partial = None
        if old is not None:
            close_in_background(old, "free old image")
        ours, found = os.fstat(self.fd), os.stat(self.name, dir_fd=self.dir_fd,
                                                  follow_symlinks=False)
        if (found.st_dev, found.st_ino) != (ours.st_dev, ours.st_ino):
            raise DestinationError(f"{self.path}: another process replaced the image "
                                   f"while it was being put in place; the file there "
                                   f"now is not this save's")
        if sync:
            os.fsync(self.dir_fd)

    def discard(self) -> None:
        """Close everything; a partial file that never became the image is
        removed (an unnamed one simply goes)."""
        if self.partial is not None and self.fd >= 0:
            unlink_if_ours(self.partial, self.fd, self.dir_fd)
        self.partial = None
        self.close()

    def close(self) -> None:
        for name in ("channel_fd", "fd", "dir_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0 and (name != "channel_fd" or fd != self.fd):
                os.close(fd)
            setattr(self, name, -1)
