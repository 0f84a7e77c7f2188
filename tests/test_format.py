"""The format layer (issue 2): what QEMU wrote reads back exactly, what we
encode is byte-identical to QEMU, and every malformed file is refused with
the right error, offset and message.

Bad files are made from a small valid image encoded here, with one field
overwritten at an offset computed from FORMAT.md (``header_fields``), not
from the reader under test.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import parallel_save as ps
from parallel_save.format import (
    CAPABILITIES_SUBSECTION,
    PAGE_SIZE,
    PAGES_ALIGNMENT,
    RAM_FLAG_EOS,
    RAM_FLAG_HOOK,
    RAM_FLAG_MEM_SIZE,
    RAM_FLAG_MULTIFD_FLUSH,
    RAM_FLAG_PAGE,
    RAM_FLAG_XBZRLE,
    RAM_FLAG_ZERO,
    StreamLayout,
    bit_runs,
    encode_setup,
    encode_tail,
    pack_bitmap,
    plan_layout,
    unpack_bitmap,
)

# --- a small valid image, and where its fields are ---

# ram0 spans two bitmap words; ram1 leaves 61 padding bits in its only word.
SMALL_BLOCKS = (("ram0", 70), ("ram1", 3))
STALE = 0xEE  # bytes left in the slot of a page whose bit is clear
SECTION_SIZE = 18  # SECTION_PART/END carrying only EOS: u8, be32, be64, u8, be32


@dataclass(frozen=True)
class SmallImage:
    path: Path
    layout: StreamLayout
    passes: int
    ram: dict[str, bytes]  # what read_block must return

    @property
    def end_offset(self) -> int:
        """The RAM SECTION_END, after the PARTs."""
        return self.layout.tail_offset + SECTION_SIZE * self.passes

    @property
    def eof_offset(self) -> int:
        return self.end_offset + SECTION_SIZE


def page_bytes(block: int, page: int) -> bytes:
    return bytes([(block * 100 + page) % 251 + 1]) * PAGE_SIZE


def write_image(path: Path, blocks=SMALL_BLOCKS, *, start: int = 0, passes: int = 1,
                machine: str = "none") -> SmallImage:
    """Encode an image as a save would: setup writes, page slots (every
    third page zero, its slot holding stale bytes), bitmaps, then the tail."""
    layout = plan_layout([(name, pages * PAGE_SIZE) for name, pages in blocks], machine,
                         start=start)
    ram = {}
    with open(path, "r+b" if path.exists() else "w+b") as f:
        for offset, data in encode_setup(layout):
            f.seek(offset)
            f.write(data)
        for index, block in enumerate(layout.blocks):
            present = np.arange(block.pages) % 3 != 1
            pages = [page_bytes(index, p) for p in range(block.pages)]
            f.seek(block.pages_offset)
            f.write(b"".join(page if bit else bytes([STALE]) * PAGE_SIZE
                             for page, bit in zip(pages, present)))
            f.seek(block.bitmap_offset)
            f.write(pack_bitmap(present))
            ram[block.name] = b"".join(page if bit else bytes(PAGE_SIZE)
                                       for page, bit in zip(pages, present))
        f.seek(layout.tail_offset)
        f.write(encode_tail(layout, passes, {"writer": "test"}))
        f.truncate()
    return SmallImage(path, layout, passes, ram)


@pytest.fixture
def image(tmp_path) -> SmallImage:
    return write_image(tmp_path / "small.img")


def header_fields(layout: StreamLayout) -> dict[str, tuple[int, int]]:
    """(offset, width) of every fixed-width field from the stream header to
    the EOS closing the RAM SECTION_START, computed from FORMAT.md."""
    at = layout.start
    fields = {"magic": (at, 4), "version": (at + 4, 4), "configuration": (at + 8, 1),
              "machine_length": (at + 9, 4)}
    at += 13 + len(layout.machine.encode())
    fields |= {"subsection": (at, 1), "subsection_name_length": (at + 1, 1)}
    at += 2 + len(CAPABILITIES_SUBSECTION)
    fields |= {"capabilities_version": (at, 4), "capability_count": (at + 4, 4)}
    at += 8
    for i, capability in enumerate(layout.capabilities):
        fields[f"capability{i}_length"] = (at, 1)
        at += 1 + len(capability)
    fields |= {"section_type": (at, 1), "section_id": (at + 1, 4),
               "section_name_length": (at + 5, 1), "instance": (at + 9, 4),
               "section_version": (at + 13, 4), "mem_size": (at + 17, 8)}
    for block in layout.blocks:
        at = block.record_offset
        fields[f"{block.name}.name_length"] = (at, 1)
        at += 1 + len(block.name.encode())
        fields |= {f"{block.name}.length": (at, 8),
                   f"{block.name}.header_version": (at + 8, 4),
                   f"{block.name}.page_size": (at + 12, 8),
                   f"{block.name}.bitmap_offset": (at + 20, 8),
                   f"{block.name}.pages_offset": (at + 28, 8)}
    fields |= {"eos": (layout.ram_end, 8), "footer": (layout.ram_end + 8, 1),
               "footer_id": (layout.ram_end + 9, 4)}
    return fields


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_field(image: SmallImage, name: str, value: int) -> int:
    """Overwrite one header field (big-endian); returns its offset."""
    offset, width = header_fields(image.layout)[name]
    poke(image.path, offset, value.to_bytes(width, "big"))
    return offset


def open_error(path: Path, **kwargs) -> ps.FormatError:
    with pytest.raises(ps.FormatError) as caught:
        ps.open_image(path, **kwargs).close()
    return caught.value


def assert_refused(path: Path, offset: int, message: str, *,
                   kind: type[ps.FormatError] = ps.FormatError, **kwargs) -> None:
    error = open_error(path, **kwargs)
    assert (type(error), error.offset, error.message) == (kind, offset, message)


# --- QEMU's fixtures ---

QEMU_BLOCKS = {  # name, used_length, record, bitmap and pages offsets, as QEMU wrote them
    "none64_multifd4.mig": [("ram0", 64 << 20, 89, 130, 1 << 20)],
    "q35_32_nomultifd.mig": [
        ("pc.ram", 32 << 20, 96, 139, 1 << 20),
        ("/rom@etc/acpi/tables", 128 << 10, 34603008, 34603065, 35651584),
        ("pc.bios", 256 << 10, 35782656, 35782700, 36700160),
        ("pc.rom", 128 << 10, 36962304, 36962347, 37748736),
        ("/rom@etc/table-loader", 4 << 10, 37879808, 37879866, 38797312),
        ("/rom@etc/acpi/rsdp", 4 << 10, 38801408, 38801463, 39845888),
    ],
}
QEMU_MACHINE = {"none64_multifd4.mig": "none", "q35_32_nomultifd.mig": "pc-q35-10.0"}
QEMU_RAM = {  # fixture: (block, its RAM file, non-zero pages)
    "none64_multifd4.mig": ("ram0", "none64.ram", 10534),
    "q35_32_nomultifd.mig": ("pc.ram", "q35_32.ram", 5335),
}
QEMU_PASSES = {"none64_multifd4.mig": 2, "q35_32_nomultifd.mig": 1}
qemu_fixture = pytest.mark.parametrize("fixture", sorted(QEMU_BLOCKS))


def read_at(path: Path, offset: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


def qemu_layout(fixture: str) -> StreamLayout:
    """Where QEMU put the fixture's blocks (plan_layout matches it: pinned below)."""
    return plan_layout([(name, length) for name, length, *_ in QEMU_BLOCKS[fixture]],
                       QEMU_MACHINE[fixture])


