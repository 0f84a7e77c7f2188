"""The on-disk format: a QEMU migration stream whose RAM is mapped-ram.

This module knows every byte of the file and nothing about processes: it
plans where each block's bitmap and pages go, encodes the stream around
them, decodes and validates a stream (ours or QEMU's), and converts page
bitmaps to and from QEMU's on-disk words.  docs/FORMAT.md in the shared
documentation is the byte-level description; the comments here say why.

Every offset in a layout is absolute in the file, also when the stream
starts at ``start > 0`` (QEMU's ``file:PATH,offset=N``): QEMU computes its
offsets from the file, not from the stream, so we must too.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BlockError, FormatError, IncompleteImageError, OptionError

# --- constants of QEMU's migration stream (migration/savevm.c, ram.c) ---

MAGIC = 0x5145564D  # "QEVM"
STREAM_VERSION = 3
OBSOLETE_STREAM_VERSION = 2

VM_EOF = 0x00
VM_SECTION_START = 0x01
VM_SECTION_PART = 0x02
VM_SECTION_END = 0x03
VM_SECTION_FULL = 0x04
VM_SUBSECTION = 0x05
VM_VMDESCRIPTION = 0x06
VM_CONFIGURATION = 0x07
VM_COMMAND = 0x08
VM_SECTION_FOOTER = 0x7E

# MIG_CMD_SWITCHOVER_START: QEMU >= 10.0 writes it before the RAM END.
CMD_SWITCHOVER_START = 0x000B

RAM_FLAG_ZERO = 0x02
RAM_FLAG_MEM_SIZE = 0x04
RAM_FLAG_PAGE = 0x08
RAM_FLAG_EOS = 0x10
RAM_FLAG_CONTINUE = 0x20
RAM_FLAG_XBZRLE = 0x40
RAM_FLAG_HOOK = 0x80
RAM_FLAG_COMPRESS_PAGE = 0x100
RAM_FLAG_MULTIFD_FLUSH = 0x200
_RAM_FLAG_NAMES = {
    RAM_FLAG_ZERO: "ZERO", RAM_FLAG_MEM_SIZE: "MEM_SIZE", RAM_FLAG_PAGE: "PAGE",
    RAM_FLAG_EOS: "EOS", RAM_FLAG_CONTINUE: "CONTINUE", RAM_FLAG_XBZRLE: "XBZRLE",
    RAM_FLAG_HOOK: "HOOK", RAM_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}

RAM_SECTION_NAME = "ram"
RAM_SECTION_VERSION = 4
# QEMU registers "ram" first, so its section id is 1 for every machine we
# have seen; the loader maps ids by name, any id would do, 1 keeps bytes equal.
RAM_SECTION_ID = 1
CAPABILITIES_SUBSECTION = "configuration/capabilities"
MAPPED_RAM = "mapped-ram"
# The top-level keys of QEMU's JSON description, and the one our metadata
# goes under beside them.
QEMU_DESCRIPTION_KEYS = ("configuration", "page_size", "devices")
DESCRIPTION_KEY = "parallel_save"

PAGE_SIZE = 4096
# Fixed, not read from the disk: the file must stay portable, and 1 MiB
# satisfies O_DIRECT on every common block size (FORMAT.md).
PAGES_ALIGNMENT = 1 << 20
MAPPED_RAM_HEADER_VERSION = 1
MAX_BLOCK_NAME = 255
MAX_MACHINE_NAME = 255
# How far back from a QEMU file's end its JSON description is looked for
# (tens of KiB for a PC), and the chunk read at a time while looking.
DESCRIPTION_SEARCH = 16 << 20
# The longest JSON description read (QEMU's are tens of KiB).
DESCRIPTION_LIMIT = 16 << 20
_SCAN_CHUNK = 1 << 20

# --- records, each struct named once beside what it describes ---

_U8 = struct.Struct(">B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_STREAM_HEADER = struct.Struct(">II")  # magic, version
# MappedRamHeader (migration/ram.c), packed: version, page_size,
# bitmap_offset, pages_offset.
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")
# QEMU_VM_COMMAND after its type byte: command number, data length.
_COMMAND = struct.Struct(">HH")
# SECTION_PART/END carrying only EOS: type, id, EOS flags, footer, id.
_RAM_SECTION_EOS = struct.Struct(">BIQBI")
# Section footer: marker, section id.
_FOOTER = struct.Struct(">BI")
# After EOF: EOF, VMDESCRIPTION, JSON length (the JSON runs to the file's end).
_DESCRIPTION_HEADER = struct.Struct(">BBI")


def round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def bitmap_size(pages: int) -> int:
    """Bytes of a block's bitmap on disk: QEMU writes whole 64-bit words."""
    return round_up(pages, 64) // 8


