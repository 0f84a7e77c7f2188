"""Streams inside containers: libvirt's save file, found without --offset.

The libvirt files here are built from the header layout of libvirt's
src/qemu/qemu_saveimage.h (virQEMUSaveHeader), with our own stream saved
into the slot after the header (``start=``): the same bytes ``virsh save
--image-format sparse`` writes around QEMU's stream.  tests/test_libvirt.py
reads files real libvirt wrote.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import parallel_save as ps
from parallel_save.cli import main as cli_main
from parallel_save.container import LIBVIRT_HEADER_SIZE, Container, detect_stream

XML = (b"<domain type='kvm'>\n  <name>guest&amp;co</name>\n  <uuid>0b9d0f3c-4b2a-4ad4-9a3e-"
       b"1f2f7c1e7d11</uuid>\n  <memory unit='KiB'>65536</memory>\n</domain>\n")
COOKIE = b"<cookie>\n  <cpu mode='custom'/>\n</cookie>\n"
SPARSE = 6


def libvirt_header(data_len: int, *, magic: bytes = b"LibvirtQemudSave", version: int = 2,
                   running: int = 1, fmt: int = SPARSE, cookie_offset: int = 0,
                   order: str = "<") -> bytes:
    return struct.pack(order + "16s5I56x", magic, version, data_len, running, fmt,
                       cookie_offset)


def libvirt_file(path: Path, *, padding: int = 1007, **header) -> int:
    """A libvirt save file with no stream yet; returns where it starts
    (deliberately aligned to nothing, as libvirt's are)."""
    xml = XML + b"\0"
    data = xml + COOKIE + b"\0" + bytes(padding)
    path.write_bytes(libvirt_header(len(data), cookie_offset=len(xml), **header) + data)
    return LIBVIRT_HEADER_SIZE + len(data)


def save_into(shm, path: Path, start: int) -> dict[str, bytes]:
    blocks = [shm.block("pc.ram", 64, fill=0.5, seed=1),
              shm.block("/rom@etc/acpi/tables", 8, fill=0.5, seed=2)]
    ps.save(path, blocks, channels=2, machine="pc-q35-10.0", start=start)
    return {b.name: b.array.tobytes() for b in blocks}


def detect(path: Path) -> Container:
    fd = os.open(path, os.O_RDONLY)
    try:
        return detect_stream(fd, path)
    finally:
        os.close(fd)


def test_saving_into_the_stream_slot_keeps_the_container_and_is_found(shm, tmp_path):
    path = tmp_path / "guest.save"
    start = libvirt_file(path)
    before = path.read_bytes()
    ram = save_into(shm, path, start)
    assert path.read_bytes()[:start] == before
    with ps.open_image(path) as image:
        assert image.start == start and start % 2 == 1
        assert image.container == Container(
            "libvirt", start, True, "guest&co", True, "sparse", 2, len(XML) + 1,
            start - LIBVIRT_HEADER_SIZE - len(XML) - 1)
        assert {n: image.read_block(n).tobytes() for n in image.blocks} == ram


def test_restore_and_verify_need_no_offset(shm, tmp_path, capsys):
    path = tmp_path / "guest.save"
    ram = save_into(shm, path, libvirt_file(path))
    targets = [shm.block(name, len(data) // 4096, fill="garbage") for name, data in ram.items()]
    ps.restore(path, targets, channels=2)
    assert {b.name: b.array.tobytes() for b in targets} == ram
    files = []
    for index, (name, data) in enumerate(ram.items()):
        (tmp_path / f"{index}.ram").write_bytes(data)
        files += ["--block", f"{name}={tmp_path / f'{index}.ram'}"]
    assert cli_main(["verify", str(path), *files, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["equal"] is True


def test_inspect_shows_what_the_container_says(shm, tmp_path, capsys):
    path = tmp_path / "guest.save"
    start = libvirt_file(path, running=0)
    save_into(shm, path, start)
    assert cli_main(["inspect", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["start"] == start
    assert {k: shown["container"][k] for k in ("kind", "domain_name", "was_running",
                                                "image_format", "complete")} == {
        "kind": "libvirt", "domain_name": "guest&co", "was_running": False,
        "image_format": "sparse", "complete": True}
    assert cli_main(["inspect", str(path)]) == 0
    assert ("container     libvirt save of domain 'guest&co' (paused when saved, image "
            "format sparse)") in capsys.readouterr().out.splitlines()


def test_a_bare_stream_has_no_container_in_inspect(shm, tmp_path, capsys):
    path = tmp_path / "vm.img"
    save_into(shm, path, 0)
    assert detect(path) == Container("qemu", 0)
    assert cli_main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["container"] is None


def test_an_unfinished_libvirt_save_is_incomplete(shm, tmp_path, capsys):
    path = tmp_path / "guest.save"
    save_into(shm, path, libvirt_file(path, magic=b"LibvirtQemudPart"))
    reason = ("the libvirt save file still has the magic LibvirtQemudPart: the save of "
              "domain 'guest&co' did not complete")
    with pytest.raises(ps.IncompleteImageError) as caught:
        ps.open_image(path)
    assert (caught.value.message, caught.value.offset) == (reason, 0)
    assert cli_main(["inspect", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["complete"], shown["incomplete_reason"], shown["container"]["complete"]) == (
        False, reason, False)


def test_an_unfinished_libvirt_save_whose_stream_stops_early_is_incomplete(tmp_path):
    path = tmp_path / "guest.save"
    libvirt_file(path, magic=b"LibvirtQemudPart")
    with open(path, "ab") as f:
        f.write(b"QEVM\0\0")
    with pytest.raises(ps.IncompleteImageError, match="did not complete; its stream does "
                       "not decode: file ends at .* inside stream header"):
        ps.open_image(path)


def test_a_big_endian_header_is_read_as_libvirt_does(shm, tmp_path):
    path = tmp_path / "guest.save"
    start = libvirt_file(path, order=">")
    ram = save_into(shm, path, start)
    with ps.open_image(path) as image:
        assert (image.start, image.container.domain_name) == (start, "guest&co")
        assert image.read_block("pc.ram").tobytes() == ram["pc.ram"]


@pytest.mark.parametrize("fmt, what", [
    (0, "QEMU's sequential stream (image format raw)"),
    (1, "QEMU's sequential stream, gzip-compressed (image format gzip)"),
    (5, "QEMU's sequential stream, zstd-compressed (image format zstd)"),
])
def test_a_libvirt_file_that_is_not_sparse_is_refused_with_what_it_holds(tmp_path, fmt, what):
    path = tmp_path / "guest.save"
    start = libvirt_file(path, fmt=fmt)
    with pytest.raises(ps.FormatError) as caught:
        ps.open_image(path)
    assert (caught.value.message, caught.value.offset) == (
        (f"libvirt save file of domain 'guest&co' holds {what} from offset {start}: "
        f"parallel-save reads only mapped-ram, libvirt's sparse format (virsh save "
        f"--image-format sparse)"), 28)


@pytest.mark.parametrize("header, message, offset", [
    ({"version": 7}, "libvirt save header version 7 is not supported (1 to 2)", 16),
])
def test_a_bad_libvirt_header_is_refused(tmp_path, header, message, offset):
    path = tmp_path / "guest.save"
    libvirt_file(path, **header)
    with pytest.raises(ps.FormatError) as caught:
        ps.open_image(path)
    assert (caught.value.message, caught.value.offset) == (message, offset)


def test_a_libvirt_header_pointing_past_the_end_is_refused(tmp_path):
    path = tmp_path / "guest.save"
    path.write_bytes(libvirt_header(1 << 20) + XML)
    with pytest.raises(ps.FormatError) as caught:
        ps.open_image(path)
    assert (caught.value.message, caught.value.offset) == (
        (f"libvirt save header puts the stream at {LIBVIRT_HEADER_SIZE + (1 << 20)} (header "
        f"92 + data length {1 << 20}), past the end of the file "
        f"({LIBVIRT_HEADER_SIZE + len(XML)} bytes)"), 20)


def test_a_truncated_libvirt_header_is_refused(tmp_path):
    path = tmp_path / "guest.save"
    path.write_bytes(b"LibvirtQemudSave\2\0\0\0")
    with pytest.raises(ps.FormatError, match="libvirt save header is truncated: the file has "
                       "20 bytes, the header 92"):
        ps.open_image(path)


@pytest.mark.parametrize("head, looks", [
    (b"\x1f\x8b\x08\x00" + bytes(12), "gzip-compressed data"),
    (b"\x28\xb5\x2f\xfd" + bytes(12), "zstd-compressed data"),
    (b"QFI\xfb" + bytes(12), "a qcow2 disk image"),
])
def test_a_file_of_another_kind_is_named_in_the_error(tmp_path, head, looks):
    path = tmp_path / "other"
    path.write_bytes(head + bytes(4096))
    with pytest.raises(ps.FormatError) as caught:
        ps.open_image(path)
    assert caught.value.offset == 0
    assert f"): {looks}. If the stream starts further in, give its offset (--offset N, " \
           f"or start=N)" in caught.value.message


def test_a_file_of_zeros_says_so(tmp_path):
    path = tmp_path / "zeros"
    path.write_bytes(bytes(8192))
    with pytest.raises(ps.FormatError, match="its first 92 bytes are zero. If the stream"):
        ps.open_image(path)


def test_an_explicit_start_skips_detection(shm, tmp_path):
    path = tmp_path / "guest.save"
    start = libvirt_file(path)
    ram = save_into(shm, path, start)
    with ps.open_image(path, start=start) as image:
        assert image.container is None
        assert image.read_block("pc.ram").tobytes() == ram["pc.ram"]
    assert np.frombuffer(ram["pc.ram"], np.uint8).any()
