"""The files a restore writes its blocks into, safe on a shared machine.

Memory images hold secrets and restores often run as root next to other
users, so the destination files are:

- never written through a symbolic link that was not expected (the last
  component is opened with O_NOFOLLOW; an output directory is opened once,
  without following a link, and its files are made relative to that
  descriptor), and never a FIFO, device or directory; in an output
  directory, never a file another user owns or one with other hard links
  (``follow_symlinks`` allows all of these: the user trusts the place);
- created 0600 whatever the umask (``mode`` widens that, exactly);
- one file per block: two blocks never land in one file, whether through
  names that collide or paths that are the same inode (hard links too);
- created only where a directory exists (no silent ``mkdir -p``; an output
  directory whose parent exists is created 0700, and the caller is told);
- on failure, the files created are removed, the files that existed before
  are named (their old contents are gone: they were truncated).

The space a restore needs is checked before any file is touched: a full
file system shows as SIGBUS or EFAULT in a channel writing through a
mapping, which would otherwise read as a fault of the image.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from .blocks import RamBlock
from .errors import DestinationError, FileError
from .files import (
    file_kind,
    free_bytes,
    length_refusal,
    not_regular,
    open_regular,
    unlink_if_ours,
)

DEFAULT_MODE = 0o600
DIRECTORY_MODE = 0o700


@dataclass
class OutFile:
    """One destination file: where, and what we did to it."""

    name: str                 # the block
    path: str                 # as the user sees it
    length: int
    existing: os.stat_result | None = None  # what was there when checked
    dir_fd: int | None = None  # the output directory, when the path is relative to it
    entry: str = ""           # the name in dir_fd, or the path
    fd: int = -1
    created: bool = False
    in_outdir: bool = False   # entry is a name in the output directory

    @property
    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


def _human_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"


def _lstat(entry: str, dir_fd: int | None) -> os.stat_result | None:
    try:
        return os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


@dataclass
class Destinations:
    """The destination files of one restore, planned and checked before
    anything is touched (:func:`plan_outdir`, :func:`plan_paths`), then
    :meth:`open` ed.  A context manager: closes its descriptors."""

    files: list[OutFile]
    follow_symlinks: bool = False
    mode: int | None = None
    outdir: str | None = None
    outdir_fd: int | None = None
    outdir_created: bool = False
    _outdir_missing: bool = field(default=False, repr=False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for out in self.files:
            if out.fd >= 0:
                os.close(out.fd)
                out.fd = -1
        if self.outdir_fd is not None:
            os.close(self.outdir_fd)
            self.outdir_fd = None

    @property
    def paths(self) -> dict[str, str]:
        return {out.name: out.path for out in self.files}

    def check_not(self, identity: os.stat_result, what: str) -> None:
        """Refuse a destination that is the file ``identity`` (the image)."""
        for out in self.files:
            if out.existing is not None and _same_inode(out.existing, identity):
                raise DestinationError(f"block {out.name!r} would overwrite {what} {out.path}")

    def check_space(self, needed: Mapping[str, int]) -> None:
        """Refuse a restore that cannot fit: ``needed`` is, per block, the
        bytes it will write (an upper bound).  The files that exist are
        truncated first, so their blocks count as free."""
        by_device: dict[int, list[OutFile]] = {}
        for out in self.files:
            by_device.setdefault(os.stat(self._existing_dir(out)).st_dev, []).append(out)
        for outs in by_device.values():
            want = sum(needed[out.name] for out in outs)
            freed = sum(out.existing.st_blocks * 512 for out in outs if out.existing)
            free = free_bytes(self._existing_dir(outs[0]))
            if want > free + freed:
                names = ", ".join(out.path for out in outs)
                raise DestinationError(
                    f"no space left for the restore: {names} need up to "
                    f"{_human_bytes(want)}, their file system has {_human_bytes(free + freed)} "
                    f"free")

    def _existing_dir(self, out: OutFile) -> str:
        """The nearest directory that exists now (an output directory not
        created yet is made in its parent, on the same file system)."""
        if self._outdir_missing and not self.outdir_created:
            return os.path.dirname(os.path.abspath(self.outdir or "."))
        return out.directory

    def open(self) -> None:
        """Create or open every destination and set it to its length, all
        holes: the restore then writes only the image's present pages.  On
        failure, what was created is removed again."""
        try:
            if self._outdir_missing:
                os.mkdir(self.outdir, DIRECTORY_MODE)
                os.chmod(self.outdir, DIRECTORY_MODE)  # whatever the umask
                self.outdir_created = True
                self.outdir_fd = _open_directory(self.outdir, self.follow_symlinks)
                for out in self.files:
                    out.dir_fd = self.outdir_fd
            for out in self.files:
                self._open_one(out)
            for out in self.files:
                os.ftruncate(out.fd, 0)  # the old contents go: holes, no stale page
                _resize(out)
        except BaseException:
            self.rollback()
            raise

    def _open_one(self, out: OutFile) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            out.fd = os.open(out.entry, flags, DEFAULT_MODE, dir_fd=out.dir_fd)
            out.created = True
            os.fchmod(out.fd, DEFAULT_MODE if self.mode is None else self.mode)
            return
        except FileExistsError:
            pass
        except OSError as error:
            raise FileError(error.errno, error.strerror, out.path) from None
        if out.existing is None:
            raise DestinationError(f"{out.path} appeared while the restore was being "
                                   f"prepared: refused")
        out.fd = open_regular(out.entry, os.O_RDWR, follow_symlinks=self.follow_symlinks,
                              dir_fd=out.dir_fd)
        if not _same_inode(os.fstat(out.fd), out.existing):
            raise DestinationError(f"{out.path} was replaced while the restore was being "
                                   f"prepared: refused")
        if self.mode is not None:
            os.fchmod(out.fd, self.mode)

    def blocks(self) -> list[RamBlock]:
        """The opened files as blocks, mapped through their descriptors."""
        return [RamBlock(out.name, mmap.mmap(out.fd, out.length, mmap.MAP_SHARED,
                                             access=mmap.ACCESS_WRITE))
                for out in self.files]

    def rollback(self) -> tuple[list[str], list[str]]:
        """After a failure: remove the files this restore created (if they
        are still ours), and the output directory if it created it and it
        is empty.  Returns (removed, changed): the paths removed, and the
        paths that existed before and were truncated (now incomplete)."""
        removed, changed = [], []
        for out in self.files:
            if out.created:
                if out.fd >= 0 and unlink_if_ours(out.entry, out.fd, out.dir_fd):
                    removed.append(out.path)
            elif out.fd >= 0:
                changed.append(out.path)
        self.close()
        if self.outdir_created:
            try:
                os.rmdir(self.outdir)
            except OSError:
                pass
        return removed, changed


def _resize(out: OutFile) -> None:
    """Make a destination its block's length, or say why it cannot be."""
    try:
        os.ftruncate(out.fd, out.length)
    except OSError as error:
        reason = length_refusal(out.fd, out.length, error)
        if reason:
            raise DestinationError(f"{out.path}: cannot hold block {out.name!r} of "
                                   f"{out.length} bytes: {reason}") from None
        raise FileError(error.errno, error.strerror, out.path) from None


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_directory(path: str, follow_symlinks: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        return os.open(path, flags)
    except OSError as error:
        # O_NOFOLLOW with O_DIRECTORY: a link is ELOOP or ENOTDIR, by kernel
        linked = error.errno in (errno.ELOOP, errno.ENOTDIR) and not follow_symlinks and \
            stat.S_ISLNK(os.lstat(path).st_mode)
        if linked:
            raise FileError(error.errno, "is a symbolic link (refused: pass "
                            "--follow-symlinks to write through it)", path) from None
        if error.errno == errno.ENOTDIR:
            mode = os.stat(path, follow_symlinks=follow_symlinks).st_mode
            kind = "a regular file" if stat.S_ISREG(mode) else file_kind(mode)
            raise FileError(error.errno, f"not a directory: {kind}", path) from None
        raise FileError(error.errno, error.strerror, path) from None


def _check_existing(out: OutFile, follow_symlinks: bool, planted: bool = False) -> None:
    """Refuse, before anything is touched, a destination that is a link
    (unless followed) or not a regular file.  ``planted``: the name comes
    from the image, not from the user (--outdir), so a file there may have
    been planted by someone else: one owned by another user, or with other
    hard links, would let them read the memory written into it."""
    info = _lstat(out.entry, out.dir_fd)
    if info is None:
        return
    if stat.S_ISLNK(info.st_mode):
        if not follow_symlinks:
            raise FileError(errno.ELOOP, "is a symbolic link (refused: pass "
                            "--follow-symlinks to write through it)", out.path)
        try:
            info = os.stat(out.entry, dir_fd=out.dir_fd)
        except FileNotFoundError:
            raise FileError(errno.ENOENT, "is a symbolic link to a missing file (refused)",
                            out.path) from None
    if not stat.S_ISREG(info.st_mode):
        raise not_regular(out.path, info.st_mode)
    if planted and not follow_symlinks and info.st_uid != os.geteuid():
        raise FileError(None, f"exists and belongs to user {info.st_uid}, who could read "
                        f"what is restored into it (refused: remove it, or pass "
                        f"--follow-symlinks to write into it anyway)", out.path)
    if planted and not follow_symlinks and info.st_nlink > 1:
        raise FileError(None, f"exists with {info.st_nlink} hard links, which could be read "
                        f"elsewhere (refused: remove it, or pass --follow-symlinks to write "
                        f"into it anyway)", out.path)
    out.existing = info


def _refuse_shared_files(files: list[OutFile]) -> None:
    """Two blocks must never land in one file: same name in one directory,
    or the same inode under two paths (hard links, symlinks, ./ and ..)."""
    seen: dict[tuple, OutFile] = {}
    for out in files:
        if out.existing is not None:
            key: tuple = ("inode", out.existing.st_dev, out.existing.st_ino)
        elif out.in_outdir:
            key = ("entry", out.entry)
        else:
            parent = os.stat(out.directory)
            key = ("entry", parent.st_dev, parent.st_ino, os.path.basename(out.path))
        if key in seen:
            raise DestinationError(f"blocks {seen[key].name!r} and {out.name!r} would both "
                                   f"be written to one file ({seen[key].path} and {out.path})")
        seen[key] = out


def plan_outdir(outdir: str | os.PathLike, file_names: Mapping[str, str],
                lengths: Mapping[str, int], *, follow_symlinks: bool = False,
                mode: int | None = None) -> Destinations:
    """One file per block in ``outdir``, named ``file_names[block]``.  The
    directory may be missing if its parent exists: it is then created 0700
    by :meth:`Destinations.open`."""
    outdir = os.fspath(outdir)
    by_file: dict[str, str] = {}
    for name, file_name in file_names.items():
        if file_name in by_file:
            raise DestinationError(f"blocks {by_file[file_name]!r} and {name!r} would both "
                                   f"be written to {os.path.join(outdir, file_name)}")
        by_file[file_name] = name
    plan = Destinations([], follow_symlinks, mode, outdir)
    if _lstat(outdir, None) is None:
        parent = os.path.dirname(os.path.abspath(outdir))
        if not os.path.isdir(parent):
            raise FileError(errno.ENOENT, f"no such directory {parent} (directories are "
                            f"not created, except the output directory itself)", outdir)
        plan._outdir_missing = True
    else:
        plan.outdir_fd = _open_directory(outdir, follow_symlinks)
    try:
        for name, file_name in file_names.items():
            out = OutFile(name, os.path.join(outdir, file_name), lengths[name],
                          dir_fd=plan.outdir_fd, entry=file_name, in_outdir=True)
            if plan.outdir_fd is not None:
                _check_existing(out, follow_symlinks, planted=True)
            plan.files.append(out)
        _refuse_shared_files(plan.files)
    except BaseException:
        plan.close()
        raise
    return plan


def plan_paths(paths: Mapping[str, str | os.PathLike], lengths: Mapping[str, int], *,
               follow_symlinks: bool = False, mode: int | None = None) -> Destinations:
    """Each block into the file its path names; the directories must exist."""
    plan = Destinations([], follow_symlinks, mode)
    for name, path in paths.items():
        path = os.fspath(path)
        out = OutFile(name, path, lengths[name], entry=path)
        if not os.path.isdir(out.directory):
            raise FileError(errno.ENOENT, f"no such directory {out.directory} (directories "
                            f"are not created)", path)
        _check_existing(out, follow_symlinks)
        plan.files.append(out)
    _refuse_shared_files(plan.files)
    return plan