Regions = list[tuple[int, bytes]]


def header_regions(path: Path, layout: StreamLayout) -> Regions:
    """The image's bytes other than its page slots: the stream header with
    the first record, every other record, the bitmaps, the tail."""
    spans = [(layout.start if i == 0 else b.record_offset, b.bitmap_offset + b.bitmap_size)
             for i, b in enumerate(layout.blocks)]
    spans.append((layout.ram_end, path.stat().st_size))
    return [(first, read_at(path, first, end - first)) for first, end in spans]


def write_regions(path: Path, regions: Regions, size: int) -> None:
    """A sparse file of ``size`` bytes holding ``regions``, cut at ``size``:
    the page slots read as zero."""
    with open(path, "wb") as f:
        for offset, data in regions:
            if offset < size:
                f.seek(offset)
                f.write(data[:size - offset])
        f.truncate(size)


@qemu_fixture
def test_qemu_fixture_records_hold_the_expected_headers(qemu_files, fixture):
    """Read straight from the raw bytes, without the reader: each record
    is name, be64 length, MappedRamHeader(1, 4096, bitmap, pages), and the
    next record starts where the previous block's pages end."""
    path = qemu_files[fixture]
    expected = QEMU_BLOCKS[fixture]
    for (name, length, record, bitmap, pages), following in zip(
            expected, expected[1:] + [None]):
        raw = read_at(path, record, 1 + 255 + 8 + 28)
        assert raw[1:1 + raw[0]] == name.encode()
        header = raw[1 + raw[0]:]
        assert struct.unpack(">QIQQQ", header[:36]) == (length, 1, PAGE_SIZE, bitmap, pages)
        assert bitmap == record + 1 + len(name) + 36
        if following is not None:
            assert following[2] == pages + length
    last = expected[-1]
    assert read_at(path, last[4] + last[1], 8) == RAM_FLAG_EOS.to_bytes(8, "big")


@qemu_fixture
def test_qemu_fixture_decodes_to_qemus_blocks_and_offsets(qemu_files, fixture):
    with ps.open_image(qemu_files[fixture]) as image:
        assert image.machine == QEMU_MACHINE[fixture]
        assert [(b.name, b.length, b.record_offset, b.bitmap_offset, b.pages_offset)
                for b in image.info.layout.blocks] == QEMU_BLOCKS[fixture]
        assert list(image.blocks) == [b[0] for b in QEMU_BLOCKS[fixture]]


@qemu_fixture
def test_qemu_fixture_tail_is_parts_end_device_state_and_description(qemu_files, fixture):
    with ps.open_image(qemu_files[fixture]) as image:
        assert image.complete
        assert image.info.passes == QEMU_PASSES[fixture]
        assert image.info.device_sections
        assert image.info.layout.capabilities == ("mapped-ram",)
        assert isinstance(image.description["devices"], list)


@qemu_fixture
def test_qemu_fixture_bitmap_is_set_exactly_on_non_zero_pages(qemu_files, fixture):
    name, ram_file, non_zero = QEMU_RAM[fixture]
    pages = np.fromfile(qemu_files[ram_file], dtype=np.uint8).reshape(-1, PAGE_SIZE)
    with ps.open_image(qemu_files[fixture]) as image:
        bitmap = image.blocks[name].bitmap
        assert image.blocks[name].pages_present == non_zero
    assert np.array_equal(bitmap, pages.any(axis=1))


