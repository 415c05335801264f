"""QEMU guests over the relocation channel: QEMU's own TLS stream between two
real qemu-system-x86_64 processes, with the channel's ticket, refusals and abort."""
from __future__ import annotations

import secrets
import shutil
import threading
import time
from typing import Any

import pytest

from migrator.hypervisor import GuestSpec
from migrator.hypervisor.qemu import QemuDriver, TlsFiles
from migrator.hypervisor.qemu_process import alive
from migrator.relocation import HostFacts, MigrationSettings, RelocationServer, TicketBook
from migrator.relocation.qemu_tls import QemuMigration, qemu_identity
from migrator.tls import AllowList
from tests.migrator.relocation.conftest import IP, STORAGE, SUBNET, TICKET
from tests.support.polling import wait_for

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed "
                                       "(apt-get install qemu-system-x86)")
MARKER_ADDR = 0x2000000


def tls(host) -> TlsFiles:
    return TlsFiles(str(host.cert), str(host.key), str(host.ca))


@pytest.fixture
def hosts(tmp_path, pki):
    source = QemuDriver("hostb", 512, tmp_path / "b", tls=tls(pki["hostb"]))
    dest = QemuDriver("hostc", 512, tmp_path / "c", tls=tls(pki["hostc"]))
    tickets, events = TicketBook(), []
    server = RelocationServer(dest, HostFacts(SUBNET, [STORAGE], 100.0), pki["hostc"].server(),
                              AllowList(["hostb"]), tickets, events.append, port=0,
                              io_timeout=10.0, handshake_timeout=5.0, commit_timeout=10.0)
    server.start()
    yield source, dest, server, tickets, events
    server.stop()
    source.shutdown_all()
    dest.shutdown_all()


def guest(driver: QemuDriver, marker: int):
    return driver.create(GuestSpec("web-1", 64, 1, {
        "ip": IP, "storage": [STORAGE], "loader": [{"addr": MARKER_ADDR, "data": marker}]}))


def engine(source, uuid, server, context, events, **settings: Any) -> QemuMigration:
    return QemuMigration(source, uuid, "127.0.0.1", server.port, "hostc", TICKET, context,
                         MigrationSettings(io_timeout=10, commit_timeout=10, **settings),
                         events.append, source_host="hostb")


def wait_until(check, what: str, timeout: float = 15.0):
    return wait_for(check, what, timeout)


def test_a_qemu_guest_migrates_over_tls_with_its_memory_and_the_source_is_gone(hosts, pki):
    source, dest, server, tickets, _ = hosts
    marker = secrets.randbits(63)
    info = guest(source, marker)
    pid = source._guest(info.uuid).pid
    tickets.expect(TICKET, info.uuid, "hostb")
    events: list[dict] = []
    result = engine(source, info.uuid, server, pki["hostb"].client(), events).run()
    assert result["state"] == "succeeded", result
    assert result["rounds"] >= 1 and result["bytes_sent"] > 0 and result["downtime_ms"] > 0
    assert result["qemu"]["status"] == "completed"
    assert 0 < result["qemu"]["transferred"] < result["bytes_sent"]  # + the channel's frames
    assert [e for e in events if e["kind"] == "round"]
    assert source.list() == [] and not alive(pid)
    moved = dest.get(info.uuid)
    assert moved.active and moved.state.value == "running"
    assert int.from_bytes(dest.read_memory(info.uuid, MARKER_ADDR, 8), "little") == marker


def test_abort_during_qemu_precopy_leaves_the_source_running_and_nothing_on_the_destination(
        hosts, pki):
    source, dest, server, tickets, dest_events = hosts
    info = guest(source, 0x5EED)
    tickets.expect(TICKET, info.uuid, "hostb")
    events: list[dict] = []
    mig = engine(source, info.uuid, server, pki["hostb"].client(), events)
    mig.max_bandwidth = 32 << 10  # slow enough to abort in the middle of round 1
    thread = threading.Thread(target=mig.run)
    thread.start()
    wait_until(lambda: any(e.get("stage") == "pre-copy" for e in events), "pre-copy")
    time.sleep(0.3)
    assert mig.abort("aborted by the test")
    thread.join(30)
    assert mig.result["state"] == "aborted", mig.result
    after = source.get(info.uuid)
    assert after.active and after.state.value == "running"
    wait_until(lambda: dest.list() == [] and dest.capacity().reserved_mib == 0,
               "the destination to discard its QEMU")
    assert [e for e in dest_events if e["kind"] == "discarded"]
    assert not list((dest.run_dir).glob("*/qemu.pid"))


