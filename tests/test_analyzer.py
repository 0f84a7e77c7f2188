"""QEMU's own reader of migration files, scripts/analyze-migration.py, as an
independent check of what we write.

It is QEMU's code (LGPL) and stays outside the project: the shared tools
directory sits beside the repository (``<clone>/../shared/tools``), and the
tests run it in place.  ``-x`` extracts every RAM block into a file named
after the block (q35's ``/rom@etc/...`` names become subdirectories), in the
current directory: the extracted files must equal the RAM we saved, byte for
byte.  It needs QEMU's vmstate description after EOF (``configuration``,
``page_size``, ``devices``); our own metadata rides beside those keys.

Also here: images written before the description took QEMU's shape (only
``{"parallel_save": {...}}``) still open, and ``inspect`` still shows them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from qemu_support import REQUIRE_QEMU

import parallel_save as ps
from parallel_save.cli import main as cli_main
from parallel_save.format import PAGE_SIZE, encode_tail, plan_layout

ANALYZER = Path(__file__).resolve().parents[2] / "shared" / "tools" / "analyze-migration.py"

#: q35's block names (as QEMU 10 writes them), several with '/' in them.
Q35_BLOCKS = [("pc.ram", 96), ("/rom@etc/acpi/tables", 32), ("pc.bios", 64),
              ("/rom@etc/table-loader", 1), ("/rom@etc/acpi/rsdp", 1)]


def analyzer() -> Path:
    """The analyzer's path; skips the test without it (fails in CI, where
    PARALLEL_SAVE_REQUIRE_QEMU=1 says the peers must be there)."""
    if ANALYZER.is_file():
        return ANALYZER
    reason = (f"QEMU's analyze-migration.py is not at {ANALYZER} (the shared tools "
              f"directory must sit beside the repository)")
    if os.environ.get(REQUIRE_QEMU) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_QEMU}=1 requires it", pytrace=False)
    pytest.skip(reason)


def analyze(image: Path, cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, str(analyzer()), *args, "-f", str(image)],
                            check=False, cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"analyze-migration.py failed:\n{result.stderr[-3000:]}"
    return result.stdout


def save_q35(shm, path: Path, *, passes: int = 0, **options) -> dict[str, bytes]:
    """Save q35-named blocks, about half their pages zero; ``passes``
    iterate passes first (each leaves a SECTION_PART in the stream).
    Returns each block's bytes as saved."""
    blocks = [shm.block(name, pages, fill=0.5, seed=seed)
              for seed, (name, pages) in enumerate(Q35_BLOCKS)]
    with ps.Saver(path, blocks, channels=2, machine="pc-q35-10.0", **options) as saver:
        saver.setup()
        for _ in range(passes):
            saver.iterate()
        saver.complete()
    return {b.name: b.array.tobytes() for b in blocks}


@pytest.mark.parametrize("passes", [0, 2])
def test_analyzer_extracts_our_blocks_byte_for_byte(shm, tmp_path, passes):
    image = tmp_path / "vm.img"
    ram = save_q35(shm, image, passes=passes)
    assert any(data[i:i + PAGE_SIZE] == bytes(PAGE_SIZE)
               for data in ram.values() for i in range(0, len(data), PAGE_SIZE))
    out = tmp_path / "extracted"
    out.mkdir()
    listed = analyze(image, out, "-x").split()
    assert listed == ["desc.json", *ram, "state.json"]
    for name, data in ram.items():
        # The analyzer writes "./" + name: a name starting with '/' stays inside.
        assert (out / name.lstrip("/")).read_bytes() == data, name
    state = json.loads((out / "state.json").read_text())
    assert state["ram (1)"]["section sizes"] == {
        name: f"0x{pages * PAGE_SIZE:016x}" for name, pages in Q35_BLOCKS}


def test_analyzer_desc_is_qemus_shape_with_ours_beside(shm, tmp_path):
    image = tmp_path / "vm.img"
    save_q35(shm, image, description={"note": "hello"})
    desc = json.loads(analyze(image, tmp_path, "-d", "desc"))
    assert (desc["page_size"], desc["devices"]) == (PAGE_SIZE, [])
    assert desc["configuration"]["fields"][1] == {"name": "name", "type": "buffer",
                                                  "size": len("pc-q35-10.0")}
    ours = desc["parallel_save"]
    assert (ours["machine"], ours["user"]) == ("pc-q35-10.0", {"note": "hello"})
    assert [b["name"] for b in ours["blocks"]] == [name for name, _ in Q35_BLOCKS]
    with ps.open_image(image) as opened:
        assert opened.description == desc


def test_description_length_never_holds_the_brace_the_analyzer_looks_for(shm, tmp_path):
    """The analyzer takes the first '{' after the file's last NUL as the
    JSON's start; a length byte 0x7b would be taken for it."""
    layout = plan_layout([("ram0", PAGE_SIZE)])
    lengths = set()
    for pad in range(600):
        tail = encode_tail(layout, 0, {"pad": "x" * pad})
        length = tail[18 + 2:18 + 6]  # after the END, EOF and VMDESCRIPTION
        assert b"{" not in length, pad
        lengths.add(int.from_bytes(length, "big") & 0xFF)
    assert 0x7C in lengths and 0x7A in lengths  # the range did cross 0x7b

    # A whole image whose unpadded description would be 0x?7b bytes long.
    first = tmp_path / "first.img"
    save_q35(shm, first, description={"pad": ""})
    with ps.open_image(first) as opened:
        unpadded = len(json.dumps(opened.description, sort_keys=True))
    pad = (0x7B - unpadded) % 256 or 256
    image = tmp_path / "vm.img"
    ram = save_q35(shm, image, description={"pad": "x" * pad})
    with ps.open_image(image) as opened:
        assert len(json.dumps(opened.description, sort_keys=True)) & 0xFF == 0x7B
    out = tmp_path / "extracted"
    out.mkdir()
    analyze(image, out, "-x")
    assert (out / "pc.ram").read_bytes() == ram["pc.ram"]


def test_image_with_the_older_description_still_opens_and_inspects(shm, tmp_path, capsys):
    """Before the description took QEMU's shape, it was only our key."""
    image = tmp_path / "old.img"
    ram = save_q35(shm, image)
    with ps.open_image(image) as opened:
        ours = opened.description["parallel_save"]
        passes = opened.info.passes
        json_at = opened.info.layout.tail_offset + 18 * (passes + 1) + 6
    old = json.dumps({"parallel_save": ours}, sort_keys=True).encode()
    with open(image, "r+b") as f:
        f.seek(json_at - 4)
        f.write(len(old).to_bytes(4, "big") + old)
        f.truncate()
    with ps.open_image(image) as opened:
        assert opened.description == {"parallel_save": ours}
        assert {n: opened.read_block(n).tobytes() for n in opened.blocks} == ram
    assert cli_main(["inspect", str(image), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["description"], shown["qemu_description"]) == (ours, False)
    assert np.frombuffer(ram["pc.ram"], np.uint8).any()
