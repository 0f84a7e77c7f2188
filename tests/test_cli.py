"""The ``parallel-save`` command: what a user types, what they get back.

Most tests call ``main(argv)`` in-process (fast); the ones about the real
command (the round trip, no traceback, Ctrl-C, the terminal progress bar,
the demo) run ``python -m parallel_save`` as a subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import sysconfig
import termios
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from qemu_support import load_into_qemu, require_mapped_ram_qemu, zero_file

import parallel_save as ps
from bench.qemu import QemuVM
from parallel_save.cli import ProgressBar, block_file_name, main
from parallel_save.format import PAGE_SIZE, encode_setup, encode_tail, plan_layout

PAGES = 256  # 1 MiB blocks: every behaviour here shows at this size


def run(*args: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "parallel_save", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=timeout)


def cli(capsys, *args: str | os.PathLike) -> tuple[int, str, str]:
    """The command in-process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def failure(status: int, message: str) -> tuple[int, str, str]:
    """What a failed command gives: its status, no output, one line on stderr."""
    return status, "", f"parallel-save: error: {message}\n"


def spec(block: ps.RamBlock) -> str:
    return f"{block.name}={block.source.path}"


def file_array(path: str | os.PathLike) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def touch_page(path: str, page: int) -> None:
    """Flip one byte of a page in a block's file."""
    with open(path, "r+b") as f:
        f.seek(page * PAGE_SIZE + 100)
        byte = f.read(1)[0]
        f.seek(page * PAGE_SIZE + 100)
        f.write(bytes([byte ^ 0xFF]))


@pytest.fixture
def ram(shm) -> ps.RamBlock:
    """A block file, half of its pages zero."""
    return shm.block("ram0", PAGES, fill=0.5, seed=7)


@pytest.fixture
def image(ram, tmp_path) -> Path:
    """An image of ``ram`` saved by the command."""
    path = tmp_path / "vm.img"
    assert main(["save", str(path), "--block", spec(ram), "--quiet"]) == 0
    return path


def incomplete_image(path: Path, block: ps.RamBlock) -> Path:
    """What a save in place that stopped after its first pass leaves behind."""
    saver = ps.Saver(path, [block], channels=2, in_place=True)
    with saver:
        saver.setup()
        saver.iterate()
    return path


# --- the round trip ---


def test_save_inspect_verify_restore_round_trip_gives_back_every_byte(shm, tmp_path):
    ram = shm.block("ram0", PAGES, fill=0.5, seed=1)
    rom = shm.block("/rom@etc/acpi/tables", 8, fill=0.0, seed=2)
    image = tmp_path / "vm.img"
    saved = run("save", image, "--block", spec(ram), "--block", spec(rom), "--channels", "3")
    assert (saved.returncode, saved.stderr) == (0, "")
    inspected = run("inspect", image, "--json")
    assert inspected.returncode == 0
    assert [b["name"] for b in json.loads(inspected.stdout)["blocks"]] == [ram.name, rom.name]
    verified = run("verify", image, "--block", spec(ram), "--block", spec(rom))
    assert (verified.returncode, verified.stdout) == (
        0, f"{image} matches the sources: 2 block(s), {PAGES + 8} pages equal\n")
    restored = run("restore", image, "--outdir", tmp_path / "out")
    assert (restored.returncode, restored.stderr) == (0, "")
    assert np.array_equal(file_array(tmp_path / "out" / "ram0"), ram.array)
    assert np.array_equal(file_array(tmp_path / "out" / "%2From@etc%2Facpi%2Ftables"),
                          rom.array)


