"""Smoke test of the benchmark (bench/): a tiny image, one round, and the
table, JSON and PNG it must produce.  Nothing here asserts a speed."""

from __future__ import annotations

import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mounted, need_huge_pages

import parallel_save as ps
from bench import probe
from bench.__main__ import main, parse_args
from bench.ab import main as ab_main
from bench.hostmemory import SteadyMemory, largest_order, reporting_state
from bench.qemu import qemu_supports_mapped_ram
from bench.report import MEMORY_TARGET, TARGETS, format_targets, target_rows
from bench.workload import BenchError, build, memory_kind

CHANNELS = 2
WORKLOADS = ("random", "dense", "guest")
# (regime, side, contender): what --quick --no-qemu runs at CHANNELS (or
# without a channel count: the floors).
PS_CONTENDERS = {("warm", "save", "ps save"), ("durable", "save", "ps save"),
                 ("warm", "save", "ps save over"), ("durable", "save", "ps save over"),
                 ("durable", "save", "ps save direct"), ("warm", "restore", "ps restore")}
FLOORS = {("warm", "save", "one writer"), ("warm", "save", "dd"), ("warm", "save", "memcpy"),
          ("durable", "save", "one writer"), ("durable", "save", "dd fdatasync"),
          ("durable", "save", "dd direct"), ("warm", "restore", "one reader"),
          ("warm", "restore", "reader per CPU"), ("warm", "restore", "dd read"),
          ("warm", "restore", "allocate pages")}
QEMU_CONTENDERS = {("warm", "save", "qemu multifd"), ("durable", "save", "qemu multifd"),
                   ("durable", "save", "qemu multifd direct"),
                   ("warm", "restore", "qemu load multifd")}

needs_qemu = pytest.mark.skipif(
    not qemu_supports_mapped_ram() and os.environ.get("PARALLEL_SAVE_REQUIRE_QEMU") != "1",
    reason="needs qemu-system-x86_64 >= 9.0")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> dict:
    """``python -m bench --quick`` on 8 MiB images, run once for the module."""
    outdir = tmp_path_factory.mktemp("bench-results")
    workdir = tmp_path_factory.mktemp("bench-work")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--size", "8M", "--channels", str(CHANNELS),
         "--outdir", str(outdir), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    (json_path,) = outdir.glob("*.json")
    return {"stdout": done.stdout, "document": json.loads(json_path.read_text()),
            "png": json_path.with_suffix(".png"), "workdir": workdir}


def _measured(bench_run: dict, layout: str) -> set[tuple[str, str, str]]:
    return {(r["regime"], r["side"], r["contender"]) for r in bench_run["document"]["runs"]
            if "seconds" in r and r["layout"] == layout}


@pytest.mark.parametrize("layout", WORKLOADS)
def test_json_has_a_timed_run_of_every_parallel_save_contender_and_floor(bench_run, layout):
    assert PS_CONTENDERS | FLOORS <= _measured(bench_run, layout)


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("layout", WORKLOADS)
def test_json_has_a_timed_run_of_every_qemu_contender(bench_run, layout):
    assert QEMU_CONTENDERS <= _measured(bench_run, layout)


def test_no_run_failed(bench_run):
    errors = [(r["contender"], r["error"]) for r in bench_run["document"]["runs"]
              if "error" in r]
    assert errors == []


def test_restored_bytes_equal_the_image(bench_run):
    restores = [r for r in bench_run["document"]["runs"]
                if r["side"] == "restore" and r["contender"] not in ("dd read", "allocate pages")]
    assert {r["layout"] for r in restores} == set(WORKLOADS)
    assert all(r["verified"] for r in restores)


def test_workloads_have_their_layout(bench_run):
    images = {image["layout"]: image for image in bench_run["document"]["images"].values()}
    assert images["dense"]["nonzero_pages"] == images["dense"]["pages"] == 2048
    assert 0.45 < images["random"]["zero_fraction"] < 0.55
    assert 0.0 < images["guest"]["zero_fraction"] < 1.0  # runs too long to converge at 8 MiB


def test_every_parallel_save_row_has_a_ratio_to_its_floor(bench_run):
    rows = [r for r in bench_run["document"]["summary"] if r["contender"].startswith("ps ")]
    assert rows and all(r["vs_floor"] is not None and r["vs_floor"] > 0 for r in rows)
    floors = {(r["regime"], r["contender"], r["floor"]) for r in rows}
    assert ("warm", "ps save", "one writer") in floors
    assert ("durable", "ps save direct", "dd direct") in floors
    assert ("warm", "ps restore", "one reader") in floors


