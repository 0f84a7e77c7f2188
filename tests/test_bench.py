"""Smoke test of the benchmark (bench/): a tiny image, one round, and the
table, JSON and PNG it must produce.  Nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.qemu import qemu_supports_mapped_ram
from bench.report import TARGETS

CHANNELS = 2
PS_CONTENDERS = {"ps save", "ps save direct", "ps pass 1%", "ps pass 10%", "ps pass 50%",
                 "dd", "numpy tofile", "ps restore", "dd read"}
QEMU_CONTENDERS = {"qemu multifd", "qemu multifd direct", "qemu load multifd"}

needs_qemu = pytest.mark.skipif(
    not qemu_supports_mapped_ram() and os.environ.get("PARALLEL_SAVE_REQUIRE_QEMU") != "1",
    reason="needs qemu-system-x86_64 >= 9.0")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> dict:
    """``python -m bench --quick`` on an 8 MiB image, run once for the module."""
    outdir = tmp_path_factory.mktemp("bench-results")
    workdir = tmp_path_factory.mktemp("bench-work")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--size", "8M", "--channels", str(CHANNELS),
         "--outdir", str(outdir), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    (json_path,) = outdir.glob("*.json")
    return {"stdout": done.stdout, "document": json.loads(json_path.read_text()),
            "png": json_path.with_suffix(".png"), "workdir": workdir}


def _measured(bench_run: dict) -> set[str]:
    return {r["contender"] for r in bench_run["document"]["runs"] if "seconds" in r}


def test_json_has_a_timed_run_of_every_parallel_save_dd_and_numpy_contender(bench_run):
    assert PS_CONTENDERS <= _measured(bench_run)


@pytest.mark.qemu
@needs_qemu
def test_json_has_a_timed_run_of_every_qemu_contender(bench_run):
    assert QEMU_CONTENDERS <= _measured(bench_run)


def test_no_run_failed(bench_run):
    errors = [(r["contender"], r["error"]) for r in bench_run["document"]["runs"]
              if "error" in r]
    assert errors == []


def test_restored_bytes_equal_the_image(bench_run):
    restores = [r for r in bench_run["document"]["runs"]
                if r["side"] == "restore" and r["contender"] != "dd read"]
    assert restores and all(r["verified"] for r in restores)


def test_json_records_the_machine(bench_run):
    machine = bench_run["document"]["machine"]
    assert machine["cores"] == os.cpu_count()
    assert machine["workdir_fs"]["type"] != "unknown"
    assert {"kernel", "qemu", "python", "numpy", "memory_bytes"} <= set(machine)


def _table_rows(stdout: str) -> set[tuple[str, str, str]]:
    """(side, contender, channels) of each row of the results table (fixed
    columns: the contender's name holds spaces)."""
    rows = set()
    for line in stdout.splitlines():
        if line.startswith(("save ", "restore ")):
            rows.add((line[:8].strip(), line[9:35].strip(), line[36:39].strip()))
    return rows


def test_table_has_a_row_per_contender_and_channel_count(bench_run):
    expected = {("restore" if name in {"ps restore", "dd read"} else "save", name,
                 "-" if name in {"dd", "numpy tofile", "dd read"} else str(CHANNELS))
                for name in PS_CONTENDERS}
    assert expected <= _table_rows(bench_run["stdout"])


def test_targets_are_printed_with_a_verdict(bench_run):
    expected = [t.label for t in TARGETS if t.denominator in PS_CONTENDERS | {"ps save"}]
    expected += ["peak RssAnon (upper bound), coordinator + channels",
                 "peak Pss_Anon, coordinator + channels"]
    verdicts = [line for line in bench_run["stdout"].splitlines()
                if re.search(r"  (PASS|MISS) \(target: (ratio <= [0-9.]+x|below [0-9]+ MiB)\)$",
                             line)]
    for label in expected:
        assert any(line.startswith(label) for line in verdicts), label


def test_the_page_cache_is_kept_unless_asked(bench_run):
    assert bench_run["document"]["config"]["drop_caches"] is False
    assert "note: before every run: sync, then the page cache is kept (no --drop-caches)" in (
        bench_run["stdout"].splitlines())


def test_png_plot_is_written(bench_run):
    assert bench_run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_and_written_files_are_removed_afterwards(bench_run):
    config = bench_run["document"]["config"]
    assert not Path(config["image_path"]).exists()
    assert list(bench_run["workdir"].iterdir()) == []


def test_list_prints_the_contenders_without_running_them(capsys):
    assert main(["--list", "--no-qemu", "--channels", "3", "--only", "ps save*"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [["save", "ps", "save", "3"], ["save", "ps", "save", "sync", "3"],
                     ["save", "ps", "save", "direct", "3"],
                     ["save", "ps", "save", "direct", "sync", "3"]]


def test_a_size_that_is_not_whole_pages_is_refused(capsys):
    assert main(["--size", "3000"]) == 2
    assert capsys.readouterr().err == (
        "bench: the size must be a positive multiple of 4096 bytes, not 3000\n")
