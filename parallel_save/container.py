"""Finding the QEMU stream in a file: at its start, or inside a container.

A bare image (ours, or QEMU's ``migrate file:PATH``) starts with the
stream's magic.  libvirt's ``virsh save`` writes its own header first
(src/qemu/qemu_saveimage.h, ``virQEMUSaveHeader``): a 16-byte magic, then
five host-endian u32 (version, data length, was-running, image format,
cookie offset) and 14 unused u32; the domain XML and the save cookie, each
NUL-terminated and padded with zeros up to the data length, follow; QEMU's
stream starts right after, at an offset aligned to nothing.  libvirt
writes the magic ``LibvirtQemudPart`` first and turns it into
``LibvirtQemudSave`` once the save completed, so the former reads as an
unfinished save.

Only the ``sparse`` image format holds a mapped-ram stream; the others are
QEMU's sequential stream, compressed or not, which this format never reads.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from .errors import FormatError, IncompleteImageError
from .format import MAGIC, StreamInfo, decode_stream

QEMU_MAGIC = MAGIC.to_bytes(4, "big")  # "QEVM"
LIBVIRT_MAGIC = b"LibvirtQemudSave"
LIBVIRT_PARTIAL = b"LibvirtQemudPart"
LIBVIRT_VERSION = 2
# magic, version, data_len, was_running, format, cookieOffset, unused[14]
_LIBVIRT_FIELDS = "16s5I56x"
LIBVIRT_HEADER_SIZE = struct.calcsize("<" + _LIBVIRT_FIELDS)  # 92
# virQEMUSaveFormat: the on-disk numbers, never reused.
LIBVIRT_FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
LIBVIRT_SPARSE = LIBVIRT_FORMATS.index("sparse")
# How much of the domain XML is read to find its <name> (it comes first).
_XML_PEEK = 64 << 10
_DOMAIN_NAME = re.compile(rb"<name>([^<]{1,1024})</name>")

# What a file that is neither may be, by its first bytes: said in the error
# so the user knows what they pointed at.
_KNOWN_MAGICS = (
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"\xfd7zXZ\x00", "xz-compressed data"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (b"BZh", "bzip2-compressed data"),
    (b"\x89LZO", "lzop-compressed data"),
    (b"QFI\xfb", "a qcow2 disk image"),
    (b"\x7fELF", "an ELF executable"),
    (b"PK\x03\x04", "a zip archive"),
    (b"MZ", "a PE/DOS executable"),
)


@dataclass(frozen=True)
class Container:
    """Where the stream is and what holds it.

    ``kind`` is ``"qemu"`` for a bare stream (``start`` 0), ``"libvirt"``
    for a ``virsh save`` file; the other fields say what libvirt's header
    says (None for a bare stream).
    """

    kind: str
    start: int
    complete: bool = True
    domain_name: str | None = None
    was_running: bool | None = None
    image_format: str | None = None
    version: int | None = None
    xml_length: int | None = None
    cookie_length: int | None = None

    def decode(self, fd: int, path: str) -> StreamInfo:
        """The stream's :class:`StreamInfo`; an unfinished container makes
        the stream incomplete, whatever the stream itself says (the
        container's writer had not committed it)."""
        try:
            info = decode_stream(fd, path, self.start)
        except FormatError as error:
            if self.complete:
                raise
            raise IncompleteImageError(f"{self._unfinished()}; its stream does not decode: "
                                       f"{error.message}", path=path,
                                       offset=error.offset) from None
        if self.complete:
            return info
        return dataclasses.replace(info, complete=False,
                                   incomplete_reason=self._unfinished(),
                                   incomplete_offset=0)

    def _unfinished(self) -> str:
        return (f"the libvirt save file still has the magic {LIBVIRT_PARTIAL.decode()}: "
                f"the save of domain {self.domain_name!r} did not complete")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def detect_stream(fd: int, path: str | os.PathLike) -> Container:
    """Where the QEMU stream of the open file starts.

    Raises :class:`FormatError` for a file that is neither a stream nor a
    container known here, saying what its first bytes look like and how to
    give the stream's offset; and for a libvirt file whose stream is not
    mapped-ram.
    """
    path = os.fspath(path)
    size = os.fstat(fd).st_size
    head = os.pread(fd, LIBVIRT_HEADER_SIZE, 0)
    if head[:4] == QEMU_MAGIC[:len(head)]:  # or a file cut inside it: the stream says so
        return Container("qemu", 0)
    if head[:16] in (LIBVIRT_MAGIC, LIBVIRT_PARTIAL):
        return _libvirt(fd, path, head, size)
    raise FormatError(f"not a QEMU migration stream (magic QEVM) nor a libvirt save file "
                      f"({LIBVIRT_MAGIC.decode()}): {_looks_like(head)}. If the "
                      f"stream starts further in, give its offset (--offset N, or start=N)",
                      path=path, offset=0)


def _libvirt(fd: int, path: str, head: bytes, size: int) -> Container:
    if len(head) < LIBVIRT_HEADER_SIZE:
        raise FormatError(f"libvirt save header is truncated: the file has {size} bytes, "
                          f"the header {LIBVIRT_HEADER_SIZE}", path=path, offset=0)
    fields = struct.unpack("<" + _LIBVIRT_FIELDS, head)
    if not 1 <= fields[1] <= LIBVIRT_VERSION:
        # libvirt writes host-endian and reads a header of the other order by
        # swapping it when the version makes no sense; so do we.
        swapped = struct.unpack(">" + _LIBVIRT_FIELDS, head)
        if not 1 <= swapped[1] <= LIBVIRT_VERSION:
            raise FormatError(f"libvirt save header version {fields[1]} is not supported "
                              f"(1 to {LIBVIRT_VERSION})", path=path, offset=16)
        fields = swapped
    magic, version, data_len, running, fmt, cookie = fields
    if data_len == 0:
        raise FormatError("libvirt save header has a data length of 0 (no domain XML)",
                          path=path, offset=20)
    start = LIBVIRT_HEADER_SIZE + data_len
    if start > size:
        raise FormatError(f"libvirt save header puts the stream at {start} (header "
                          f"{LIBVIRT_HEADER_SIZE} + data length {data_len}), past the end "
                          f"of the file ({size} bytes)", path=path, offset=20)
    if cookie > data_len:
        raise FormatError(f"libvirt save header puts the cookie at {cookie}, past the data "
                          f"length {data_len}", path=path, offset=32)
    xml_length = cookie or data_len
    found = _DOMAIN_NAME.search(os.pread(fd, min(xml_length, _XML_PEEK), LIBVIRT_HEADER_SIZE))
    name = html.unescape(found.group(1).decode("utf-8", "replace")) if found else None
    image_format = LIBVIRT_FORMATS[fmt] if fmt < len(LIBVIRT_FORMATS) else f"unknown ({fmt})"
    container = Container("libvirt", start, magic == LIBVIRT_MAGIC, name, bool(running),
                          image_format, version, xml_length, data_len - xml_length)
    if fmt != LIBVIRT_SPARSE:
        what = ("QEMU's sequential stream" if image_format == "raw"
                else f"QEMU's sequential stream, {image_format}-compressed")
        raise FormatError(f"libvirt save file of domain {name!r} holds {what} (image format "
                          f"{image_format}) from offset {start}: parallel-save reads only "
                          f"mapped-ram, libvirt's sparse format (virsh save --image-format "
                          f"sparse)", path=path, offset=28)
    return container


def _looks_like(head: bytes) -> str:
    first = head[:16]
    shown = " ".join(f"{b:02x}" for b in first)
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in first)
    for magic, name in _KNOWN_MAGICS:
        if head.startswith(magic):
            return f"it starts with {shown} ({text!r}): {name}"
    if not any(head):
        return f"its first {len(head)} bytes are zero"
    return f"it starts with {shown} ({text!r})"
