"""Drive a real ``qemu-system-x86_64`` as the peer of parallel-save.

QEMU defined the mapped-ram file format, so it is the authority on it: the
test suite proves that QEMU loads what parallel-save writes (and the other way
round), and the benchmarks compare against QEMU's own save.  This module is
the only place that knows how to start such a QEMU and talk QMP to it.

The VMs started here never run guest code (``-S``), and their RAM is a
``memory-backend-file`` with ``share=on`` over a file the caller provides, so
"the guest's RAM" is exactly the bytes of that file, before a save and after
a load.

Standard library only: it is imported by tests and benchmarks that must not
pull in anything else.  It is a development tool of the repository (like the
rest of ``bench``), not part of the installed package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Self

__all__ = [
    "MAPPED_RAM_MIN_VERSION",
    "QMP",
    "QemuError",
    "QemuVM",
    "qemu_binary",
    "qemu_supports_mapped_ram",
    "qemu_version",
]

QEMU_SYSTEM = "qemu-system-x86_64"

#: mapped-ram appeared in QEMU 9.0; older QEMUs cannot be a peer at all.
MAPPED_RAM_MIN_VERSION: tuple[int, int, int] = (9, 0, 0)

#: The ``direct-io`` migration parameter appeared in QEMU 9.1; a 9.0 QEMU
#: rejects the key even when it is set to false.
_DIRECT_IO_MIN_VERSION = (9, 1, 0)

#: migrate-incoming's ``exit-on-error`` also appeared in 9.1.
_EXIT_ON_ERROR_MIN_VERSION = (9, 1, 0)

#: How much of QEMU's stderr goes into an error message: enough for its last
#: few complaints, not so much that a test report drowns.
_STDERR_TAIL = 4000

# A unix socket path must fit sun_path (108 bytes including the NUL).
_SUN_PATH_MAX = 107


class QemuError(Exception):
    """QEMU refused a command, failed a migration, or died.

    ``desc`` is QEMU's own error text (QMP ``error.desc`` or query-migrate's
    ``error-desc``) when there is one, and ``stderr`` is the tail of QEMU's
    stderr, because a failed load is often explained only there.
    """

    def __init__(self, message: str, *, desc: str | None = None, stderr: str = "") -> None:
        full = message
        if stderr.strip():
            full += "\n--- QEMU stderr (tail) ---\n" + stderr.rstrip()
        super().__init__(full)
        self.desc = desc
        self.stderr = stderr


# --------------------------------------------------------------------------
# Finding the binary


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` on PATH, or None when there is none."""
    return shutil.which(QEMU_SYSTEM)


_version_cache: dict[str, tuple[int, int, int] | None] = {}


def qemu_version() -> tuple[int, int, int] | None:
    """(major, minor, micro) of the QEMU on PATH, or None if absent/unparsable.

    Cached per binary path: tests ask this for every skip decision and a fork
    of QEMU per question would be wasteful.
    """
    binary = qemu_binary()
    if binary is None:
        return None
    if binary not in _version_cache:
        _version_cache[binary] = _probe_version(binary)
    return _version_cache[binary]


