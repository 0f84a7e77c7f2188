"""Hostile files (issue 8, the reader): a mutated or truncated image makes
the reader raise FormatError or read it, and nothing else.  It never raises
another exception, never hangs (the deadline), never allocates memory for a
length it has not checked against the file (tracemalloc's peak), and never
writes outside the buffer it reads a block into (guard bytes).

Two sources: our small image, and the header region of QEMU's q35 fixture
(its records, bitmaps, device state and JSON; the page slots are holes).
bench/fuzz_reader.py runs the same check under atheris for longer.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_format import (
    Regions,
    header_fields,
    header_regions,
    qemu_layout,
    write_image,
    write_regions,
)

import parallel_save as ps
from parallel_save.format import DESCRIPTION_SEARCH

# Allocations while opening and reading one image; a length trusted before
# it is checked against the file would need far more (2**63, 2**64-1...).
PEAK_LIMIT = 4 << 20
GUARD = 4096  # bytes on each side of the destination buffer
GUARD_BYTE = 0x5A


@dataclass(frozen=True)
class Target:
    """A valid image to mutate: its non-page bytes, size and fixed fields."""

    regions: Regions
    size: int
    fields: tuple[tuple[int, int], ...]  # (offset, width)
    scratch: np.ndarray  # destination for read_block, with room for guards


def make_target(path: Path, layout) -> Target:
    size = path.stat().st_size
    return Target(header_regions(path, layout), size,
                  tuple(header_fields(layout).values()),
                  np.empty(size + 2 * GUARD, dtype=np.uint8))


@pytest.fixture(scope="module")
def small_target(tmp_path_factory) -> Target:
    image = write_image(tmp_path_factory.mktemp("fuzz") / "small.img", passes=2)
    return make_target(image.path, image.layout)


@pytest.fixture(scope="module")
def qemu_target(qemu_files) -> Target:
    fixture = "q35_32_nomultifd.mig"
    return make_target(qemu_files[fixture], qemu_layout(fixture))


@pytest.fixture
def target(request) -> Target:
    """The target named by the test's parameter, built before any example runs."""
    return request.getfixturevalue(request.param)


each_target = pytest.mark.parametrize("target", ["small_target", "qemu_target"], indirect=True)


def overwrite(regions: Regions, offset: int, data: bytes) -> Regions:
    """``data`` written at ``offset`` inside the region that holds it."""
    out = []
    for first, region in regions:
        if first <= offset < first + len(region):
            at = offset - first
            region = region[:at] + data + region[at + len(data):]
        out.append((first, region))
    return out


def extremes(width: int) -> st.SearchStrategy[int]:
    top = 2 ** (8 * width)
    return st.sampled_from([0, 1, top // 2, top - 1, top // 2 - 1]) | st.integers(0, top - 1)


@st.composite
def field_edit(draw, target: Target) -> tuple[int, bytes]:
    offset, width = draw(st.sampled_from(target.fields))
    return offset, draw(extremes(width)).to_bytes(width, "big")


@st.composite
def byte_flip(draw, target: Target) -> tuple[int, bytes]:
    first, region = draw(st.sampled_from(target.regions))
    at = draw(st.integers(0, len(region) - 1))
    return first + at, bytes([region[at] ^ draw(st.integers(1, 255))])


@st.composite
def mutated(draw, target: Target) -> tuple[Regions, int]:
    """The target with a few field overwrites and byte flips, maybe cut short."""
    regions = target.regions
    for offset, data in draw(st.lists(field_edit(target) | byte_flip(target),
                                      min_size=1, max_size=4)):
        regions = overwrite(regions, offset, data)
    cuts = st.sampled_from([first + at for first, region in target.regions
                            for at in (0, 1, len(region) // 2, len(region) - 1)])
    size = draw(st.just(target.size) | cuts | st.integers(0, target.size))
    return regions, size


def read_guarded(image: ps.Image, name: str, scratch: np.ndarray) -> None:
    """read_block into the middle of ``scratch``; the bytes around stay."""
    length = image.blocks[name].length
    scratch[:GUARD] = GUARD_BYTE
    scratch[GUARD + length:2 * GUARD + length] = GUARD_BYTE
    image.read_block(name, scratch[GUARD:GUARD + length])
    assert (scratch[:GUARD] == GUARD_BYTE).all()
    assert (scratch[GUARD + length:2 * GUARD + length] == GUARD_BYTE).all()


def open_traced(path: Path) -> ps.Image:
    """open_image(allow_incomplete=True), whose allocations must stay small:
    decoding is where a bogus length could be trusted."""
    tracemalloc.start()
    try:
        return ps.open_image(path, allow_incomplete=True)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_LIMIT


def check_reader(path: Path, scratch: np.ndarray) -> None:
    """Open (lenient and strict) and read every block: only FormatError may
    come out."""
    try:
        image = open_traced(path)
    except ps.FormatError:
        return
    with image:
        if image.complete:
            ps.open_image(path).close()
            for name in image.blocks:
                read_guarded(image, name, scratch)
        else:
            with pytest.raises(ps.IncompleteImageError):
                ps.open_image(path)
            with pytest.raises(ps.IncompleteImageError):
                image.read_block(next(iter(image.blocks)))


# An example takes milliseconds; the deadline has room for a loaded machine.
fuzz_settings = settings(deadline=timedelta(seconds=5),
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])


@each_target
@settings(fuzz_settings, max_examples=200)
@given(data=st.data())
def test_mutated_image_raises_only_format_error(tmp_path, target, data):
    regions, size = data.draw(mutated(target))
    write_regions(tmp_path / "mutated.img", regions, size)
    check_reader(tmp_path / "mutated.img", target.scratch)


@each_target
def test_every_header_field_at_extreme_values_raises_only_format_error(tmp_path, target):
    """Deterministic sweep: each fixed field set to 0, 1, 2**(n-1) and
    2**n - 1, one at a time."""
    path = tmp_path / "extreme.img"
    for offset, width in target.fields:
        for value in (0, 1, 2 ** (8 * width - 1), 2 ** (8 * width) - 1):
            write_regions(path, overwrite(target.regions, offset,
                                          value.to_bytes(width, "big")), target.size)
            check_reader(path, target.scratch)


def test_device_state_without_eof_is_searched_in_bounded_memory(tmp_path):
    """QEMU's device state has no length: EOF is looked for from the end,
    a chunk at a time, and no further back than DESCRIPTION_SEARCH."""
    image = write_image(tmp_path / "small.img")
    with open(image.path, "r+b") as f:
        f.seek(image.eof_offset)
        f.write(b"\x04" + b"\x01" * (DESCRIPTION_SEARCH + (4 << 20)))
        f.truncate()
    with open_traced(image.path) as opened:
        assert (opened.complete, opened.info.incomplete_offset) == (False, image.eof_offset)