def test_json_records_the_machine(bench_run):
    machine = bench_run["document"]["machine"]
    assert machine["cores"] == os.cpu_count()
    assert machine["workdir_fs"]["type"] != "unknown"
    assert machine["memory_fs"]["kind"] == memory_kind(Path("/dev/shm")).text
    assert machine["memory_fs"]["type"] == "tmpfs"
    assert {"kernel", "qemu", "python", "numpy", "memory_bytes"} <= set(machine)
    assert machine["free_page_reporting"] == reporting_state()


def _table_rows(stdout: str) -> set[tuple[str, str, str, str, str]]:
    """(workload, regime, side, contender, channels) of each row of the
    results tables (fixed columns: the contender's name holds spaces)."""
    rows = set()
    heading = None
    for line in stdout.splitlines():
        found = re.fullmatch(r"== (.+), (warm|durable) ==", line)
        if found:
            heading = found.groups()
        elif line.startswith(("save ", "restore ")):
            rows.add((*heading, line[:8].strip(), line[9:29].strip(), line[30:33].strip()))
    return rows


@pytest.mark.parametrize("layout", WORKLOADS)
def test_table_has_a_row_per_contender_and_channel_count(bench_run, layout):
    expected = {(f"{layout} 8 MiB", regime, side, name, str(CHANNELS))
                for regime, side, name in PS_CONTENDERS}
    expected |= {(f"{layout} 8 MiB", regime, side, name, "-") for regime, side, name in FLOORS}
    assert expected <= _table_rows(bench_run["stdout"])


def test_targets_are_printed_with_a_verdict(bench_run):
    verdicts = [line for line in bench_run["stdout"].splitlines()
                if re.search(r"  (PASS|MISS) \(target: (ratio <= [0-9.]+x|below [0-9]+ MiB)\)$",
                             line)]
    labels = [t.label for t in TARGETS if not t.denominator.startswith("qemu")]
    labels.append(MEMORY_TARGET)
    for layout in WORKLOADS:
        for label in labels:
            assert any(line.startswith(f"{layout} 8 MiB") and label in line
                       for line in verdicts), (layout, label)


def test_the_page_cache_is_kept_unless_asked(bench_run):
    assert bench_run["document"]["config"]["drop_caches"] is False
    assert ("note: before every run: sync; the page cache is kept (no --drop-caches): "
            "the durable regime ran with a warm cache") in bench_run["stdout"].splitlines()


def test_png_plot_is_written(bench_run):
    assert bench_run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_and_written_files_are_removed_afterwards(bench_run):
    for image in bench_run["document"]["images"].values():
        assert not Path(image["image_path"]).exists()
    assert list(bench_run["workdir"].iterdir()) == []


