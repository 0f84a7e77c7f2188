"""Shared fixtures.  Tests run under ``pytest -n auto``: every file, segment
and socket name here is unique per test, never fixed."""

from __future__ import annotations

import contextlib
import lzma
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


def _import_the_installed_package_first() -> None:
    """Test the installed ``parallel_save`` when there is one, the checkout's
    otherwise.

    ``python -m pytest`` puts the current directory first on sys.path, so
    from the repository's root the checkout would shadow the installed
    package and CI would test the sources instead of the wheel.  The root
    moves to the END of sys.path: ``parallel_save`` comes from site-packages
    when installed, and the checkout (and its development tools, ``bench``)
    stays importable.  Every Python a test starts imports the same way: the
    path goes into PYTHONPATH and PYTHONSAFEPATH keeps a child's current
    directory off its sys.path.
    """
    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.curdir).resolve() == ROOT
        except OSError:
            return False

    if "parallel_save" in sys.modules:
        raise RuntimeError("parallel_save was imported before tests/conftest.py could "
                           "choose between the installed package and the checkout")
    sys.path[:] = [entry for entry in sys.path if not is_root(entry)] + [str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join(entry for entry in sys.path if entry)
    os.environ["PYTHONSAFEPATH"] = "1"


_import_the_installed_package_first()

import numpy as np
import pytest

import parallel_save as ps
from parallel_save.channels import STOP_GRACE
from parallel_save.format import PAGE_SIZE

DATA = Path(__file__).parent / "data"

# pytest-xdist's workers run a thread, which makes the library start its
# channels as new interpreters (safe with threads, but slower to start);
# the suite pins the default of single-threaded callers, fork, and tests
# the other start method where it names it.
os.environ.setdefault("PARALLEL_SAVE_START_METHOD", "fork")

# A suite started as a shell's background job (`... &`) inherits Ctrl-C
# ignored, and so would every command the Ctrl-C tests start and interrupt
# (an ignored SIGINT stays ignored across exec): they get the terminal's
# default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header(config) -> str:
    return f"parallel_save: {Path(ps.__file__).parent}"


def fill_pages(array: np.ndarray, rng: np.random.Generator, zero_fraction: float = 0.5
               ) -> np.ndarray:
    """Give each page random bytes or zeros; returns the non-zero mask."""
    pages = array.reshape(-1, PAGE_SIZE)
    nonzero = rng.random(pages.shape[0]) >= zero_fraction
    pages[~nonzero] = 0
    count = int(nonzero.sum())
    data = rng.integers(0, 256, size=(count, PAGE_SIZE), dtype=np.uint8)
    data[:, 0] |= 1  # never a page that is zero by chance
    pages[nonzero] = data
    return nonzero


class ShmFactory:
    """Makes RAM blocks over files in a private /dev/shm directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def block(self, name: str, pages: int, *, fill: str | float | None = None,
              seed: int = 0) -> ps.RamBlock:
        """A block of ``pages`` pages; ``fill`` None keeps it zero, "garbage"
        fills every byte, a float is the fraction of zero pages (random)."""
        path = self.root / f"{uuid.uuid4().hex}.ram"
        block = ps.RamBlock.from_file(name, path, length=pages * PAGE_SIZE, create=True)
        if fill == "garbage":
            block.array[:] = np.random.default_rng(seed).integers(
                1, 256, size=block.length, dtype=np.uint8)
        elif fill is not None:
            fill_pages(block.array, np.random.default_rng(seed), float(fill))
        return block

    def path(self, suffix: str = ".ram") -> Path:
        return self.root / f"{uuid.uuid4().hex}{suffix}"


@pytest.fixture
def shm(request) -> ShmFactory:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    root = Path("/dev/shm") / f"parallel-save-test-{worker}-{uuid.uuid4().hex}"
    root.mkdir()
    try:
        yield ShmFactory(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def qemu_files(tmp_path_factory) -> dict[str, Path]:
    """The fixtures QEMU 10.0.2 wrote, decompressed once per test worker."""
    out = tmp_path_factory.mktemp("qemu-fixtures")
    files = {}
    for packed in DATA.glob("*.xz"):
        target = out / packed.name[:-3]
        with lzma.open(packed) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        files[target.name] = target
    return files


def leftover_segments() -> list[str]:
    """Control segments this process created and did not remove."""
    prefix = f"parallel-save-{os.getpid()}-"
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


class ChildProcess(NamedTuple):
    pid: int
    name: str  # its /proc/<pid>/comm


def channel_processes() -> list[ChildProcess]:
    """This process's channel processes, running or not yet reaped, as the
    kernel lists the children of each of its threads: channels name
    themselves "ps channel N"; a snapshot's channels are children of its
    holder, "ps snapshot", which is listed for them."""
    found = []
    for task in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue  # the thread ended
        for pid in children:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except (FileNotFoundError, ProcessLookupError):
                continue  # reaped meanwhile
            if name.startswith(("ps channel ", "ps snapshot")):
                found.append(ChildProcess(int(pid), name))
    return found


def thread_names(pid: int) -> list[str]:
    """The names of a process's threads (each /proc/<pid>/task/<tid>/comm)."""
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(Path(f"/proc/{pid}/task/{task}/comm").read_text().strip())
        except FileNotFoundError:
            continue  # the thread ended
    return names


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no channel process and no control segment behind
    (docs/DESIGN.md, invariant 6), once the channels of its finished saves
    and restores have exited: the calls return before they do."""
    before = set(leftover_segments())
    yield
    assert ps.wait_channels(timeout=STOP_GRACE + 10), "channels still exiting"
    children = channel_processes()
    assert not children, f"channel processes left behind: {children}"
    assert set(leftover_segments()) <= before, "control segment left in /dev/shm"


@contextlib.contextmanager
def mounted(mount_point: Path, fstype: str, options: str = ""):
    """A real file system of ``fstype`` mounted at a new ``mount_point`` for
    the test (root only: skipped with the reason where mount is refused)."""
    mount_point.mkdir()
    command = ["mount", "-t", fstype] + (["-o", options] if options else [])
    done = subprocess.run([*command, fstype, str(mount_point)], check=False,
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {fstype} here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazily, if a test left a file open on it: it must go either way.
        unmounted = subprocess.run(["umount", str(mount_point)], check=False,
                                   capture_output=True)
        if unmounted.returncode:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


# The machine's pool of 2 MiB huge pages, which a hugetlbfs takes its pages from.
HUGE_PAGE_POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def need_huge_pages(count: int) -> None:
    """Skip (fail where CI reserved them) unless the machine's pool of
    2 MiB pages has ``count`` free."""
    try:
        free = int((HUGE_PAGE_POOL / "free_hugepages").read_text())
    except FileNotFoundError:
        free = 0
    if free < count:
        reason = (f"needs {count} free 2 MiB huge pages, the pool has {free} "
                  f"(as root: echo 64 > /proc/sys/vm/nr_hugepages, as .ci/run does)")
        if os.environ.get("PARALLEL_SAVE_REQUIRE_HUGE_PAGES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount: a real file system that refuses O_DIRECT."""
    with mounted(tmp_path / "ramfs", "ramfs") as mount_point:
        yield mount_point
