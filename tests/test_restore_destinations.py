"""Where ``parallel-save restore`` writes (issue 15, items 4, 5, 9, 12 and
the full disk): never through a link it did not expect, files 0600, never
two blocks in one file, no directory created silently, a failed restore
undoes what it created and names what it changed, a full disk is named as
such.  And ``inspect`` prints what an image says without letting it drive
the terminal."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from conftest import mounted

import parallel_save as ps
from parallel_save.cli import _out_of_space, _undone, block_file_name, main
from parallel_save.outfiles import plan_paths

PAGES = 64


def cli(capsys, *args) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def error_line(message: str) -> str:
    return f"parallel-save: error: {message}\n"


@pytest.fixture
def ram(shm) -> ps.RamBlock:
    return shm.block("ram0", PAGES, fill=0.25, seed=5)


@pytest.fixture
def image(ram, tmp_path) -> Path:
    path = tmp_path / "vm.img"
    ps.save(path, [ram], channels=2)
    return path


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file another user wants overwritten: it must stay as it is."""
    path = tmp_path / "victim"
    path.write_bytes(b"precious")
    return path


def restored(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


# --- symbolic links ---


def test_outdir_file_planted_as_a_symlink_is_refused(capsys, image, victim, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ram0").symlink_to(victim)
    assert cli(capsys, "restore", image, "--outdir", out) == (1, "", error_line(
        f"{out}/ram0: is a symbolic link (refused: pass --follow-symlinks to write "
        f"through it)"))
    assert victim.read_bytes() == b"precious"


def test_follow_symlinks_writes_through_the_link(capsys, image, ram, victim, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ram0").symlink_to(victim)
    assert cli(capsys, "restore", image, "--outdir", out, "--follow-symlinks",
               "--quiet")[0] == 0
    assert np.array_equal(restored(victim), ram.array)


def test_outdir_that_is_a_symlink_is_refused(capsys, image, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").symlink_to(elsewhere)
    assert cli(capsys, "restore", image, "--outdir", tmp_path / "out") == (1, "", error_line(
        f"{tmp_path}/out: is a symbolic link (refused: pass --follow-symlinks to write "
        f"through it)"))
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("dangling", [False, True])
def test_block_path_that_is_a_symlink_is_refused(capsys, image, victim, tmp_path, dangling):
    link = tmp_path / "ram0.out"
    link.symlink_to(tmp_path / "missing" if dangling else victim)
    assert cli(capsys, "restore", image, "--block", f"ram0={link}") == (1, "", error_line(
        f"{link}: is a symbolic link (refused: pass --follow-symlinks to write through it)"))
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "missing").exists()


def test_block_path_that_is_a_fifo_is_refused_at_once(capsys, image, tmp_path):
    fifo = tmp_path / "ram0.out"
    os.mkfifo(fifo)
    assert cli(capsys, "restore", image, "--block", f"ram0={fifo}") == (
        1, "", error_line(f"{fifo}: not a regular file: a FIFO"))


# --- modes ---


def test_files_are_created_0600_whatever_the_umask(capsys, image, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli(capsys, "restore", image, "--outdir", tmp_path / "out", "--quiet")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "ram0").st_mode) == 0o600


def test_mode_option_sets_the_mode_exactly(capsys, image, tmp_path):
    old = os.umask(0o077)
    try:
        assert cli(capsys, "restore", image, "--block", f"ram0={tmp_path}/r", "--mode", "640",
                   "--quiet")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r").st_mode) == 0o640


def test_mode_option_must_be_octal(capsys, image, tmp_path):
    assert cli(capsys, "restore", image, "--outdir", tmp_path, "--mode", "9") == (
        2, "", error_line("argument --mode: expected an octal mode from 0 to 777, such as "
                          "600 or 640, got '9'"))


def test_existing_file_keeps_its_mode(capsys, image, ram, tmp_path):
    target = tmp_path / "r"
    target.write_bytes(b"old")
    target.chmod(0o640)
    assert cli(capsys, "restore", image, "--block", f"ram0={target}", "--quiet")[0] == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert np.array_equal(restored(target), ram.array)


# --- one block, one file ---


def test_block_file_names_crafted_to_collide_stay_distinct():
    """Before, a long name was cut and suffixed "-" + hash: a second block
    named exactly that took the same file."""
    long = "a" * 250
    crafted = "a" * 180 + "-" + hashlib.sha256(long.encode()).hexdigest()[:16]
    assert block_file_name(long) != block_file_name(crafted)
    assert block_file_name(crafted) == crafted
    assert block_file_name("%") == "%25"


def test_restore_of_blocks_crafted_to_collide_writes_two_files(capsys, shm, tmp_path):
    long = "a" * 250
    crafted = "a" * 180 + "-" + hashlib.sha256(long.encode()).hexdigest()[:16]
    first = shm.block(long, 4, fill=0.0, seed=1)
    second = shm.block(crafted, 4, fill=0.0, seed=2)
    path = tmp_path / "vm.img"
    ps.save(path, [first, second], channels=2)
    out = tmp_path / "out"
    assert cli(capsys, "restore", path, "--outdir", out, "--quiet")[0] == 0
    assert len(os.listdir(out)) == 2
    assert np.array_equal(restored(out / block_file_name(long)), first.array)
    assert np.array_equal(restored(out / block_file_name(crafted)), second.array)


def test_block_paths_hard_linked_to_each_other_are_refused(capsys, shm, tmp_path):
    ram, rom = shm.block("ram0", 4, fill=0.0), shm.block("rom", 4, fill=0.0, seed=3)
    path = tmp_path / "vm.img"
    ps.save(path, [ram, rom], channels=2)
    one, other = tmp_path / "one", tmp_path / "other"
    one.write_bytes(b"old")
    os.link(one, other)
    assert cli(capsys, "restore", path, "--block", f"ram0={one}", "--block",
               f"rom={other}") == (1, "", error_line(
                   f"blocks 'ram0' and 'rom' would both be written to one file ({one} and "
                   f"{other})"))
    assert one.read_bytes() == b"old"


def test_two_spellings_of_one_new_path_are_refused(capsys, shm, tmp_path):
    ram, rom = shm.block("ram0", 4, fill=0.0), shm.block("rom", 4, fill=0.0, seed=3)
    path = tmp_path / "vm.img"
    ps.save(path, [ram, rom], channels=2)
    status, _, err = cli(capsys, "restore", path, "--block", f"ram0={tmp_path}/x",
                         "--block", f"rom={tmp_path}/./x")
    assert (status, err) == (1, error_line(
        f"blocks 'ram0' and 'rom' would both be written to one file ({tmp_path}/x and "
        f"{tmp_path}/./x)"))
    assert not (tmp_path / "x").exists()


# --- directories ---


def test_missing_directory_of_a_block_path_is_not_created(capsys, image, tmp_path):
    target = tmp_path / "no" / "such" / "ram0"
    assert cli(capsys, "restore", image, "--block", f"ram0={target}") == (1, "", error_line(
        f"{target}: no such directory {tmp_path}/no/such (directories are not created)"))
    assert not (tmp_path / "no").exists()


def test_outdir_whose_parent_is_missing_is_not_created(capsys, image, tmp_path):
    out = tmp_path / "no" / "out"
    assert cli(capsys, "restore", image, "--outdir", out) == (1, "", error_line(
        f"{out}: no such directory {tmp_path}/no (directories are not created, except the "
        f"output directory itself)"))
    assert not (tmp_path / "no").exists()


def test_outdir_created_is_said(capsys, image, tmp_path):
    status, out, _ = cli(capsys, "restore", image, "--outdir", tmp_path / "out")
    assert status == 0
    assert out.startswith(f"created the directory {tmp_path}/out (mode 0700)\n")
    status, out, _ = cli(capsys, "restore", image, "--outdir", tmp_path / "out", "--json")
    assert json.loads(out)["created_directory"] is None


# --- a full disk, a failed restore ---


def test_restore_that_cannot_fit_is_refused_before_any_file_is_touched(capsys, shm, tmp_path):
    ram = shm.block("ram0", 1024, fill=0.0, seed=4)  # 4 MiB of non-zero pages
    path = tmp_path / "vm.img"
    ps.save(path, [ram], channels=2)
    with mounted(tmp_path / "small", "tmpfs", "size=1m") as small:
        status, out, err = cli(capsys, "restore", path, "--outdir", small / "out")
        assert (status, out) == (1, "")
        assert err.startswith(error_line(f"no space left for the restore: {small}/out/ram0 "
                                         f"need up to 4.0 MiB, their file system has")[:-1])
        assert os.listdir(small) == []


def test_disk_filled_during_a_restore_is_named_and_created_files_removed(shm, tmp_path):
    """The disk fills after the check (another writer): the channel's
    EFAULT or SIGBUS is reported as no space on the destination, the file
    the restore created is removed, the one that existed is named."""
    ram = shm.block("ram0", 512, fill=0.0, seed=6)
    rom = shm.block("rom", 4, fill=0.0, seed=7)
    path = tmp_path / "vm.img"
    ps.save(path, [ram, rom], channels=2)
    with mounted(tmp_path / "small", "tmpfs", "size=4m") as small:
        existing = small / "rom"
        existing.write_bytes(b"old")
        plan = plan_paths({"ram0": small / "ram0", "rom": existing},
                          {"ram0": ram.length, "rom": rom.length})
        plan.open()
        with open(small / "filler", "wb") as filler:  # the other writer
            with pytest.raises(OSError) as full:
                while True:
                    filler.write(bytes(1 << 20))
                    filler.flush()
            assert full.value.errno == errno.ENOSPC
        blocks = plan.blocks()
        with pytest.raises(ps.ParallelSaveError) as caught:
            ps.restore(path, blocks, channels=2, assume_zero=True)
        del blocks
        translated = _out_of_space(caught.value, plan)
        assert translated is not None, caught.value
        assert str(translated).startswith(f"{small}/ram0: no space left on its file system")
        assert str(translated).endswith("while block 'ram0' was restored into it; the image "
                                        "is not at fault")
        assert _undone(plan) == (f"removed the files it created: {small}/ram0; these files "
                                 f"existed and now hold an incomplete restore (their old "
                                 f"contents are gone): {existing}")
        assert sorted(os.listdir(small)) == ["filler", "rom"]


# --- inspect prints untrusted text safely ---


def test_inspect_escapes_terminal_controls_from_the_image(capsys, shm, tmp_path):
    evil = "\x1b]0;pwned\x07\x1b[2J"
    ram = shm.block("ram0" + evil, 4, fill=0.0)
    path = tmp_path / "vm.img"
    with ps.Saver(path, [ram], channels=1, machine="pc" + evil) as saver:
        saver.setup()
        saver.complete()
    status, out, _ = cli(capsys, "inspect", path)
    assert status == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "machine       pc\\x1b]0;pwned\\x07\\x1b[2J\n" in out
    assert "'ram0\\x1b]0;pwned\\x07\\x1b[2J'" in out
    status, out, _ = cli(capsys, "inspect", path, "--json")
    data = json.loads(out)
    assert (data["machine"], data["blocks"][0]["name"]) == ("pc" + evil, "ram0" + evil)
    assert "\x1b" not in out


def test_outdir_file_planted_by_another_user_is_refused(capsys, image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    planted = out / "ram0"
    planted.write_bytes(b"theirs")
    os.chown(planted, 65534, 65534)
    assert cli(capsys, "restore", image, "--outdir", out) == (1, "", error_line(
        f"{planted}: exists and belongs to user 65534, who could read what is restored into "
        f"it (refused: remove it, or pass --follow-symlinks to write into it anyway)"))
    assert planted.read_bytes() == b"theirs"


def test_outdir_file_hard_linked_elsewhere_is_refused(capsys, image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "copy"
    elsewhere.write_bytes(b"mine")
    os.link(elsewhere, out / "ram0")
    assert cli(capsys, "restore", image, "--outdir", out) == (1, "", error_line(
        f"{out}/ram0: exists with 2 hard links, which could be read elsewhere (refused: "
        f"remove it, or pass --follow-symlinks to write into it anyway)"))
    assert elsewhere.read_bytes() == b"mine"