@qemu_fixture
def test_pack_bitmap_of_non_zero_pages_equals_qemus_bitmap_bytes(qemu_files, fixture):
    _, ram_file, _ = QEMU_RAM[fixture]
    _, length, _, bitmap_offset, _ = QEMU_BLOCKS[fixture][0]
    pages = np.fromfile(qemu_files[ram_file], dtype=np.uint8).reshape(-1, PAGE_SIZE)
    on_disk = read_at(qemu_files[fixture], bitmap_offset, length // PAGE_SIZE // 8)
    assert pack_bitmap(pages.any(axis=1)) == on_disk


@qemu_fixture
def test_qemu_fixture_read_block_equals_the_saved_ram(qemu_files, fixture):
    name, ram_file, _ = QEMU_RAM[fixture]
    with ps.open_image(qemu_files[fixture]) as image:
        data = image.read_block(name)
    assert data.tobytes() == qemu_files[ram_file].read_bytes()


def test_qemu_q35_rom_blocks_have_their_pages_present(qemu_files):
    with ps.open_image(qemu_files["q35_32_nomultifd.mig"]) as image:
        assert {n: b.pages_present for n, b in image.blocks.items()} == {
            "pc.ram": 5335, "/rom@etc/acpi/tables": 3, "pc.bios": 47, "pc.rom": 0,
            "/rom@etc/table-loader": 1, "/rom@etc/acpi/rsdp": 1}


@qemu_fixture
def test_encoded_setup_is_byte_identical_to_qemus_headers(qemu_files, fixture):
    expected = QEMU_BLOCKS[fixture]
    layout = qemu_layout(fixture)
    assert [(b.name, b.length, b.record_offset, b.bitmap_offset, b.pages_offset)
            for b in layout.blocks] == expected
    writes = encode_setup(layout)
    # the stream header with the first record, one record per other block,
    # and the EOS + footer closing the SECTION_START
    assert [offset for offset, _ in writes] == (
        [0] + [b[2] for b in expected[1:]] + [expected[-1][4] + expected[-1][1]])
    for offset, data in writes:
        assert read_at(qemu_files[fixture], offset, len(data)) == data


@qemu_fixture
def test_encoded_parts_and_end_are_byte_identical_to_qemus(qemu_files, fixture):
    """QEMU puts a switchover-start command (5 bytes) before the END; we do not."""
    layout = qemu_layout(fixture)
    passes = QEMU_PASSES[fixture]
    ours = encode_tail(layout, passes, {})
    qemu = read_at(qemu_files[fixture], layout.tail_offset, SECTION_SIZE * (passes + 1) + 5)
    parts = SECTION_SIZE * passes
    assert ours[:parts] == qemu[:parts]
    assert qemu[parts:parts + 5] == bytes.fromhex("08000b0000")
    assert ours[parts:parts + SECTION_SIZE] == qemu[parts + 5:]


# --- QEMU's tail: device state without length, found via the description ---


@pytest.fixture
def q35_skeleton(qemu_files, tmp_path) -> tuple[Path, StreamLayout]:
    """The q35 fixture without its page bytes."""
    source, layout = qemu_files["q35_32_nomultifd.mig"], qemu_layout("q35_32_nomultifd.mig")
    target = tmp_path / "q35.img"
    write_regions(target, header_regions(source, layout), source.stat().st_size)
    return target, layout


def qemu_eof_offset(path: Path) -> int:
    """QEMU_VM_EOF, found from the raw bytes: the JSON is the file's last
    ``length`` bytes, preceded by EOF, VMDESCRIPTION and be32 length."""
    data = path.read_bytes()
    eof = data.rindex(b"\x00\x06")
    assert int.from_bytes(data[eof + 2:eof + 6], "big") == len(data) - eof - 6
    return eof


def test_qemu_image_without_its_description_is_complete(q35_skeleton):
    path, _ = q35_skeleton
    os.truncate(path, qemu_eof_offset(path) + 1)
    with ps.open_image(path) as image:
        assert (image.complete, image.info.device_sections, image.description) == (
            True, True, None)


@pytest.mark.parametrize("cut", [1, 100, 7000], ids=lambda c: f"{c}-into-device-state")
def test_qemu_image_cut_inside_its_device_state_is_incomplete(q35_skeleton, cut):
    path, layout = q35_skeleton
    device_state = layout.tail_offset + SECTION_SIZE * (QEMU_PASSES["q35_32_nomultifd.mig"]
                                                        + 1) + 5
    assert read_at(path, device_state, 1) == b"\x04"
    os.truncate(path, device_state + cut)
    assert_refused(path, device_state,
                   f"the device state after the RAM END (from {device_state}) has no EOF: "
                   f"the save did not complete", kind=ps.IncompleteImageError)


def test_qemu_image_cut_inside_its_description_is_incomplete(q35_skeleton):
    path, _ = q35_skeleton
    os.truncate(path, path.stat().st_size - 10)
    with ps.open_image(path, allow_incomplete=True) as image:
        assert not image.complete


def test_qemu_description_that_does_not_parse_is_refused(q35_skeleton):
    path, _ = q35_skeleton
    json_at = qemu_eof_offset(path) + 6
    poke(path, json_at, b"[")
    assert_refused(path, json_at, "the JSON description after EOF does not parse")


# --- stream at an offset inside the file ---

PREFIX_BYTE = 0xA5


@pytest.mark.parametrize("start", [0x100000, 4096 + 17])
def test_stream_at_an_offset_leaves_the_bytes_before_it_untouched(tmp_path, start):
    path = tmp_path / "offset.img"
    path.write_bytes(bytes([PREFIX_BYTE]) * start)
    layout = write_image(path, start=start).layout
    assert all(offset >= start for offset, _ in encode_setup(layout))
    assert read_at(path, 0, start) == bytes([PREFIX_BYTE]) * start


@pytest.mark.parametrize("start", [0x100000, 4096 + 17])
def test_stream_at_an_offset_has_absolute_offsets(start):
    at_zero = plan_layout([(n, p * PAGE_SIZE) for n, p in SMALL_BLOCKS])
    layout = plan_layout([(n, p * PAGE_SIZE) for n, p in SMALL_BLOCKS], start=start)
    first, reference = layout.blocks[0], at_zero.blocks[0]
    assert (first.record_offset, first.bitmap_offset) == (reference.record_offset + start,
                                                          reference.bitmap_offset + start)
    # The pages move to the next 1 MiB boundary of the file, not of the
    # stream, and every later record follows its block's pages.
    shift = start if start % PAGES_ALIGNMENT == 0 else 0
    assert [b.pages_offset for b in layout.blocks] == [
        b.pages_offset + shift for b in at_zero.blocks]
    assert layout.blocks[1:] == tuple(
        replace(b, record_offset=b.record_offset + shift, bitmap_offset=b.bitmap_offset + shift,
                pages_offset=b.pages_offset + shift) for b in at_zero.blocks[1:])


@pytest.mark.parametrize("start", [0x100000, 4096 + 17])
def test_stream_at_an_offset_stores_absolute_offsets_in_its_headers(tmp_path, start):
    path = tmp_path / "offset.img"
    path.write_bytes(bytes([PREFIX_BYTE]) * start)
    image = write_image(path, start=start)
    fields = header_fields(image.layout)
    for block in image.layout.blocks:
        for field in ("bitmap_offset", "pages_offset"):
            offset, width = fields[f"{block.name}.{field}"]
            assert int.from_bytes(read_at(path, offset, width), "big") == getattr(block, field)


@pytest.mark.parametrize("start", [0x100000, 4096 + 17])
def test_stream_at_an_offset_reads_back_with_that_start(tmp_path, start):
    path = tmp_path / "offset.img"
    path.write_bytes(bytes([PREFIX_BYTE]) * start)
    written = write_image(path, start=start)
    with ps.open_image(path, start=start) as image:
        assert image.start == start
        assert image.info.layout.blocks == written.layout.blocks
        assert {n: image.read_block(n).tobytes() for n in image.blocks} == written.ram


def test_stream_at_an_offset_is_not_found_at_zero(tmp_path):
    path = tmp_path / "offset.img"
    path.write_bytes(bytes([PREFIX_BYTE]) * 4113)
    write_image(path, start=4113)
    assert_refused(path, 0, not_a_stream("a5 " * 15 + "a5", "." * 16))
    assert_refused(path, 1, "bad magic 0xa5a5a5a5, expected 0x5145564d (QEVM): "
                            "not a QEMU migration stream", start=1)


def test_negative_start_is_refused(image):
    with pytest.raises(ValueError, match="stream start offset -1 is negative"):
        ps.open_image(image.path, start=-1)


def test_start_past_the_end_of_the_file_is_refused(image):
    size = image.path.stat().st_size
    assert_refused(image.path, size + 1,
                   f"stream start {size + 1} is past the end of the file ({size} bytes)",
                   start=size + 1)


# --- our own image reads back ---


def test_small_image_reads_back_its_blocks(image):
    with ps.open_image(image.path) as opened:
        assert opened.complete and opened.info.passes == 1
        assert opened.description["writer"] == "test"
        assert (opened.description["page_size"], opened.description["devices"]) == (4096, [])
        assert {n: opened.read_block(n).tobytes() for n in opened.blocks} == image.ram


def test_read_block_zeroes_clear_pages_whatever_their_slot_holds(image):
    ram1 = image.layout.block("ram1")
    assert read_at(image.path, ram1.page_offset(1), 1) == bytes([STALE])
    out = bytearray(b"\xff" * ram1.length)
    with ps.open_image(image.path) as opened:
        opened.read_block("ram1", out)
    assert bytes(out) == image.ram["ram1"]


def test_switchover_start_command_before_the_end_is_accepted(image):
    tail = encode_tail(image.layout, image.passes, {})
    parts = SECTION_SIZE * image.passes
    poke(image.path, image.layout.tail_offset,
         tail[:parts] + bytes.fromhex("08000b0000") + tail[parts:])
    os.truncate(image.path, image.layout.tail_offset + len(tail) + 5)
    with ps.open_image(image.path) as opened:
        assert opened.complete and opened.info.passes == image.passes


# --- bitmap words ---


def slow_pack(present: list[bool]) -> bytes:
    out = bytearray(-(-len(present) // 64) * 8)
    for page, bit in enumerate(present):
        if bit:
            out[page // 8] |= 1 << (page % 8)
    return bytes(out)


def slow_runs(present: list[bool]) -> list[tuple[int, int]]:
    runs, first = [], None
    for page, bit in enumerate(present + [False]):
        if bit and first is None:
            first = page
        elif not bit and first is not None:
            runs.append((first, page))
            first = None
    return runs


@given(st.lists(st.booleans(), max_size=300))
def test_pack_bitmap_equals_the_slow_reference(present):
    assert pack_bitmap(np.array(present, dtype=bool)) == slow_pack(present)


@given(st.lists(st.booleans(), max_size=300))
def test_unpack_bitmap_inverts_pack_bitmap(present):
    packed = pack_bitmap(np.array(present, dtype=bool))
    assert unpack_bitmap(packed, len(present)).tolist() == present


@given(st.lists(st.booleans(), max_size=300))
def test_bit_runs_equal_the_slow_reference(present):
    starts, ends = bit_runs(np.array(present, dtype=bool))
    assert list(zip(starts.tolist(), ends.tolist())) == slow_runs(present)


@pytest.mark.parametrize("pages", [0, 1, 63, 64, 65, 128, 129])
def test_bitmap_size_is_whole_64_bit_words(pages):
    assert len(pack_bitmap(np.ones(pages, dtype=bool))) == -(-pages // 64) * 8


def test_bitmap_words_are_little_endian_64_bit():
    present = np.zeros(130, dtype=bool)
    present[[0, 9, 63, 64, 129]] = True
    words = np.frombuffer(pack_bitmap(present), dtype="<u8").tolist()
    assert words == [1 | 1 << 9 | 1 << 63, 1, 1 << 1]


# --- writer-side refusals ---


@pytest.mark.parametrize("name, message", [
    ("a" * 256, f"block name {'a' * 40!r}... is 256 bytes, the format holds at most 255"),
    ("é" * 128, f"block name {'é' * 40!r}... is 256 bytes, the format holds at most 255"),
    ("", "block name is empty"),
    ("ram\0x", "block name 'ram\\x00x' contains a NUL byte"),
], ids=["256-bytes", "256-utf8-bytes", "empty", "nul"])
def test_writer_refuses_a_block_name_the_format_cannot_hold(name, message):
    with pytest.raises(ps.BlockError) as caught:
        plan_layout([(name, PAGE_SIZE)])
    assert str(caught.value) == message


def test_writer_accepts_a_255_byte_block_name():
    assert plan_layout([("a" * 255, PAGE_SIZE)]).blocks[0].name == "a" * 255


def test_writer_refuses_a_duplicate_block_name():
    with pytest.raises(ps.BlockError, match="^block name 'ram0' is given twice$"):
        plan_layout([("ram0", PAGE_SIZE), ("ram0", PAGE_SIZE)])


@pytest.mark.parametrize("length", [0, PAGE_SIZE + 1, -PAGE_SIZE])
def test_writer_refuses_a_length_that_is_not_whole_pages(length):
    with pytest.raises(ps.BlockError) as caught:
        plan_layout([("ram0", length)])
    assert str(caught.value) == (f"block 'ram0': length {length} is not a positive "
                                 f"multiple of the page size 4096")


# --- validation: the stream header and configuration ---


def not_a_stream(first: str, text: str) -> str:
    """What open_image says of a file that holds no stream at its start."""
    return (f"not a QEMU migration stream (magic QEVM) nor a libvirt save file "
            f"(LibvirtQemudSave): it starts with {first} ({text!r}). If the stream starts "
            f"further in, give its offset (--offset N, or start=N)")


def test_bad_magic_is_refused(image):
    poke(image.path, 0, b"QEVN")
    head = image.path.read_bytes()[:16]
    assert_refused(image.path, 0, not_a_stream(
        " ".join(f"{b:02x}" for b in head),
        "".join(chr(b) if 32 <= b < 127 else "." for b in head)))


def test_bad_magic_at_a_given_start_is_refused(tmp_path):
    path = tmp_path / "offset.img"
    write_image(path, start=4096)
    poke(path, 4096, b"QEVN")
    assert_refused(path, 4096, "bad magic 0x5145564e, expected 0x5145564d (QEVM): "
                               "not a QEMU migration stream", start=4096)


@pytest.mark.parametrize("version, why", [(2, "obsolete"), (4, "unsupported"),
                                          (0, "unsupported")])
def test_stream_version_other_than_3_is_refused(image, version, why):
    offset = set_field(image, "version", version)
    assert_refused(image.path, offset, f"{why} stream version {version} (expected 3)")


def test_missing_configuration_section_is_refused(image):
    offset = set_field(image, "configuration", 0x01)
    assert_refused(image.path, offset,
                   "expected the configuration section (0x07), found 0x01")


@pytest.mark.parametrize("length", [0, 256, 2**32 - 1])
def test_machine_type_length_out_of_range_is_refused(image, length):
    offset = set_field(image, "machine_length", length)
    assert_refused(image.path, offset, f"machine type length {length} is out of range 1..255")


def test_configuration_without_mapped_ram_is_refused(image):
    offset, _ = header_fields(image.layout)["capability0_length"]
    poke(image.path, offset + 1, b"mapped-rom")
    count, _ = header_fields(image.layout)["capability_count"]
    assert_refused(image.path, count, "the configuration does not list the mapped-ram "
                                      "capability: not a mapped-ram image")


def test_configuration_without_capabilities_is_refused(image):
    offset = set_field(image, "subsection", 0x01)
    assert_refused(image.path, offset, "the configuration does not list the mapped-ram "
                                       "capability: not a mapped-ram image")


def test_unknown_configuration_subsection_is_refused(image):
    offset, _ = header_fields(image.layout)["subsection_name_length"]
    poke(image.path, offset, b"\x1econfiguration/target-page-bits")
    assert_refused(image.path, offset,
                   "unsupported configuration subsection 'configuration/target-page-bits'")


def test_capabilities_subsection_version_other_than_1_is_refused(image):
    offset = set_field(image, "capabilities_version", 2)
    assert_refused(image.path, offset, "unsupported capabilities subsection version 2")


def test_implausible_capability_count_is_refused(image):
    offset = set_field(image, "capability_count", 2**32 - 1)
    assert_refused(image.path, offset, f"capability count {2**32 - 1} is implausible")


def test_first_section_other_than_ram_start_is_refused(image):
    offset = set_field(image, "section_type", 0x04)
    assert_refused(image.path, offset,
                   "expected SECTION_START (0x01) of the RAM section, found 0x04")


def test_first_section_not_named_ram_is_refused(image):
    offset, _ = header_fields(image.layout)["section_name_length"]
    poke(image.path, offset + 1, b"rom")
    assert_refused(image.path, offset, "first section is 'rom', expected 'ram'")


def test_ram_section_version_other_than_4_is_refused(image):
    offset = set_field(image, "section_version", 3)
    instance, _ = header_fields(image.layout)["instance"]
    assert offset == instance + 4
    assert_refused(image.path, instance,
                   "RAM section instance 0 version 3, expected instance 0 version 4")


# --- validation: MEM_SIZE and block records ---


def small_total(image: SmallImage) -> int:
    return image.layout.total_length


def test_mem_size_larger_than_the_blocks_is_refused(image):
    total = small_total(image) + PAGE_SIZE
    offset = set_field(image, "mem_size", total | RAM_FLAG_MEM_SIZE)
    assert_refused(image.path, offset,
                   f"MEM_SIZE total {total} does not match the blocks: they hold "
                   f"{small_total(image)} bytes, then the RAM ends")


def test_mem_size_smaller_than_the_blocks_is_refused(image):
    total = small_total(image) - PAGE_SIZE
    offset = set_field(image, "mem_size", total | RAM_FLAG_MEM_SIZE)
    assert_refused(image.path, offset,
                   f"MEM_SIZE total {total} does not match the blocks: block 'ram1' "
                   f"({3 * PAGE_SIZE} bytes) exceeds the {2 * PAGE_SIZE} bytes left")


def test_mem_size_without_its_flag_is_refused(image):
    offset = set_field(image, "mem_size", small_total(image) | RAM_FLAG_ZERO)
    assert_refused(image.path, offset,
                   "unexpected RAM flags 0x2 (ZERO) where MEM_SIZE was expected")


def test_mem_size_zero_is_refused(image):
    offset = set_field(image, "mem_size", RAM_FLAG_MEM_SIZE)
    assert_refused(image.path, offset, "MEM_SIZE is 0: the image holds no RAM block")


def test_empty_block_name_is_refused(image):
    offset = set_field(image, "ram1.name_length", 0)
    assert_refused(image.path, offset, "block name is empty")


def test_duplicate_block_name_is_refused(image):
    offset, _ = header_fields(image.layout)["ram1.name_length"]
    poke(image.path, offset + 1, b"ram0")
    assert_refused(image.path, offset, "block name 'ram0' appears twice")


def test_block_name_with_nul_is_refused(image):
    offset, _ = header_fields(image.layout)["ram1.name_length"]
    poke(image.path, offset + 1, b"r\0m1")
    assert_refused(image.path, offset, "block name 'r\\x00m1' contains a NUL byte")


def test_block_name_that_is_not_utf8_is_refused(image):
    offset, _ = header_fields(image.layout)["ram1.name_length"]
    poke(image.path, offset + 1, b"\xffam1")
    assert_refused(image.path, offset + 1, "block name is not UTF-8: b'\\xffam1'")


@pytest.mark.parametrize("length", [70 * PAGE_SIZE + 1, 70 * PAGE_SIZE - 512, 0])
def test_block_length_not_whole_pages_is_refused(image, length):
    offset = set_field(image, "ram0.length", length)
    assert_refused(image.path, offset, f"block 'ram0': length {length} is not a positive "
                                       f"multiple of the page size 4096")


@pytest.mark.parametrize("page_size", [8192, 0, 2 << 20, 2**64 - 1])
def test_page_size_other_than_4096_is_refused(image, page_size):
    offset = set_field(image, "ram1.page_size", page_size)
    assert_refused(image.path, offset, f"block 'ram1': page size {page_size} in the "
                                       f"mapped-ram header, expected 4096")


@pytest.mark.parametrize("version", [0, 2, 2**32 - 1])
def test_mapped_ram_header_version_other_than_1_is_refused(image, version):
    offset = set_field(image, "ram0.header_version", version)
    assert_refused(image.path, offset, f"block 'ram0': unsupported mapped-ram header "
                                       f"version {version} (expected 1)")


def test_pages_offset_not_1mib_aligned_is_refused(image):
    pages = image.layout.block("ram0").pages_offset + PAGE_SIZE
    offset = set_field(image, "ram0.pages_offset", pages)
    assert_refused(image.path, offset,
                   f"block 'ram0': pages offset {pages} is not 1 MiB aligned")


def test_pages_overlapping_the_bitmap_are_refused(image):
    block = image.layout.block("ram0")
    bitmap = block.pages_offset - 8  # the 16-byte bitmap runs into the pages
    set_field(image, "ram0.bitmap_offset", bitmap)
    offset, _ = header_fields(image.layout)["ram0.pages_offset"]
    assert_refused(image.path, offset,
                   f"block 'ram0': pages offset {block.pages_offset} overlaps its "
                   f"bitmap ({bitmap}..{bitmap + 16})")


def test_bitmap_overlapping_its_own_header_is_refused(image):
    block = image.layout.block("ram0")
    offset = set_field(image, "ram0.bitmap_offset", block.bitmap_offset - 1)
    assert_refused(image.path, offset,
                   f"block 'ram0': bitmap offset {block.bitmap_offset - 1} overlaps its "
                   f"own header (which ends at {block.bitmap_offset})")


@pytest.mark.parametrize("excess", [1, 2**40, 2**64 - 1], ids=["just", "far", "max"])
def test_bitmap_past_the_end_of_the_file_is_refused(image, excess):
    size = image.path.stat().st_size
    bitmap = min(size - 16 + excess, 2**64 - 1)
    offset = set_field(image, "ram0.bitmap_offset", bitmap)
    assert_refused(image.path, offset,
                   f"block 'ram0': bitmap at {bitmap} (16 bytes) is past the end of "
                   f"the file ({size} bytes)")


def test_pages_past_the_end_of_the_file_are_refused(image):
    block = image.layout.block("ram1")
    os.truncate(image.path, block.pages_offset + PAGE_SIZE)
    offset, _ = header_fields(image.layout)["ram1.pages_offset"]
    assert_refused(image.path, offset,
                   f"block 'ram1': pages {block.pages_offset}..{block.end} are past the "
                   f"end of the file ({block.pages_offset + PAGE_SIZE} bytes)")


def test_pages_offset_far_past_the_end_of_the_file_is_refused(image):
    pages = 2**63
    offset = set_field(image, "ram1.pages_offset", pages)
    assert_refused(image.path, offset,
                   f"block 'ram1': pages {pages}..{pages + 3 * PAGE_SIZE} are past the "
                   f"end of the file ({image.path.stat().st_size} bytes)")


def test_huge_block_length_is_refused_before_reading_its_bitmap(image):
    length = 2**64 - PAGE_SIZE
    set_field(image, "ram1.length", length)
    offset, _ = header_fields(image.layout)["ram1.bitmap_offset"]
    bitmap = image.layout.block("ram1").bitmap_offset
    assert_refused(image.path, offset,
                   f"block 'ram1': bitmap at {bitmap} ({-(-length // PAGE_SIZE // 64) * 8} "
                   f"bytes) "
                   f"is past the end of the file ({image.path.stat().st_size} bytes)")


# --- validation: truncation inside the header ---


def header_bytes(layout: StreamLayout) -> list[int]:
    """Every offset of the stream header, the records and the bitmaps."""
    return [offset for i, block in enumerate(layout.blocks)
            for offset in range(layout.start if i == 0 else block.record_offset,
                                block.bitmap_offset + block.bitmap_size)]


def test_truncation_anywhere_in_the_header_is_a_format_error(image):
    """Not IncompleteImageError: a save writes the whole header first, so a
    header cut short is a damaged file, not a save that stopped."""
    regions = header_regions(image.path, image.layout)
    for cut in header_bytes(image.layout):
        write_regions(image.path, regions, cut)
        error = open_error(image.path)
        assert type(error) is ps.FormatError, cut
        assert error.offset <= cut
        assert (error.message.endswith(": truncated")
                or error.message.endswith(f"past the end of the file ({cut} bytes)")), cut


@pytest.mark.parametrize("field, what, needed", [
    ("version", "stream header", 8),
    ("machine_length", "machine type length", 4),
    ("mem_size", "MEM_SIZE", 8),
    ("ram1.length", "length of block 'ram1'", 8),
    ("ram1.page_size", "mapped-ram header of block 'ram1'", 28),
])
def test_truncation_inside_a_header_field_names_the_field(image, field, what, needed):
    offset, width = header_fields(image.layout)[field]
    cut = offset + width - 1
    os.truncate(image.path, cut)
    start = offset if field not in ("version", "ram1.page_size") else offset - 4
    assert_refused(image.path, start,
                   f"file ends at {cut} inside {what} ({needed} bytes needed): truncated")


def test_truncation_inside_a_bitmap_is_refused(image):
    block = image.layout.block("ram1")
    os.truncate(image.path, block.bitmap_offset + 3)
    offset, _ = header_fields(image.layout)["ram1.bitmap_offset"]
    assert_refused(image.path, offset,
                   f"block 'ram1': bitmap at {block.bitmap_offset} (8 bytes) is past the "
                   f"end of the file ({block.bitmap_offset + 3} bytes)")


def test_truncation_before_the_closing_eos_is_refused(image):
    cut = image.layout.ram_end + 4
    os.truncate(image.path, cut)
    assert_refused(image.path, image.layout.ram_end,
                   f"file ends at {cut} inside RAM flags of the RAM SECTION_START "
                   f"(8 bytes needed): truncated")


# --- validation: RAM flags where EOS is expected ---

BAD_FLAGS = {"ZERO": RAM_FLAG_ZERO, "PAGE": RAM_FLAG_PAGE, "XBZRLE": RAM_FLAG_XBZRLE,
             "MULTIFD_FLUSH": RAM_FLAG_MULTIFD_FLUSH, "HOOK": RAM_FLAG_HOOK}


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_unexpected_ram_flags_closing_the_section_start_are_refused(image, flag):
    offset = set_field(image, "eos", BAD_FLAGS[flag])
    assert_refused(image.path, offset,
                   f"unexpected RAM flags 0x{BAD_FLAGS[flag]:x} ({flag}) in the RAM "
                   f"SECTION_START: a mapped-ram stream carries only EOS here")


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_unexpected_ram_flags_in_a_section_part_are_refused(image, flag):
    offset = image.layout.tail_offset + 5
    poke(image.path, offset, BAD_FLAGS[flag].to_bytes(8, "big"))
    assert_refused(image.path, offset,
                   f"unexpected RAM flags 0x{BAD_FLAGS[flag]:x} ({flag}) in a RAM "
                   f"SECTION_PART: a mapped-ram stream carries only EOS here")


@pytest.mark.parametrize("flag", BAD_FLAGS)
def test_unexpected_ram_flags_in_the_section_end_are_refused(image, flag):
    offset = image.end_offset + 5
    poke(image.path, offset, (BAD_FLAGS[flag] | RAM_FLAG_EOS).to_bytes(8, "big"))
    names = "|".join(name for _, name in sorted([(BAD_FLAGS[flag], flag),
                                                 (RAM_FLAG_EOS, "EOS")]))
    assert_refused(image.path, offset,
                   f"unexpected RAM flags 0x{BAD_FLAGS[flag] | RAM_FLAG_EOS:x} "
                   f"({names}) in the RAM SECTION_END: a mapped-ram stream carries "
                   f"only EOS here")


def test_footer_naming_another_section_is_refused(image):
    offset = set_field(image, "footer_id", 7)
    assert_refused(image.path, offset,
                   "footer of the RAM SECTION_START names section 7, expected 1")


def test_missing_footer_is_refused(image):
    offset = set_field(image, "footer", 0x00)
    assert_refused(image.path, offset, "expected section footer 0x7e after the RAM "
                                       "SECTION_START, found 0x00")


def test_section_part_of_another_section_is_refused(image):
    offset = image.layout.tail_offset + 1
    poke(image.path, offset, (2).to_bytes(4, "big"))
    assert_refused(image.path, offset, "SECTION_PART for section 2: only the RAM section "
                                       "(1) is supported before its END")


def test_device_section_before_the_ram_end_is_refused(image):
    offset = image.layout.tail_offset
    poke(image.path, offset, b"\x04")
    assert_refused(image.path, offset,
                   "unexpected section type 0x04 before the RAM section's END")


def test_command_other_than_switchover_start_is_refused(image):
    offset = image.layout.tail_offset
    poke(image.path, offset, bytes.fromhex("0800020000"))
    assert_refused(image.path, offset,
                   "unsupported command 0x0002 (length 0) in a file stream")


# --- validation: the tail after the RAM END ---


def test_byte_after_eof_other_than_description_is_refused(image):
    offset = image.eof_offset + 1
    poke(image.path, offset, b"\x07")
    assert_refused(image.path, offset, "unexpected byte 0x07 after EOF")


def test_description_shorter_than_the_rest_of_the_file_is_refused(image):
    length = image.path.stat().st_size - (image.eof_offset + 6)
    with open(image.path, "ab") as f:
        f.write(b"  ")
    assert_refused(image.path, image.eof_offset + 2,
                   f"description length {length} does not reach the end of the file "
                   f"({length + 2} bytes follow)")


@pytest.mark.parametrize("extra", [1, 1 << 20], ids=["one-more", "1MiB"])
def test_description_longer_than_the_file_is_refused_not_incomplete(image, extra):
    """A length that reaches past the end is a damaged or hostile file, not
    a save that stopped: the whole tail is written at once."""
    follow = image.path.stat().st_size - (image.eof_offset + 6)
    length = follow + extra
    poke(image.path, image.eof_offset + 2, length.to_bytes(4, "big"))
    assert_refused(image.path, image.eof_offset + 2,
                   f"description length {length} reaches past the end of the file "
                   f"(only {follow} bytes follow)")


def test_description_length_of_4gib_over_a_hole_is_refused_before_reading(image):
    """The file really is 4 GiB long (a hole): the length fits, but is not
    read into memory."""
    length = 2**32 - 1
    poke(image.path, image.eof_offset + 2, length.to_bytes(4, "big"))
    os.truncate(image.path, image.eof_offset + 6 + length)
    assert_refused(image.path, image.eof_offset + 2,
                   f"description length {length} is implausible (a description is at "
                   f"most {16 << 20} bytes)")


def test_description_that_does_not_parse_is_refused(image):
    offset = image.eof_offset + 6
    poke(image.path, offset, b"[")
    assert_refused(image.path, offset, "the JSON description after EOF does not parse")


def test_description_that_is_not_an_object_is_refused(image):
    offset = image.eof_offset + 6
    text = b'["writer", "test"]'
    poke(image.path, offset - 4, len(text).to_bytes(4, "big") + text)
    os.truncate(image.path, offset + len(text))
    assert_refused(image.path, offset, "the JSON description after EOF is not an object")


def test_section_after_the_ram_end_other_than_eof_or_device_is_refused(image):
    poke(image.path, image.eof_offset, b"\x02")
    assert_refused(image.path, image.eof_offset,
                   "unexpected section type 0x02 after the RAM END")


# --- validation: a save that did not complete ---


def incomplete_cuts(image: SmallImage) -> dict[str, tuple[int, int, str]]:
    """cut -> (offset reported, reason) for where a save can stop."""
    tail, end, eof = image.layout.tail_offset, image.end_offset, image.eof_offset
    stopped = "the save did not complete"
    return {
        "no-end": (tail, tail,
                   f"the RAM section has no END (the stream stops at {tail}): {stopped}"),
        "inside-part": (tail + 7, tail,
                        f"the stream stops inside a section at {tail}: {stopped}"),
        "inside-end": (end + 17, end, f"the stream stops inside a section at {end}: {stopped}"),
        "before-eof": (eof, eof, f"the stream stops after the RAM END, before EOF: {stopped}"),
        "inside-description": (eof + 4, eof + 1,
                               f"the stream stops inside the description at {eof + 1}: {stopped}"),
    }


@pytest.mark.parametrize("where", ["no-end", "inside-part", "inside-end", "before-eof",
                                   "inside-description"])
def test_stream_that_stops_in_the_tail_is_incomplete(image, where):
    cut, offset, reason = incomplete_cuts(image)[where]
    os.truncate(image.path, cut)
    assert_refused(image.path, offset, reason, kind=ps.IncompleteImageError)


def test_incomplete_image_opens_when_allowed(image):
    os.truncate(image.path, image.layout.tail_offset)
    with ps.open_image(image.path, allow_incomplete=True) as opened:
        assert not opened.complete
        assert opened.info.layout == image.layout
        assert list(opened.blocks) == ["ram0", "ram1"]


def test_incomplete_image_refuses_read_block(image):
    tail = image.layout.tail_offset
    os.truncate(image.path, tail)
    with (ps.open_image(image.path, allow_incomplete=True) as opened,
          pytest.raises(ps.IncompleteImageError) as caught):
        opened.read_block("ram0")
    assert caught.value.offset == tail


# --- validation: bitmap padding ---


@pytest.mark.parametrize("bit", [3, 63])
def test_bitmap_padding_bit_set_past_the_last_page_is_refused(image, bit):
    block = image.layout.block("ram1")
    raw = bytearray(read_at(image.path, block.bitmap_offset, 8))
    raw[bit // 8] |= 1 << (bit % 8)
    poke(image.path, block.bitmap_offset, bytes(raw))
    assert_refused(image.path, block.bitmap_offset + bit // 8,
                   f"block 'ram1': bitmap sets 1 bit(s) past the block's 3 pages, "
                   f"the first is bit {bit}")