def _probe_version(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def qemu_supports_mapped_ram() -> bool:
    """True when the QEMU on PATH is new enough to save/load mapped-ram."""
    version = qemu_version()
    return version is not None and version >= MAPPED_RAM_MIN_VERSION


# --------------------------------------------------------------------------
# QMP


class QMP:
    """A minimal QMP client over a unix socket.

    QMP is line-delimited JSON. Commands carry an ``id`` so that a reply is
    matched to its command; asynchronous events (``{"event": ...}``) that
    arrive in between are kept in :attr:`events` and otherwise ignored, since
    nothing here needs them but they help when debugging a failure.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Connect to ``path``, read the greeting and leave negotiation mode.

        QEMU creates the socket some time after it was started, so connecting
        is retried until ``timeout``. ``alive`` is asked between retries so that
        a QEMU that died on its command line is reported at once instead of
        after the whole timeout.
        """
        self.path = os.fspath(path)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._sock = self._connect(timeout, alive)
        self._file: IO[bytes] = self._sock.makefile("rb")
        try:
            greeting = self._read(timeout)
            if "QMP" not in greeting:
                raise QemuError(f"unexpected QMP greeting: {greeting!r}")
            self.greeting: dict[str, Any] = greeting["QMP"]
            self.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float, alive: Callable[[], bool] | None) -> socket.socket:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if alive is not None and not alive():
                    raise QemuError("QEMU exited before its QMP socket accepted") from exc
                if time.monotonic() >= deadline:
                    raise QemuError(
                        f"QMP socket {self.path} not ready after {timeout:.0f} s"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
            except BaseException:
                sock.close()
                raise

    def _read(self, timeout: float | None) -> dict[str, Any]:
        """One JSON object (one line) from QEMU."""
        self._sock.settimeout(timeout)
        try:
            line = self._file.readline()
        except TimeoutError as exc:
            raise QemuError(f"no QMP message within {timeout} s") from exc
        except OSError as exc:
            raise QemuError(f"QMP connection lost: {exc}") from exc
        if not line:
            raise QemuError("QMP connection closed by QEMU")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QemuError(f"malformed QMP message: {line!r}") from exc
        if not isinstance(msg, dict):
            raise QemuError(f"malformed QMP message: {line!r}")
        return msg

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        /,
        *,
        timeout: float | None = 60.0,
        **kwargs: Any,
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        Arguments may be given as a mapping (needed for QMP's hyphenated names,
        e.g. ``{"multifd-channels": 4}``) and/or as keyword arguments; both are
        merged (a QMP argument named ``timeout`` must go in the mapping).
        Raises :class:`QemuError` carrying QEMU's ``desc`` when QEMU answers
        with an error.
        """
        args = dict(arguments or {})
        args.update(kwargs)
        self._next_id += 1
        msg_id = self._next_id
        request: dict[str, Any] = {"execute": command, "id": msg_id}
        if args:
            request["arguments"] = args
        data = (json.dumps(request) + "\n").encode()
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(data)
        except OSError as exc:
            raise QemuError(f"QMP {command}: cannot send: {exc}") from exc

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            msg = self._read(left)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != msg_id:
                continue  # a reply to an earlier, abandoned command
            if "error" in msg:
                desc = msg["error"].get("desc", str(msg["error"]))
                raise QemuError(f"QMP {command}: {desc}", desc=desc)
            if "return" in msg:
                return msg["return"]
            raise QemuError(f"QMP {command}: unexpected reply {msg!r}")

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        for closeable in (getattr(self, "_file", None), getattr(self, "_sock", None)):
            if closeable is not None:
                with contextlib.suppress(OSError):
                    closeable.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------
# A VM over a RAM file

_MACHINES = {
    # machine -> id of the memory backend that holds the guest RAM; QEMU
    # names the RAM block (and so the block in the migration file) after it.
    "none": "ram0",
    "q35": "pc.ram",
}


def _opt(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def _terminate(proc: subprocess.Popen[bytes], tmpdir: str) -> None:
    """Kill and reap QEMU, remove its temp dir.

    A plain function (not a method) so that it can serve as the
    weakref.finalize callback: it must not keep the VM object alive.
    """
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):  # only a D-state QEMU
        proc.wait(timeout=30)
    shutil.rmtree(tmpdir, ignore_errors=True)


class QemuVM:
    """A paused QEMU whose guest RAM is the file ``ram_path``.

    ``machine="none"``: one RAM block named ``ram0`` and machine type
    ``none``. ``machine="q35"``: a PC whose RAM block ``pc.ram`` is the file,
    plus QEMU's own ROM/BIOS blocks, machine type ``pc-q35-<version>``.
    The file should be ``size`` bytes (QEMU refuses a smaller one). For a load
    (``incoming=True``) it must be all zero: QEMU skips pages whose bitmap
    bit is clear, assuming fresh RAM.

    Use as a context manager: on exit QEMU is asked to ``quit``, killed if it
    does not, and always reaped. Each VM has its own temp dir (QMP socket,
    stderr log), so VMs can run side by side, e.g. under pytest-xdist.

    As a last resort QEMU is started under ``setpriv --pdeathsig KILL`` when
    available, so a test worker killed hard does not leave a QEMU behind.
    The death signal follows the *thread* that started QEMU: start a VM from
    a thread that outlives it.
    """

    def __init__(
        self,
        ram_path: str | os.PathLike[str],
        size: int,
        *,
        machine: str = "none",
        incoming: bool = False,
        extra_args: tuple[str, ...] | list[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        binary = qemu_binary()
        if binary is None:
            raise QemuError(f"{QEMU_SYSTEM} not found on PATH")
        if machine not in _MACHINES:
            raise ValueError(f"machine must be one of {sorted(_MACHINES)}, not {machine!r}")
        if size <= 0 or size % 4096:
            raise ValueError(f"size must be a positive multiple of 4096, not {size}")

        self.ram_path = Path(ram_path)
        self.size = size
        self.machine = machine
        self.incoming = incoming
        self.version = qemu_version()
        self.backend_id = _MACHINES[machine]

        self._tmpdir = tempfile.mkdtemp(prefix="ps-qemu-")
        if len(os.path.join(self._tmpdir, "qmp.sock")) > _SUN_PATH_MAX:
            # A long TMPDIR would overflow sun_path; /tmp is always short.
            os.rmdir(self._tmpdir)
            self._tmpdir = tempfile.mkdtemp(prefix="ps-qemu-", dir="/tmp")
        self.socket_path = os.path.join(self._tmpdir, "qmp.sock")
        self.stderr_path = os.path.join(self._tmpdir, "qemu.stderr")

        backend = (
            f"memory-backend-file,id={self.backend_id},size={size},"
            f"mem-path={_opt(os.fspath(self.ram_path))},share=on"
        )
        if machine == "none":
            machine_args = ["-M", f"none,memory-backend={self.backend_id}"]
        else:
            # -m must equal the backend size; "B" keeps it exact (a bare
            # number would be MiB).
            machine_args = [
                "-M",
                f"q35,memory-backend={self.backend_id}",
                "-m",
                f"{size}B",
            ]
        self.args: list[str] = [
            binary,
            "-nodefaults",
            "-display",
            "none",
            "-S",  # never run guest code: the RAM must stay the file's bytes
            *machine_args,
            "-object",
            backend,
            "-qmp",
            f"unix:{_opt(self.socket_path)},server=on,wait=off",
            *(["-incoming", "defer"] if incoming else []),
            *extra_args,
        ]
        setpriv = shutil.which("setpriv")
        argv = [setpriv, "--pdeathsig", "KILL", "--", *self.args] if setpriv else self.args

        with open(self.stderr_path, "wb") as err:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                close_fds=True,
            )
        # Reaps QEMU even if close() is never called (e.g. the object is
        # dropped, or the interpreter exits with the VM still open).
        self._finalizer = weakref.finalize(self, _terminate, self.proc, self._tmpdir)
        try:
            self.qmp = QMP(
                self.socket_path,
                timeout=startup_timeout,
                alive=lambda: self.proc.poll() is None,
            )
        except QemuError as exc:
            stderr = self.stderr_tail()
            self._finalizer()
            raise QemuError(
                f"QEMU did not start: {exc}\ncommand: {' '.join(self.args)}",
                desc=exc.desc,
                stderr=stderr,
            ) from exc
        except BaseException:
            self._finalizer()
            raise

    # -- lifecycle --------------------------------------------------------

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self.proc.pid

    def stderr_tail(self, limit: int = _STDERR_TAIL) -> str:
        """The last ``limit`` characters QEMU wrote to stderr (or stdout)."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - limit, 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit, kill it if it will not, reap it, clean up.

        Idempotent. ``quit`` first, so QEMU flushes and unmaps the RAM file
        itself; the kill is only the fallback.
        """
        if not self._finalizer.alive:
            return
        if self.proc.poll() is None:
            # QEMU may close the socket before answering, or be wedged.
            with contextlib.suppress(QemuError):
                self.qmp.execute("quit", timeout=timeout)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.qmp.close()
        self._finalizer()  # kills if still alive, reaps, removes the temp dir

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a stream for this VM must say -----------------------------------

    def machine_type(self) -> str:
        """The machine type QEMU writes in a stream, and demands of one it loads.

        ``-M q35`` is an alias: the stream names the versioned machine behind
        it (``pc-q35-10.0`` on QEMU 10.0), so a file meant for this VM must
        carry that name, not the alias.
        """
        machines: list[dict[str, Any]] = self.qmp.execute("query-machines")
        for entry in machines:
            if self.machine in (entry.get("name"), entry.get("alias")):
                return str(entry["name"])
        raise QemuError(f"QEMU lists no machine named or aliased {self.machine!r}")

    def ram_blocks(self) -> dict[str, int]:
        """The VM's RAM blocks in QEMU's order: name -> used length in bytes.

        These are the blocks (and lengths) QEMU writes in a stream; a loaded
        stream may name only some of them. QMP has no command for this, so it
        is read from HMP's ``info ramblock`` table (name first, then page
        size, offset, used, total, host address, ro/rw).
        """
        table: str = self.qmp.execute("human-monitor-command", {"command-line": "info ramblock"})
        blocks: dict[str, int] = {}
        for line in table.splitlines()[1:]:  # the first line is the header
            fields = line.split()
            if fields:
                blocks[fields[0]] = int(fields[-4], 16)
        return blocks

    # -- migration ------------------------------------------------------------

    def query_migrate(self) -> dict[str, Any]:
        """QEMU's ``query-migrate`` (on a destination: the incoming side)."""
        info: dict[str, Any] = self.qmp.execute("query-migrate")
        return info

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        multifd_channels: int = 0,
        direct_io: bool = False,
        offset: int = 0,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Save the VM to ``path`` with mapped-ram; return the final query-migrate.

        ``multifd_channels=0`` is QEMU's single-threaded mapped-ram save; N > 0
        turns on multifd with N channels. ``direct_io`` opens the channels with
        O_DIRECT; QEMU silently ignores it without multifd, so that combination
        is refused here rather than measured by mistake. ``offset`` places the
        stream at that byte of the file (``file:PATH,offset=N``); QEMU keeps
        the bytes before it and truncates the file to ``offset`` first.

        The result carries ``total-time`` (ms) and ``ram`` counters. On failure
        raises :class:`QemuError` with QEMU's ``error-desc`` and stderr.

        One save per VM: after a migration QEMU leaves the VM in
        ``postmigrate`` and refuses another ("Can't migrate the vm that was
        paused due to previous migration").
        """
        if direct_io and multifd_channels <= 0:
            raise ValueError("direct_io only takes effect with multifd (multifd_channels > 0)")
        uri = self._uri(path, offset)
        self._configure(multifd_channels, direct_io)
        started = time.monotonic()
        try:
            self.qmp.execute("migrate", uri=uri)
        except QemuError as exc:
            raise self._error(f"migrate to {path} refused: {exc.desc}", exc.desc) from exc
        return self._wait_migration("save", started, timeout)

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        multifd_channels: int = 0,
        direct_io: bool = False,
        offset: int = 0,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Load ``path`` into this VM (started with ``incoming=True``).

        The destination sets its own capabilities: mapped-ram must be on (it is
        one of the capabilities QEMU checks against the file), while multifd
        and its channel count need not match the saver's: the file layout does
        not depend on them. ``direct_io`` makes the destination's channels read
        with O_DIRECT; it is the destination's own choice.

        Returns the final query-migrate (status ``completed``), plus
        ``"wall-time"``: milliseconds from migrate-incoming to the poll that
        saw completion (polled every 10 ms at most), measured here because an
        incoming QEMU's query-migrate holds nothing but ``status``.

        A failed load makes QEMU report ``failed`` (QEMU >= 9.1, with
        ``exit-on-error`` off) or exit; either way :class:`QemuError` carries
        its stderr, which is where QEMU says why. QEMU 10.0.2 crashes with
        SIGSEGV, printing nothing, when a multifd load meets a file shorter
        than its headers promise; the error then says so.
        """
        if not self.incoming:
            raise QemuError("load() needs a VM started with incoming=True")
        if direct_io and multifd_channels <= 0:
            raise ValueError("direct_io only takes effect with multifd (multifd_channels > 0)")
        args: dict[str, Any] = {"uri": self._uri(path, offset)}
        self._configure(multifd_channels, direct_io)
        if self.version is None or self.version >= _EXIT_ON_ERROR_MIN_VERSION:
            # Keep QEMU alive on failure so that query-migrate can say why;
            # older QEMUs just exit and we fall back on stderr.
            args["exit-on-error"] = False
        started = time.monotonic()
        try:
            self.qmp.execute("migrate-incoming", args)
        except QemuError as exc:
            raise self._error(
                f"migrate-incoming from {path} refused: {exc.desc}", exc.desc
            ) from exc
        info = self._wait_migration("load", started, timeout)
        info["wall-time"] = round((time.monotonic() - started) * 1000)
        return info

    def _uri(self, path: str | os.PathLike[str], offset: int) -> str:
        p = os.fspath(path)
        if ",offset=" in p:
            raise ValueError(f"QEMU cannot express this path in a file: URI: {p!r}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        return f"file:{p},offset={offset}" if offset else f"file:{p}"

    def _configure(self, multifd_channels: int, direct_io: bool) -> None:
        """Set every capability/parameter a save or load depends on.

        All are set explicitly, not only the ones that differ from QEMU's
        defaults, so that what a VM does never depends on QEMU's defaults.
        """
        if multifd_channels < 0:
            raise ValueError(f"multifd_channels must be >= 0, not {multifd_channels}")
        multifd = multifd_channels > 0
        caps = [
            {"capability": "mapped-ram", "state": True},
            {"capability": "multifd", "state": multifd},
        ]
        self.qmp.execute("migrate-set-capabilities", capabilities=caps)

        # max-bandwidth defaults to 128 MiB/s even for files: without 0 every
        # timing would measure QEMU's throttle.
        params: dict[str, Any] = {"max-bandwidth": 0}
        if multifd:
            params["multifd-channels"] = multifd_channels
        if self.version is None or self.version >= _DIRECT_IO_MIN_VERSION:
            params["direct-io"] = direct_io
        elif direct_io:
            raise QemuError(f"QEMU {self.version} has no direct-io (needs 9.1)")
        self.qmp.execute("migrate-set-parameters", params)

    def _wait_migration(self, what: str, started: float, timeout: float) -> dict[str, Any]:
        """Poll query-migrate until the migration completes; raise otherwise."""
        deadline = started + timeout
        delay = 0.002
        while True:
            if self.proc.poll() is not None:
                raise self._error(f"{what}: {self._exit_reason()}")
            try:
                info = self.query_migrate()
            except QemuError as exc:
                # Usually QEMU dying during a load, racing with our poll.
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    raise self._error(f"{what}: {exc}", exc.desc) from exc
                raise self._error(f"{what}: {self._exit_reason()}", exc.desc) from exc
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                desc = info.get("error-desc")
                raise self._error(f"{what} {status}: {desc or '(no error-desc)'}", desc)
            if time.monotonic() >= deadline:
                if what == "save":
                    with contextlib.suppress(QemuError):
                        self.qmp.execute("migrate_cancel")
                raise self._error(f"{what} not completed after {timeout} s (status {status})")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _exit_reason(self) -> str:
        """How QEMU ended, for messages; a signal means QEMU itself crashed."""
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"QEMU was killed by {name}"
        return f"QEMU exited with status {rc}"

    def _error(self, message: str, desc: str | None = None) -> QemuError:
        return QemuError(message, desc=desc, stderr=self.stderr_tail())