# --- layout ---


@dataclass(frozen=True)
class BlockLayout:
    """Where one RAM block lives in the file."""

    name: str
    length: int          # used_length, bytes
    record_offset: int   # the record's first byte (the name's length byte)
    bitmap_offset: int
    pages_offset: int
    page_size: int = PAGE_SIZE

    @property
    def pages(self) -> int:
        return self.length // self.page_size

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.pages)

    @property
    def end(self) -> int:
        """First byte after the block's reserved page region."""
        return self.pages_offset + self.length

    def page_offset(self, page: int) -> int:
        return self.pages_offset + page * self.page_size


@dataclass(frozen=True)
class StreamLayout:
    """The planned (or parsed) shape of a whole stream."""

    machine: str
    blocks: tuple[BlockLayout, ...]
    start: int = 0
    capabilities: tuple[str, ...] = (MAPPED_RAM,)
    section_id: int = RAM_SECTION_ID

    @property
    def total_length(self) -> int:
        return sum(b.length for b in self.blocks)

    @property
    def ram_end(self) -> int:
        """Where the EOS that closes the RAM SECTION_START goes."""
        return self.blocks[-1].end

    @property
    def tail_offset(self) -> int:
        """Where the stream goes on after setup: PART, END, EOF, JSON."""
        return self.ram_end + _BE64.size + 1 + _BE32.size

    def block(self, name: str) -> BlockLayout:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(name)


