"""QEMU processes for the QEMU driver: command lines, launch, liveness, files.

Every guest owns a directory ``<run_dir>/<uuid>/``::

    meta.json      0600  name, domain ID, memory, vCPUs, config, Berth state
    qmp.sock             the agent's QMP monitor (short sessions, one per operation)
    watch.sock           a second QMP monitor, held open while a migration is watched
    console.sock         the serial port (ttyS0): output and input (see console.py)
    console.ring   0600  the console's newest output, kept by the agent
    qemu.pid             written by QEMU (-pidfile)
    qemu.log             QEMU's stderr (-D keeps it open after -daemonize)

QEMU runs daemonized (``-daemonize``): it is not the agent's child, so guests
outlive an agent restart, and a new agent re-attaches to them through the
sockets in these directories.

Django-free, standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import console
from .base import HypervisorError, InvalidRequest
from .qmp import QMP, QMPError

QEMU_BINARY = "qemu-system-x86_64"
MACHINE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_LOADERS = 16
GUEST_KEYS = ("machine", "initrd", "append", "disk", "loader")  # besides kernel
LOG_TAIL = 2000

# The guest that runs when the config names no kernel and no disk: a boot
# sector that enables interrupts, halts until the next timer tick and counts
# ticks in the dword at 0x7e00 - it really executes (the counter moves) and
# costs almost no host CPU under TCG.
#   31 C0 xor ax,ax | 8E D8 mov ds,ax | FB sti
#   F4 hlt | 66 FF 06 00 7E inc dword [0x7e00] | EB F8 jmp hlt
BOOT_LOOP = bytes.fromhex("31c08ed8fbf466ff06007eebf8")
TICK_COUNTER = 0x7E00


def boot_sector() -> bytes:
    return BOOT_LOOP + bytes(510 - len(BOOT_LOOP)) + b"\x55\xaa"


class QemuFailed(HypervisorError):
    """QEMU could not be started, or died; the message quotes its log."""


@dataclass(frozen=True)
class TlsFiles:
    """This host's certificate, key and the deployment CA (PEM files)."""

    cert: str
    key: str
    ca: str


# --------------------------------------------------------------------------
def check_config(config: dict[str, Any]) -> None:
    """Refuse what would make a bad or dangerous command line."""
    machine = config.get("machine", "pc")
    if not isinstance(machine, str) or not MACHINE.match(machine):
        raise InvalidRequest(f"config.machine {machine!r} is not a QEMU machine type")
    for key in ("kernel", "initrd", "disk"):
        value = config.get(key, "")
        if not isinstance(value, str):
            raise InvalidRequest(f"config.{key} must be a path")
        if value and not os.path.isfile(value):
            raise InvalidRequest(f"config.{key}: {value} is not a file on this host")
    if config.get("initrd") and not config.get("kernel"):
        raise InvalidRequest("config.initrd needs config.kernel")
    if not isinstance(config.get("append", ""), str):
        raise InvalidRequest("config.append must be a string")
    loaders = config.get("loader", [])
    if not isinstance(loaders, list) or len(loaders) > MAX_LOADERS:
        raise InvalidRequest(f"config.loader must be a list of at most {MAX_LOADERS} entries")
    for entry in loaders:
        if not _loader_ok(entry):
            raise InvalidRequest("config.loader entries are {addr, data, data_len in 1/2/4/8} "
                                 "or {addr, file} (a raw image loaded at addr)")


def _loader_ok(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("addr"), int) \
            or entry["addr"] < 0:
        return False
    if "file" in entry:
        return set(entry) == {"addr", "file"} and isinstance(entry["file"], str) \
            and os.path.isabs(entry["file"]) and os.path.isfile(entry["file"])
    data, size = entry.get("data"), entry.get("data_len", 8)
    return (not set(entry) - {"addr", "data", "data_len"} and isinstance(data, int)
            and size in (1, 2, 4, 8) and 0 <= data < 1 << (8 * size))


def _opt(value: str) -> str:
    """Escape a value inside a QEMU ``-opt key=value,...`` list."""
    return value.replace(",", ",,")


def command_line(directory: Path, *, name: str, uuid: str, memory_mib: int, vcpus: int,
                 config: dict[str, Any], incoming: bool, paused: bool,
                 binary: str = QEMU_BINARY) -> list[str]:
    machine = config.get("machine", "pc")
    argv = [binary, "-name", f"guest={_opt(name)}", "-uuid", uuid,
            "-machine", f"{machine},accel=tcg", "-m", str(memory_mib), "-smp", str(vcpus),
            "-nodefaults", "-no-user-config", "-display", "none",
            # The RTC follows the VM clock: a paused guest's state does not
            # change with wall time.
            "-rtc", "clock=vm",
            # Relative to the guest's directory (QEMU starts there and binds
            # before it daemonizes): a unix socket path is limited to 108 bytes.
            "-qmp", "unix:qmp.sock,server=on,wait=off",
            "-qmp", "unix:watch.sock,server=on,wait=off",
            # Every guest has a serial port (-nodefaults gives none).
            *console.command_line(),
            "-daemonize", "-pidfile", str(directory / "qemu.pid"),
            "-D", str(directory / "qemu.log")]
    if config.get("kernel"):
        argv += ["-kernel", config["kernel"]]
        if config.get("initrd"):
            argv += ["-initrd", config["initrd"]]
        if config.get("append"):
            argv += ["-append", config["append"]]
    disk = config.get("disk") or str(directory / "boot.img")
    if config.get("disk") or not config.get("kernel"):
        argv += ["-drive", f"file={_opt(disk)},format=raw,if=ide"]
    if not incoming:
        # Initial memory content applies to a fresh boot only: a restored or
        # migrated guest's memory comes from its stream, nowhere else.
        for entry in config.get("loader", []):
            if "file" in entry:
                argv += ["-device", f"loader,addr={entry['addr']:#x},"
                         f"file={_opt(entry['file'])},force-raw=on"]
            else:
                argv += ["-device", f"loader,addr={entry['addr']:#x},data={entry['data']:#x},"
                         f"data-len={entry.get('data_len', 8)}"]
    if incoming:
        argv += ["-incoming", "defer"]
    if incoming or paused:
        argv += ["-S"]
    return argv


