"""Every failure of a save or restore is loud, prompt and harmless.

Each fault here is provoked for real (a signal, a full or failing disk, a
file that changes under the save) and each test checks the error (type and
words), the cleanup (no channel process, no control segment: conftest's
autouse fixture; no file descriptor: compared here) and what is left at the
image's path: an older image, byte for byte, or an image that
``open_image`` reports as incomplete.  Hostile files for the reader are
test_format_fuzz.py's business.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import channel_processes, mounted
from test_engine import open_fds

import parallel_save as ps
from parallel_save.control import CHUNK_PAGES, SHARD_CHUNKS
from parallel_save.format import PAGE_SIZE
from parallel_save.signals import signals_deferred

# A dead channel must be reported within this many seconds.
PROMPT = 5.0
# What a failed save may leave allocated: its headers.
HEADER_MARGIN = 64 << 10


def run_as_root(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def files_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def assert_incomplete(path) -> None:
    with pytest.raises(ps.IncompleteImageError, match="did not complete"):
        ps.open_image(path)


def kill_mid_pass(saver: ps.Saver, channel: int) -> dict[str, float]:
    """Arrange for channel ``channel`` to be SIGKILLed in the middle of the
    saver's next pass: it is stopped now (so it cannot finish that pass)
    and killed from the pass's first progress report, while the
    coordinator waits for it.  Returns a dict that receives the kill time."""
    victim = saver._group.processes[channel].pid
    os.kill(victim, signal.SIGSTOP)
    killed: dict[str, float] = {}

    def on_progress(*progress) -> None:
        if not killed:
            killed["at"] = time.monotonic()
            os.kill(victim, signal.SIGKILL)

    saver.on_progress = on_progress
    return killed


def saved_image(shm, path: Path, pages: int = 256, seed: int = 99) -> bytes:
    """Save an image at ``path``; returns its bytes."""
    ps.save(path, [shm.block("old", pages, fill=0.5, seed=seed)], channels=2)
    return path.read_bytes()


# --- fixtures: real file systems that fail ---


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs: a disk that fills up."""
    with mounted(tmp_path / "small", "tmpfs", "size=4m") as mount_point:
        yield mount_point


@pytest.fixture
def read_only_fs(tmp_path):
    with mounted(tmp_path / "ro", "tmpfs", "ro,size=1m") as mount_point:
        yield mount_point