def test_console_script_runs_the_command():
    # The script installed for this interpreter, wherever PATH points.
    script = shutil.which("parallel-save", path=os.pathsep.join(
        [sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    checkout = Path(__file__).resolve().parent.parent
    if script is None and Path(ps.__file__).resolve().is_relative_to(checkout):
        pytest.skip("the tests run against the checkout, not an installed parallel-save")
    assert script is not None, "the parallel-save console script is not installed"
    found = subprocess.run([script, "--version"], check=False, capture_output=True,
                           text=True, timeout=60)
    assert (found.returncode, found.stdout) == (0, f"parallel-save {ps.__version__}\n")


# --- save ---


def test_save_prints_a_one_line_summary(capsys, ram, tmp_path):
    status, out, err = cli(capsys, "save", tmp_path / "vm.img", "--block", spec(ram))
    zero = PAGES - int(ram.array.reshape(PAGES, -1).any(axis=1).sum())
    assert (status, err) == (0, "")
    assert re.fullmatch(rf"saved {tmp_path}/vm.img: {PAGES} pages \({PAGES - zero} written, "
                        rf"{zero} zero\), [0-9.]+ (KiB|MiB) written in [0-9.]+ s, "
                        rf"[0-9.]+ GB/s\n", out), out


def test_save_quiet_prints_nothing(capsys, ram, tmp_path):
    assert cli(capsys, "save", tmp_path / "vm.img", "--block", spec(ram), "--quiet") == (0, "", "")


def test_save_json_reports_pages_and_blocks(capsys, ram, tmp_path):
    status, out, _ = cli(capsys, "save", tmp_path / "vm.img", "--block", spec(ram), "--json")
    data = json.loads(out)
    assert status == 0
    assert data["blocks"] == [{"name": "ram0", "path": ram.source.path,
                               "length": PAGES * PAGE_SIZE}]
    assert data["pages_written"] + data["zero_pages"] == PAGES
    assert data["status"] == "completed"


def test_save_machine_preset_writes_qemus_full_machine_name(capsys, ram, tmp_path):
    image = tmp_path / "vm.img"
    assert cli(capsys, "save", image, "--block", spec(ram), "--machine", "q35", "--quiet")[0] == 0
    with ps.open_image(image) as opened:
        assert opened.machine == "pc-q35-10.0"


def test_save_and_restore_at_an_offset_keep_the_bytes_before_it(capsys, ram, tmp_path):
    image = tmp_path / "vm.img"
    image.write_bytes(b"header" * 100)
    assert cli(capsys, "save", image, "--block", spec(ram), "--offset", "4K", "--quiet")[0] == 0
    assert image.read_bytes()[:600] == b"header" * 100
    target = tmp_path / "ram0.out"
    status, _, _ = cli(capsys, "restore", image, "--block", f"ram0={target}", "--offset", "4096",
                       "--quiet")
    assert status == 0
    assert np.array_equal(file_array(target), ram.array)


def test_save_shows_a_progress_bar_on_a_terminal(shm, tmp_path):
    ram = shm.block("ram0", 4096, fill=0.5)
    controller, terminal = pty.openpty()
    # A terminal of 100 columns: a fresh pty has none, and tqdm draws nothing there.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "parallel_save", "save", str(tmp_path / "vm.img"),
             "--block", spec(ram)], stdout=subprocess.DEVNULL, stderr=terminal)
        os.close(terminal)
        shown = b""
        while True:
            ready, _, _ = select.select([controller], [], [], 60)
            try:
                chunk = os.read(controller, 4096) if ready else b""
            except OSError:  # EIO: the process closed the terminal
                chunk = b""
            if not chunk:
                break
            shown += chunk
        assert process.wait(60) == 0
    finally:
        os.close(controller)
    assert b"pass 1 (last): " in shown and b"B/s" in shown


def test_progress_bar_shows_every_phase_by_name_in_powers_of_1000(capsys):
    with ProgressBar(True) as bar:
        for phase, total in (("iterate", 2000), ("iterate", 30), ("complete", 5)):
            bar(phase, 0, total)
            bar(phase, total, total)
        for phase in ("sync", "rename", "a phase of the future"):
            bar(phase, 0, 1)
            bar(phase, 1, 1)
    shown = capsys.readouterr().err
    labels = ["pass 1: ", "pass 2: ", "pass 3 (last): ", "syncing the file: 0/1",
              "renaming the file into place: 0/1", "a phase of the future: 0/1"]
    assert [shown.find(label) for label in labels] == sorted(
        shown.find(label) for label in labels)
    assert -1 not in [shown.find(label) for label in labels]
    # 2000 pages are 8,192,000 bytes: 8.19 MB (10^6), as the summary's GB are 10^9.
    assert "/8.19M " in shown and "B/s" in shown


def test_progress_bar_starts_no_thread(capsys):
    """tqdm's monitor thread would outlive the bar, and a process with a
    thread starts the channels of its next save as new interpreters."""
    before = set(threading.enumerate())
    with ProgressBar(True) as bar:
        bar("iterate", 0, 100)
        bar("iterate", 50, 100)
        assert set(threading.enumerate()) == before
    assert set(threading.enumerate()) == before
    assert "pass 1: " in capsys.readouterr().err


# --- restore ---


def test_restore_block_overwrites_a_longer_file_with_exact_length(capsys, ram, image,
                                                                   tmp_path):
    target = tmp_path / "ram0.out"
    target.write_bytes(b"\xff" * (PAGES * PAGE_SIZE * 2))
    assert cli(capsys, "restore", image, "--block", f"ram0={target}", "--quiet")[0] == 0
    assert np.array_equal(file_array(target), ram.array)


def test_restore_writes_sparse_files(capsys, shm, tmp_path):
    ram = shm.block("ram0", 4096, fill=0.9, seed=3)
    image = tmp_path / "vm.img"
    assert cli(capsys, "save", image, "--block", spec(ram), "--quiet")[0] == 0
    target = tmp_path / "ram0.out"
    assert cli(capsys, "restore", image, "--block", f"ram0={target}", "--quiet")[0] == 0
    nonzero = int(ram.array.reshape(-1, PAGE_SIZE).any(axis=1).sum())
    assert os.stat(target).st_blocks * 512 <= 2 * nonzero * PAGE_SIZE


def test_restore_outdir_names_files_after_qemus_blocks(capsys, qemu_files, tmp_path):
    out = tmp_path / "out"
    status, text, _ = cli(capsys, "restore", qemu_files["q35_32_nomultifd.mig"],
                          "--outdir", out)
    assert status == 0
    assert sorted(os.listdir(out)) == ["%2From@etc%2Facpi%2Frsdp", "%2From@etc%2Facpi%2Ftables",
                                       "%2From@etc%2Ftable-loader", "pc.bios", "pc.ram",
                                       "pc.rom"]
    assert f"  '/rom@etc/acpi/tables' -> {out}/%2From@etc%2Facpi%2Ftables\n" in text
    assert np.array_equal(file_array(out / "pc.ram"), file_array(qemu_files["q35_32.ram"]))


@pytest.mark.parametrize("name, expected", [
    ("ram0", "ram0"), ("pc.ram", "pc.ram"), ("/rom@etc/acpi/tables", "%2From@etc%2Facpi%2Ftables"),
    (".", "%2E"), ("..", "%2E."), (".hidden", "%2Ehidden"), ("a%2Fb", "a%252Fb"),
    ("a b\n", "a%20b%0A"),
])
def test_block_file_name_is_a_safe_single_name(name, expected):
    assert block_file_name(name) == expected


def test_block_file_name_of_a_long_name_fits_and_stays_unique():
    first, second = "/" * 254 + "a", "/" * 254 + "b"
    assert len(block_file_name(first)) <= 255
    assert block_file_name(first) != block_file_name(second)


# --- inspect ---

INSPECT_KEYS = {"path", "machine", "start", "complete", "incomplete_reason", "iterations",
                "capabilities", "device_state", "file_size", "disk_usage", "ram_bytes", "pages",
                "pages_present", "pages_zero", "blocks", "description", "qemu_description",
                "container"}
BLOCK_KEYS = {"name", "length", "pages", "pages_present", "pages_zero", "record_offset",
              "bitmap_offset", "pages_offset"}


def test_inspect_json_has_stable_keys(capsys, ram, image):
    status, out, _ = cli(capsys, "inspect", image, "--json")
    data = json.loads(out)
    assert status == 0
    assert set(data) == INSPECT_KEYS
    assert [set(b) for b in data["blocks"]] == [BLOCK_KEYS]
    nonzero = int(ram.array.reshape(PAGES, -1).any(axis=1).sum())
    assert (data["complete"], data["pages"], data["pages_present"]) == (True, PAGES, nonzero)
    assert data["blocks"][0]["pages_offset"] == 1 << 20
    assert data["description"]["machine"] == "none"


def test_inspect_text_shows_machine_blocks_and_completeness(capsys, image):
    status, out, _ = cli(capsys, "inspect", image)
    assert status == 0
    assert "machine       none\n" in out
    assert "complete      yes\n" in out
    assert re.search(r"'ram0'\s+1048576\s+256\s+\d+\s+\d+\s+\d+\s+\d+\s+1048576\n", out), out


def test_inspect_reports_an_incomplete_image_and_why(capsys, ram, tmp_path):
    image = incomplete_image(tmp_path / "vm.img", ram)
    status, out, _ = cli(capsys, "inspect", image, "--json")
    data = json.loads(out)
    assert status == 0
    assert data["complete"] is False
    assert data["incomplete_reason"].endswith("the save did not complete")
    assert data["pages_present"] is None


def test_inspect_reads_an_image_qemu_wrote(capsys, qemu_files):
    status, out, _ = cli(capsys, "inspect", qemu_files["q35_32_nomultifd.mig"], "--json")
    data = json.loads(out)
    assert status == 0
    assert (data["machine"], data["device_state"], data["qemu_description"]) == (
        "pc-q35-10.0", True, True)
    assert len(data["blocks"]) == 6
    assert data["blocks"][0]["name"] == "pc.ram"
    assert data["blocks"][0]["pages_present"] == 5335


# --- verify ---


def test_verify_lists_the_differing_pages_and_exits_1(capsys, ram, image):
    present = np.flatnonzero(ram.array.reshape(PAGES, -1).any(axis=1))
    touch_page(ram.source.path, int(present[0]))
    touch_page(ram.source.path, int(present[5]))
    status, out, _ = cli(capsys, "verify", image, "--block", spec(ram))
    assert status == 1
    assert out == (f"{image} differs from the sources: 2 page(s) in 1 block(s)\n"
                   f"  block 'ram0': 2 page(s) differ: {present[0]}, {present[5]}\n")


def test_verify_sees_a_page_that_is_no_longer_zero(capsys, ram, image):
    zero = int(np.flatnonzero(~ram.array.reshape(PAGES, -1).any(axis=1))[0])
    touch_page(ram.source.path, zero)
    status, out, _ = cli(capsys, "verify", image, "--block", spec(ram), "--json")
    assert status == 1
    assert json.loads(out)["blocks"]["ram0"]["first_differing"] == [zero]


def test_verify_caps_the_listed_pages(capsys, ram, image):
    for page in range(25):
        touch_page(ram.source.path, page)
    status, out, _ = cli(capsys, "verify", image, "--block", spec(ram))
    assert status == 1
    assert out.endswith(": 25 page(s) differ: " + ", ".join(map(str, range(20)))
                        + ", ... and 5 more\n")


# --- errors: one line on stderr, the right status, no traceback ---


def test_missing_block_file_is_an_error(capsys, tmp_path):
    missing = tmp_path / "nope"
    assert cli(capsys, "save", tmp_path / "vm.img", "--block", f"ram0={missing}") == failure(
        1, f"block 'ram0': cannot open {missing}: No such file or directory")


def test_block_without_a_path_is_a_usage_error(capsys, tmp_path):
    assert cli(capsys, "save", tmp_path / "vm.img", "--block", "ram0") == failure(
        2, "argument --block: expected NAME=PATH, got 'ram0'")


def test_block_file_not_a_page_multiple_is_an_error(capsys, tmp_path):
    odd = tmp_path / "odd.ram"
    odd.write_bytes(b"x" * 5000)
    assert cli(capsys, "save", tmp_path / "vm.img", "--block", f"ram0={odd}") == failure(
        1, f"block 'ram0': {odd} is 5000 bytes, not a positive multiple of the page size 4096")


def test_duplicate_block_name_is_a_usage_error(capsys, ram, tmp_path):
    assert cli(capsys, "save", tmp_path / "vm.img", "--block", spec(ram), "--block", spec(ram)
               ) == failure(2, "block 'ram0' is given twice")


def test_bad_channel_count_is_a_usage_error(capsys, ram, tmp_path):
    assert cli(capsys, "save", tmp_path / "vm.img", "--block", spec(ram), "--channels", "0"
               ) == failure(2, "argument --channels: expected an integer from 1 to 64, got '0'")


def test_missing_image_is_an_error(capsys, tmp_path):
    assert cli(capsys, "inspect", tmp_path / "nope.img") == failure(
        1, f"{tmp_path}/nope.img: no such image file")


def test_not_an_image_is_an_error_with_the_offset(capsys, tmp_path):
    other = tmp_path / "notes.txt"
    other.write_bytes(b"hello, world")
    assert cli(capsys, "inspect", other) == failure(
        1, f"{other}, offset 0 (0x0): not a QEMU migration stream (magic QEVM) nor a libvirt "
           "save file (LibvirtQemudSave): it starts with 68 65 6c 6c 6f 2c 20 77 6f 72 6c 64 "
           "('hello, world'). If the stream starts further in, give its offset "
           "(--offset N, or start=N)")


def test_restore_refuses_an_incomplete_image(capsys, ram, tmp_path):
    image = incomplete_image(tmp_path / "vm.img", ram)
    status, out, err = cli(capsys, "restore", image, "--outdir", tmp_path / "out")
    assert (status, out) == (1, "")
    assert re.fullmatch(rf"parallel-save: error: {image}, offset \d+ \(0x[0-9a-f]+\): the RAM "
                        rf"section has no END \(the stream stops at \d+\): the save did not "
                        rf"complete\n", err), err
    assert not (tmp_path / "out").exists()


def test_restore_refuses_missing_and_extra_blocks_before_writing(capsys, image, tmp_path):
    assert cli(capsys, "restore", image, "--block", f"rom={tmp_path}/rom") == failure(
        1, f"{image} holds blocks 'ram0'; no --block for 'ram0'; not in the image: 'rom'")
    assert not (tmp_path / "rom").exists()


def test_restore_refuses_to_overwrite_the_image(capsys, image):
    assert cli(capsys, "restore", image, "--block", f"ram0={image}") == failure(
        1, f"block 'ram0' would overwrite the image {image}")


def test_restore_needs_blocks_or_outdir(capsys, image):
    assert cli(capsys, "restore", image) == failure(
        2, "one of the arguments --block --outdir is required")


def test_unknown_command_is_a_usage_error(capsys):
    status, _, err = cli(capsys, "frobnicate")
    assert status == 2
    assert err.startswith("parallel-save: error: argument COMMAND: invalid choice: 'frobnicate'")


def test_status_of_no_running_save_is_an_error(capsys):
    name = f"ps-test-{uuid.uuid4().hex}"
    assert cli(capsys, "status", name) == failure(
        1, f"no status board named '{name}' (is the save running?)")


def test_direct_io_on_a_file_system_without_it_is_an_error(capsys, ram, ramfs):
    image = ramfs / "vm.img"
    assert cli(capsys, "save", image, "--block", spec(ram), "--direct-io") == failure(
        1, f"{image}: cannot open with O_DIRECT (--direct-io): Invalid argument")
    assert os.listdir(ramfs) == []


def test_the_real_command_prints_no_traceback(tmp_path):
    done = run("inspect", tmp_path / "nope.img")
    assert (done.returncode, done.stdout, done.stderr) == failure(
        1, f"{tmp_path}/nope.img: no such image file")


def test_debug_adds_the_traceback(tmp_path):
    done = run("inspect", tmp_path / "nope.img", "--debug")
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert done.stderr.endswith(f"parallel-save: error: {tmp_path}/nope.img: no such image file\n")


def sparse_image(path: Path, blocks: int) -> Path:
    """An image of ``blocks`` one-page blocks, all zero: a few KiB of data
    in a sparse file, written by the format layer."""
    layout = plan_layout([(f"ram{i}", PAGE_SIZE) for i in range(blocks)])
    with open(path, "wb") as f:
        for offset, data in encode_setup(layout):
            f.seek(offset)
            f.write(data)
        f.seek(layout.tail_offset)
        f.write(encode_tail(layout, 1, {}))
    return path


def signalled(tmp_path: Path, signum: int) -> tuple[int, str]:
    """Send ``signum`` to the command while it is surely inside its work:
    its stdout is a pipe filled to the brim beforehand, so printing the
    JSON of a 100-block image (more than the 8 KiB stdio buffer) blocks in
    the kernel until the pipe is read, which only happens after the signal.
    Returns (status, stderr)."""
    image = sparse_image(tmp_path / "vm.img", 100)
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    try:
        while True:
            os.write(writer, bytes(PAGE_SIZE))
    except BlockingIOError:
        pass
    os.set_blocking(writer, True)
    with open(reader, "rb") as out:
        process = subprocess.Popen([sys.executable, "-m", "parallel_save", "inspect",
                                    str(image), "--json"], stdout=writer,
                                   stderr=subprocess.PIPE, text=True)
        os.close(writer)
        deadline = time.monotonic() + 60
        wchan = Path(f"/proc/{process.pid}/wchan")
        while "pipe_write" not in wchan.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signum)
        out.read()  # drained to the end: the command's exit flushes what it holds
        err = process.stderr.read()
        process.wait(timeout=60)
        process.stderr.close()
    return process.returncode, err


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    assert signalled(tmp_path, signal.SIGINT) == (130, "parallel-save: interrupted\n")