def launch(directory: Path, argv: list[str], *, timeout: float = 30.0) -> int:
    """Start QEMU daemonized; its pid once its monitor answers."""
    if not (directory / "boot.img").exists():
        (directory / "boot.img").write_bytes(boot_sector())
    log = directory / "qemu.log"
    with open(log, "ab") as err:
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err, timeout=timeout, check=False, cwd=directory)
        except FileNotFoundError:
            raise QemuFailed(f"{argv[0]} is not installed on this host") from None
        except subprocess.TimeoutExpired:
            raise QemuFailed(f"QEMU did not start within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise QemuFailed(f"QEMU refused to start: {log_tail(directory)}")
    pid = read_pid(directory)
    if pid is None:
        raise QemuFailed(f"QEMU started but wrote no pid file: {log_tail(directory)}")
    return pid


def log_tail(directory: Path) -> str:
    try:
        text = (directory / "qemu.log").read_text(errors="replace")
    except OSError:
        return "no log"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-LOG_TAIL:] or "no message"


def read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_qemu(pid: int | None, uuid: str) -> bool:
    """``pid`` is the QEMU of this guest (not a recycled pid)."""
    if not alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return uuid.encode() in f.read().split(b"\0")
    except OSError:
        return False


def kill(pid: int | None, uuid: str, timeout: float = 5.0) -> None:
    """SIGKILL this guest's QEMU and wait for it to be gone."""
    if not is_qemu(pid, uuid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def remove_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------
def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically, 0600."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def tls_dir(run_dir: Path, files: TlsFiles, endpoint: str) -> Path:
    """The directory layout QEMU's ``tls-creds-x509`` wants, as symlinks to
    the host's own files (the key is never copied)."""
    directory = run_dir / f"tls-{endpoint}"
    directory.mkdir(mode=0o700, exist_ok=True)
    for name, target in (("ca-cert.pem", files.ca), (f"{endpoint}-cert.pem", files.cert),
                         (f"{endpoint}-key.pem", files.key)):
        link = directory / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(os.path.abspath(target))
    return directory


# --------------------------------------------------------------------------
@contextlib.contextmanager
def memory_reader(directory: Path) -> Iterator[tuple[str, _FifoReader]]:
    """A FIFO QEMU can ``pmemsave`` into and a thread reading it: guest
    memory reaches the agent through a pipe, never a file on disk."""
    path = directory / f"mem-{secrets.token_hex(4)}.fifo"
    os.mkfifo(path, 0o600)
    reader = _FifoReader(path)
    try:
        yield str(path), reader
    finally:
        reader.release()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _FifoReader:
    """Hashes (and optionally keeps a slice of) what arrives on a FIFO."""

    def __init__(self, path: Path):
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
        self.keep: tuple[int, int] | None = None  # (offset, length) to keep
        self.kept = bytearray()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"pmemsave-{path.name}")
        self._thread.start()

    def _run(self) -> None:
        with open(self.path, "rb") as f:  # blocks until QEMU opens it
            while chunk := f.read(1 << 20):
                self.digest.update(chunk)
                if self.keep is not None:
                    start, length = self.keep
                    lo, hi = max(start - self.size, 0), min(start + length - self.size,
                                                           len(chunk))
                    if lo < hi:
                        self.kept += chunk[lo:hi]
                self.size += len(chunk)

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise QemuFailed("QEMU did not finish writing guest memory")

    def release(self) -> None:
        """Unblock the reader if QEMU never opened the FIFO."""
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            self._thread.join(5)


def pmemsave(qmp: QMP, directory: Path, addr: int, size: int, *,
             keep: tuple[int, int] | None = None) -> _FifoReader:
    """Stream ``size`` bytes of guest-physical memory from ``addr`` through a
    FIFO; the reader holds their SHA-256 (and the ``keep`` slice)."""
    with memory_reader(directory) as (path, reader):
        reader.keep = keep
        try:
            answer = qmp.hmp(f'pmemsave {addr} {size} "{path}"')
        except QMPError as exc:
            raise QemuFailed(f"cannot read guest memory: {exc}") from None
        if answer.strip():
            raise QemuFailed(f"cannot read guest memory: {answer.strip()}")
        reader.wait(60 + size / (50 << 20))
    return reader
