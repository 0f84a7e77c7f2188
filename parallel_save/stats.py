"""Statistics of a save or restore, in the spirit of QEMU's query-migrate,
and the status board that publishes them to other processes.

Channels only add to their own row of counters in the control segment;
the coordinator turns those rows into these records and is the single
writer of the status board (shared-memory-dict loses updates with two
writers and copies the whole dict on every operation: docs/DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import control as c
from .artifacts import SEGMENT_DIR, open_ours, segment_name
from .errors import ParallelSaveError


@dataclass(frozen=True)
class ChannelStats:
    channel: int
    pages_written: int
    zero_pages: int
    bytes_written: int
    write_calls: int
    pages_read: int
    pages_zeroed: int
    busy_seconds: float
    shards: int
    # Of pages_read, those copied into the destination's file by the
    # kernel (sendfile) rather than read into the channel's mapping.
    pages_sent: int = 0

    @classmethod
    def from_row(cls, channel: int, row: np.ndarray) -> ChannelStats:
        return cls(channel, int(row[c.PAGES_WRITTEN]), int(row[c.ZERO_PAGES]),
                   int(row[c.BYTES_WRITTEN]), int(row[c.WRITE_CALLS]),
                   int(row[c.PAGES_READ]), int(row[c.PAGES_ZEROED]),
                   row[c.BUSY_NS] / 1e9, int(row[c.SHARDS_DONE]), int(row[c.PAGES_SENT]))


@dataclass(frozen=True)
class PassStats:
    """One pass over the dirty pages (iterate or complete).  With the hash
    tracker, ``dirty_pages`` are the pages looked at, and ``pages_unchanged``
    those of them skipped because their hash had not changed."""

    number: int
    dirty_pages: int
    pages_written: int
    zero_pages: int
    bytes_written: int
    seconds: float
    pages_unchanged: int = 0

    @property
    def throughput(self) -> float:
        """Dirty bytes handled per second (zero pages count: they were checked)."""
        return self.dirty_pages * 4096 / self.seconds if self.seconds else 0.0


@dataclass
class SaveStats:
    """Totals of a save; ``phases`` holds seconds per phase (setup,
    iterate, complete), ``passes`` one record per pass."""

    path: str
    channels: int
    direct_io: bool
    synced: bool
    status: str = "setup"
    phases: dict[str, float] = field(default_factory=dict)
    passes: list[PassStats] = field(default_factory=list)
    channel_stats: list[ChannelStats] = field(default_factory=list)
    pages_present: int = 0            # set bits in the final bitmaps
    control_bytes: int = 0            # bytes through the pipes, both ways

    @property
    def pages_written(self) -> int:
        return sum(p.pages_written for p in self.passes)

    @property
    def zero_pages(self) -> int:
        return sum(p.zero_pages for p in self.passes)

    @property
    def bytes_written(self) -> int:
        return sum(p.bytes_written for p in self.passes)

    @property
    def total_seconds(self) -> float:
        return sum(self.phases.values())

    @property
    def throughput(self) -> float:
        """Bytes of RAM handled per second over the whole save."""
        handled = sum(p.dirty_pages for p in self.passes) * 4096
        return handled / self.total_seconds if self.total_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(pages_written=self.pages_written, zero_pages=self.zero_pages,
                    bytes_written=self.bytes_written, total_seconds=self.total_seconds,
                    throughput=self.throughput)
        return data


@dataclass
class RestoreStats:
    path: str
    channels: int
    pages_read: int = 0
    pages_zeroed: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    channel_stats: list[ChannelStats] = field(default_factory=list)
    control_bytes: int = 0

    @property
    def throughput(self) -> float:
        return self.bytes_read / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["throughput"] = self.throughput
        return data


class StatusBoard:
    """A shared-memory-dict that observers (a progress display, another
    process) read by name; only the coordinator writes it.

    It holds JSON, never pickle: whoever reads it runs no code of the
    writer's.  Its segment is created here exclusively, mode 0600, so a
    name that someone else created first is refused, never taken over; a
    reader checks that the segment is ours before reading it."""

    SIZE = 64 * 1024

    def __init__(self, name: str | None = None) -> None:
        from shared_memory_dict import SharedMemoryDict
        from shared_memory_dict.serializers import JSONSerializer

        self.name = check_board_name(name) if name else segment_name("board")
        path = board_path(self.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ParallelSaveError(f"status board {self.name!r}: {path} exists already "
                                    f"(another save's board, or planted); choose another "
                                    f"name") from None
        try:
            os.ftruncate(fd, self.SIZE)
            # Attached by name right after we made it: in a sticky /dev/shm
            # no one else can remove or replace our file meanwhile.
            self._board = SharedMemoryDict(name=self.name, size=self.SIZE,
                                           serializer=JSONSerializer())
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    def publish(self, **values: Any) -> None:
        # One update per publish: every operation re-serialises the whole dict.
        self._board.update(values)

    def close(self) -> None:
        segment = self._board.shm
        self._board.cleanup()
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def check_board_name(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 200 or "/" in name \
            or name in (".", "..") or not name.isprintable():
        raise ParallelSaveError(f"{name!r} is not a status board name (up to 200 "
                                f"printable characters, no '/')")
    return name


def board_path(name: str) -> str:
    from shared_memory_dict.templates import MEMORY_NAME

    return os.path.join(SEGMENT_DIR, MEMORY_NAME.format(name=name))


def read_status(name: str) -> dict[str, Any]:
    """What the coordinator last published on the board ``name``: read
    through one descriptor, from a segment of ours, as JSON."""
    path = board_path(check_board_name(name))
    try:
        fd, _ = open_ours(path, os.O_RDONLY, "status board")
    except FileNotFoundError:
        raise ParallelSaveError(f"no status board named {name!r} (is the save "
                                f"running?)") from None
    try:
        raw = os.pread(fd, StatusBoard.SIZE, 0)
    finally:
        os.close(fd)
    try:
        board = json.loads(raw.split(b"\0", 1)[0] or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise ParallelSaveError(f"{path}: not a status board (not JSON)") from None
    if not isinstance(board, dict):
        raise ParallelSaveError(f"{path}: not a status board (not a JSON object)")
    return board
