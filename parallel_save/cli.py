"""The ``parallel-save`` command.

    parallel-save save IMAGE --block NAME=PATH ...     save files as RAM blocks
    parallel-save restore IMAGE --outdir DIR           one file per block
    parallel-save inspect IMAGE                        what an image holds
    parallel-save verify IMAGE --block NAME=PATH ...   compare with the sources
    parallel-save demo                                 save and restore a generated image
    parallel-save status BOARD                         a running save's progress
    parallel-save checkpoint DIR --block NAME=PATH ... checkpoint again and again
    parallel-save clean [DIR ...]                      remove what killed saves left

Every user mistake ends in one line on stderr, ``parallel-save: error: ...``,
with exit status 2 for a bad command line and 1 for a failure; ``--debug``
adds the traceback.  Ctrl-C ends with status 130, SIGTERM and SIGHUP with
128 + the signal; the Saver has stopped its channels and dealt with the
file it was writing by then.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import traceback
import urllib.parse
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn, Self

import numpy as np

from ._version import __version__
from .artifacts import clean, stale_files
from .blocks import RamBlock
from .checkpoint import Checkpointer, latest_checkpoint
from .directio import check_direct_io_fd
from .errors import DirectIOError, ParallelSaveError
from .format import PAGE_SIZE
from .image import Image, open_image
from .outfiles import Destinations, plan_outdir, plan_paths
from .restorer import restore, unmatched_blocks
from .saver import MAX_CHANNELS, default_channels, save
from .signals import terminate_cleanly
from .stats import read_status
from .verify import LISTED_PAGES, describe_image, verify_image

PROG = "parallel-save"
DEFAULT_CHANNELS = default_channels()  # one per CPU, at most 8
# The demo's blocks live here: shared memory any channel can map.
SHM_DIR = "/dev/shm"

# QEMU refuses a stream whose machine type is not its own machine's full,
# versioned name; these are the aliases users type, as QEMU 10.0 resolves
# them.  Any other name is written as given.
MACHINE_PRESETS = {"q35": "pc-q35-10.0", "pc": "pc-i440fx-10.0"}

# Pages handled per step when the demo fills or compares its block:
# bounded temporaries, whatever the block's size.
COMPARE_PAGES = 16384
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

        # No monitor thread (it only fixes bars updated too rarely; ours are
        # updated every tenth of a second): a thread left running makes the
        # next save or restore in the process start its channels as new
        # interpreters instead of forking them (channels.choose_start_method).
        tqdm.monitor_interval = 0
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
    """A file name for a block, one per name (injective: two blocks never
    share a file): QEMU's names hold slashes ("/rom@etc/acpi/tables"), so
    they are percent-encoded, "%" too, and a leading dot (no ".", "..",
    or hidden file); an overlong one is shortened and made unique by a
    hash of the name after a "#", which no short name's encoding holds."""
    safe = urllib.parse.quote(name, safe="@+,=")
    if safe.startswith("."):
        safe = "%2E" + safe[1:]
    if len(safe) > 200:
        # "#" is one character quote() always encodes: no short name's file
        # name holds one, so a shortened name cannot equal a short one's.
        safe = safe[:180] + "#" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
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


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal mode from 0 to 777, such as "
                                         f"600 or 640, got {text!r}")
    return mode


def _plan_destinations(args: argparse.Namespace, image: Image) -> Destinations:
    """Where each of the image's blocks goes, checked before any file is touched."""
    lengths = {name: block.length for name, block in image.blocks.items()}
    if args.outdir is not None:
        return plan_outdir(args.outdir, {name: block_file_name(name) for name in image.blocks},
                           lengths, follow_symlinks=args.follow_symlinks, mode=args.mode)
    paths = _unique_blocks(args.block)
    missing, extra = unmatched_blocks(image.blocks, paths)
    if missing or extra:
        raise Failure(f"{args.image} holds blocks {', '.join(map(repr, image.blocks))}"
                      + (f"; no --block for {', '.join(map(repr, missing))}" if missing else "")
                      + (f"; not in the image: {', '.join(map(repr, extra))}" if extra else ""))
    return plan_paths(paths, lengths, follow_symlinks=args.follow_symlinks, mode=args.mode)


