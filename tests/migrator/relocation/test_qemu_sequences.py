"""Several operations on one real Linux guest (Debian's kernel, the busybox
initramfs): each one must set the migration parameters it relies on, whatever
the one before left in QEMU.

The guest counts TICK lines on its console; after each step the count goes on
from where it was (no reboot, no second copy), the guest runs on exactly one
host, and a save's memory digest is the restored guest's."""
from __future__ import annotations

import re
import secrets
import threading
import time

import pytest

from migrator.hypervisor import GuestSpec
from migrator.hypervisor.qemu import QemuDriver
from migrator.relocation import HostFacts, RelocationServer, TicketBook
from migrator.tls import AllowList
from tests.migrator.relocation.conftest import IP, STORAGE, SUBNET, TICKET
from tests.migrator.relocation.test_qemu_tls import engine, tls
from tests.support.guest_image import marker_for
from tests.support.polling import wait_for

pytestmark = pytest.mark.slow
TICK = re.compile(rb"TICK (\d+) [\d.]+\r?\n")
MEMORY_MIB = 128
SAVE_SECONDS = 8.0  # a paused 128 MiB guest saves in about a second; the TLS bug took 10 s


@pytest.fixture
def pair(tmp_path, pki):
    """hostb and hostc, each a QEMU host with a relocation server: a guest
    can go either way."""
    drivers = {name: QemuDriver(name, 512, tmp_path / name, tls=tls(pki[name]))
               for name in ("hostb", "hostc")}
    books = {name: TicketBook() for name in drivers}
    servers = {}
    for name, peer in (("hostb", "hostc"), ("hostc", "hostb")):
        servers[name] = RelocationServer(
            drivers[name], HostFacts(SUBNET, [STORAGE], 100.0), pki[name].server(),
            AllowList([peer]), books[name], lambda event: None, port=0, io_timeout=10.0,
            handshake_timeout=5.0, commit_timeout=10.0)
        servers[name].start()
    yield drivers, servers, books
    for server in servers.values():
        server.stop()
    for driver in drivers.values():
        driver.shutdown_all()
        driver.close()


def last_tick(driver: QemuDriver, uuid: str, since: int = 0) -> int:
    found = TICK.findall(driver.console_output(uuid, since).data)
    return int(found[-1]) if found else 0


def ticking_after(driver: QemuDriver, uuid: str, count: int) -> int:
    """Wait until the guest prints a TICK numbered above ``count``; its number."""
    return wait_for(lambda: (n := last_tick(driver, uuid)) > count and n,
                    f"a TICK above {count} on {driver.host_info().name}", 120)


def only_on(drivers: dict[str, QemuDriver], name: str, uuid: str) -> None:
    for other, driver in drivers.items():
        guests = [g.uuid for g in driver.list()]
        assert guests == ([uuid] if other == name else []), (other, guests)
    assert drivers[name].get(uuid).active


def migrate(drivers, servers, books, pki, uuid, source, dest, **tweak):
    books[dest].expect(TICKET, uuid, source)
    return engine(drivers[source], uuid, servers[dest],
                  pki[source].client(), [], **tweak)


def save(driver: QemuDriver, uuid: str) -> tuple[bytes, str, float]:
    """Pause, digest, save; the image, the digest and the save's seconds."""
    driver.pause(uuid)
    digest = driver.memory_digest(uuid)
    started = time.monotonic()
    image = b"".join(driver.save_stream(uuid))
    elapsed = time.monotonic() - started
    driver.destroy(uuid)
    return image, digest, elapsed


def restore(driver: QemuDriver, image: bytes, digest: str) -> str:
    info = driver.restore_stream([image], start=False)
    assert driver.memory_digest(info.uuid) == digest
    driver.resume(info.uuid)
    return info.uuid


def boot(drivers, real_guest, seed: str) -> tuple[str, int]:
    info = drivers["hostb"].create(GuestSpec("web-1", MEMORY_MIB, 1, real_guest.config(
        seed=seed, ip=IP, storage=[STORAGE])))
    return info.uuid, ticking_after(drivers["hostb"], info.uuid, 3)


def assert_marker_in_memory_only(driver: QemuDriver, uuid: str, seed: str, tmp_path) -> None:
    """The marker the guest computed at boot is in its memory still, and
    nowhere on disk (images, run directories, console files)."""
    marker = marker_for(seed)
    assert marker in driver.read_memory(uuid, 0, MEMORY_MIB << 20)
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_socket() and not path.is_fifo():
            assert marker not in path.read_bytes(), path


def test_a_guest_that_arrived_by_live_migration_saves_and_restores(
        pair, pki, real_guest, tmp_path):
    drivers, servers, books = pair
    seed = secrets.token_hex(8)
    uuid, count = boot(drivers, real_guest, seed)

    # Live migration hostb -> hostc: the guest arrives with its counter.
    result = migrate(drivers, servers, books, pki, uuid, "hostb", "hostc").run()
    assert result["state"] == "succeeded", result
    count = ticking_after(drivers["hostc"], uuid, count)
    only_on(drivers, "hostc", uuid)

    # Its QEMU still holds the incoming side's TLS parameters: the save must
    # not try TLS. Then it restores on hostb and counts on.
    image, digest, seconds = save(drivers["hostc"], uuid)
    assert seconds < SAVE_SECONDS, seconds
    assert restore(drivers["hostb"], image, digest) == uuid
    ticking_after(drivers["hostb"], uuid, count)
    only_on(drivers, "hostb", uuid)
    assert_marker_in_memory_only(drivers["hostb"], uuid, seed, tmp_path)


def test_a_guest_whose_migration_was_aborted_saves_and_restores(
        pair, pki, real_guest, tmp_path):
    drivers, servers, books = pair
    seed = secrets.token_hex(8)
    uuid, count = boot(drivers, real_guest, seed)

    # A migration hostb -> hostc aborted in its pre-copy...
    mig = migrate(drivers, servers, books, pki, uuid, "hostb", "hostc")
    mig.max_bandwidth = 64 << 10  # slow enough to abort in the middle of round 1
    thread = threading.Thread(target=mig.run)
    thread.start()
    wait_for(lambda: drivers["hostb"].migration_status(uuid).get("status") == "active",
             "QEMU's pre-copy", 30)
    time.sleep(0.5)
    assert mig.abort("aborted by the test")
    thread.join(30)
    assert mig.result["state"] == "aborted", mig.result
    count = ticking_after(drivers["hostb"], uuid, count)
    wait_for(lambda: drivers["hostc"].list() == [], "hostc to discard its QEMU", 30)
    only_on(drivers, "hostb", uuid)

    # ...leaves the client's TLS parameters (and its bandwidth) in QEMU: the
    # save must neither try TLS nor crawl. Then it restores on hostc.
    image, digest, seconds = save(drivers["hostb"], uuid)
    assert seconds < SAVE_SECONDS, seconds
    assert restore(drivers["hostc"], image, digest) == uuid
    ticking_after(drivers["hostc"], uuid, count)
    only_on(drivers, "hostc", uuid)
    assert_marker_in_memory_only(drivers["hostc"], uuid, seed, tmp_path)
