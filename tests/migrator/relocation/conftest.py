"""Two simulated hosts, a throwaway CA, a relocation server, and a link that
can be cut: everything a live migration needs, in one process, over real
loopback TLS 1.3 with mutual certificates."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migrator.hypervisor import PAGE_SIZE, GuestSpec, SimDriver
from migrator.pki import CertificateAuthority
from migrator.relocation import (
    HostFacts,
    MigrationSettings,
    PrecopyMigration,
    RelocationServer,
    TicketBook,
)
from migrator.tls import AllowList, client_context, server_context

FAST_WEB = {"profile": "web", "rate": 20_000, "hot_fraction": 0.05}
SUBNET, IP, STORAGE = "10.0.0.0/24", "10.0.0.7", "hosta:/xen-storage"
TICKET = "t-" + "0123456789abcdef" * 2


@dataclass
class HostPki:
    name: str
    cert: Path
    key: Path
    ca: Path
    serial: int

    def server(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key, self.ca)

    def client(self) -> ssl.SSLContext:
        return client_context(self.cert, self.key, self.ca)


def _write_host(directory: Path, ca: CertificateAuthority, name: str,
                ca_file: Path | None = None) -> HostPki:
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_host_certificate(name, addresses=["127.0.0.1"])
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(issued.cert_pem)
    key.touch(mode=0o600)
    key.write_bytes(issued.key_pem)
    if ca_file is None:
        ca_file = directory / "ca.crt"
        ca_file.write_bytes(ca.ca_cert_pem())
    return HostPki(name, cert, key, ca_file, issued.serial)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("relocation-pki")
    ca = CertificateAuthority.load_or_create(root / "ca")
    rogue_ca = CertificateAuthority.load_or_create(root / "rogue-ca")
    hosts = {n: _write_host(root / "hosts", ca, n) for n in ("hostb", "hostc", "hostd")}
    # a rogue CA certifies "hostb"; its holder trusts the real CA to reach the server
    rogue = _write_host(root / "rogue", rogue_ca, "hostb", ca_file=hosts["hostb"].ca)
    return {**hosts, "rogue_hostb": rogue, "ca": hosts["hostb"].ca}


@dataclass
class Destination:
    driver: SimDriver
    server: RelocationServer
    tickets: TicketBook
    events: list[dict[str, Any]] = field(default_factory=list)
    hooks: dict[str, Any] = field(default_factory=dict)  # event kind/stage -> callable

    @property
    def port(self) -> int:
        return self.server.port

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]


@pytest.fixture
def drivers():
    made: list[SimDriver] = []

    def make(name: str, capacity_mib: int = 256, **kw: Any) -> SimDriver:
        driver = SimDriver(name, capacity_mib, **kw)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def source(drivers) -> SimDriver:
    return drivers("hostb")


@pytest.fixture
def destination(drivers, pki):
    """A factory for hostc's relocation server (stopped at teardown)."""
    started: list[RelocationServer] = []

    def make(driver: SimDriver | None = None, facts: HostFacts | None = None,
             allow: tuple[str, ...] = ("hostb",), **kw: Any) -> Destination:
        driver = driver or drivers("hostc")
        dest = Destination(driver, None, TicketBook())  # type: ignore[arg-type]

        def on_event(event: dict[str, Any]) -> None:
            dest.events.append(event)
            hook = dest.hooks.get(event.get("stage")) or dest.hooks.get(event["kind"])
            if hook is not None:
                hook(event)

        kw = {"io_timeout": 5.0, "handshake_timeout": 5.0, "commit_timeout": 5.0, **kw}
        dest.server = RelocationServer(
            driver, facts or HostFacts(SUBNET, [STORAGE], 100.0), pki["hostc"].server(),
            AllowList(allow), dest.tickets, on_event, port=0, **kw)
        dest.server.start()
        started.append(dest.server)
        return dest

    yield make
    for server in started:
        server.stop()


def web_guest(driver: SimDriver, mib: int = 16, workload: Any = None, **config: Any):
    cfg = {"ip": IP, "storage": [STORAGE], "workload": workload or FAST_WEB, **config}
    guest = driver.create(GuestSpec("web-1", mib, vcpus=2, config=cfg))
    wait_for_writes(driver, guest.uuid, 50)
    return guest