def test_a_source_certified_by_another_ca_is_refused_before_any_qemu_starts(hosts, pki):
    source, dest, server, tickets, dest_events = hosts
    info = guest(source, 1)
    tickets.expect(TICKET, info.uuid, "hostb")
    result = engine(source, info.uuid, server, pki["rogue_hostb"].client(), []).run()
    assert result["state"] == "failed" and result["stage"] == "reservation"
    assert source.get(info.uuid).active
    assert dest.list() == []
    assert [e for e in dest_events if e["kind"] == "refused" and e["stage"] == "tls"]


def test_qemus_own_tls_refuses_another_ca_and_another_host_then_takes_the_ticketed_one(
        hosts, pki):
    """The TLS port of the incoming QEMU itself: verify-peer and authz-simple."""
    source, dest, _, _, _ = hosts
    info = guest(source, 7)
    res = dest.reserve(info.uuid, 64)
    dest.commit_reservation(res.id, GuestSpec("web-1", 64, 1, info.config, uuid=info.uuid))
    port = dest.listen_incoming(info.uuid, "127.0.0.1", qemu_identity("hostb"))

    def attempt(files: TlsFiles) -> dict:
        source.tls = files
        source.migrate_start(info.uuid, "127.0.0.1", port, tls_hostname="127.0.0.1",
                             parameters={"max-bandwidth": 1 << 40}, capabilities={})
        return wait_until(lambda: (s := source.migration_status(info.uuid))["status"]
                          in ("completed", "failed") and s, "the attempt to end")

    # QEMU checks its own certificate against its CA file: the impostor's
    # bundle holds its own CA and the real one (to verify the destination).
    rogue = pki["rogue_hostb"]
    bundle = rogue.cert.parent / "both-cas.pem"
    bundle.write_bytes((rogue.cert.parent.parent / "rogue-ca" / "ca-cert.pem").read_bytes()
                       + rogue.ca.read_bytes())
    impostors = (TlsFiles(str(rogue.cert), str(rogue.key), str(bundle)),  # another CA
                 tls(pki["hostd"]))  # the right CA, the wrong host
    log = dest.run_dir / info.uuid / "qemu.log"
    refusals = ("hasn't got a known issuer", "is denied")
    for impostor, refusal in zip(impostors, refusals, strict=True):
        attempt(impostor)
        # Under TLS 1.3 the client may finish sending before the server has
        # judged its certificate, so the source alone cannot tell: the
        # destination's QEMU is what must refuse - and the relocation
        # channel's COMMIT only succeeds once the destination completed.
        wait_until(lambda text=refusal: text in log.read_text(errors="replace"),
                   f"the destination to log {refusal!r}")
        assert dest.migration_status(info.uuid).get("status") != "completed"
        assert not dest.get(info.uuid).active
        if not source.get(info.uuid).active:
            source.resume(info.uuid)  # what the engine's rollback does
        log.write_text("")
    assert attempt(tls(pki["hostb"]))["status"] == "completed"
    assert wait_until(lambda: dest.migration_status(info.uuid).get("status") == "completed",
                      "the destination to load the stream")


def test_non_live_qemu_migration_pauses_first_and_resumes_on_the_destination(hosts, pki):
    source, dest, server, tickets, _ = hosts
    info = guest(source, 99)
    tickets.expect(TICKET, info.uuid, "hostb")
    events: list[dict] = []
    result = engine(source, info.uuid, server, pki["hostb"].client(), events, live=False).run()
    assert result["state"] == "succeeded", result
    assert result["stop_reason"] == "not_live"
    assert dest.get(info.uuid).active and source.list() == []
