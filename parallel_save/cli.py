"""The ``parallel-save`` command.

    parallel-save save IMAGE --block NAME=PATH ...     save files as RAM blocks
    parallel-save restore IMAGE --outdir DIR           one file per block
    parallel-save inspect IMAGE                        what an image holds
    parallel-save verify IMAGE --block NAME=PATH ...   compare with the sources
    parallel-save demo                                 save and restore a generated image
    parallel-save status BOARD                         a running save's progress
    parallel-save clean [DIR ...]                      remove what killed saves left

Every user mistake ends in one line on stderr, ``parallel-save: error: ...``,
with exit status 2 for a bad command line and 1 for a failure; ``--debug``
adds the traceback.  Ctrl-C ends with status 130, SIGTERM and SIGHUP with
128 + the signal; the Saver has stopped its channels and dealt with its
partial file by then.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import stat
import sys
import tempfile
import traceback
import urllib.parse
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn, Self

import numpy as np

from ._version import __version__
from .artifacts import clean, stale_files
from .blocks import BlockMapping, BlockSource, RamBlock
from .directio import check_direct_io
from .errors import BlockError, DirectIOError, ParallelSaveError
from .format import PAGE_SIZE
from .image import Image, open_image
from .restorer import restore, unmatched_blocks
from .saver import MAX_CHANNELS, default_channels, save
from .signals import terminate_cleanly
from .stats import read_status

PROG = "parallel-save"
DEFAULT_CHANNELS = default_channels()  # one per CPU, at most 8
# The demo's blocks live here: shared memory any channel can map.
SHM_DIR = "/dev/shm"

# QEMU refuses a stream whose machine type is not its own machine's full,
# versioned name; these are the aliases users type, as QEMU 10.0 resolves
# them.  Any other name is written as given.
MACHINE_PRESETS = {"q35": "pc-q35-10.0", "pc": "pc-i440fx-10.0"}

# Pages handled per step when verify compares and demo fills or compares:
# bounded temporaries, whatever the block's size.
COMPARE_PAGES = 16384
# Page numbers listed per block when verify finds differences.
LISTED_PAGES = 20
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(Exception):
    """A bad command line: exit status 2."""


class Failure(ParallelSaveError):
    """A failure the command itself detects: exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- argument types ---


def parse_size(text: str) -> int:
    """Bytes from "4096", "64K", "256M", "2GiB" (binary multiples)."""
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 4096, 64K, 256M or 2G, "
                                         f"got {text!r}")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def _channels(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_CHANNELS}, "
                                         f"got {text!r}")
    return count


def _block_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _unique_blocks(specs: list[tuple[str, str]]) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for name, path in specs:
        if name in blocks:
            raise UsageError(f"block {name!r} is given twice")
        blocks[name] = path
    return blocks


# --- output ---


def _human_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"


def _gbps(ram_bytes: int, seconds: float) -> float:
    """GB (10^9 bytes) of RAM handled per second, zero pages included."""
    return ram_bytes / seconds / 1e9 if seconds > 0 else 0.0