def _bytes_to_write(image: Image) -> dict[str, int]:
    """An upper bound of what restoring each block writes: its present
    pages, and never more than the image holds on disk (a hostile image
    may set bits over holes)."""
    allocated = os.fstat(image.fileno()).st_blocks * 512
    return {name: min(block.pages_present * PAGE_SIZE, allocated)
            for name, block in image.blocks.items()}


def _out_of_space(error: BaseException, plan: Destinations) -> Failure | None:
    """A channel writing through a mapping into a full file system fails
    with EFAULT ("Bad address") or dies of SIGBUS, which reads as a fault
    of the image: say what it is, naming the destination."""
    cause = f"{getattr(error, 'cause', '')} {error}"
    if not (getattr(error, "errno", None) in (errno.EFAULT, errno.ENOSPC, errno.EDQUOT)
            or "SIGBUS" in cause):
        return None
    for out in plan.files:
        info = os.statvfs(out.directory)
        free = info.f_bavail * info.f_frsize
        if free < PAGE_SIZE * 16:
            return Failure(f"{out.path}: no space left on its file system "
                           f"({_human_bytes(free)} free) while block {out.name!r} was "
                           f"restored into it; the image is not at fault")
    return None


def _undone(plan: Destinations) -> str:
    """Undo what a failed restore did to the destinations, and say so."""
    removed, changed = plan.rollback()
    said = []
    if removed:
        said.append(f"removed the files it created: {', '.join(removed)}")
    if changed:
        said.append(f"these files existed and now hold an incomplete restore (their old "
                    f"contents are gone): {', '.join(changed)}")
    return "; ".join(said) or "no destination file was changed"


def cmd_restore(args: argparse.Namespace) -> int:
    chosen = []
    if os.path.isdir(args.image):
        # A checkpoint directory: its newest complete image.
        args.image, generation = latest_checkpoint(args.image)
        chosen = [f"restoring checkpoint {generation}: {_printable(args.image)}"]
    with open_image(args.image, start=args.offset) as image:
        lengths = {name: block.length for name, block in image.blocks.items()}
        with _plan_destinations(args, image) as plan:
            plan.check_not(os.fstat(image.fileno()), "the image")
            if args.direct_io:  # before any destination is touched
                os.close(check_direct_io_fd(image.fileno(), args.image, writable=False,
                                            option="--direct-io"))
            plan.check_space(_bytes_to_write(image))
            plan.open()
            try:
                blocks = plan.blocks()
                with _progress(args) as bar:
                    # The open image: the file checked is the file read.
                    stats = restore(image, blocks, args.channels, direct_io=args.direct_io,
                                    assume_zero=True, on_progress=bar)
                del blocks
            except (ParallelSaveError, OSError) as error:
                translated = _out_of_space(error, plan)
                undone = _undone(plan)
                raise Failure(f"{translated or _error_text(error)}; restore failed, {undone}"
                              ) from error
            except BaseException:
                print(f"{PROG}: restore stopped, {_undone(plan)}", file=sys.stderr)
                raise
            paths = plan.paths
            created_dir = plan.outdir if plan.outdir_created else None
    ram = sum(lengths.values())
    pages = ram // PAGE_SIZE
    lines = chosen + ([f"created the directory {created_dir} (mode 0700)"]
                      if created_dir else [])
    lines += [f"  {name!r} -> {_printable(path)}" for name, path in paths.items()]
    lines.append(f"restored {args.image}: {pages} pages ({stats.pages_read} read, "
                 f"{pages - stats.pages_read} zero), {_human_bytes(stats.bytes_read)} read in "
                 f"{stats.seconds:.2f} s, {_gbps(ram, stats.seconds):.2f} GB/s")
    data = {"image": args.image, "files": paths, "ram_bytes": ram, "pages": pages,
            "pages_zero": pages - stats.pages_read, "gb_per_s": _gbps(ram, stats.seconds),
            "created_directory": created_dir, **stats.to_dict()}
    _emit(args, "\n".join(lines), data)
    return 0


