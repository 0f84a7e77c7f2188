"""verify and describe as library calls (issue 13), verify reading with
pread so an image truncated under it is an error, not a SIGBUS (issue 15),
and a verify that did not compare every block is not a pass (issue 14)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import parallel_save as ps
from parallel_save.cli import main
from parallel_save.format import PAGE_SIZE
from parallel_save.verify import compare_block

PAGES = 256


@pytest.fixture
def saved(shm, tmp_path):
    ram = shm.block("ram0", PAGES, fill=0.5, seed=11)
    rom = shm.block("rom", 8, fill=0.0, seed=12)
    path = tmp_path / "vm.img"
    ps.save(path, [ram, rom], channels=2)
    return path, ram, rom


def test_verify_image_of_equal_sources_is_ok(saved):
    path, ram, rom = saved
    result = ps.verify_image(path, {"ram0": ram.source.path, "rom": rom})
    assert (result.ok, result.equal, result.complete, result.pages_differing) == (
        True, True, True, 0)
    assert {n: (b.pages, b.pages_differing) for n, b in result.blocks.items()} == {
        "ram0": (PAGES, 0), "rom": (8, 0)}


def test_verify_image_names_the_differing_pages(saved):
    path, ram, rom = saved
    pages = ram.array.reshape(PAGES, PAGE_SIZE)
    changed = [0, 7, 8, 200, PAGES - 1]
    for page in changed:
        pages[page, 10] ^= 0xFF
    result = ps.verify_image(path, {"ram0": ram, "rom": rom})
    verdict = result.blocks["ram0"]
    assert (result.ok, verdict.pages_differing) == (False, len(changed))
    assert verdict.differing_pages().tolist() == changed
    assert verdict.differing_pages(limit=2).tolist() == changed[:2]
    assert result.to_dict()["blocks"]["ram0"]["first_differing"] == changed


def test_verify_image_of_some_blocks_lists_the_others_as_not_compared(saved):
    path, ram, _ = saved
    result = ps.verify_image(path, {"ram0": ram})
    assert (result.equal, result.complete, result.ok, result.not_compared) == (
        True, False, False, ["rom"])


def test_verify_image_refuses_a_block_it_does_not_hold(saved):
    path, ram, _ = saved
    with pytest.raises(ps.BlockError, match=r"has no block 'nope' \(it holds 'ram0', 'rom'\)"):
        ps.verify_image(path, {"nope": ram})


def test_verify_image_refuses_a_source_of_another_length(saved, tmp_path):
    path, _, rom = saved
    short = tmp_path / "short"
    short.write_bytes(bytes(4 * PAGE_SIZE))
    with pytest.raises(ps.BlockError) as caught:
        ps.verify_image(path, {"ram0": short, "rom": rom})
    assert str(caught.value) == (f"block 'ram0': the image holds {PAGES * PAGE_SIZE} bytes, "
                                 f"{short} is {4 * PAGE_SIZE}")


def test_image_truncated_under_verify_is_a_format_error_not_sigbus(saved):
    """Verify mapped the image before: a truncation under it killed the
    process with SIGBUS.  Now it reads, and the short read is an error."""
    path, ram, _ = saved
    with ps.open_image(path) as image:
        block = image.blocks["ram0"]
        assert block.pages_present > 0
        cut = block.layout.pages_offset + 10 * PAGE_SIZE
        with open(path, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(ps.FormatError) as caught:
            compare_block(image, "ram0", ram)
    assert caught.value.path == str(path)
    assert caught.value.message == (
        f"block 'ram0': pages {block.layout.pages_offset}..{block.layout.end} are past the "
        f"end of the file ({cut} bytes): the image was truncated while it was read")
    assert caught.value.offset == cut


def test_describe_image_is_what_inspect_json_prints(saved, capsys):
    path, ram, _ = saved
    with ps.open_image(path) as image:
        described = ps.describe_image(image)
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == described
    nonzero = int(ram.array.reshape(PAGES, -1).any(axis=1).sum())
    assert described["blocks"][0]["pages_present"] == nonzero


def test_cli_verify_of_some_blocks_fails_unless_partial(saved, capsys):
    path, ram, _ = saved
    assert main(["verify", str(path), "--block", f"ram0={ram.source.path}"]) == 1
    out = capsys.readouterr().out
    assert out == (f"{path} matches the sources: 1 block(s), {PAGES} pages equal\n"
                   f"  not compared (no --block): 'rom': the check is incomplete (exit 1); "
                   f"--partial accepts it\n")
    assert main(["verify", str(path), "--block", f"ram0={ram.source.path}", "--partial"]) == 0
    assert capsys.readouterr().out == (
        f"{path} matches the sources: 1 block(s), {PAGES} pages equal\n"
        f"  not compared (no --block): 'rom'\n")
    assert main(["verify", str(path), "--block", f"ram0={ram.source.path}", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["equal"], data["complete"], data["not_compared"]) == (True, False, ["rom"])


def test_cli_verify_source_that_is_a_fifo_is_refused(saved, capsys, tmp_path):
    path, _, rom = saved
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    status = main(["verify", str(path), "--block", f"ram0={fifo}",
                   "--block", f"rom={rom.source.path}"])
    assert (status, capsys.readouterr().err) == (
        1, f"parallel-save: error: {fifo}: not a regular file: a FIFO\n")


def test_verdict_differing_is_one_bit_per_page(saved):
    path, ram, rom = saved
    result = ps.verify_image(path, {"ram0": ram, "rom": rom})
    assert result.blocks["ram0"].differing.nbytes == PAGES // 8
    assert not np.any(result.blocks["ram0"].differing)