def _emit(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    """The result: JSON for scripts with ``--json``, else the text unless ``--quiet``."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    elif not getattr(args, "quiet", False):
        print(text)


class ProgressBar:
    """A progress bar per phase, on a terminal only: the ``on_progress``
    callback of a save or restore, ``(phase, done, total)``.

    The passes over pages ("iterate", "complete", "restore") show bytes of
    RAM and their throughput in the summary's units (kB, MB, GB: powers of
    1000); each pass gets its own bar, numbered.  Any other phase (the
    file's "sync" and "rename" at the end of a save, or a phase this bar
    does not know) is shown by its name as steps, so the bar never sits at
    the last pass's figure while the file is synced.
    """

    PAGE_PHASES: ClassVar[dict[str, str]] = {"iterate": "pass {number}",
                                             "complete": "pass {number} (last)",
                                             "restore": "restoring"}
    STEP_PHASES: ClassVar[dict[str, str]] = {"sync": "syncing the file",
                                             "rename": "renaming the file into place"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._phase: str | None = None
        self._last = (0, 0)  # (done, total) of the last call: a smaller done is a new pass
        self._passes = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        pages = phase in self.PAGE_PHASES
        if (self._bar is None or phase != self._phase or done < self._last[0]
                or total != self._last[1]):
            self._start(phase, pages, total)
        self._last = (done, total)
        self._bar.update((done * PAGE_SIZE if pages else done) - self._bar.n)

    def _start(self, phase: str, pages: bool, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self._phase = phase
        if pages:
            if phase != "restore":
                self._passes += 1
            label = self.PAGE_PHASES[phase].format(number=self._passes)
            self._bar = tqdm(total=total * PAGE_SIZE, desc=label, unit="B", unit_scale=True,
                             unit_divisor=1000, leave=False, dynamic_ncols=True,
                             file=sys.stderr)
        else:
            label = self.STEP_PHASES.get(phase, phase)
            self._bar = tqdm(total=total, desc=label, leave=False, dynamic_ncols=True,
                             bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]",
                             file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _progress(args: argparse.Namespace) -> ProgressBar:
    return ProgressBar(not args.quiet and sys.stderr.isatty())


# --- blocks from files ---


def _source_block(name: str, path: str) -> RamBlock:
    """A block mapped shared from ``path``: its bytes stay in the page
    cache, never copied into this process."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise Failure(f"block {name!r}: cannot open {path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise Failure(f"block {name!r}: {path} is not a regular file")
    if info.st_size == 0 or info.st_size % PAGE_SIZE:
        raise Failure(f"block {name!r}: {path} is {info.st_size} bytes, not a positive "
                      f"multiple of the page size {PAGE_SIZE}")
    return RamBlock.from_file(name, path, writable=False)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def block_file_name(name: str) -> str:
    """A file name for a block, one per name: QEMU's names hold slashes
    ("/rom@etc/acpi/tables"), so they are percent-encoded, a leading dot
    too (no ".", "..", or hidden file); an overlong one is shortened and
    made unique by a hash of the name."""
    safe = urllib.parse.quote(name, safe="@+,=")
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    if len(safe) > 200:
        safe = safe[:180] + "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    return safe


# --- save ---


def cmd_save(args: argparse.Namespace) -> int:
    paths = _unique_blocks(args.block)
    image_dir = os.path.dirname(os.path.abspath(args.image))
    if not os.path.isdir(image_dir):
        raise Failure(f"cannot save {args.image}: no such directory {image_dir}")
    for name, path in paths.items():
        if _same_file(path, args.image):
            raise Failure(f"{args.image} is also the source of block {name!r}")
    blocks = [_source_block(name, path) for name, path in paths.items()]
    machine = MACHINE_PRESETS.get(args.machine, args.machine)
    with _progress(args) as bar:
        try:
            stats = save(args.image, blocks, args.channels, direct_io=args.direct_io,
                         machine=machine, sync=not args.no_sync, start=args.offset,
                         in_place=args.in_place, status_board=args.status_board,
                         mode=args.mode, follow_symlinks=args.follow_symlinks,
                         on_progress=bar)
        except DirectIOError as error:
            # Refused before anything was written; named as the user spelt it.
            raise DirectIOError(str(error).replace("(direct_io)", "(--direct-io)")) from None
    ram = sum(b.length for b in blocks)
    seconds = stats.total_seconds
    text = (f"saved {args.image}: {ram // PAGE_SIZE} pages ({stats.pages_written} written, "
            f"{stats.zero_pages} zero), {_human_bytes(stats.bytes_written)} written in "
            f"{seconds:.2f} s, {_gbps(ram, seconds):.2f} GB/s")
    data = {"image": args.image, "machine": machine, "ram_bytes": ram,
            "blocks": [{"name": b.name, "path": paths[b.name], "length": b.length}
                       for b in blocks],
            "gb_per_s": _gbps(ram, seconds), **stats.to_dict()}
    _emit(args, text, data)
    return 0


# --- restore ---


def _destinations(args: argparse.Namespace, image: Image) -> dict[str, str]:
    """Where each of the image's blocks goes, checked before any file is touched."""
    if args.outdir is not None:
        return {name: os.path.join(args.outdir, block_file_name(name)) for name in image.blocks}
    paths = _unique_blocks(args.block)
    missing, extra = unmatched_blocks(image.blocks, paths)
    if missing or extra:
        raise Failure(f"{args.image} holds blocks {', '.join(map(repr, image.blocks))}"
                      + (f"; no --block for {', '.join(map(repr, missing))}" if missing else "")
                      + (f"; not in the image: {', '.join(map(repr, extra))}" if extra else ""))
    seen: dict[str, str] = {}
    for name, path in paths.items():
        real = os.path.realpath(path)
        if real in seen:
            raise Failure(f"blocks {seen[real]!r} and {name!r} would both be written to {path}")
        seen[real] = name
    return paths


def _fresh_file(path: str, length: int) -> None:
    """Create or overwrite ``path`` as ``length`` zero bytes, all holes:
    the restore then writes only the image's present pages."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def cmd_restore(args: argparse.Namespace) -> int:
    with open_image(args.image, start=args.offset) as image:
        lengths = {name: block.length for name, block in image.blocks.items()}
        paths = _destinations(args, image)
    for name, path in paths.items():
        if _same_file(path, args.image):
            raise Failure(f"block {name!r} would overwrite the image {path}")
    if args.direct_io:
        check_direct_io(args.image, writable=False, option="--direct-io")
    if args.outdir is not None:
        os.makedirs(args.outdir, exist_ok=True)
    for name, path in paths.items():
        _fresh_file(path, lengths[name])
    blocks = [RamBlock.from_file(name, path, length=lengths[name]) for name, path in paths.items()]
    with _progress(args) as bar:
        stats = restore(args.image, blocks, args.channels, start=args.offset,
                        direct_io=args.direct_io, assume_zero=True, on_progress=bar)
    ram = sum(lengths.values())
    pages = ram // PAGE_SIZE
    lines = [f"  {name!r} -> {path}" for name, path in paths.items()]
    lines.append(f"restored {args.image}: {pages} pages ({stats.pages_read} read, "
                 f"{pages - stats.pages_read} zero), {_human_bytes(stats.bytes_read)} read in "
                 f"{stats.seconds:.2f} s, {_gbps(ram, stats.seconds):.2f} GB/s")
    data = {"image": args.image, "files": paths, "ram_bytes": ram, "pages": pages,
            "pages_zero": pages - stats.pages_read, "gb_per_s": _gbps(ram, stats.seconds),
            **stats.to_dict()}
    _emit(args, "\n".join(lines), data)
    return 0


# --- inspect ---


def describe_image(image: Image) -> dict[str, Any]:
    """What ``inspect --json`` prints; these keys are stable."""
    size = os.stat(image.path)
    complete = image.complete
    blocks = []
    for block in image.blocks.values():
        layout = block.layout
        blocks.append({
            "name": block.name, "length": block.length, "pages": block.pages,
            # The bitmaps are written last: an incomplete image has none yet.
            "pages_present": block.pages_present if complete else None,
            "pages_zero": block.pages_zero if complete else None,
            "record_offset": layout.record_offset, "bitmap_offset": layout.bitmap_offset,
            "pages_offset": layout.pages_offset,
        })
    description = image.description or {}
    return {
        "path": image.path, "machine": image.machine, "start": image.start,
        "complete": complete, "incomplete_reason": image.info.incomplete_reason,
        "iterations": image.info.passes, "capabilities": list(image.info.layout.capabilities),
        "device_state": image.info.device_sections,
        "file_size": size.st_size, "disk_usage": size.st_blocks * 512,
        "ram_bytes": sum(b["length"] for b in blocks),
        "pages": sum(b["pages"] for b in blocks),
        "pages_present": sum(b["pages_present"] for b in blocks) if complete else None,
        "pages_zero": sum(b["pages_zero"] for b in blocks) if complete else None,
        "blocks": blocks,
        "description": description.get("parallel_save"),
        "qemu_description": "parallel_save" not in description and bool(description),
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _inspect_text(info: dict[str, Any]) -> str:
    def count(value: int | None) -> str:
        return "?" if value is None else str(value)

    lines = [f"image         {info['path']}",
             f"machine       {info['machine']}",
             f"stream start  {info['start']}",
             "complete      " + ("yes" if info["complete"] else f"no: {info['incomplete_reason']}"),
             f"iterations    {info['iterations']} (SECTION_PARTs before the END)",
             (f"file size     {_human_bytes(info['file_size'])} apparent, "
              f"{_human_bytes(info['disk_usage'])} on disk"),
             (f"RAM           {_human_bytes(info['ram_bytes'])} in {len(info['blocks'])} "
              f"block(s), {info['pages']} pages: {count(info['pages_present'])} present, "
              f"{count(info['pages_zero'])} zero")]
    if not info["complete"]:
        lines.append("              (page counts come from the bitmaps, written when a "
                     "save completes)")
    if info["device_state"]:
        lines.append("device state  yes (QEMU's, not read)")
    rows = [["block", "length", "pages", "present", "zero", "record", "bitmap", "pages at"]]
    rows += [[repr(b["name"]), str(b["length"]), str(b["pages"]), count(b["pages_present"]),
              count(b["pages_zero"]), str(b["record_offset"]), str(b["bitmap_offset"]),
              str(b["pages_offset"])] for b in info["blocks"]]
    lines += ["", *_table(rows), ""]
    if info["description"] is not None:
        described = json.dumps(info["description"], indent=2, sort_keys=True)
        lines.append("description   " + described.replace("\n", "\n              "))
    elif info["qemu_description"]:
        lines.append("description   QEMU's (device state layout, not shown)")
    else:
        lines.append("description   none")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    with open_image(args.image, start=args.offset, allow_incomplete=True) as image:
        info = describe_image(image)
    _emit(args, _inspect_text(info), info)
    return 0


# --- verify ---


def pages_differ(stored: np.ndarray, present: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Page numbers where the image (``stored`` slots, ``present`` bits)
    does not hold ``expected``: a present page must match its slot, a clear
    page must be zero (its slot may hold stale bytes)."""
    stored_pages = stored.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    expected_pages = expected.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    found = []
    for first in range(0, present.size, COMPARE_PAGES):
        step = slice(first, first + COMPARE_PAGES)
        mismatch = np.where(present[step],
                            (stored_pages[step] != expected_pages[step]).any(axis=1),
                            expected_pages[step].any(axis=1))
        found.append(first + np.flatnonzero(mismatch))
    return np.concatenate(found)


def _listed(pages: np.ndarray) -> str:
    shown = ", ".join(str(p) for p in pages[:LISTED_PAGES])
    more = pages.size - LISTED_PAGES
    return shown + (f", ... and {more} more" if more > 0 else "")


def cmd_verify(args: argparse.Namespace) -> int:
    paths = _unique_blocks(args.block)
    differing: dict[str, np.ndarray] = {}
    with open_image(args.image, start=args.offset) as image:
        unknown = [n for n in paths if n not in image.blocks]
        if unknown:
            raise Failure(f"{args.image} has no block {', '.join(map(repr, unknown))} (it "
                          f"holds {', '.join(map(repr, image.blocks))})")
        for name, path in paths.items():
            block = image.blocks[name]
            source = _source_block(name, path)
            if source.length != block.length:
                raise BlockError(f"block {name!r}: the image holds {block.length} bytes, "
                                 f"{path} is {source.length}")
            # The image's page slots, mapped: nothing is read that is not compared.
            stored = BlockMapping(BlockSource(image.path, block.layout.pages_offset,
                                              block.length), writable=False)
            differing[name] = pages_differ(stored.array, block.bitmap, source.array)
            stored.close()
        unchecked = [n for n in image.blocks if n not in paths]
    total = sum(p.size for p in differing.values())
    if total:
        lines = [(f"{args.image} differs from the sources: {total} page(s) in "
                  f"{sum(1 for p in differing.values() if p.size)} block(s)")]
        lines += [f"  block {name!r}: {p.size} page(s) differ: {_listed(p)}"
                  for name, p in differing.items() if p.size]
    else:
        lines = [(f"{args.image} matches the sources: {len(differing)} block(s), "
                  f"{sum(image.blocks[n].pages for n in differing)} pages equal")]
    if unchecked:
        lines.append(f"  not compared (no --block): {', '.join(map(repr, unchecked))}")
    data = {"image": args.image, "equal": total == 0, "pages_differing": total,
            "blocks": {name: {"pages": image.blocks[name].pages, "pages_differing": int(p.size),
                              "first_differing": p[:LISTED_PAGES].tolist()}
                       for name, p in differing.items()},
            "not_compared": unchecked}
    # The verdict is the point of the command: print it even with --quiet.
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))
    return 1 if total else 0


