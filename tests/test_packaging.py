"""What ships: the wheel built from this checkout holds one top-level
package, installs beside other distributions' ``bench`` and ``workers``
without touching them, and works from there; and CI tests that installed
package, not the checkout.

Slower than the rest (a wheel build and one virtual environment for the
module, no network beyond what building the wheel needs): installs use
``--no-deps --no-index``, and the environment borrows the test run's own
site-packages for numpy and the other dependencies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import parallel_save as ps
import parallel_save.workers.channel

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".hypothesis", "results", "*.img")


def clean_env() -> dict[str, str]:
    """The environment of a tool run in another Python environment: none
    of this test run's import path (tests/conftest.py sets it for the
    subprocesses of the tests themselves)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONSAFEPATH", None)
    return env


def run(*command: str | os.PathLike, cwd: Path, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=clean_env(), check=False,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}: {done.stderr or done.stdout}"
    return done


def dummy_wheel(directory: Path, name: str) -> Path:
    """A wheel of distribution ``name`` holding a top-level package of the
    same name whose ``WHO`` says whose it is: another project's ``bench``
    or ``workers``."""
    files = {
        f"{name}/__init__.py": f'WHO = "the {name} distribution"\n',
        f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{name}-1.0.dist-info/WHEEL": ("Wheel-Version: 1.0\nGenerator: tests\n"
                                        "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{name}-1.0.dist-info/RECORD,,")
    files[f"{name}-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of this checkout (a copy: the build
    writes build/ and *.egg-info beside the sources)."""
    source = tmp_path_factory.mktemp("source") / "parallel-save"
    shutil.copytree(ROOT, source, symlinks=True, ignore=IGNORED)
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out, source,
        cwd=out)
    (built,) = out.glob("parallel_save-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment holding another project's ``bench`` and
    ``workers``, then our wheel; numpy and the other dependencies come from
    this test run's site-packages (a .pth at the end of its sys.path)."""
    home = tmp_path_factory.mktemp("venv")
    env = home / "env"
    run(sys.executable, "-m", "venv", "--without-pip", env, cwd=home)
    python = env / "bin" / "python"
    where = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=home)
    purelib = Path(where.stdout.strip())
    dummies = [dummy_wheel(home, "bench"), dummy_wheel(home, "workers")]
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
               "--no-deps", "--no-index"]
    run(*install, *dummies, cwd=home)
    run(*install, wheel, cwd=home)
    # Only now: pip would take a parallel-save installed there for this one.
    (purelib / "zz-test-run-site-packages.pth").write_text(
        "".join(f"{p}\n" for p in site.getsitepackages()))
    return env


def test_the_wheel_holds_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = archive.read(f"{wheel.name.split('-')[0]}-{ps.__version__}.dist-info/"
                                 "top_level.txt").decode().split()
    assert {name.split("/")[0] for name in names} == {
        "parallel_save", f"parallel_save-{ps.__version__}.dist-info"}
    assert top_level == ["parallel_save"]
    # The channel code, under the package; the QEMU driver and bench stay out.
    assert {"parallel_save/workers/__init__.py", "parallel_save/workers/channel.py"} <= set(names)
    assert not [name for name in names if name.endswith("qemu.py")]


def test_the_wheel_carries_the_license(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (license_name,) = [n for n in archive.namelist() if n.endswith("/LICENSE")]
        text = archive.read(license_name).decode()
        metadata = archive.read(f"parallel_save-{ps.__version__}.dist-info/METADATA").decode()
    assert text == (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 parallel-save developers\n")
    assert "License-Expression: MIT\n" in metadata


def test_installing_beside_other_bench_and_workers_packages_leaves_them_alone(venv, tmp_path):
    shown = run(venv / "bin" / "python", "-c",
                "import bench, workers, parallel_save.workers.channel as c; "
                "print(bench.WHO); print(workers.WHO); print(c.__file__)", cwd=tmp_path)
    bench_who, workers_who, channel_file = shown.stdout.splitlines()
    assert (bench_who, workers_who) == ("the bench distribution", "the workers distribution")
    assert Path(channel_file).is_relative_to(venv)


def test_the_installed_command_saves_and_restores_beside_them(venv, tmp_path):
    done = run(venv / "bin" / "parallel-save", "demo", "--size", "8M", "--channels", "2",
               "--dir", tmp_path, cwd=tmp_path)
    assert done.stderr == ""
    assert done.stdout.endswith("  check    the restored block equals the source\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI tests the installed wheel; "
                    "elsewhere the checkout may be what is tested")
def test_ci_tests_the_installed_package_not_the_checkout():
    # Installed: in a site-packages (which may lie in the checkout's .venv),
    # not the checkout's own sources.
    for module in (ps, parallel_save.workers.channel):
        found = Path(module.__file__).resolve()
        assert not found.is_relative_to(ROOT / "parallel_save"), module.__file__
        assert not found.is_relative_to(ROOT / "workers"), module.__file__
        assert "site-packages" in found.parts, module.__file__


def test_a_python_the_tests_start_imports_the_same_package():
    # From the repository's root, where `python -m` would put the checkout first.
    code = "import parallel_save; print(parallel_save.__file__)"
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout == f"{ps.__file__}\n"