def wait_for_writes(driver: SimDriver, uuid: str, more: int, timeout: float = 5.0) -> None:
    target = driver.get(uuid).pages_written + more
    deadline = time.monotonic() + timeout
    while driver.get(uuid).pages_written < target:
        assert time.monotonic() < deadline, "the guest's workload made no progress"
        time.sleep(0.005)


def migration(source: SimDriver, guest_uuid: str, dest_port: int, pki: dict[str, Any], *,
              ticket: str = TICKET, context: ssl.SSLContext | None = None,
              dest_name: str = "hostc", events: list | None = None, hooks: dict | None = None,
              **settings: Any) -> PrecopyMigration:
    """An engine whose events land in ``events``; ``hooks`` maps a stage or
    event kind to a callable run (in the engine thread) when it is emitted."""
    events = events if events is not None else []
    hooks = hooks or {}

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        hook = hooks.get(event.get("stage")) if event["kind"] != "round" else None
        hook = hook or hooks.get(event["kind"])
        if hook is not None:
            hook(event)

    defaults = {"io_timeout": 5.0, "commit_timeout": 5.0, "connect_timeout": 5.0}
    engine = PrecopyMigration(source, guest_uuid, "127.0.0.1", dest_port, dest_name, ticket,
                              context or pki["hostb"].client(),
                              MigrationSettings(**{**defaults, **settings}), on_event)
    engine.events = events  # type: ignore[attr-defined]
    return engine


def assert_source_unharmed(source: SimDriver, uuid: str, before: np.ndarray) -> None:
    """The guest runs on the source as before: running, active, not
    migrating, no dirty log, full speed, and every page that changed since
    ``before`` was written by the guest itself (the journal), never by the
    migration."""
    info = source.get(uuid)
    assert info.state.value == "running" and info.active
    assert not info.dirty_log and info.throttle == 1.0
    wait_for_writes(source, uuid, 20)  # it really runs again
    source.pause(uuid)
    after = source.memory_snapshot(uuid)
    written = set(source.journal_take(uuid).tolist())
    changed = (before.reshape(-1, PAGE_SIZE) != after.reshape(-1, PAGE_SIZE)).any(axis=1)
    assert set(np.flatnonzero(changed).tolist()) <= written
    source.resume(uuid)


def snapshot_with_journal(source: SimDriver, uuid: str) -> np.ndarray:
    """Memory now, and a journal of every page the guest writes from now on."""
    source.pause(uuid)
    before = source.memory_snapshot(uuid)
    source.journal_start(uuid)
    source.resume(uuid)
    return before


def assert_destination_clean(dest: Destination, capacity_before) -> None:
    deadline = time.monotonic() + 5.0
    while dest.driver.list() or dest.driver.capacity() != capacity_before:
        assert time.monotonic() < deadline, (dest.driver.list(), dest.driver.capacity())
        time.sleep(0.01)


class Link:
    """A TCP relay between source and destination that a test can cut, at
    once or after some bytes from the source.  TLS runs end to end through
    it (it only ever sees ciphertext)."""

    def __init__(self, upstream_port: int, cut_after: int | None = None):
        self.upstream_port, self.cut_after = upstream_port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0
        self._socks: list[socket.socket] = []
        self._cut = threading.Event()
        self._blackhole: dict[str, bool] = {}
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(10)
        try:
            down, _ = self.listener.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._socks += [down, up]
        for a, b, count in ((down, up, True), (up, down, False)):
            t = threading.Thread(target=self._pump, args=(a, b, count), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while not self._cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if count and self.cut_after is not None and \
                        self.forwarded + len(data) >= self.cut_after:
                    self.cut()
                    return
                if self._blackhole.get("up" if count else "down"):
                    continue  # swallowed: the sender thinks it was delivered
                dst.sendall(data)
                if count:
                    self.forwarded += len(data)
        except OSError:
            pass
        finally:
            self.cut()

    def blackhole(self, direction: str, then_cut_after: float) -> None:
        """From now on drop what travels ``up`` (to the destination) or
        ``down`` (to the source); cut the link a bit later."""
        self._blackhole[direction] = True
        threading.Timer(then_cut_after, self.cut).start()

    def cut(self) -> None:
        """Drop the connection both ways, abruptly: both ends get a reset (a
        silent cable cut would only differ by reaching the I/O timeout)."""
        self._cut.set()
        for s in self._socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def link():
    made: list[Link] = []

    def make(upstream_port: int, cut_after: int | None = None) -> Link:
        made.append(Link(upstream_port, cut_after))
        return made[-1]

    yield make
    for item in made:
        item.close()