# --- demo ---


def _fill_demo_block(array: np.ndarray, zero_fraction: float, seed: int) -> int:
    """Random bytes in a random ``1 - zero_fraction`` of the pages, zero
    elsewhere; returns the number of non-zero pages."""
    rng = np.random.default_rng(seed)
    pages = array.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
    nonzero = 0
    for first in range(0, pages.shape[0], COMPARE_PAGES):
        chunk = pages[first:first + COMPARE_PAGES]
        chosen = np.flatnonzero(rng.random(chunk.shape[0]) >= zero_fraction)
        data = rng.integers(0, 1 << 63, size=(chosen.size, chunk.shape[1]), dtype=np.uint64)
        data[:, 0] |= 1  # never zero by chance
        chunk[chosen] = data
        nonzero += chosen.size
    return nonzero


def _shm_room(size: int, image_dir: str) -> None:
    """Refuse up front what would end in SIGBUS or ENOSPC half way: two
    blocks of ``size`` in /dev/shm, and the image if it goes there too."""
    needed = 2 * size + (size if os.stat(image_dir).st_dev == os.stat(SHM_DIR).st_dev else 0)
    info = os.statvfs(SHM_DIR)
    free = info.f_bavail * info.f_frsize
    if free < needed:
        raise Failure(f"demo: {SHM_DIR} has {_human_bytes(free)} free, the demo needs "
                      f"{_human_bytes(needed)}; pass a smaller --size, or --dir DIR")


