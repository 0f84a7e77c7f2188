"""Coverage-guided fuzzing of the image reader with atheris (libFuzzer).

Not part of the test suite (tests/test_format_fuzz.py is the short,
deterministic-budget version of the same property): run it by hand or in a
nightly job, for as long as you like.

    pip install atheris
    python3 bench/fuzz_reader.py --seeds /tmp/fuzz-corpus      # write the seed corpus
    python3 bench/fuzz_reader.py /tmp/fuzz-corpus -max_len=131072 \\
        -timeout=10 -rss_limit_mb=2048 -max_total_time=3600
    python3 bench/fuzz_reader.py crash-<sha1>                   # replay one finding

Any libFuzzer flag works (``-jobs=2 -workers=2`` to use both cores).  A
finding is an input that makes the reader raise anything but FormatError,
write outside the buffer ``read_block`` fills, take longer than ``-timeout``
seconds, or grow past ``-rss_limit_mb``.  The instrumented code itself
grows the RSS by about 0.5 KiB per run (the plain reader does not), so
2048 MiB lasts a few million runs, about an hour on one core.

The input is a sparse file, so that a 64 MiB image whose headers are a few
KiB is a few KiB of input: repeated ``be32 hole, be16 length, bytes[length]``
(skip ``hole`` zero bytes, then write the bytes); a partial segment at the
end is ignored.  The seeds are small images encoded with plan_layout and
encode_setup/encode_tail, and the header regions of QEMU's fixtures (their
page bytes become holes): those of the repository's tests/data, beside this
bench/ folder, or of ``--fixtures DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["parallel_save"]):
    import parallel_save as ps
    from parallel_save.format import (
        PAGE_SIZE,
        StreamLayout,
        encode_setup,
        encode_tail,
        pack_bitmap,
        plan_layout,
    )

SEGMENT = struct.Struct(">IH")  # hole before the bytes, length of the bytes
MAX_FILE = 64 << 20  # larger sparse files are cut here: enough room for 1 MiB alignment
GUARD = 4096  # bytes checked on each side of the read_block destination
GUARD_BYTE = 0x5A
# bench/ is a tool of the repository, never installed: its fixtures are the
# repository's own, found from this file.
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


# --- the input format ---


def decode_segments(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(offset, bytes) writes and the file size an input describes."""
    writes, offset, at = [], 0, 0
    while at + SEGMENT.size <= len(data):
        hole, length = SEGMENT.unpack_from(data, at)
        at += SEGMENT.size
        offset += hole
        chunk = data[at:at + length]
        at += length
        if offset + len(chunk) > MAX_FILE:
            break
        writes.append((offset, chunk))
        offset += len(chunk)
    return writes, offset


def encode_segments(writes: list[tuple[int, bytes]]) -> bytes:
    """The input for a file made of ``writes`` (sorted, not overlapping)."""
    out, end = [], 0
    for offset, data in writes:
        for first in range(0, len(data), 0xFFFF):
            chunk = data[first:first + 0xFFFF]
            out.append(SEGMENT.pack(offset + first - end, len(chunk)) + chunk)
            end = offset + first + len(chunk)
    return b"".join(out)


# --- the property ---


def read_guarded(image: ps.Image, name: str) -> None:
    length = image.blocks[name].length
    buffer = np.full(length + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
    image.read_block(name, buffer[GUARD:GUARD + length])
    if not ((buffer[:GUARD] == GUARD_BYTE).all()
            and (buffer[GUARD + length:] == GUARD_BYTE).all()):
        raise AssertionError(f"read_block({name!r}) wrote outside its destination")


def test_one_input(data: bytes) -> None:
    writes, size = decode_segments(data)
    fd = os.memfd_create("fuzz-image")
    try:
        for offset, chunk in writes:
            os.pwrite(fd, chunk, offset)
        os.ftruncate(fd, size)
        path = f"/proc/self/fd/{fd}"
        try:
            image = ps.open_image(path, allow_incomplete=True)
        except ps.FormatError:
            return
        with image:
            if not image.complete:
                return
            for name in image.blocks:
                read_guarded(image, name)
    finally:
        os.close(fd)


# --- seeds ---


def small_image(blocks: list[tuple[str, int]], machine: str, passes: int
                ) -> list[tuple[int, bytes]]:
    """The writes of a valid image whose even pages hold bytes."""
    layout = plan_layout([(name, pages * PAGE_SIZE) for name, pages in blocks], machine)
    writes = encode_setup(layout)
    for block in layout.blocks:
        present = np.arange(block.pages) % 2 == 0
        writes.append((block.bitmap_offset, pack_bitmap(present)))
        writes.append((block.pages_offset, b"\x01" * PAGE_SIZE))
    writes.append((layout.tail_offset, encode_tail(layout, passes, {"seed": True})))
    return sorted(writes)


def header_writes(path: Path, layout: StreamLayout) -> list[tuple[int, bytes]]:
    """An image's bytes other than its page slots."""
    spans = [(layout.start if i == 0 else b.record_offset, b.bitmap_offset + b.bitmap_size)
             for i, b in enumerate(layout.blocks)]
    spans.append((layout.ram_end, path.stat().st_size))
    with open(path, "rb") as f:
        return [(first, os.pread(f.fileno(), end - first, first)) for first, end in spans]


def qemu_seeds(fixtures: Path) -> list[list[tuple[int, bytes]]]:
    packed_files = sorted(fixtures.glob("*.mig.xz"))
    if not packed_files:
        raise SystemExit(f"fuzz_reader: no QEMU fixtures (*.mig.xz) in {fixtures}: run it "
                         "from a checkout of the repository or give --fixtures DIR")
    seeds = []
    with tempfile.TemporaryDirectory() as tmp:
        for packed in packed_files:
            path = Path(tmp) / packed.stem
            with lzma.open(packed) as source:
                path.write_bytes(source.read())
            with ps.open_image(path) as image:
                seeds.append(header_writes(path, image.info.layout))
    return seeds


def write_seeds(directory: Path, fixtures: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = [small_image([("ram0", 3)], "none", 0),
             small_image([("ram0", 70), ("ram1", 1)], "none", 2),
             small_image([("pc.ram", 8), ("/rom@etc/acpi/rsdp", 1)], "pc-q35-10.0", 1),
             *qemu_seeds(fixtures)]
    for writes in seeds:
        data = encode_segments(writes)
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{directory}: seed of {len(data)} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seeds", type=Path)
    parser.add_argument("--fixtures", type=Path, default=DATA)
    known, rest = parser.parse_known_args()
    if known.seeds is not None:
        write_seeds(known.seeds, known.fixtures)
        return
    atheris.Setup([sys.argv[0], *rest], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