class FailingDisk:
    """ext4 on a loop device over a file; once the backing file is made
    immutable, every write reaching the device fails with EIO."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "disk.ext4"
        self.mount_point = root / "mnt"
        self.device = None

    def attach(self) -> str | None:
        """Set it up; returns why it cannot be, or None."""
        if shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
            return "losetup or mkfs.ext4 is missing"
        with open(self.backing, "wb") as backing:
            backing.truncate(64 << 20)
        done = run_as_root("mkfs.ext4", "-q", str(self.backing))
        if done.returncode:
            return f"mkfs.ext4 failed: {done.stderr.strip()}"
        done = run_as_root("losetup", "--show", "-f", str(self.backing))
        if done.returncode:
            return f"no loop device: {done.stderr.strip()}"
        self.device = done.stdout.strip()
        self.mount_point.mkdir()
        done = run_as_root("mount", self.device, str(self.mount_point))
        if done.returncode:
            return f"cannot mount {self.device}: {done.stderr.strip()}"
        return None

    def fail(self) -> None:
        done = run_as_root("chattr", "+i", str(self.backing))
        if done.returncode:
            pytest.skip(f"cannot make the loop device fail: {done.stderr.strip()}")

    def detach(self) -> None:
        run_as_root("chattr", "-i", str(self.backing))
        if (self.mount_point.is_mount()
                and run_as_root("umount", str(self.mount_point)).returncode):
            run_as_root("umount", "-l", str(self.mount_point))
        if self.device:
            run_as_root("losetup", "-d", self.device)


@pytest.fixture
def failing_disk(tmp_path):
    disk = FailingDisk(tmp_path)
    try:
        why = disk.attach()
        if why:
            pytest.skip(why)
        yield disk
    finally:
        disk.detach()


# --- a channel killed ---


def test_channel_killed_mid_pass_fails_the_pass_promptly(shm, tmp_path):
    block = shm.block("ram0", 2048, fill=0.3)
    before = open_fds()
    with ps.Saver(tmp_path / "vm.img", [block], channels=3) as saver:
        saver.setup()
        pids = [p.pid for p in saver._group.processes]
        killed = kill_mid_pass(saver, 1)
        with pytest.raises(ps.ChannelError) as caught:
            saver.iterate()
        failed_after = time.monotonic() - killed["at"]
        # The other channels are stopped as part of the failure, not at close.
        assert saver._group.processes == []
    assert caught.value.channel == 1
    assert str(caught.value) == "channel 1 failed: the process was killed by SIGKILL"
    assert failed_after < PROMPT
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    del caught  # its traceback holds the pass's frames, and they the control segment
    assert open_fds() <= before
    assert files_in(tmp_path) == []


def test_a_killed_process_fails_the_pass_naming_the_channels_it_hosted(shm, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "2")
    monkeypatch.setenv("PARALLEL_SAVE_START_METHOD", "fork")
    block = shm.block("ram0", 4096, fill=0.3)
    with ps.Saver(tmp_path / "vm.img", [block], channels=4) as saver:
        saver.setup()
        # Channels 1 and 3 are threads of one process.
        assert saver._group.processes[1] is saver._group.processes[3]
        pids = {p.pid for p in saver._group.processes}
        kill_mid_pass(saver, 3)
        with pytest.raises(ps.ChannelError) as caught:
            saver.iterate()
        assert saver._group.processes == []
    assert caught.value.channel in (1, 3)
    assert caught.value.cause == "the process of channels 1, 3 was killed by SIGKILL"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    del caught  # its traceback holds the pass's frames
    assert files_in(tmp_path) == []


def test_channel_killed_between_passes_fails_the_next_pass(shm, tmp_path):
    block = shm.block("ram0", 2048, fill=0.3)
    with ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver:
        saver.setup()
        saver.iterate()
        victim = saver._group.processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        with pytest.raises(ps.ChannelError, match=r"^channel 0 failed: the process was "
                                                  r"killed by SIGKILL$"):
            saver.iterate()
    assert files_in(tmp_path) == []


def test_channel_killed_during_complete_keeps_the_old_image(shm, tmp_path):
    path = tmp_path / "vm.img"
    old = saved_image(shm, path)
    block = shm.block("ram0", 2048, fill=0.3)
    with ps.Saver(path, [block], channels=2) as saver:
        saver.setup()
        saver.iterate()
        kill_mid_pass(saver, 0)
        with pytest.raises(ps.ChannelError, match="killed by SIGKILL"):
            saver.complete()
    assert path.read_bytes() == old
    assert files_in(tmp_path) == ["vm.img"]


def test_save_over_an_image_leaves_it_loadable_until_complete(shm, tmp_path):
    path = tmp_path / "vm.img"
    old = saved_image(shm, path)
    block = shm.block("ram0", 512, fill=0.5)
    with ps.Saver(path, [block], channels=2) as saver:
        saver.setup()
        saver.iterate()
        # The new image has no name until it is complete.
        assert files_in(tmp_path) == ["vm.img"]
        assert path.read_bytes() == old
        saver.complete()
    assert files_in(tmp_path) == ["vm.img"]
    with ps.open_image(path) as image:
        assert list(image.blocks) == ["ram0"]


def test_save_to_a_symbolic_link_is_refused_and_touches_nothing(shm, tmp_path):
    (tmp_path / "images").mkdir()
    real = tmp_path / "images" / "vm.img"
    old = saved_image(shm, real)
    link = tmp_path / "vm.img"
    link.symlink_to(real)
    with pytest.raises(ps.DestinationError, match=f"^{link}: is a symbolic link; refused"):
        ps.save(link, [shm.block("ram0", 512, fill=0.5)], channels=2)
    assert link.is_symlink() and real.read_bytes() == old
    assert files_in(tmp_path / "images") == ["vm.img"]


def test_save_follows_a_symbolic_link_when_asked(shm, tmp_path):
    (tmp_path / "images").mkdir()
    real = tmp_path / "images" / "vm.img"
    saved_image(shm, real)
    link = tmp_path / "vm.img"
    link.symlink_to(real)
    ps.save(link, [shm.block("ram0", 512, fill=0.5)], channels=2, follow_symlinks=True)
    assert link.is_symlink()
    with ps.open_image(real) as image:
        assert list(image.blocks) == ["ram0"]
    assert files_in(tmp_path / "images") == ["vm.img"]


def test_channel_killed_in_place_leaves_an_incomplete_image(shm, tmp_path):
    path = tmp_path / "vm.img"
    saved_image(shm, path)
    block = shm.block("ram0", 2048, fill=0.0)
    with ps.Saver(path, [block], channels=2, in_place=True) as saver:
        saver.setup()
        kill_mid_pass(saver, 1)
        with pytest.raises(ps.ChannelError, match="killed by SIGKILL"):
            saver.iterate()
    assert_incomplete(path)
    assert os.stat(path).st_blocks * 512 <= HEADER_MARGIN  # its pages are given back


def test_channel_killed_mid_restore_fails_the_restore(shm, tmp_path):
    # Every other page of the first shard present, read with O_DIRECT:
    # hundreds of milliseconds of reads for the channel that claims it.  The
    # other finds nothing to claim and answers at once; its answer wakes the
    # coordinator, whose progress report kills the channels: the reading
    # one in the middle of its reads.
    pages = 2 * SHARD_CHUNKS * CHUNK_PAGES
    block = shm.block("ram0", pages)
    index = np.arange(pages)
    block.array.reshape(-1, PAGE_SIZE)[(index < pages // 2) & (index % 2 == 0)] = 7
    path = tmp_path / "vm.img"
    ps.save(path, [block], channels=2)
    target = shm.block("ram0", pages)
    killed = {}

    def kill_channels(*progress) -> None:
        if not killed:
            killed["at"] = time.monotonic()
            for process in channel_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)

    with pytest.raises(ps.ChannelError, match=r"^channel [01] failed: the process was "
                                              r"killed by SIGKILL$"):
        ps.restore(path, [target], channels=2, direct_io=True, assume_zero=True,
                   on_progress=kill_channels)
    assert time.monotonic() - killed["at"] < PROMPT


# --- a channel that fails on its own ---


@pytest.mark.parametrize("lookahead", ["0", "1"], ids=["one-thread", "look-ahead"])
def test_channel_write_error_is_reported_with_its_cause(shm, tmp_path, monkeypatch,
                                                         lookahead):
    monkeypatch.setenv("PARALLEL_SAVE_LOOKAHEAD", lookahead)
    monkeypatch.setenv("PARALLEL_SAVE_CHANNEL_PROCESSES", "2")
    block = shm.block("ram0", 1024, fill=0.0)  # chunk 1 (channel 1) at 3..5 MiB
    path = tmp_path / "vm.img"
    with ps.Saver(path, [block], channels=2) as saver:
        saver.setup()
        # Files that channel 1 writes may not reach 2 MiB: EFBIG.
        resource.prlimit(saver._group.processes[1].pid, resource.RLIMIT_FSIZE,
                         (2 << 20, 2 << 20))
        with pytest.raises(ps.ChannelError) as caught:
            saver.iterate()
    assert caught.value.channel == 1
    assert caught.value.cause.startswith(f"{path}: File too large")
    assert files_in(tmp_path) == []  # no older image: nothing left


def test_block_file_truncated_under_a_save_is_reported(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.0)
    with ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver:
        saver.setup()
        os.truncate(block.source.path, 0)  # the channels' mappings lose their pages
        with pytest.raises(ps.ChannelError, match=f"{block.source.path}: the block's file "
                                                  f"was cut short under the save \\(0 bytes, "
                                                  f"its pages need 4194304\\)"):
            saver.iterate()
    assert files_in(tmp_path) == []


def test_block_file_truncated_before_setup_is_refused(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.0)
    os.truncate(block.source.path, 4096)
    with (ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver,
          pytest.raises(ps.BlockError, match=f"block 'ram0': its file {block.source.path} "
                                             f"is 4096 bytes, too short for 4194304 bytes "
                                             f"from offset 0")):
        saver.setup()
    assert files_in(tmp_path) == []


def test_block_file_removed_before_setup_is_refused(shm, tmp_path):
    block = shm.block("ram0", 1024, fill=0.0)
    os.unlink(block.source.path)
    with pytest.raises(ps.BlockError, match=f"its file {block.source.path} is gone"):
        ps.save(tmp_path / "vm.img", [block], channels=2)
    assert files_in(tmp_path) == []


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def file_flags(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]


def set_file_flags(fd: int, flags: int) -> None:
    """chattr on a descriptor: the image has no name to give chattr."""
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))


def test_image_made_immutable_mid_save_fails_and_says_what_is_left(shm, tmp_path):
    path = tmp_path / "vm.img"
    old = saved_image(shm, path)
    block = shm.block("ram0", 1024, fill=0.0)
    saver = ps.Saver(path, [block], channels=2)
    saver.setup()
    fd = saver._file.fd
    try:
        flags = file_flags(fd)
        set_file_flags(fd, flags | FS_IMMUTABLE_FL)
    except OSError as error:
        saver.close()
        pytest.skip(f"the immutable flag is not supported here: {error}")
    try:
        with pytest.raises(ps.ChannelError, match=f"{path}: Operation not permitted"):
            saver.iterate()
    finally:
        set_file_flags(fd, flags)
    saver.close()  # the unnamed file goes with its last descriptor
    assert path.read_bytes() == old
    assert files_in(tmp_path) == ["vm.img"]


# --- disks that fill up, vanish, refuse or fail ---


def test_disk_full_fails_with_enospc_and_gives_the_space_back(shm, small_tmpfs):
    block = shm.block("ram0", 2048, fill=0.0)  # 8 MiB of data for a 4 MiB disk
    source = block.array.copy()
    free_before = shutil.disk_usage(small_tmpfs).free
    path = small_tmpfs / "vm.img"
    before = open_fds()
    with ps.Saver(path, [block], channels=2) as saver:
        saver.setup()
        with pytest.raises(ps.ChannelError, match=f"{path}: No space left on device") \
                as caught:
            saver.iterate()
    assert caught.value.errno == errno.ENOSPC
    del caught  # its traceback holds the control segment's mapping
    assert open_fds() <= before
    assert np.array_equal(block.array, source)
    assert files_in(small_tmpfs) == []
    assert shutil.disk_usage(small_tmpfs).free == free_before


def test_disk_full_keeps_the_old_image(shm, small_tmpfs):
    path = small_tmpfs / "vm.img"
    old = saved_image(shm, path)  # 1 MiB of pages
    free_before = shutil.disk_usage(small_tmpfs).free
    block = shm.block("ram0", 2048, fill=0.0)
    with pytest.raises(ps.ChannelError, match="No space left on device"):
        ps.save(path, [block], channels=2)
    assert path.read_bytes() == old
    assert files_in(small_tmpfs) == ["vm.img"]
    assert shutil.disk_usage(small_tmpfs).free == free_before


def test_read_only_file_system_is_refused_at_setup(shm, read_only_fs):
    block = shm.block("ram0", 256, fill=0.5)
    with pytest.raises(OSError) as caught:
        ps.save(read_only_fs / "vm.img", [block], channels=2)
    assert caught.value.errno == errno.EROFS
    assert "vm.img" in caught.value.filename
    assert files_in(read_only_fs) == []


def test_directory_removed_under_a_save_fails_complete(shm, tmp_path):
    directory = tmp_path / "images"
    directory.mkdir()
    block = shm.block("ram0", 1024, fill=0.5)
    before = open_fds()
    with ps.Saver(directory / "vm.img", [block], channels=2) as saver:
        saver.setup()
        saver.iterate()
        shutil.rmtree(directory)
        with pytest.raises(ps.ImageWriteError) as caught:
            saver.complete()
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == str(directory / "vm.img")
    del caught
    assert open_fds() <= before
    assert not directory.exists()


def test_io_error_in_a_channel_is_reported(shm, failing_disk):
    # 16 MiB, in several writes: a lone 4 MiB write was seen to complete
    # after the device had been made to fail (its error left to the file
    # system's journal), three times in five.
    block = shm.block("ram0", 4096, fill=0.0)
    with ps.Saver(failing_disk.mount_point / "vm.img", [block], channels=2,
                  direct_io=True) as saver:
        saver.setup()
        failing_disk.fail()
        with pytest.raises(ps.ChannelError, match=f"{saver.path}: Input/output error"):
            saver.iterate()


def test_io_error_on_sync_is_reported_with_the_path(shm, failing_disk):
    block = shm.block("ram0", 1024, fill=0.0)
    with ps.Saver(failing_disk.mount_point / "vm.img", [block], channels=2) as saver:
        saver.setup()
        failing_disk.fail()
        with pytest.raises(ps.ImageWriteError) as caught:
            saver.complete()  # buffered writes: the error surfaces at fdatasync
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == saver.path


# --- interrupted: Ctrl-C and SIGTERM ---

# A save that runs until it is stopped, then says how it stopped and what
# it left behind (once the exception is handled: until then its traceback
# holds the frames of the pass, and they the control segment's mapping).
SAVE_UNTIL_STOPPED = textwrap.dedent("""
    import json, os, sys
    import parallel_save as ps
    from parallel_save.signals import terminate_cleanly

    image, source = sys.argv[1:3]
    block = ps.RamBlock.from_file("ram0", source)
    fds = set(os.listdir("/proc/self/fd"))
    try:
        with terminate_cleanly(), ps.Saver(image, [block], channels=2) as saver:
            saver.setup()
            print("saving", flush=True)
            while True:
                saver.iterate()
    except KeyboardInterrupt:
        stopped_by = "KeyboardInterrupt"
    except SystemExit as stop:
        stopped_by = f"SystemExit({stop.code})"
    print(json.dumps({
        "stopped_by": stopped_by,
        "channels": [pid for task in os.listdir("/proc/self/task") for pid in
                     open(f"/proc/self/task/{task}/children").read().split()],
        "fds": sorted(set(os.listdir("/proc/self/fd")) - fds),
        "segments": [n for n in os.listdir("/dev/shm")
                     if n.startswith(f"parallel-save-{os.getpid()}-")],
    }), flush=True)