def _blocks_equal(a: np.ndarray, b: np.ndarray) -> bool:
    step = COMPARE_PAGES * PAGE_SIZE
    return all(np.array_equal(a[at:at + step], b[at:at + step]) for at in range(0, a.size, step))


def cmd_demo(args: argparse.Namespace) -> int:
    size = args.size
    if size == 0 or size % PAGE_SIZE:
        raise UsageError(f"argument --size: {size} is not a positive multiple of the "
                         f"page size {PAGE_SIZE}")
    if not os.path.isdir(args.dir):
        raise Failure(f"demo: no such directory {args.dir}")
    _shm_room(size, args.dir)
    with tempfile.TemporaryDirectory(prefix="parallel-save-demo-", dir=SHM_DIR) as ram_dir, \
            tempfile.TemporaryDirectory(prefix="parallel-save-demo-", dir=args.dir) as image_dir:
        source = RamBlock.from_file("ram0", os.path.join(ram_dir, "source.ram"),
                                    length=size, create=True)
        pages = size // PAGE_SIZE
        zero = pages - _fill_demo_block(source.array, args.zero_fraction, seed=0)
        image = os.path.join(image_dir, "demo.img")
        print(f"parallel-save demo: {_human_bytes(size)} of RAM in one block, {zero} of its "
              f"{pages} pages zero, {args.channels} channel(s)")
        print(f"  RAM      {ram_dir}")
        print(f"  image    {image}")
        with ProgressBar(sys.stderr.isatty()) as bar:
            saved = save(image, [source], args.channels, on_progress=bar)
        on_disk = os.stat(image)
        target = RamBlock.from_file("ram0", os.path.join(ram_dir, "restored.ram"),
                                    length=size, create=True)
        with ProgressBar(sys.stderr.isatty()) as bar:
            restored = restore(image, [target], args.channels, assume_zero=True,
                               on_progress=bar)
        equal = _blocks_equal(source.array, target.array)
        print(f"  save     {saved.total_seconds:7.3f} s {_gbps(size, saved.total_seconds):6.2f} "
              f"GB/s  {saved.pages_written} pages written, {saved.zero_pages} zero pages "
              f"left as holes")
        print(f"  restore  {restored.seconds:7.3f} s {_gbps(size, restored.seconds):6.2f} "
              f"GB/s  {restored.pages_read} pages read into a fresh block")
        print(f"  file     {_human_bytes(on_disk.st_size)} apparent, "
              f"{_human_bytes(on_disk.st_blocks * 512)} on disk")
        del source, target  # unmapped, tmpfs frees the memory as the files go
    if not equal:
        raise Failure("demo: the restored block differs from the source")
    print("  check    the restored block equals the source")
    return 0