def test_list_prints_the_contenders_without_running_them(capsys):
    assert main(["--list", "--no-qemu", "--channels", "3", "--only", "ps save*"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [["save", "warm", "ps", "save", "3"],
                     ["save", "warm", "ps", "save", "over", "3"],
                     ["save", "durable", "ps", "save", "3"],
                     ["save", "durable", "ps", "save", "over", "3"],
                     ["save", "durable", "ps", "save", "direct", "3"]]


def test_the_matrix_is_the_issues_sizes_and_channel_counts(capsys):
    assert main(["--list", "--no-qemu", "--matrix", "--regimes", "warm",
                 "--only", "ps save"]) == 0
    assert [line.split()[-1] for line in capsys.readouterr().out.splitlines()] == [
        "1", "2", "4", "8"]
    assert parse_args(["--matrix"]).sizes == [1 << 30, 4 << 30, 8 << 30]


def test_a_size_that_is_not_whole_pages_is_refused(capsys):
    assert main(["--size", "3000"]) == 2
    assert capsys.readouterr().err == (
        "bench: the size must be a positive multiple of 4096 bytes, not 3000\n")


def test_an_unknown_workload_is_refused(capsys):
    assert main(["--workloads", "random,sparse"]) == 2
    assert capsys.readouterr().err == (
        "bench: --workloads takes some of random, dense, guest, not 'sparse'\n")


def test_a_memory_dir_that_is_not_shared_memory_is_refused(capsys, ramfs):
    assert main(["--quick", "--no-qemu", "--memory-dir", str(ramfs)]) == 2
    assert capsys.readouterr().err == (
        f"bench: --memory-dir {ramfs}: a ramfs, not shared memory (a tmpfs or a hugetlbfs)\n")


def test_an_image_in_huge_pages_has_the_bytes_of_one_in_dev_shm(tmp_path):
    """--memory-dir: the same seed gives the same image in a tmpfs of
    transparent huge pages (written through a mapping) as in /dev/shm."""
    with mounted(tmp_path / "thp", "tmpfs", "huge=always,size=128M") as mount_point:
        kind = memory_kind(mount_point)
        assert (kind.fstype, kind.huge, kind.page_bytes) == ("tmpfs", True, 4096)
        assert kind.text == f"tmpfs with transparent huge pages at {mount_point}"
        huge = build(8 << 20, 0.5, tmp_path, seed=3, layout="random", memory_dir=mount_point)
        small = build(8 << 20, 0.5, tmp_path, seed=3, layout="random")
        try:
            assert huge.image.parent.parent == mount_point
            assert small.image.parent.parent == Path("/dev/shm")
            assert huge.nonzero_pages == small.nonzero_pages > 0
            assert huge.image.read_bytes() == small.image.read_bytes()
        finally:
            huge.close()
            small.close()
        assert list(mount_point.iterdir()) == []


# --- memory the host takes back (bench/hostmemory.py) ----------------------

BUDDY_LINE = "Node 0, zone   Normal   " + " ".join(["7"] * 11) + "\n"


def test_the_largest_order_is_read_from_buddyinfo(tmp_path):
    buddy_info = tmp_path / "buddyinfo"
    buddy_info.write_text(BUDDY_LINE)
    assert largest_order(buddy_info) == 10
    assert largest_order() >= 9  # this machine's own


def test_reporting_is_active_only_at_an_order_free_blocks_reach(tmp_path):
    buddy_info = tmp_path / "buddyinfo"
    buddy_info.write_text(BUDDY_LINE)
    parameter = tmp_path / "page_reporting_order"
    parameter.write_text("9\n")
    assert reporting_state(parameter, buddy_info) == {"order": 9, "active": True}
    parameter.write_text("11\n")
    assert reporting_state(parameter, buddy_info) == {"order": 11, "active": False}
    assert reporting_state(tmp_path / "absent", buddy_info) == {"order": None, "active": False}


def test_steady_memory_raises_the_order_for_its_block_and_puts_it_back(tmp_path):
    buddy_info = tmp_path / "buddyinfo"
    buddy_info.write_text(BUDDY_LINE)
    parameter = tmp_path / "page_reporting_order"
    parameter.write_text("9\n")
    with SteadyMemory(parameter, buddy_info, size=16 << 20) as steady:
        assert parameter.read_text() == "11\n"
        record = steady.record()
    assert parameter.read_text() == "9\n"
    assert record["touched_bytes"] == 16 << 20
    assert record["first_touch_us_per_page"] > 0
    assert record["second_touch_us_per_page"] > 0


def test_steady_memory_without_the_parameter_is_refused_naming_it(tmp_path):
    absent = tmp_path / "page_reporting_order"
    with pytest.raises(BenchError) as caught:
        SteadyMemory(absent).__enter__()
    assert str(caught.value) == (
        f"--steady-memory: {absent} is not writable (run as root on a machine with "
        "free page reporting, or leave the option out)")


def test_the_allocation_floor_touches_exactly_the_present_pages(bench_run):
    """The restores' allocation floor faults in the pages a restore must
    fill (the image's non-zero pages), one process per CPU."""
    images = bench_run["document"]["images"]
    touched = {r["workload"]: (r["pages_touched"], r["processes"])
               for r in bench_run["document"]["runs"] if r["contender"] == "allocate pages"}
    assert touched == {label: (image["nonzero_pages"], len(os.sched_getaffinity(0)))
                       for label, image in images.items()}


def test_the_reader_per_cpu_floor_reads_the_present_pages_a_share_per_cpu(bench_run):
    """The restores' parallel floor: a thread per CPU, each preading its
    share of the image's present pages; into /dev/shm, which takes
    sendfile, it bounds no restore."""
    images = bench_run["document"]["images"]
    found = {r["workload"]: (r["pages_read"], r["readers"], r["takes_sendfile"], r["bounds"])
             for r in bench_run["document"]["runs"] if r["contender"] == "reader per CPU"}
    assert found == {label: (image["nonzero_pages"], len(os.sched_getaffinity(0)), True, False)
                     for label, image in images.items()}


@pytest.mark.parametrize("fstype", ["hugetlbfs", "tmpfs"])
def test_the_reader_per_cpu_floor_says_whether_its_destination_takes_sendfile(
        tmp_path, shm, fstype):
    """Into a hugetlbfs, which takes no sendfile, nothing fills the pages
    faster than the CPUs preading into them, and the floor says so (the
    bench then holds every restore there to it); a tmpfs takes sendfile
    (a restore sends its long runs, which no page fault can match).
    Either way the floor reads exactly the image's bytes."""
    size = 8 << 20
    if fstype == "hugetlbfs":
        need_huge_pages(size // (2 << 20))
    image = tmp_path / "floor.img"
    with shm.block(probe.BLOCK, size // 4096, fill=0.5, seed=7) as block:
        ps.save(image, [block], channels=1)
        expected = block.array.copy()
    options = "pagesize=2M,size=16M" if fstype == "hugetlbfs" else "size=16M"
    with mounted(tmp_path / fstype, fstype, options) as mount_point:
        destination = mount_point / "destination.ram"
        with open(destination, "wb") as file:
            file.truncate(size)
        found = probe.read_floor({"source": str(image), "destination": str(destination),
                                  "size": size, "readers": 2})
        # Through a mapping: a hugetlbfs file cannot be read otherwise.
        with open(destination, "rb") as file, \
                mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as mapping:
            restored = np.frombuffer(mapping, np.uint8).copy()
        destination.unlink()
    assert (found["takes_sendfile"], found["readers"]) == (fstype == "tmpfs", 2)
    assert found["pages_read"] == int(expected.reshape(-1, 4096).any(axis=1).sum())
    assert np.array_equal(restored, expected)


def _restore_round(round_: int, ours: float, qemu: float, floor: float,
                   bounds: bool) -> list[dict]:
    common = {"round": round_, "workload": "guest 1 GiB", "regime": "warm",
              "side": "restore"}
    return [{**common, "contender": "ps restore", "channels": 2, "seconds": ours},
            {**common, "contender": "qemu load multifd", "channels": 2, "seconds": qemu},
            {**common, "contender": "reader per CPU", "channels": None, "seconds": floor,
             "bounds": bounds}]


def test_a_target_below_a_floor_that_bounds_it_is_out_of_reach():
    """restore / QEMU's load at most 0.8x: where the reader per CPU bounds
    the restore and itself takes more than 0.8x QEMU's time, the MISS says
    the target is out of reach, and by how much (medians over rounds)."""
    records = (_restore_round(0, 0.090, 0.100, 0.085, True)
               + _restore_round(1, 0.095, 0.100, 0.090, True)
               + _restore_round(2, 0.099, 0.110, 0.099, True))
    (row,) = [r for r in target_rows(records) if r["target"] == "restore / QEMU multifd load"]
    assert (row["value"], row["bound"], row["bound_value"], row["out_of_reach"]) == (
        pytest.approx(0.9), "reader per CPU", pytest.approx(0.9), True)
    assert format_targets([row]).splitlines()[1] == (
        "guest 1 GiB    restore / QEMU multifd load                  2     0.900x  "
        "MISS, out of reach: the reader per CPU floor takes 0.900x (target: ratio <= 0.8x)")


def test_a_floor_that_does_not_bound_a_target_says_nothing_of_its_reach():
    records = _restore_round(0, 0.090, 0.100, 0.085, False)
    (row,) = [r for r in target_rows(records) if r["target"] == "restore / QEMU multifd load"]
    assert "out_of_reach" not in row
    assert format_targets([row]).splitlines()[1].endswith(
        "0.900x  MISS (target: ratio <= 0.8x)")


REPOSITORY = Path(__file__).resolve().parents[1]


def test_ab_runs_two_checkouts_in_turn_and_prints_their_ratio(tmp_path):
    """``python -m bench.ab`` (the same save by two checkouts, alternating
    fresh processes), here of this checkout against itself: a median per
    checkout and the median of the rounds' ratios."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", str(REPOSITORY), str(REPOSITORY), "--size", "16M",
         "--rounds", "2", "--channels", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "save of a 16 MiB guest image, 1 channel(s), 2 alternating rounds"
    for line, label in zip(lines[1:3], "AB"):
        assert re.fullmatch(rf"{label} {re.escape(str(REPOSITORY))}: median \d+\.\d ms "
                            r"\(rounds \d+\.\d-\d+\.\d\)", line), line
    assert re.fullmatch(r"B/A: median of the rounds' ratios \d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\); "
                        r"B faster in [0-2] of 2 rounds", lines[3]), lines[3]
    assert list(tmp_path.iterdir()) == []  # the written files and their directory: gone


def test_ab_refuses_a_directory_that_is_not_a_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        ab_main([str(REPOSITORY), str(tmp_path)])
    assert exited.value.code == 2
    assert (f"CHECKOUT {tmp_path}: not a checkout of parallel-save (no parallel_save/ and "
            f"bench/ in it)") in capsys.readouterr().err