""")
NOTHING_LEFT = {"channels": [], "fds": [], "segments": []}


def stop_library_save(shm, tmp_path: Path, signum: int) -> dict:
    """Run SAVE_UNTIL_STOPPED, send it ``signum`` mid-save; returns its
    report."""
    script = tmp_path / "save_until_stopped.py"
    script.write_text(SAVE_UNTIL_STOPPED)
    source = shm.block("ram0", 4096, fill=0.2)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "vm.img"),
                                block_path(source)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "saving\n"
        time.sleep(0.2)  # a few passes in
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert (process.returncode, err) == (0, "")
    return json.loads(out)


def block_path(block: ps.RamBlock) -> str:
    return block.source.path


def test_ctrl_c_stops_a_library_save_cleanly(shm, tmp_path):
    report = stop_library_save(shm, tmp_path, signal.SIGINT)
    assert report == {"stopped_by": "KeyboardInterrupt", **NOTHING_LEFT}
    assert files_in(tmp_path) == ["save_until_stopped.py"]


def test_sigterm_stops_a_library_save_cleanly_with_terminate_cleanly(shm, tmp_path):
    report = stop_library_save(shm, tmp_path, signal.SIGTERM)
    assert report == {"stopped_by": "SystemExit(143)", **NOTHING_LEFT}
    assert files_in(tmp_path) == ["save_until_stopped.py"]


def attached_channels(command: subprocess.Popen, count: int) -> list[int]:
    """The command's channel processes, once all are up: each has mapped
    the control segment (a memfd)."""
    children = Path(f"/proc/{command.pid}/task/{command.pid}/children")
    segment = re.compile(r"/memfd:parallel-save-control \(deleted\)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [int(pid) for pid in children.read_text().split()]
        try:
            if len(pids) == count and all(segment.search(Path(f"/proc/{pid}/maps").read_text())
                                          for pid in pids):
                return pids
        except FileNotFoundError:
            pass  # one has exited meanwhile
    raise AssertionError(f"the command did not start {count} channels")


def stop_command_save(shm, tmp_path: Path, signum: int) -> tuple[int, str]:
    """Run ``python -m parallel_save save``, freeze its channels once they
    are up (so the save cannot finish), send the command ``signum``;
    returns its exit status and stderr."""
    source = shm.block("ram0", 8192, fill=0.0)
    command = subprocess.Popen([sys.executable, "-m", "parallel_save", "save",
                                str(tmp_path / "vm.img"), "--block",
                                f"ram0={block_path(source)}", "--channels", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        channels = attached_channels(command, 2)
        for pid in channels:
            os.kill(pid, signal.SIGSTOP)
        command.send_signal(signum)
        _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
        command.wait()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in channels)
    assert not [n for n in os.listdir("/dev/shm")
                if n.startswith(f"parallel-save-{command.pid}-")]
    return command.returncode, stderr


def test_ctrl_c_stops_the_command_cleanly(shm, tmp_path):
    status, stderr = stop_command_save(shm, tmp_path, signal.SIGINT)
    assert (status, stderr) == (130, "parallel-save: interrupted\n")
    assert files_in(tmp_path) == []


def test_sigterm_stops_the_command_cleanly(shm, tmp_path):
    status, stderr = stop_command_save(shm, tmp_path, signal.SIGTERM)
    assert (status, stderr) == (128 + signal.SIGTERM, "parallel-save: stopped by SIGTERM\n")
    assert files_in(tmp_path) == []


def test_stop_signal_during_cleanup_is_delivered_after_it():
    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGHUP, stop)
    try:
        with pytest.raises(Stopped), signals_deferred():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)  # it would have been raised by now
            cleanup_finished = True
        assert cleanup_finished
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_saver_dropped_without_close_is_closed_with_a_warning(shm, tmp_path):
    # What a Ctrl-C between the end of a with block and close() leaves.
    block = shm.block("ram0", 256, fill=0.5)
    saver = ps.Saver(tmp_path / "vm.img", [block], channels=2)
    saver.setup()
    saver.iterate()
    with pytest.warns(ResourceWarning, match="a Saver dropped without close"):
        del saver  # its last reference
    assert channel_processes() == []
    assert files_in(tmp_path) == []


# --- restoring into the wrong places ---


@pytest.fixture
def two_block_image(shm, tmp_path) -> Path:
    path = tmp_path / "vm.img"
    ps.save(path, [shm.block("ram0", 512, fill=0.5, seed=1),
                   shm.block("rom", 16, fill=0.5, seed=2)], channels=2)
    return path


def refused_untouched(shm, image: Path, into: list[ps.RamBlock], error: str) -> None:
    before = [b.array.copy() for b in into]
    with pytest.raises(ps.BlockError, match=error):
        ps.restore(image, into, channels=2)
    for block, data in zip(into, before):
        assert np.array_equal(block.array, data), block.name


def test_restore_into_a_wrong_size_is_refused_before_writing(shm, two_block_image):
    refused_untouched(shm, two_block_image,
                      [shm.block("ram0", 511, fill="garbage"), shm.block("rom", 16,
                                                                          fill="garbage")],
                      "block 'ram0' is 2097152 bytes, its destination 2093056")


def test_restore_with_a_block_missing_is_refused_before_writing(shm, two_block_image):
    refused_untouched(shm, two_block_image, [shm.block("ram0", 512, fill="garbage")],
                      r"missing \['rom'\]")


def test_restore_with_an_extra_block_is_refused_before_writing(shm, two_block_image):
    refused_untouched(shm, two_block_image,
                      [shm.block("ram0", 512, fill="garbage"),
                       shm.block("rom", 16, fill="garbage"),
                       shm.block("extra", 16, fill="garbage")],
                      r"not in the image \['extra'\]")


def test_restore_into_a_truncated_file_is_refused(shm, two_block_image):
    ram0, rom = shm.block("ram0", 512, fill="garbage"), shm.block("rom", 16, fill="garbage")
    os.truncate(rom.source.path, 0)
    with pytest.raises(ps.BlockError, match="block 'rom': its file .* is 0 bytes"):
        ps.restore(two_block_image, [ram0, rom], channels=2)


def test_restore_from_an_incomplete_image_is_refused_before_writing(shm, tmp_path):
    path = tmp_path / "vm.img"
    block = shm.block("ram0", 512, fill=0.5)
    with ps.Saver(path, [block], channels=2, in_place=True) as saver:
        saver.setup()
        saver.iterate()  # and never completed
    target = shm.block("ram0", 512, fill="garbage")
    before = target.array.copy()
    with pytest.raises(ps.IncompleteImageError):
        ps.restore(path, [target], channels=2)
    assert np.array_equal(target.array, before)


# --- a Saver used wrongly ---


def test_iterate_before_setup_is_refused(shm, tmp_path):
    saver = ps.Saver(tmp_path / "vm.img", [shm.block("ram0", 16)], channels=1)
    with pytest.raises(ps.SaveStateError, match=r"^cannot iterate: the saver of .*vm.img "
                                                r"is not set up yet \(call setup first\)$"):
        saver.iterate()
    assert files_in(tmp_path) == []


def test_setup_twice_is_refused(shm, tmp_path):
    with ps.Saver(tmp_path / "vm.img", [shm.block("ram0", 16)], channels=1) as saver:
        saver.setup()
        with pytest.raises(ps.SaveStateError, match="cannot setup: .* is already set up"):
            saver.setup()
        saver.complete()


def test_complete_twice_is_refused(shm, tmp_path):
    with ps.Saver(tmp_path / "vm.img", [shm.block("ram0", 16)], channels=1) as saver:
        saver.setup()
        saver.complete()
        with pytest.raises(ps.SaveStateError, match="cannot complete: .* is closed"):
            saver.complete()
    ps.open_image(tmp_path / "vm.img").close()


def test_iterate_after_a_failure_is_refused(shm, tmp_path):
    with ps.Saver(tmp_path / "vm.img", [shm.block("ram0", 16)], channels=2) as saver:
        saver.setup()
        os.kill(saver._group.processes[0].pid, signal.SIGKILL)
        with pytest.raises(ps.ChannelError):
            saver.iterate()
        with pytest.raises(ps.SaveStateError, match=r"cannot iterate: .* is failed \(an "
                                                    r"earlier call raised"):
            saver.iterate()


@pytest.mark.parametrize("dirty, error", [
    ([True] * 16, "not a list"),
    ({"nope": np.ones(16, bool)}, r"unknown blocks: \['nope'\]"),
    ({"ram0": np.ones(15, bool)}, r"shape \(15,\), expected one bool per page: \(16,\)"),
    ({"ram0": np.ones(16, float)}, "is a float64 array"),
    ({"ram0": "yes"}, "is a <U3 array"),
], ids=["list", "unknown-block", "short", "float", "text"])
def test_bad_dirty_set_is_refused_and_the_save_goes_on(shm, tmp_path, dirty, error):
    block = shm.block("ram0", 16, fill=0.5)
    with ps.Saver(tmp_path / "vm.img", [block], channels=2) as saver:
        saver.setup()
        with pytest.raises(ps.BlockError, match=error):
            saver.iterate(dirty)
        saver.complete()
    target = shm.block("ram0", 16, fill="garbage")
    ps.restore(tmp_path / "vm.img", [target], channels=1)
    assert np.array_equal(target.array, block.array)


def test_direct_io_refused_by_the_file_system_leaves_no_file(shm, ramfs):
    image = ramfs / "vm.img"
    block = shm.block("ram0", 16, fill=0.5)
    with pytest.raises(ps.DirectIOError) as caught, \
            ps.Saver(image, [block], channels=2, direct_io=True) as saver:
        saver.setup()
    assert str(caught.value) == (f"{image}: cannot open with O_DIRECT (direct_io): "
                                 f"Invalid argument")
    assert os.listdir(ramfs) == []


def test_direct_io_refused_in_place_keeps_the_old_image(shm, ramfs):
    image = ramfs / "vm.img"
    block = shm.block("ram0", 16, fill=0.5)
    ps.save(image, [block], channels=1)
    before = image.read_bytes()
    with pytest.raises(ps.DirectIOError), \
            ps.Saver(image, [block], channels=1, direct_io=True, in_place=True) as saver:
        saver.setup()
    assert image.read_bytes() == before