# --- status ---


def _status_text(name: str, board: dict[str, Any]) -> str:
    lines = [f"board     {name}",
             f"status    {board.get('status', '?')}",
             f"image     {board.get('path', '?')}"]
    if "phase" in board:
        done, total = board.get("pass_pages_done", 0), board.get("pass_pages", 0)
        share = f" ({100 * done / total:.0f}%)" if total else ""
        lines.append(f"pass      {board['phase']}: {done} of {total} pages{share}")
    lines.append(f"totals    {board.get('passes', 0)} pass(es), {board.get('pages_written', 0)} "
                 f"pages written, {board.get('zero_pages', 0)} zero, "
                 f"{_human_bytes(board.get('bytes_written', 0))}")
    for channel in board.get("channels", []):
        lines.append(f"  channel {channel['channel']}: {channel['pages_written']} written, "
                     f"{channel['zero_pages']} zero, busy {channel['busy_seconds']:.2f} s")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    board = read_status(args.board)
    _emit(args, _status_text(args.board, board), board)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    directories = args.directory
    for directory in directories:
        if not os.path.isdir(directory):
            raise Failure(f"{directory}: no such directory")
    found = stale_files(directories) if args.dry_run else clean(directories)
    verb = "would remove" if args.dry_run else "removed"
    text = "\n".join(f"{verb} {path}" for path in found) or "nothing left by dead saves"
    _emit(args, text, {"dry_run": args.dry_run, "files": found})
    return 0


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 600 "
                                         f"or 640")
    return mode


