"""A QEMU guest's serial console, kept by the agent in a bounded ring.

What survives an agent restart decides the design.  QEMU outlives the agent
(``-daemonize``) and so do the guest's run directory's files; the agent's
memory does not.  So:

* the serial port's backend is a unix socket QEMU listens on
  (``console.sock`` in the guest's run directory, ``server=on,wait=off``):
  the agent connects as its one client, reads the output and writes input;
  when the agent goes away QEMU keeps the guest running, drops what the guest
  prints meanwhile (the guest never blocks on an absent reader) and takes
  the next agent's connection;
* the agent keeps the newest `RING_BYTES` of output per guest in a
  `ConsoleRing`, in memory and mirrored into ``console.ring`` (0600) beside
  the socket, so the next agent starts with what the previous one had read,
  and the ring's offsets go on from there.

What a restart loses: the output printed while no agent was connected (the
seconds between one agent's death and the next one's start).  QEMU 7.2 has no
chardev that both keeps output for an absent reader and accepts input
(``ringbuf`` keeps output, but ``ringbuf-write`` only appends to its own
buffer, it never reaches the guest), and a console without input is no
console.

The file is the console's history, plaintext like any serial log; it lives
and dies with the guest's run directory (0700) and is at most twice
`RING_BYTES` long (rewritten with the ring alone when it reaches that).

Django-free, standard library only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from .base import HypervisorError
from .qmp import connect_unix

log = logging.getLogger("berth.qemu")

RING_BYTES = 256 << 10     # per guest
CHARDEV = "berth-console"
SOCKET = "console.sock"    # relative to the guest's directory, as the monitors
RING_FILE = "console.ring"
READ_BYTES = 64 << 10
RETRY_SECONDS = 0.5
_BASE = struct.Struct("<Q")  # the file's header: the stream offset of its first byte


@dataclass(frozen=True)
class ConsoleOutput:
    """``data`` is the console's output from stream offset ``start`` to ``end``
    (offsets count every byte the guest printed since it booted here)."""

    start: int
    end: int
    data: bytes


class ConsoleRing:
    """The newest ``size`` bytes of a console, in memory and in ``path``."""

    def __init__(self, path: Path, size: int = RING_BYTES):
        self.path, self.size = path, size
        self._lock = threading.Lock()
        self._data = bytearray()
        self._end = 0
        self._file_bytes = 0
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("console %s unreadable (%s): starting empty", self.path, exc.strerror)
            return
        if len(raw) < _BASE.size:
            return
        (base,) = _BASE.unpack_from(raw)
        body = raw[_BASE.size:]
        self._data = bytearray(body[-self.size:])
        self._end = base + len(body)
        self._file_bytes = len(body)

    def append(self, chunk: bytes) -> None:
        if not chunk:
            return
        with self._lock:
            self._data += chunk
            del self._data[:-self.size]
            self._end += len(chunk)
            self._persist(chunk)

    def _persist(self, chunk: bytes) -> None:
        """Append to the file; rewrite it with the ring alone once it is
        twice the ring (appending keeps the usual write one syscall)."""
        try:
            if self._file_bytes and self._file_bytes + len(chunk) <= 2 * self.size:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                with os.fdopen(fd, "ab") as f:
                    f.write(chunk)
                self._file_bytes += len(chunk)
                return
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_BASE.pack(self._end - len(self._data)) + self._data)
            os.replace(tmp, self.path)
            self._file_bytes = len(self._data)
        except OSError:  # the guest's directory is being removed: memory only
            self._file_bytes = 0

    def read(self, since: int = 0) -> ConsoleOutput:
        """What the ring holds from offset ``since`` on (from its oldest byte
        if ``since`` is older)."""
        with self._lock:
            first = self._end - len(self._data)
            start = min(max(since, first), self._end)
            return ConsoleOutput(start, self._end, bytes(self._data[start - first:]))


class ConsoleReader:
    """A thread connected to one QEMU's console socket, appending what the
    guest prints to a `ConsoleRing`; `write` sends input."""

    def __init__(self, path: str, ring: ConsoleRing, name: str):
        self.path, self.ring = path, ring
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"console-{name}")
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._sock is None:
                raise ConsoleUnavailable("the guest's console is not connected")
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise ConsoleUnavailable(f"the guest's console: {exc.strerror}") from None

    def _run(self) -> None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connect_unix(sock, self.path)
            except OSError:
                sock.close()
                if not os.path.exists(self.path):
                    return  # the guest's directory is gone (or QEMU has no console)
                self._stop.wait(RETRY_SECONDS)
                continue
            with self._lock:
                if self._stop.is_set():  # stopped while connecting: nobody would shut it
                    sock.close()
                    return
                self._sock = sock
            try:
                while chunk := sock.recv(READ_BYTES):
                    self.ring.append(chunk)
            except OSError:
                pass
            finally:
                with self._lock:
                    self._sock = None
                sock.close()
            self._stop.wait(RETRY_SECONDS)


class ConsoleUnavailable(HypervisorError):
    """Input for a console no agent thread is connected to."""


def command_line() -> list[str]:
    """QEMU arguments: the serial port on the console socket."""
    return ["-chardev", f"socket,id={CHARDEV},path={SOCKET},server=on,wait=off",
            "-serial", f"chardev:{CHARDEV}"]