def check_block_name(name: str) -> bytes:
    """The name as the stream stores it; refuses what QEMU could not hold."""
    if not isinstance(name, str):
        raise BlockError(f"block name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if not raw:
        raise BlockError("block name is empty")
    if len(raw) > MAX_BLOCK_NAME:
        raise BlockError(f"block name {name[:40]!r}... is {len(raw)} bytes, "
                         f"the format holds at most {MAX_BLOCK_NAME}")
    if b"\0" in raw:
        raise BlockError(f"block name {name!r} contains a NUL byte")
    return raw


def check_block_length(name: str, length: int) -> None:
    if length <= 0 or length % PAGE_SIZE:
        raise BlockError(f"block {name!r}: length {length} is not a positive "
                         f"multiple of the page size {PAGE_SIZE}")


def _record_header_size(name_raw: bytes) -> int:
    return 1 + len(name_raw) + _BE64.size + MAPPED_RAM_HEADER.size


def _prefix(machine: str, capabilities: Sequence[str], section_id: int,
            total: int) -> bytes:
    """Stream header, configuration section, RAM SECTION_START, MEM_SIZE."""
    machine_raw = machine.encode("utf-8")
    out = [_STREAM_HEADER.pack(MAGIC, STREAM_VERSION),
           _U8.pack(VM_CONFIGURATION), _BE32.pack(len(machine_raw)), machine_raw,
           _U8.pack(VM_SUBSECTION), _short_string(CAPABILITIES_SUBSECTION),
           _BE32.pack(1), _BE32.pack(len(capabilities))]
    out += [_short_string(cap) for cap in capabilities]
    out += [_U8.pack(VM_SECTION_START), _BE32.pack(section_id),
            _short_string(RAM_SECTION_NAME), _BE32.pack(0),
            _BE32.pack(RAM_SECTION_VERSION), _BE64.pack(total | RAM_FLAG_MEM_SIZE)]
    return b"".join(out)


def _short_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _U8.pack(len(raw)) + raw


def plan_layout(blocks: Iterable[tuple[str, int]], machine: str = "none", *,
                start: int = 0, capabilities: Sequence[str] = (MAPPED_RAM,)
                ) -> StreamLayout:
    """Place each block exactly where QEMU 10 would.

    The bitmap follows the block's header, the pages start at the next
    1 MiB boundary, the next record starts where the pages end.
    """
    if start < 0:
        raise OptionError(f"stream start offset {start} is negative")
    machine_raw = machine.encode("utf-8") if isinstance(machine, str) else b""
    if not machine_raw or len(machine_raw) > MAX_MACHINE_NAME:
        raise OptionError(f"machine type {machine!r} must be 1 to "
                          f"{MAX_MACHINE_NAME} bytes")
    if MAPPED_RAM not in capabilities:
        raise OptionError("the capabilities must include mapped-ram")
    blocks = list(blocks)
    if not blocks:
        raise BlockError("an image needs at least one RAM block")
    seen: set[str] = set()
    for name, length in blocks:
        check_block_name(name)
        check_block_length(name, length)
        if name in seen:
            raise BlockError(f"block name {name!r} is given twice")
        seen.add(name)
    total = sum(length for _, length in blocks)
    offset = start + len(_prefix(machine, capabilities, RAM_SECTION_ID, total))
    placed = []
    for name, length in blocks:
        bitmap_offset = offset + _record_header_size(check_block_name(name))
        pages_offset = round_up(bitmap_offset + bitmap_size(length // PAGE_SIZE),
                                PAGES_ALIGNMENT)
        placed.append(BlockLayout(name, length, offset, bitmap_offset, pages_offset))
        offset = pages_offset + length
    return StreamLayout(machine, tuple(placed), start, tuple(capabilities))


# --- encoding ---


def encode_setup(layout: StreamLayout) -> list[tuple[int, bytes]]:
    """The (offset, bytes) writes of the setup phase: stream header and
    configuration, one record per block at its place, and the EOS and
    footer that close the RAM SECTION_START after the last block."""
    writes = []
    prefix = _prefix(layout.machine, layout.capabilities, layout.section_id,
                     layout.total_length)
    for i, block in enumerate(layout.blocks):
        record = (_short_string(block.name) + _BE64.pack(block.length)
                  + MAPPED_RAM_HEADER.pack(MAPPED_RAM_HEADER_VERSION, block.page_size,
                                           block.bitmap_offset, block.pages_offset))
        writes.append((block.record_offset - (len(prefix) if i == 0 else 0),
                       (prefix if i == 0 else b"") + record))
    writes.append((layout.ram_end, _BE64.pack(RAM_FLAG_EOS)
                   + _U8.pack(VM_SECTION_FOOTER) + _BE32.pack(layout.section_id)))
    return writes


def encode_tail(layout: StreamLayout, passes: int, description: dict[str, Any]
                ) -> bytes:
    """What follows the RAM at completion: one SECTION_PART per iterate pass
    (as QEMU writes; with mapped-ram each carries only EOS), the RAM
    SECTION_END, QEMU_VM_EOF and the JSON description.

    ``description`` holds our own keys (the saver's ``parallel_save``); they
    go beside the keys of QEMU's vmstate description (:func:`qemu_description`)
    so that QEMU's analyze-migration.py reads our files too.

    We write no switchover-start command: QEMU 10 writes it but does not
    need it on load, and QEMU 9.x, which also reads mapped-ram, does not
    know it.  We write no device state: there is no device.
    """
    sid = layout.section_id
    part = _RAM_SECTION_EOS.pack(VM_SECTION_PART, sid, RAM_FLAG_EOS,
                                 VM_SECTION_FOOTER, sid)
    end = _RAM_SECTION_EOS.pack(VM_SECTION_END, sid, RAM_FLAG_EOS,
                                VM_SECTION_FOOTER, sid)
    text = json.dumps(qemu_description(layout, description), sort_keys=True).encode("utf-8")
    # QEMU's analyzer finds the JSON as the first "{" after the file's last
    # NUL, which may be a byte of the length: that length must hold no "{".
    # Trailing blanks are still the same JSON.
    while b"{" in _BE32.pack(len(text)):
        text += b" "
    return (part * passes + end + _U8.pack(VM_EOF)
            + _U8.pack(VM_VMDESCRIPTION) + _BE32.pack(len(text)) + text)


def qemu_description(layout: StreamLayout, ours: dict[str, Any]) -> dict[str, Any]:
    """QEMU's vmstate description of a stream with no device, plus ``ours``.

    QEMU writes this JSON after EOF for tools, never reads it back on load;
    its analyze-migration.py needs ``page_size``, a ``devices`` list and the
    ``configuration`` section's fields (machine name, capabilities) to walk
    the stream.  Sizes are those of the fields as this stream holds them.
    """
    clash = sorted(set(ours) & set(QEMU_DESCRIPTION_KEYS))
    if clash:
        raise OptionError(f"description key(s) {clash} are QEMU's own")
    machine = len(layout.machine.encode("utf-8"))
    # One entry per capability: the analyzer makes repeated names a list.
    capabilities = [{"name": "capabilities", "type": "capability",
                     "size": 1 + len(cap.encode("utf-8"))} for cap in layout.capabilities]
    configuration = {
        "vmsd_name": "configuration", "version": 1,
        "fields": [{"name": "len", "type": "uint32", "size": 4},
                   {"name": "name", "type": "buffer", "size": machine}],
        "subsections": [{
            "vmsd_name": CAPABILITIES_SUBSECTION, "version": 1,
            "fields": [{"name": "caps_count", "type": "uint32", "size": 4}, *capabilities],
        }],
    }
    return {"configuration": configuration, "page_size": PAGE_SIZE, "devices": [], **ours}


def our_metadata(description: dict[str, Any] | None) -> dict[str, Any] | None:
    """What parallel-save recorded in an image's description, or None (a
    QEMU image, or none).  Images written before the description took
    QEMU's shape hold only ``{"parallel_save": {...}}``; newer ones hold
    QEMU's keys beside it: the key is read the same way in both."""
    if not description:
        return None
    ours = description.get(DESCRIPTION_KEY)
    return ours if isinstance(ours, dict) else None


# --- bitmaps ---


def pack_bitmap(present: np.ndarray) -> bytes:
    """A bool-per-page array to QEMU's on-disk words: 64-bit little-endian
    ``unsigned long``s, bit i = bit i%8 of byte i//8, whole words."""
    packed = np.packbits(np.asarray(present, dtype=bool), bitorder="little")
    return packed.tobytes() + bytes(bitmap_size(len(present)) - len(packed))


def unpack_bitmap(raw: bytes | np.ndarray, pages: int) -> np.ndarray:
    """QEMU's on-disk words to a bool-per-page array of ``pages`` entries."""
    words = np.frombuffer(raw, dtype=np.uint8)
    return np.unpackbits(words, count=pages, bitorder="little").view(bool)


def bit_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (exclusive) of the runs of True in a bool array: the
    runs of pages that go in one write or one read."""
    edges = np.diff(mask.view(np.int8), prepend=0, append=0)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def padding_bits(raw: bytes | np.ndarray, pages: int) -> np.ndarray:
    """Indexes of the bits set past the last page (there must be none);
    only the bytes that hold padding are unpacked."""
    tail = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)[pages // 8:],
                         bitorder="little")
    return np.flatnonzero(tail[pages % 8:]) + pages


# --- decoding ---


@dataclass(frozen=True)
class StreamInfo:
    """What decoding a stream found: its layout and how far it got."""

    layout: StreamLayout
    complete: bool
    incomplete_reason: str | None = None
    passes: int = 0                   # SECTION_PART count
    device_sections: bool = False     # QEMU's opaque device state was present
    description: dict[str, Any] | None = field(default=None, compare=False)
    file_size: int = 0
    incomplete_offset: int | None = None  # where an incomplete stream stops


class _Truncated(FormatError):
    """The file ends inside a field: in the tail, that is an unfinished save."""


class _Cursor:
    """Bounded positioned reads: every read is checked against the file's
    size first, so a bogus length never allocates or reads past the end."""

    def __init__(self, fd: int, path: str, pos: int, size: int) -> None:
        self.fd, self.path, self.pos, self.size = fd, path, pos, size

    def error(self, message: str, offset: int | None = None) -> FormatError:
        return FormatError(message, path=self.path,
                           offset=self.pos if offset is None else offset)

    def take(self, count: int, what: str) -> bytes:
        if self.pos + count > self.size:
            raise _Truncated(f"file ends at {self.size} inside {what} "
                             f"({count} bytes needed): truncated",
                             path=self.path, offset=self.pos)
        data = os.pread(self.fd, count, self.pos)
        if len(data) != count:  # the file shrank under us
            raise _Truncated(f"short read of {what}: truncated",
                             path=self.path, offset=self.pos)
        self.pos += count
        return data

    def peek(self, count: int) -> bytes:
        """Up to ``count`` bytes at the cursor, which does not move."""
        return os.pread(self.fd, max(0, min(count, self.size - self.pos)), self.pos)

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))

    def u8(self, what: str) -> int:
        return self.unpack(_U8, what)[0]

    def be32(self, what: str) -> int:
        return self.unpack(_BE32, what)[0]

    def be64(self, what: str) -> int:
        return self.unpack(_BE64, what)[0]

    def text(self, count: int, what: str) -> str:
        at = self.pos
        raw = self.take(count, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not UTF-8: {raw[:40]!r}", at) from None

    def short_string(self, what: str) -> str:
        return self.text(self.u8(f"length of {what}"), what)


def _flag_names(flags: int) -> str:
    names = [name for bit, name in _RAM_FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~sum(_RAM_FLAG_NAMES)
    if unknown:
        names.append(f"0x{unknown:x}")
    return "|".join(names) or "none"


def _expect_eos(cur: _Cursor, where: str) -> None:
    at = cur.pos
    flags = cur.be64(f"RAM flags of {where}")
    if flags != RAM_FLAG_EOS:
        raise cur.error(f"unexpected RAM flags 0x{flags:x} ({_flag_names(flags)}) "
                        f"in {where}: a mapped-ram stream carries only EOS here", at)


def _expect_footer(cur: _Cursor, section_id: int, where: str) -> None:
    at = cur.pos
    marker = cur.u8(f"footer of {where}")
    if marker != VM_SECTION_FOOTER:
        raise cur.error(f"expected section footer 0x7e after {where}, "
                        f"found 0x{marker:02x}", at)
    at = cur.pos
    sid = cur.be32(f"footer section id of {where}")
    if sid != section_id:
        raise cur.error(f"footer of {where} names section {sid}, expected "
                        f"{section_id}", at)


def _section_id(cur: _Cursor, ram_id: int, where: str) -> None:
    at = cur.pos
    sid = cur.be32(f"section id of {where}")
    if sid != ram_id:
        raise cur.error(f"{where} for section {sid}: only the RAM section "
                        f"({ram_id}) is supported before its END", at)


def _read_configuration(cur: _Cursor) -> tuple[str, tuple[str, ...]]:
    at = cur.pos
    kind = cur.u8("configuration section type")
    if kind != VM_CONFIGURATION:
        raise cur.error(f"expected the configuration section (0x07), found "
                        f"0x{kind:02x}", at)
    at = cur.pos
    length = cur.be32("machine type length")
    if not 0 < length <= MAX_MACHINE_NAME:
        raise cur.error(f"machine type length {length} is out of range "
                        f"1..{MAX_MACHINE_NAME}", at)
    machine = cur.text(length, "machine type")
    capabilities: tuple[str, ...] | None = None
    list_at = cur.pos  # where the capability list is, or should have been
    # A type byte follows the machine type: a subsection's, or the RAM section's.
    while cur.peek(1) in (_U8.pack(VM_SUBSECTION), b""):
        cur.u8("section type after the machine type")
        at = cur.pos
        name = cur.short_string("configuration subsection name")
        if name != CAPABILITIES_SUBSECTION:
            raise cur.error(f"unsupported configuration subsection {name!r}", at)
        at = cur.pos
        version = cur.be32("capabilities subsection version")
        if version != 1:
            raise cur.error(f"unsupported capabilities subsection version {version}", at)
        list_at = cur.pos
        count = cur.be32("capability count")
        if count > 64:  # QEMU has a few dozen capabilities in all
            raise cur.error(f"capability count {count} is implausible", list_at)
        capabilities = tuple(cur.short_string("capability name") for _ in range(count))
    if capabilities is None or MAPPED_RAM not in capabilities:
        raise cur.error("the configuration does not list the mapped-ram capability: "
                        "not a mapped-ram image", list_at)
    return machine, capabilities


def _read_block_record(cur: _Cursor, seen: set[str]) -> BlockLayout:
    record_offset = cur.pos
    name_length = cur.u8("block name length")
    if name_length == 0:
        raise cur.error("block name is empty", record_offset)
    name = cur.text(name_length, "block name")
    if "\0" in name:
        raise cur.error(f"block name {name!r} contains a NUL byte", record_offset)
    if name in seen:
        raise cur.error(f"block name {name!r} appears twice", record_offset)
    seen.add(name)
    at = cur.pos
    length = cur.be64(f"length of block {name!r}")
    if length == 0 or length % PAGE_SIZE:
        raise cur.error(f"block {name!r}: length {length} is not a positive multiple "
                        f"of the page size {PAGE_SIZE}", at)
    at = cur.pos
    version, page_size, bitmap_offset, pages_offset = cur.unpack(
        MAPPED_RAM_HEADER, f"mapped-ram header of block {name!r}")
    if version != MAPPED_RAM_HEADER_VERSION:
        raise cur.error(f"block {name!r}: unsupported mapped-ram header version "
                        f"{version} (expected {MAPPED_RAM_HEADER_VERSION})", at)
    if page_size != PAGE_SIZE:
        raise cur.error(f"block {name!r}: page size {page_size} in the mapped-ram "
                        f"header, expected {PAGE_SIZE}", at + 4)
    block = BlockLayout(name, length, record_offset, bitmap_offset, pages_offset)
    if bitmap_offset < cur.pos:
        raise cur.error(f"block {name!r}: bitmap offset {bitmap_offset} overlaps "
                        f"its own header (which ends at {cur.pos})", at + 12)
    if bitmap_offset + block.bitmap_size > cur.size:
        raise cur.error(f"block {name!r}: bitmap at {bitmap_offset} "
                        f"({block.bitmap_size} bytes) is past the end of the file "
                        f"({cur.size} bytes)", at + 12)
    if pages_offset % PAGES_ALIGNMENT:
        raise cur.error(f"block {name!r}: pages offset {pages_offset} is not "
                        f"1 MiB aligned", at + 20)
    if pages_offset < bitmap_offset + block.bitmap_size:
        raise cur.error(f"block {name!r}: pages offset {pages_offset} overlaps its "
                        f"bitmap ({bitmap_offset}..{bitmap_offset + block.bitmap_size})",
                        at + 20)
    if block.end > cur.size:
        raise cur.error(f"block {name!r}: pages {pages_offset}..{block.end} are past "
                        f"the end of the file ({cur.size} bytes)", at + 20)
    cur.pos = block.end
    return block


def _ends_device_state(cur: _Cursor, eof_at: int) -> bool:
    """Whether the byte at ``eof_at`` is a QEMU_VM_EOF that closes QEMU's
    device state, i.e. comes right after a section footer."""
    if eof_at - _FOOTER.size < cur.pos:
        return False
    footer = os.pread(cur.fd, _FOOTER.size + 1, eof_at - _FOOTER.size)
    return (len(footer) == _FOOTER.size + 1 and footer[0] == VM_SECTION_FOOTER
            and footer[-1] == VM_EOF)


def _find_vmdescription(cur: _Cursor) -> dict[str, Any] | None:
    """After QEMU's device sections, which carry no length, find EOF by its
    trailer: footer, EOF, VMDESCRIPTION, be32 length, JSON reaching the
    file's end.  Returns the description, or None if there is no trailer.

    JSON text holds no NUL byte, so EOF is one of the six bytes that end at
    the file's last NUL: find that NUL reading backwards a chunk at a time,
    at most DESCRIPTION_SEARCH bytes, so a hostile file costs bounded time
    and memory."""
    floor = max(cur.pos, cur.size - DESCRIPTION_SEARCH)
    end = cur.size
    while end > floor:
        base = max(floor, end - _SCAN_CHUNK)
        last_nul = os.pread(cur.fd, end - base, base).rfind(b"\0")
        if last_nul >= 0:
            last_nul += base
            break
        end = base
    else:
        return None
    for eof_at in range(max(floor, last_nul - _DESCRIPTION_HEADER.size + 1), last_nul + 1):
        trailer = os.pread(cur.fd, _DESCRIPTION_HEADER.size, eof_at)
        if len(trailer) < _DESCRIPTION_HEADER.size:
            continue
        eof, kind, length = _DESCRIPTION_HEADER.unpack(trailer)
        json_at = eof_at + _DESCRIPTION_HEADER.size
        if ((eof, kind) == (VM_EOF, VM_VMDESCRIPTION) and json_at + length == cur.size
                and _ends_device_state(cur, eof_at)):
            return _parse_description(cur, os.pread(cur.fd, length, json_at), json_at)
    return None


def _parse_description(cur: _Cursor, raw: bytes, at: int) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise cur.error("the JSON description after EOF does not parse", at) from None
    if not isinstance(value, dict):
        raise cur.error("the JSON description after EOF is not an object", at)
    return value


def decode_stream(fd: int, path: str | os.PathLike, start: int = 0) -> StreamInfo:
    """Parse and validate the stream that starts at ``start`` in the open file.

    Raises :class:`FormatError` (with the offset) for anything malformed.
    A stream that stops where a save that never completed would stop is not
    an error here: it comes back with ``complete=False`` and the reason, and
    the caller decides (a loader refuses it, ``inspect`` reports it).
    """
    path = os.fspath(path)
    if start < 0:
        raise OptionError(f"stream start offset {start} is negative")
    cur = _Cursor(fd, path, start, os.fstat(fd).st_size)
    try:
        return _decode(cur)
    except _Truncated as truncated:  # in the header: a damaged file, not a stopped save
        raise FormatError(truncated.message, path=path, offset=truncated.offset) from None


def _decode(cur: _Cursor) -> StreamInfo:
    start, size = cur.pos, cur.size
    if start > size:
        raise cur.error(f"stream start {start} is past the end of the file ({size} bytes)")
    magic, version = cur.unpack(_STREAM_HEADER, "stream header")
    if magic != MAGIC:
        raise cur.error(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x} "
                        f"(QEVM): not a QEMU migration stream", start)
    if version != STREAM_VERSION:
        why = "obsolete" if version == OBSOLETE_STREAM_VERSION else "unsupported"
        raise cur.error(f"{why} stream version {version} (expected {STREAM_VERSION})",
                        start + 4)
    machine, capabilities = _read_configuration(cur)

    at = cur.pos
    kind = cur.u8("RAM section type")
    if kind != VM_SECTION_START:
        raise cur.error(f"expected SECTION_START (0x01) of the RAM section, found "
                        f"0x{kind:02x}", at)
    section_id = cur.be32("RAM section id")
    at = cur.pos
    name = cur.short_string("section name")
    if name != RAM_SECTION_NAME:
        raise cur.error(f"first section is {name!r}, expected 'ram'", at)
    at = cur.pos
    instance, section_version = cur.unpack(_STREAM_HEADER, "RAM section instance/version")
    if instance != 0 or section_version != RAM_SECTION_VERSION:
        raise cur.error(f"RAM section instance {instance} version {section_version}, "
                        f"expected instance 0 version {RAM_SECTION_VERSION}", at)
    mem_size_at = cur.pos
    mem_size = cur.be64("MEM_SIZE")
    flags, total = mem_size & (PAGE_SIZE - 1), mem_size & ~(PAGE_SIZE - 1)
    if flags != RAM_FLAG_MEM_SIZE:
        raise cur.error(f"unexpected RAM flags 0x{flags:x} ({_flag_names(flags)}) "
                        f"where MEM_SIZE was expected", mem_size_at)
    if total == 0:
        raise cur.error("MEM_SIZE is 0: the image holds no RAM block", mem_size_at)

    blocks: list[BlockLayout] = []
    seen: set[str] = set()
    remaining = total
    while remaining:
        # QEMU reads records until MEM_SIZE is used up; a total larger than
        # the blocks shows as the closing EOS where the next record should be.
        if blocks and cur.peek(_BE64.size) == _BE64.pack(RAM_FLAG_EOS):
            raise cur.error(f"MEM_SIZE total {total} does not match the blocks: they "
                            f"hold {total - remaining} bytes, then the RAM ends",
                            mem_size_at)
        block = _read_block_record(cur, seen)
        if block.length > remaining:
            raise cur.error(f"MEM_SIZE total {total} does not match the blocks: block "
                            f"{block.name!r} ({block.length} bytes) exceeds the "
                            f"{remaining} bytes left", mem_size_at)
        remaining -= block.length
        blocks.append(block)
    layout = StreamLayout(machine, tuple(blocks), start, capabilities, section_id)
    _expect_eos(cur, "the RAM SECTION_START")
    _expect_footer(cur, section_id, "the RAM SECTION_START")

    def incomplete(reason: str, passes: int, at: int) -> StreamInfo:
        return StreamInfo(layout, False, reason, passes, file_size=size,
                          incomplete_offset=at)

    passes = 0
    while True:
        if cur.pos >= size:
            return incomplete(f"the RAM section has no END (the stream stops at "
                              f"{cur.pos}): the save did not complete", passes, cur.pos)
        at = cur.pos
        kind = cur.u8("section type")
        try:
            if kind == VM_SECTION_PART:
                _section_id(cur, section_id, "SECTION_PART")
                _expect_eos(cur, "a RAM SECTION_PART")
                _expect_footer(cur, section_id, "a RAM SECTION_PART")
                passes += 1
            elif kind == VM_COMMAND:
                command, length = cur.unpack(_COMMAND, "command")
                if command != CMD_SWITCHOVER_START or length != 0:
                    raise cur.error(f"unsupported command 0x{command:04x} "
                                    f"(length {length}) in a file stream", at)
            elif kind == VM_SECTION_END:
                _section_id(cur, section_id, "SECTION_END")
                _expect_eos(cur, "the RAM SECTION_END")
                _expect_footer(cur, section_id, "the RAM SECTION_END")
                break
            else:
                raise cur.error(f"unexpected section type 0x{kind:02x} before the "
                                f"RAM section's END", at)
        except _Truncated:
            return incomplete(f"the stream stops inside a section at {at}: "
                              f"the save did not complete", passes, at)

    # After the RAM END: ours writes EOF then the JSON description; QEMU
    # writes device state first (SECTION_FULL), which carries no length.
    if cur.pos >= size:
        return incomplete("the stream stops after the RAM END, before EOF: the save did "
                          "not complete", passes, cur.pos)
    at = cur.pos
    kind = cur.u8("section type after the RAM END")
    if kind == VM_EOF:
        description = None
        if cur.pos < size:
            at = cur.pos
            kind = cur.u8("section type after EOF")
            if kind != VM_VMDESCRIPTION:
                raise cur.error(f"unexpected byte 0x{kind:02x} after EOF", at)
            try:
                length = cur.be32("description length")
            except _Truncated:
                return incomplete(f"the stream stops inside the description at {at}: "
                                  f"the save did not complete", passes, at)
            json_at = cur.pos
            # Checked before anything is read: a hostile length (up to 4 GiB,
            # over a hole) must not cost memory, nor pass for a stopped save.
            if length > DESCRIPTION_LIMIT:
                raise cur.error(f"description length {length} is implausible (a "
                                f"description is at most {DESCRIPTION_LIMIT} bytes)", at + 1)
            if json_at + length > size:
                raise cur.error(f"description length {length} reaches past the end of "
                                f"the file (only {size - json_at} bytes follow)", at + 1)
            if json_at + length != size:
                raise cur.error(f"description length {length} does not reach the end "
                                f"of the file ({size - json_at} bytes follow)", at + 1)
            raw = cur.take(length, "description")
            description = _parse_description(cur, raw, json_at)
        return StreamInfo(layout, True, None, passes, False, description, size)
    if kind == VM_SECTION_FULL:
        description = _find_vmdescription(cur)
        if description is not None or _ends_device_state(cur, size - 1):
            return StreamInfo(layout, True, None, passes, True, description, size)
        return incomplete(f"the device state after the RAM END (from {at}) has no "
                          f"EOF: the save did not complete", passes, at)
    raise cur.error(f"unexpected section type 0x{kind:02x} after the RAM END", at)


def check_bitmap_padding(fd: int, path: str | os.PathLike, block: BlockLayout) -> None:
    """Refuse a bitmap that sets bits past the block's last page.  Only the
    bytes holding padding are read (at most one 64-bit word), so checking
    costs nothing however large the block is."""
    first = block.pages // 8
    raw = os.pread(fd, block.bitmap_size - first, block.bitmap_offset + first)
    if len(raw) != block.bitmap_size - first:
        raise FormatError(f"block {block.name!r}: bitmap is truncated",
                          path=path, offset=block.bitmap_offset + first)
    # The bytes from page // 8 on: bit i of them is bit first * 8 + i.
    tail = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    extra = np.flatnonzero(tail[block.pages % 8:]) + block.pages
    if extra.size:
        raise FormatError(f"block {block.name!r}: bitmap sets {extra.size} bit(s) past "
                          f"the block's {block.pages} pages, the first is bit {extra[0]}",
                          path=path, offset=block.bitmap_offset + int(extra[0]) // 8)


def require_complete(info: StreamInfo, path: str | os.PathLike) -> None:
    if not info.complete:
        raise IncompleteImageError(info.incomplete_reason or "incomplete", path=path,
                                   offset=info.incomplete_offset)