# --- the parser ---


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Save and restore large memory images in "
                     "parallel, in QEMU's mapped-ram migration format.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    def transfer_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                         help=f"worker processes (default {DEFAULT_CHANNELS})")
        sub.add_argument("--direct-io", action="store_true",
                         help="read/write the image's pages with O_DIRECT")
        sub.add_argument("--offset", type=parse_size, default=0, metavar="N",
                         help="the stream starts at byte N of the file (QEMU's "
                         "file:PATH,offset=N)")
        sub.add_argument("--quiet", action="store_true",
                         help="no progress bar, no summary")
        sub.add_argument("--json", action="store_true", help="print the statistics as JSON")

    block_help = ("a RAM block: its name in the image and the file holding its bytes "
                  "(a page multiple); repeat for several blocks")

    sub = command("save", "save files as RAM blocks into an image")
    sub.add_argument("image", metavar="IMAGE")
    sub.add_argument("--block", type=_block_spec, action="append", required=True,
                     metavar="NAME=PATH", help=block_help)
    sub.add_argument("--machine", default="none", metavar="TYPE",
                     help="machine type written in the image; QEMU loads only its own: "
                     "none (default), q35 (= pc-q35-10.0), pc (= pc-i440fx-10.0), or a "
                     "full name")
    sub.add_argument("--no-sync", action="store_true",
                     help="skip fdatasync (faster, as QEMU does; not crash safe)")
    sub.add_argument("--in-place", action="store_true",
                     help="write IMAGE directly instead of a temporary file renamed at the end")
    sub.add_argument("--status-board", metavar="BOARD",
                     help="publish progress under this name for 'parallel-save status BOARD'")
    sub.add_argument("--mode", type=_mode, default=None, metavar="OCTAL",
                     help="the new image's mode (default 600, or the mode of the image it "
                     "replaces): it holds memory")
    sub.add_argument("--follow-symlinks", action="store_true",
                     help="save where a symbolic link at IMAGE leads (refused by default)")
    transfer_options(sub)
    sub.set_defaults(run=cmd_save)

    sub = command("restore", "restore an image's blocks into files (sparse, exact length)")
    sub.add_argument("image", metavar="IMAGE")
    where = sub.add_mutually_exclusive_group(required=True)
    where.add_argument("--block", type=_block_spec, action="append", metavar="NAME=PATH",
                       help="write block NAME to PATH (created or overwritten); "
                       "every block of the image needs one")
    where.add_argument("--outdir", metavar="DIR",
                       help="write one file per block in DIR, named after the block "
                       "(percent-encoded)")
    transfer_options(sub)
    sub.set_defaults(run=cmd_restore)

    sub = command("inspect", "show what an image holds (complete or not, ours or QEMU's)")
    sub.add_argument("image", metavar="IMAGE")
    sub.add_argument("--offset", type=parse_size, default=0, metavar="N",
                     help="the stream starts at byte N of the file")
    sub.add_argument("--json", action="store_true", help="print as JSON (stable keys)")
    sub.set_defaults(run=cmd_inspect)

    sub = command("verify", "compare an image with the files it was saved from "
                  "(exit 1 when they differ)")
    sub.add_argument("image", metavar="IMAGE")
    sub.add_argument("--block", type=_block_spec, action="append", required=True,
                     metavar="NAME=PATH", help=block_help)
    sub.add_argument("--offset", type=parse_size, default=0, metavar="N",
                     help="the stream starts at byte N of the file")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(run=cmd_verify)

    sub = command("demo", "save and restore a generated image, check it, print the figures")
    sub.add_argument("--size", type=parse_size, default=256 << 20, metavar="SIZE",
                     help="RAM size, e.g. 64M or 2G (default 256M)")
    sub.add_argument("--zero-fraction", type=_fraction, default=0.5, metavar="F",
                     help="share of pages that are zero (default 0.5)")
    sub.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                     help=f"worker processes (default {DEFAULT_CHANNELS})")
    sub.add_argument("--dir", default=SHM_DIR, metavar="DIR",
                     help="where the image is written (default %(default)s, memory: "
                     "give a directory on a disk to measure the disk)")
    sub.set_defaults(run=cmd_demo)

    sub = command("status", "show the progress a running save publishes (save --status-board)")
    sub.add_argument("board", metavar="BOARD")
    sub.add_argument("--json", action="store_true", help="print as JSON")
    sub.set_defaults(run=cmd_status)

    sub = command("clean", "remove what saves that were killed left behind (this user's)")
    sub.add_argument("directory", nargs="*", metavar="DIR",
                     help="also look for partial images in these directories (the "
                     "segments in /dev/shm are always looked at)")
    sub.add_argument("--dry-run", action="store_true", help="only list what would go")
    sub.add_argument("--json", action="store_true", help="print as JSON")
    sub.set_defaults(run=cmd_clean)
    return parser


def _error_text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        with terminate_cleanly():
            return args.run(args)
    except UsageError as error:
        return _fail(error, 2, debug)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as error:
        return _fail(error, 130, debug, "interrupted")
    except SystemExit as error:
        if not isinstance(error.code, int) or error.code <= 128:
            raise  # --help, --version
        # SIGTERM or SIGHUP, turned into SystemExit(128 + signal) so that
        # the Saver cleans up as it does for Ctrl-C.
        name = signal.Signals(error.code - 128).name
        return _fail(error, error.code, debug, f"stopped by {name}")
    except (ParallelSaveError, OSError, ValueError) as error:
        return _fail(error, 1, debug)


def _fail(error: BaseException, status: int, debug: bool, text: str | None = None) -> int:
    if debug:
        traceback.print_exception(error)
    print(f"{PROG}: {text or 'error: ' + _error_text(error)}", file=sys.stderr)
    return status