# --- inspect ---


def _printable(text: str) -> str:
    """Text from a file (a machine type, a block name), safe to print on a
    terminal: every non-printable character (escape sequences, bidi
    overrides, newlines) shown as a Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def _container_lines(container: dict[str, Any] | None) -> list[str]:
    if container is None:
        return []
    running = "running" if container["was_running"] else "paused"
    return [f"container     {container['kind']} save of domain {container['domain_name']!r} "
            f"({running} when saved, image format {container['image_format']}"
            + ("" if container["complete"] else ", INCOMPLETE") + ")"]


def _inspect_text(info: dict[str, Any]) -> str:
    def count(value: int | None) -> str:
        return "?" if value is None else str(value)

    lines = [f"image         {_printable(info['path'])}",
             f"machine       {_printable(info['machine'])}",
             f"stream start  {info['start']}",
             *_container_lines(info["container"]),
             "complete      " + ("yes" if info["complete"]
                                 else f"no: {_printable(info['incomplete_reason'])}"),
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
    # repr: a name holds no terminal escape once printed
    rows += [[repr(b["name"]), str(b["length"]), str(b["pages"]), count(b["pages_present"]),
              count(b["pages_zero"]), str(b["record_offset"]), str(b["bitmap_offset"]),
              str(b["pages_offset"])] for b in info["blocks"]]
    lines += ["", *_table(rows), ""]
    if info["description"] is not None:
        # json.dumps escapes every control character (and all non-ASCII)
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


def _listed(pages: np.ndarray, total: int) -> str:
    shown = ", ".join(str(p) for p in pages[:LISTED_PAGES])
    more = total - LISTED_PAGES
    return shown + (f", ... and {more} more" if more > 0 else "")


def cmd_verify(args: argparse.Namespace) -> int:
    result = verify_image(args.image, _unique_blocks(args.block), start=args.offset)
    total = result.pages_differing
    if total:
        lines = [(f"{args.image} differs from the sources: {total} page(s) in "
                  f"{sum(1 for b in result.blocks.values() if not b.equal)} block(s)")]
        lines += [f"  block {name!r}: {b.pages_differing} page(s) differ: "
                  f"{_listed(b.differing_pages(LISTED_PAGES), b.pages_differing)}"
                  for name, b in result.blocks.items() if not b.equal]
    else:
        lines = [(f"{args.image} matches the sources: {len(result.blocks)} block(s), "
                  f"{sum(b.pages for b in result.blocks.values())} pages equal")]
    if result.not_compared:
        lines.append(f"  not compared (no --block): {', '.join(map(repr, result.not_compared))}"
                     + ("" if args.partial else
                        ": the check is incomplete (exit 1); --partial accepts it"))
    # The verdict is the point of the command: print it even with --quiet.
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(lines))
    return 0 if result.equal and (result.complete or args.partial) else 1


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


def cmd_checkpoint(args: argparse.Namespace) -> int:
    paths = _unique_blocks(args.block)
    if not os.path.isdir(args.directory):
        raise Failure(f"{args.directory}: no such directory for checkpoints")
    blocks = [_source_block(name, path) for name, path in paths.items()]
    machine = MACHINE_PRESETS.get(args.machine, args.machine)
    stop = threading.Event()
    count = 0
    # Ctrl-C asks to stop: the checkpoint in flight completes first.
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with Checkpointer(args.directory, blocks, args.channels, machine=machine,
                          tracker=None if args.full else "hash",
                          sync=not args.no_sync, mode=args.mode) as checkpointer:
            while not stop.is_set():
                stats = checkpointer.checkpoint()
                count += 1
                text = (f"checkpoint {stats.generation} -> {os.path.basename(stats.image)}: "
                        f"{stats.pages_written} pages written, {stats.zero_pages} zero, "
                        f"{stats.pages_unchanged} unchanged, "
                        f"{_human_bytes(stats.bytes_written)} in {stats.seconds:.2f} s")
                _emit(args, text, {"checkpoint": count, **stats.to_dict()})
                sys.stdout.flush()  # a line per checkpoint, also into a pipe
                if args.count and count >= args.count:
                    break
                stop.wait(args.every)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop.is_set() and not args.quiet:
        print(f"stopped after {count} checkpoint(s)", file=sys.stderr)
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
                         help=f"parallel writers or readers (threads, in at most one process "
                              f"per CPU; default {DEFAULT_CHANNELS})")
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
    sub.add_argument("--mode", type=_file_mode, default=None, metavar="OCTAL",
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
                       "(percent-encoded); DIR is created (mode 0700) if its parent exists")
    sub.add_argument("--mode", type=_file_mode, default=None, metavar="OCTAL",
                     help="mode of the files written (default: 600 for the files created, "
                     "existing files keep theirs)")
    sub.add_argument("--follow-symlinks", action="store_true",
                     help="write through destinations that are symbolic links, and into "
                     "files in --outdir that another user owns or that have other hard links "
                     "(all refused by default)")
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
    sub.add_argument("--partial", action="store_true",
                     help="accept comparing only the blocks given (by default a block of "
                     "the image with no --block makes verify fail)")
    sub.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.set_defaults(run=cmd_verify)

    sub = command("demo", "save and restore a generated image, check it, print the figures")
    sub.add_argument("--size", type=parse_size, default=256 << 20, metavar="SIZE",
                     help="RAM size, e.g. 64M or 2G (default 256M)")
    sub.add_argument("--zero-fraction", type=_fraction, default=0.5, metavar="F",
                     help="share of pages that are zero (default 0.5)")
    sub.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                     help=f"parallel writers or readers (threads, in at most one process "
                          f"per CPU; default {DEFAULT_CHANNELS})")
    sub.add_argument("--dir", default=SHM_DIR, metavar="DIR",
                     help="where the image is written (default %(default)s, memory: "
                     "give a directory on a disk to measure the disk)")
    sub.set_defaults(run=cmd_demo)

    sub = command("status", "show the progress a running save publishes (save --status-board)")
    sub.add_argument("board", metavar="BOARD")
    sub.add_argument("--json", action="store_true", help="print as JSON")
    sub.set_defaults(run=cmd_status)

    sub = command("checkpoint", "checkpoint files into two images in DIR again and again "
                  "(only the pages that changed; Ctrl-C stops after the one in flight)")
    sub.add_argument("directory", metavar="DIR")
    sub.add_argument("--block", type=_block_spec, action="append", required=True,
                     metavar="NAME=PATH", help="a file to checkpoint as block NAME")
    sub.add_argument("--every", type=float, default=60.0, metavar="SECONDS",
                     help="seconds between checkpoints (default 60)")
    sub.add_argument("--count", type=int, default=0, metavar="N",
                     help="stop after N checkpoints (default: until Ctrl-C)")
    sub.add_argument("--full", action="store_true",
                     help="write every page each time instead of hashing the pages to "
                     "find those that changed")
    sub.add_argument("--machine", default="none", metavar="TYPE",
                     help="machine type written into the images (default none)")
    sub.add_argument("--no-sync", action="store_true",
                     help="do not wait for the disk (a crash may then lose both images' "
                     "last checkpoints)")
    sub.add_argument("--mode", type=_file_mode, default=None, metavar="OCTAL",
                     help="the images' mode when created (default 600)")
    sub.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                     help=f"parallel writers or readers (threads, in at most one process "
                          f"per CPU; default {DEFAULT_CHANNELS})")
    sub.add_argument("--quiet", action="store_true", help="no summary lines")
    sub.add_argument("--json", action="store_true", help="one JSON line per checkpoint")
    sub.set_defaults(run=cmd_checkpoint)

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