def test_sigterm_exits_143_with_one_line(tmp_path):
    assert signalled(tmp_path, signal.SIGTERM) == (143, "parallel-save: stopped by SIGTERM\n")


# --- demo, status ---


def test_demo_saves_restores_and_checks_then_cleans_up(tmp_path):
    done = run("demo", "--size", "4M", "--channels", "2", "--dir", tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.endswith("  check    the restored block equals the source\n")
    ram_dir = re.search(r"^  RAM +(\S+)$", done.stdout, re.MULTILINE)[1]
    assert not os.path.exists(ram_dir)
    assert os.listdir(tmp_path) == []


def test_demo_size_not_a_page_multiple_is_a_usage_error(capsys):
    assert cli(capsys, "demo", "--size", "5000") == failure(
        2, "argument --size: 5000 is not a positive multiple of the page size 4096")


def test_status_shows_a_running_saves_board(ram, tmp_path):
    name = f"ps-test-{uuid.uuid4().hex}"
    with ps.Saver(tmp_path / "vm.img", [ram], channels=2, status_board=name) as saver:
        saver.setup()
        saver.iterate()
        # Another process observes, as a user's second terminal would.
        shown = run("status", name, "--json")
        saver.complete()
    assert (shown.returncode, shown.stderr) == (0, "")
    board = json.loads(shown.stdout)
    assert (board["path"], board["phase"]) == (str(tmp_path / "vm.img"), "iterate")
    assert board["pass_pages_done"] == board["pass_pages"] == PAGES


def test_bench_is_not_a_command_of_the_installed_tool(capsys):
    # The benchmarks are a tool of the repository (python -m bench), not shipped.
    assert cli(capsys, "bench", "--help") == failure(
        2, "argument COMMAND: invalid choice: 'bench' (choose from 'save', 'restore', "
        "'inspect', 'verify', 'demo', 'status', 'checkpoint', 'clean')")


# --- QEMU loads what the command writes ---


@pytest.mark.qemu
def test_qemu_loads_an_image_the_command_saved(shm, tmp_path):
    require_mapped_ram_qemu()
    size = 8 << 20
    guest = shm.block("ram0", size // PAGE_SIZE, fill=0.5, seed=11)
    image = tmp_path / "vm.img"
    saved = run("save", image, "--block", spec(guest), "--machine", "none", "--quiet")
    assert (saved.returncode, saved.stderr) == (0, "")
    loaded = zero_file(tmp_path / "loaded.ram", size)
    with QemuVM(loaded, size, machine="none", incoming=True) as vm:
        load_into_qemu(vm, image)
    assert np.array_equal(file_array(loaded), guest.array)


# --- a shared machine ---


def test_save_creates_the_image_0600_and_mode_widens_it(capsys, ram, tmp_path):
    assert cli(capsys, "save", tmp_path / "a.img", "--block", spec(ram), "--quiet")[0] == 0
    assert stat.S_IMODE((tmp_path / "a.img").stat().st_mode) == 0o600
    assert cli(capsys, "save", tmp_path / "b.img", "--block", spec(ram), "--quiet",
               "--mode", "640")[0] == 0
    assert stat.S_IMODE((tmp_path / "b.img").stat().st_mode) == 0o640


def test_save_refuses_a_mode_that_is_not_octal(capsys, ram, tmp_path):
    status, out, err = cli(capsys, "save", tmp_path / "a.img", "--block", spec(ram),
                           "--mode", "rw-r--r--")
    assert (status, out) == (2, "")
    assert ("argument --mode: expected an octal mode from 0 to 777, such as 600 or 640, "
            "got 'rw-r--r--'") in err
    assert not (tmp_path / "a.img").exists()


def test_save_refuses_a_symlink_unless_asked_to_follow_it(capsys, ram, tmp_path):
    real, link = tmp_path / "real.img", tmp_path / "vm.img"
    link.symlink_to(real)
    assert cli(capsys, "save", link, "--block", spec(ram)) == failure(
        1, f"{link}: is a symbolic link; refused (give follow_symlinks=True, "
           f"--follow-symlinks, to save where it leads)")
    assert not real.exists()
    assert cli(capsys, "save", link, "--block", spec(ram), "--quiet",
               "--follow-symlinks")[0] == 0
    assert link.is_symlink() and real.is_file()


def test_clean_removes_a_dead_saves_partial_image(capsys, tmp_path):
    process = subprocess.run(["true"], check=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = tmp_path / f".vm.img.{dead.pid}-0badcafe.partial"
    partial.write_bytes(b"pages of a killed save")
    status, out, _ = cli(capsys, "clean", tmp_path, "--dry-run")
    assert (status, partial.exists()) == (0, True)
    assert f"would remove {partial}" in out.splitlines()
    status, out, _ = cli(capsys, "clean", tmp_path)
    assert (status, partial.exists()) == (0, False)
    assert f"removed {partial}" in out.splitlines()
    assert process.returncode == 0


def test_clean_of_a_missing_directory_is_an_error(capsys, tmp_path):
    assert cli(capsys, "clean", tmp_path / "nowhere") == failure(
        1, f"{tmp_path / 'nowhere'}: no such directory")


# --- checkpoints ---


def test_checkpoint_count_then_restore_the_directory_picks_the_newest(capsys, ram, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    status, out, _ = cli(capsys, "checkpoint", directory, "--block", spec(ram), "--count", "3",
                         "--every", "0", "--channels", "2")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 3
    assert re.fullmatch(r"checkpoint 3 -> checkpoint-a\.img: \d+ pages written, \d+ zero, "
                        r"\d+ unchanged, .* in \d+\.\d\d s", lines[2]), lines[2]
    assert re.search(r" 0 pages written, 0 zero, 256 unchanged", lines[2])  # nothing changed
    status, out, _ = cli(capsys, "restore", directory, "--outdir", tmp_path / "out")
    assert status == 0
    assert out.splitlines()[0] == f"restoring checkpoint 3: {directory / 'checkpoint-a.img'}"
    assert (tmp_path / "out" / "ram0").read_bytes() == bytes(ram.array)


def test_checkpoint_stops_on_ctrl_c_after_the_checkpoint_in_flight(ram, tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "parallel_save", "checkpoint", directory,
                                "--block", spec(ram), "--every", "0.05", "--channels", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        ram.array[:PAGE_SIZE] = 5  # a change the next checkpoints pick up
        while not re.search(r"^checkpoint [4-9]", process.stdout.readline()):
            pass
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert first.startswith("checkpoint 1 -> checkpoint-a.img:")
    assert process.returncode == 0
    assert re.fullmatch(r"stopped after \d+ checkpoint\(s\)\n", err), err
    path, generation = ps.latest_checkpoint(directory)
    with ps.open_image(path) as image:
        assert np.array_equal(image.read_block("ram0"), ram.array)
    assert generation >= 4


def test_checkpoint_into_a_missing_directory_is_an_error(capsys, ram, tmp_path):
    assert cli(capsys, "checkpoint", tmp_path / "nowhere", "--block", spec(ram)) == failure(
        1, f"{tmp_path / 'nowhere'}: no such directory for checkpoints")
