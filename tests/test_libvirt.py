"""libvirt as the peer: a domain saved by ``virsh save --image-format sparse``.

libvirt 11.3 (bookworm-backports, .ci/install-peers) writes QEMU's
mapped-ram stream behind its own header.  A small TCG domain boots the real
guest of guest_support.py, is paused, and saved with two parallel channels;
then, with no ``--offset``: ``parallel-save inspect`` shows what libvirt's
header says, ``restore`` gives the guest's RAM byte for byte, ``verify``
agrees, and ``virsh restore`` of the same file still resumes the guest (its
counter goes on).

libvirt's qemu:///system wants root.  When no daemon answers, the test
starts ``virtlogd`` and ``libvirtd`` itself (no systemd needed) and stops
them after; a lock keeps two test runs on one host from sharing one.  If
libvirt cannot run, the skip reason says why (the daemon's own words).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from guest_support import (
    GUEST_RAM,
    KERNEL_ARGS,
    READY,
    build_initramfs,
    guest_kernel,
    peer_missing,
    ticks,
    wait_for_ticks,
)
from qemu_support import qemu_binary, require_mapped_ram_qemu

from parallel_save.cli import main as cli_main

pytestmark = [pytest.mark.peer, pytest.mark.qemu]

URI = "qemu:///system"
LOCK = Path("/run/lock" if os.path.isdir("/run/lock") else "/tmp") / "parallel-save-libvirt.lock"
#: Where libvirt keeps a file-backed domain's RAM (qemu.conf memory_backing_dir).
MEMORY_BACKING_DIR = "/var/lib/libvirt/qemu/ram"

DOMAIN = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='KiB'>{kib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def virsh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def must(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stderr}"
    return result.stdout


@contextlib.contextmanager
def host_lock(timeout: float = 300):
    """One libvirt test per host at a time: qemu:///system is host-wide."""
    with open(os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{LOCK} held by another libvirt test for {timeout} s")
                time.sleep(0.5)
        yield


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def daemon_command(daemon: str) -> list[str]:
    """How to start ``daemon``: libvirtd without /dev/kvm where QEMU's user
    cannot use it.

    When /dev/kvm exists but the qemu user (libvirt-qemu) may not open it
    (root-only, as on hosts whose /dev/kvm is kvm-pvm), libvirt 11.3 finds
    its cached QEMU capabilities outdated on every look-up ("KVM was enabled
    when probing ..., but it is not available now") and probes QEMU again,
    4 s each: ``virsh create`` then takes a minute.  The domain uses TCG
    anyway, so libvirtd runs in a mount namespace of its own where /dev/kvm
    is /dev/null: nothing there is KVM, and the capabilities stay cached.
    """
    unshare = shutil.which("unshare")
    if daemon != "libvirtd" or not os.path.exists("/dev/kvm") or unshare is None:
        return [daemon]
    return [unshare, "--mount", "--propagation", "private", "sh", "-c",
            "mount --bind /dev/null /dev/kvm && exec libvirtd"]


@pytest.fixture
def libvirt(tmp_path):
    """A qemu:///system that answers: the host's, or daemons started here."""
    require_mapped_ram_qemu()
    for tool, package in (("virsh", "libvirt-clients"), ("libvirtd", "libvirt-daemon"),
                          ("virtlogd", "libvirt-daemon-log")):
        if shutil.which(tool) is None:
            peer_missing(f"{tool} not found (install {package} from bookworm-backports: "
                         f".ci/install-peers)")
    if os.geteuid() != 0:
        pytest.skip("libvirt's qemu:///system needs root to start its daemon and domains, "
                    f"and this test runs as uid {os.geteuid()}")
    with host_lock():
        if virsh("version", timeout=30).returncode == 0:
            yield  # a libvirt the host runs already
            return
        daemons, logs = [], []
        try:
            for daemon in ("virtlogd", "libvirtd"):
                log = tmp_path / f"{daemon}.log"
                logs.append(log)
                with open(log, "wb") as out:
                    daemons.append(subprocess.Popen(daemon_command(daemon),
                                                    stdin=subprocess.DEVNULL,
                                                    stdout=out, stderr=out))
            deadline = time.monotonic() + 30
            while virsh("version", timeout=30).returncode != 0:
                dead = [d.args[0] for d in daemons if d.poll() is not None]
                if dead or time.monotonic() > deadline:
                    said = "\n".join(f"{log.name}: {log.read_text(errors='replace')[-1500:]}"
                                     for log in logs)
                    why = f"{dead[0]} exited" if dead else "no answer within 30 s"
                    pytest.skip(f"libvirt cannot run here: {why} when started as root "
                                f"without systemd; {said}")
                time.sleep(0.2)
            yield
        finally:
            for daemon in reversed(daemons):
                _stop(daemon)


@pytest.fixture
def workdir():
    """Files the domain's QEMU (user libvirt-qemu) must reach: pytest's
    tmp_path sits under a root-only directory, so not there."""
    path = Path(tempfile.mkdtemp(prefix="ps-libvirt-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_virsh_sparse_save_is_read_without_offset_and_still_restores(
        libvirt, workdir, tmp_path, capsys):
    kernel = guest_kernel()
    name = f"ps-test-{uuid.uuid4().hex[:8]}"
    serial = workdir / "serial.txt"
    xml = workdir / "domain.xml"
    xml.write_text(DOMAIN.format(
        name=name, kib=GUEST_RAM >> 10, kernel=kernel, cmdline=KERNEL_ARGS,
        initrd=build_initramfs(workdir / "initramfs.cpio"), emulator=qemu_binary(),
        serial=serial))
    image = workdir / "guest.save"
    try:
        must(virsh("create", str(xml)))
        wait_for_ticks(serial, 2, timeout=120)
        must(virsh("suspend", name))
        last_tick = ticks(serial)[-1]
        backing = glob.glob(f"{MEMORY_BACKING_DIR}/*-{name}/pc.ram")
        assert len(backing) == 1, f"the domain's RAM file is not in {MEMORY_BACKING_DIR}"
        guest_ram = Path(backing[0]).read_bytes()
        must(virsh("save", name, str(image), "--image-format", "sparse",
                   "--parallel-channels", "2", "--running"))

        assert cli_main(["inspect", str(image), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        container = shown["container"]
        assert (container["kind"], container["domain_name"], container["was_running"],
                container["image_format"], container["complete"]) == (
            "libvirt", name, True, "sparse", True)
        assert shown["start"] == container["start"] > 0 and shown["complete"]
        # libvirt's q35 guest: the RAM, the BIOS and the option ROM.
        assert [b["name"] for b in shown["blocks"]] == ["pc.ram", "pc.bios", "pc.rom"]

        out = tmp_path / "restored"
        assert cli_main(["restore", str(image), "--outdir", str(out), "--quiet"]) == 0
        restored = np.fromfile(out / "pc.ram", np.uint8)
        assert np.array_equal(restored, np.frombuffer(guest_ram, np.uint8))
        (tmp_path / "guest.ram").write_bytes(guest_ram)
        assert cli_main(["verify", str(image), "--json",
                         "--block", f"pc.ram={tmp_path / 'guest.ram'}",
                         "--block", f"pc.bios={out / 'pc.bios'}",
                         "--block", f"pc.rom={out / 'pc.rom'}"]) == 0
        assert json.loads(capsys.readouterr().out)["equal"] is True

        # libvirt still restores its file, and the guest goes on.
        must(virsh("restore", str(image)))
        assert "running" in must(virsh("domstate", name))
        wait_for_ticks(serial, last_tick + 2, timeout=60)
        output = serial.read_bytes()
        assert output.count(READY.encode()) == 1, "the guest rebooted instead of resuming"
        later = ticks(serial)
        assert later[later.index(last_tick) + 1] == last_tick + 1
    finally:
        virsh("destroy", name, timeout=60)
        with contextlib.suppress(FileNotFoundError):  # the log libvirt kept of its QEMU
            os.remove(f"/var/log/libvirt/qemu/{name}.log")
