"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket).

The QEMU driver talks to each guest's QEMU through its QMP socket.  A
connection is opened per operation (`QMP.session`): QEMU serves one client
per monitor socket, so holding none open leaves the socket free for another
agent process after a restart, and there is no shared connection state
between the driver's threads.  File descriptors (a socketpair end for a save
stream, a pipe for a restore) travel with ``getfd`` as SCM_RIGHTS ancillary
data, which is how QEMU's ``fd:`` migration URIs receive them.

Asynchronous events that arrive while waiting for an answer are kept in
``events`` (the driver polls state instead of relying on them).

Django-free, standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

MAX_LINE = 16 * 1024 * 1024  # human-monitor-command answers (xp) can be long


class QMPError(Exception):
    """QEMU answered with an error, or the monitor is unreachable."""

    def __init__(self, message: str, error_class: str = ""):
        super().__init__(message)
        self.error_class = error_class


class QMPGone(QMPError):
    """The socket is missing, refused or closed: QEMU is not there (anymore)."""


class QMP:
    """One negotiated QMP connection.  Not thread-safe: one per thread."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path, self.timeout = path, timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            connect_unix(self._sock, path)
            greeting = self._read()
            if "QMP" not in greeting:
                raise QMPError(f"{path} is not a QMP monitor")
            self.command("qmp_capabilities")
        except OSError as exc:
            self.close()
            raise QMPGone(f"QEMU monitor {path} unreachable: {exc}") from None
        except QMPError:
            self.close()
            raise

    @classmethod
    @contextlib.contextmanager
    def session(cls, path: str, timeout: float = 10.0) -> Iterator[QMP]:
        qmp = cls(path, timeout)
        try:
            yield qmp
        finally:
            qmp.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- commands -----------------------------------------------------------
    def command(self, name: str, args: dict[str, Any] | None = None, *,
                fds: list[int] | None = None) -> Any:
        """Run one command; its ``return`` value, or `QMPError`."""
        message: dict[str, Any] = {"execute": name}
        if args:
            message["arguments"] = args
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self._sock, [data], fds)
            else:
                self._sock.sendall(data)
            while True:
                answer = self._read()
                if "event" in answer:
                    self.events.append(answer)
                    continue
                break
        except OSError as exc:
            raise QMPGone(f"QEMU monitor {self.path}: {name} failed: {exc}") from None
        if "error" in answer:
            err = answer["error"]
            raise QMPError(f"{name}: {err.get('desc', err)}", err.get("class", ""))
        return answer.get("return")

    def hmp(self, line: str) -> str:
        """A human monitor command (for the few things QMP lacks, e.g. pmemsave)."""
        return str(self.command("human-monitor-command", {"command-line": line}))

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QMPGone(f"QEMU monitor {self.path} closed the connection")
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise QMPError(f"QEMU monitor {self.path} sent an oversized message")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            value = json.loads(line)
        except ValueError:
            raise QMPError(f"QEMU monitor {self.path} sent malformed JSON") from None
        if not isinstance(value, dict):
            raise QMPError(f"QEMU monitor {self.path} sent a non-object")
        return value


def connect_unix(sock: socket.socket, path: str) -> None:
    """Connect even when the path is longer than a unix socket address
    allows (108 bytes): through the directory's /proc/self/fd entry."""
    if len(path.encode()) < 100:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    finally:
        os.close(fd)


def command(path: str, name: str, args: dict[str, Any] | None = None, *,
            timeout: float = 10.0) -> Any:
    """Connect, run one command, disconnect."""
    with QMP.session(path, timeout) as qmp:
        return qmp.command(name, args)
