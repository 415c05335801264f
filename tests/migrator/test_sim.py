"""The simulated hypervisor driver: real memory, dirty log, save/restore."""

import hashlib
import time

import numpy as np
import pytest

from migrator.hypervisor import (
    PAGE_SIZE,
    DigestMismatch,
    GuestExists,
    GuestNotFound,
    GuestSpec,
    GuestState,
    HypervisorDriver,
    IncompatibleHost,
    InsufficientMemory,
    InvalidGuestState,
    InvalidRequest,
    MalformedStream,
    ReservationNotFound,
    SaveStreamError,
    SimDriver,
    TruncatedStream,
)
from migrator.hypervisor.workload import REG_ICOUNT, REG_WRITES, VCPU_REGS

from .test_savestream import reseal

FAST_WEB = {"profile": "web", "rate": 20_000, "hot_fraction": 0.05}


@pytest.fixture
def hosts():
    made = []

    def make(name="host-a", capacity_mib=256, **kw):
        driver = SimDriver(name, capacity_mib, **kw)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.close()


@pytest.fixture
def host(hosts):
    return hosts()


def web_guest(driver, mib=8, start=True, workload=FAST_WEB, **kw):
    return driver.create(GuestSpec("web-1", mib, vcpus=2, start=start,
                                   config={"kernel": "/boot/vmlinuz-6.1", "ip": "10.0.0.7",
                                           "mounts": ["nfs:/xen-storage"],
                                           "workload": workload}, **kw))


def wait_for_writes(driver, uuid, at_least, timeout=5.0):
    deadline = time.monotonic() + timeout
    while driver.get(uuid).pages_written < at_least:
        assert time.monotonic() < deadline, "workload made no progress"
        time.sleep(0.01)


def changed_pages(before, after):
    diff = (before.reshape(-1, PAGE_SIZE) != after.reshape(-1, PAGE_SIZE)).any(axis=1)
    return set(np.flatnonzero(diff).tolist())


def test_sim_driver_implements_the_interface(host):
    assert isinstance(host, HypervisorDriver)
    info = host.host_info()
    assert (info.name, info.driver, info.arch, info.virt_features) == \
        ("host-a", "sim", "x86_64", ("vmx",))


def test_create_assigns_domids_and_completes_config(host):
    a = web_guest(host)
    b = host.create(GuestSpec("idle-1", 4, start=False))
    assert (a.domid, b.domid) == (1, 2)
    assert a.state is GuestState.RUNNING and a.active
    assert b.state is GuestState.PAUSED and not b.active
    assert a.config["ip"] == "10.0.0.7" and isinstance(a.config["seed"], int)
    assert b.config["workload"] == {"profile": "idle"}
    assert b.config["memory_content"] == {"zero": 0.6, "text": 0.25, "random": 0.15}
    assert [g.uuid for g in host.list()] == [a.uuid, b.uuid]
    assert host.get(b.uuid) == b
    with pytest.raises(GuestNotFound):
        host.get("00000000-0000-0000-0000-000000000000")


def test_memory_content_is_realistic_and_deterministic(hosts):
    spec = GuestSpec("db", 8, start=False, uuid="11111111-2222-3333-4444-555555555555",
                     config={"memory_content": {"text": 0.3, "random": 0.1}})
    a, b = hosts("a"), hosts("b")
    mem = a.memory_snapshot(a.create(spec).uuid).reshape(-1, PAGE_SIZE)
    b.create(spec)
    assert a.memory_digest(spec.uuid) == b.memory_digest(spec.uuid)
    npages = len(mem)
    nonzero = mem.any(axis=1)
    assert nonzero.sum() == round(npages * 0.3) + round(npages * 0.1)
    printable = ((mem >= 32) & (mem < 127)) | (mem == 10)
    text_like = nonzero & (printable | (mem == 0)).all(axis=1)
    assert text_like.sum() == round(npages * 0.3)  # random pages are not ASCII


def test_bad_specs_are_refused(host):
    for spec in (GuestSpec("", 4), GuestSpec("x", 0), GuestSpec("x", 4, vcpus=0),
                 GuestSpec("x", 4, config={"workload": "mining"}),
                 GuestSpec("x", 4, config={"workload": {"profile": "web", "rate": -1}}),
                 GuestSpec("x", 4, config={"memory_content": {"zero": 0.9, "text": 0.5}}),
                 GuestSpec("x", 4, uuid="not-a-uuid")):
        with pytest.raises(InvalidRequest):
            host.create(spec)
    assert host.list() == [] and host.capacity().used_mib == 0


def test_dirty_log_records_exactly_the_pages_written(host):
    g = web_guest(host)
    wait_for_writes(host, g.uuid, 1)
    host.pause(g.uuid)
    shadow = host.memory_snapshot(g.uuid)
    host.journal_start(g.uuid)
    host.dirty_log_start(g.uuid)
    host.resume(g.uuid)
    time.sleep(0.2)
    host.pause(g.uuid)
    logged = host.dirty_log_read_and_clear(g.uuid)
    written = set(host.journal_take(g.uuid).tolist())
    after = host.memory_snapshot(g.uuid)
    assert len(logged) > 100
    assert np.all(np.diff(logged) > 0)  # sorted, unique
    assert changed_pages(shadow, after) <= set(logged.tolist())
    assert set(logged.tolist()) == written
    # every write stamps a unique counter, so every logged page really changed
    assert changed_pages(shadow, after) == written
    assert len(host.dirty_log_read_and_clear(g.uuid)) == 0


def test_read_and_clear_is_atomic_while_running(host):
    g = web_guest(host)
    host.pause(g.uuid)
    shadow = host.memory_snapshot(g.uuid)
    host.journal_start(g.uuid)
    host.dirty_log_start(g.uuid)
    host.resume(g.uuid)
    rounds = []
    for _ in range(20):
        time.sleep(0.01)
        rounds.append(host.dirty_log_read_and_clear(g.uuid))
    host.pause(g.uuid)
    rounds.append(host.dirty_log_read_and_clear(g.uuid))
    logged = set(np.concatenate(rounds).tolist())
    assert logged == set(host.journal_take(g.uuid).tolist())
    assert logged == changed_pages(shadow, host.memory_snapshot(g.uuid))


def test_dirty_log_off_records_nothing(host):
    g = web_guest(host)
    with pytest.raises(InvalidGuestState, match="not enabled"):
        host.dirty_log_read_and_clear(g.uuid)
    host.dirty_log_start(g.uuid)
    host.dirty_log_stop(g.uuid)
    assert not host.get(g.uuid).dirty_log
    with pytest.raises(InvalidGuestState):
        host.dirty_log_read_and_clear(g.uuid)


def test_pause_freezes_memory_and_vcpus_and_resume_restarts(host):
    g = web_guest(host)
    wait_for_writes(host, g.uuid, 1)
    paused = host.pause(g.uuid)
    digest, regs = host.memory_digest(g.uuid), host.get_vcpu_state(g.uuid)
    host.dirty_log_start(g.uuid)
    time.sleep(0.15)
    assert host.memory_digest(g.uuid) == digest
    assert host.get_vcpu_state(g.uuid) == regs
    assert host.get(g.uuid).pages_written == paused.pages_written
    assert len(host.dirty_log_read_and_clear(g.uuid)) == 0
    assert host.pause(g.uuid).state is GuestState.PAUSED  # idempotent
    host.resume(g.uuid)
    wait_for_writes(host, g.uuid, paused.pages_written + 50)
    assert host.memory_digest(g.uuid) != digest
    after = np.frombuffer(host.get_vcpu_state(g.uuid), "<u8").reshape(2, VCPU_REGS)
    before = np.frombuffer(regs, "<u8").reshape(2, VCPU_REGS)
    assert after[:, REG_ICOUNT].sum() > before[:, REG_ICOUNT].sum()
    assert after[:, REG_WRITES].sum() > before[:, REG_WRITES].sum()


def test_a_runner_caught_mid_batch_cannot_write_after_pause(host):
    g = web_guest(host)
    target = host._guest(g.uuid)  # what the workload thread writes through
    host.pause(g.uuid)
    digest = host.memory_digest(g.uuid)
    assert target.workload_write(np.array([1, 2, 3])) is False
    assert host.memory_digest(g.uuid) == digest


def test_pause_resume_cycles_never_leak_writes(host):
    g = web_guest(host, workload={"profile": "db", "rate": 50_000})
    for _ in range(25):
        host.resume(g.uuid)
        time.sleep(0.004)
        paused = host.pause(g.uuid)
        digest = host.memory_digest(g.uuid)
        time.sleep(0.002)
        assert host.get(g.uuid).pages_written == paused.pages_written
        assert host.memory_digest(g.uuid) == digest


def test_read_and_write_pages(host):
    g = host.create(GuestSpec("p", 4, start=False))
    data = host.read_pages(g.uuid, [3, 1])
    assert len(data) == 2 * PAGE_SIZE
    mem = host.memory_snapshot(g.uuid).reshape(-1, PAGE_SIZE)
    assert data == mem[3].tobytes() + mem[1].tobytes()
    host.write_pages(g.uuid, np.array([5]), b"\x07" * PAGE_SIZE)
    assert host.read_pages(g.uuid, [5]) == b"\x07" * PAGE_SIZE
    with pytest.raises(InvalidRequest, match="out of range"):
        host.read_pages(g.uuid, [4 * 256])
    with pytest.raises(InvalidRequest):
        host.write_pages(g.uuid, [0, 1], b"\x00" * PAGE_SIZE)
    host.resume(g.uuid)
    with pytest.raises(InvalidGuestState):
        host.write_pages(g.uuid, [0], b"\x00" * PAGE_SIZE)
    with pytest.raises(InvalidGuestState):
        host.set_vcpu_state(g.uuid, bytes(VCPU_REGS * 8))


def test_capacity_accounting(hosts):
    host = hosts("small", 64)
    a = host.create(GuestSpec("a", 32, start=False))
    res = host.reserve("aaaaaaaa-0000-0000-0000-000000000001", 24)
    cap = host.capacity()
    assert (cap.total_mib, cap.used_mib, cap.reserved_mib, cap.free_mib) == (64, 32, 24, 8)
    with pytest.raises(InsufficientMemory, match="cannot fit 16 MiB: 8 MiB free of 64 MiB"):
        host.create(GuestSpec("b", 16))
    with pytest.raises(InsufficientMemory):
        host.reserve("aaaaaaaa-0000-0000-0000-000000000002", 9)
    with pytest.raises(GuestExists):
        host.reserve(a.uuid, 1)
    with pytest.raises(GuestExists):
        host.reserve(res.uuid, 1)
    assert host.capacity().free_mib == 8  # refusals claimed nothing
    host.release_reservation(res.id)
    with pytest.raises(ReservationNotFound):
        host.release_reservation(res.id)
    host.create(GuestSpec("b", 16, start=False))
    host.destroy(a.uuid)
    assert host.capacity().used_mib == 16
    with pytest.raises(GuestNotFound):
        host.destroy(a.uuid)


def test_reservation_commit_builds_an_incoming_guest(hosts):
    src, dst = hosts("src"), hosts("dst", 64)
    g = web_guest(src, start=False)
    res = dst.reserve(g.uuid, 8)
    spec = GuestSpec(g.name, g.memory_mib, g.vcpus, g.config, uuid=g.uuid)
    incoming = dst.commit_reservation(res.id, spec)
    assert incoming.state is GuestState.INCOMING and incoming.uuid == g.uuid
    assert dst.capacity().reserved_mib == 0 and dst.capacity().used_mib == 8
    with pytest.raises(ReservationNotFound):
        dst.commit_reservation(res.id, spec)
    npages = g.memory_mib * 256
    dst.write_pages(g.uuid, np.arange(npages), src.read_pages(g.uuid, np.arange(npages)))
    dst.set_vcpu_state(g.uuid, src.get_vcpu_state(g.uuid))
    assert dst.memory_digest(g.uuid) == src.memory_digest(g.uuid)
    assert dst.resume(g.uuid).state is GuestState.RUNNING


def test_manual_live_migration_through_the_interface(hosts):
    """Pre-copy with the driver calls the migration engine will use."""
    src, dst = hosts("src"), hosts("dst")
    g = web_guest(src)
    npages = g.memory_mib * 256
    src.begin_migration(g.uuid)
    res = dst.reserve(g.uuid, g.memory_mib)
    dst.commit_reservation(res.id, GuestSpec(g.name, g.memory_mib, g.vcpus, g.config,
                                             uuid=g.uuid))
    src.dirty_log_start(g.uuid)
    to_send = np.arange(npages)
    for _ in range(3):  # iterative pre-copy while the guest runs
        dst.write_pages(g.uuid, to_send, src.read_pages(g.uuid, to_send))
        to_send = src.dirty_log_read_and_clear(g.uuid)
    src.throttle(g.uuid, 0.1)
    assert src.pause(g.uuid).state is GuestState.MIGRATING  # stop-and-copy
    to_send = src.dirty_log_read_and_clear(g.uuid)
    dst.write_pages(g.uuid, to_send, src.read_pages(g.uuid, to_send))
    dst.set_vcpu_state(g.uuid, src.get_vcpu_state(g.uuid))
    assert dst.memory_digest(g.uuid) == src.memory_digest(g.uuid)  # commitment
    src.end_migration(g.uuid, succeeded=True)
    dst.resume(g.uuid)
    assert src.list() == [] and src.capacity().used_mib == 0
    assert dst.get(g.uuid).domid == 1 and dst.get(g.uuid).state is GuestState.RUNNING


def test_failed_migration_leaves_the_source_running(host):
    g = web_guest(host)
    assert host.begin_migration(g.uuid).state is GuestState.MIGRATING
    with pytest.raises(InvalidGuestState, match="busy"):
        host.begin_migration(g.uuid)
    host.throttle(g.uuid, 0.5)
    host.end_migration(g.uuid, succeeded=False)
    info = host.get(g.uuid)
    assert info.state is GuestState.RUNNING and info.active and info.throttle == 1.0
    with pytest.raises(InvalidRequest):
        host.throttle(g.uuid, 1.5)


# ---------------------------------------------------------------------------
# save / restore
def save(driver, uuid, **kw):
    return list(driver.save_stream(uuid, **kw))


def test_save_restore_round_trip_on_another_host(hosts):
    src, dst = hosts("src"), hosts("dst")
    src.create(GuestSpec("other", 4, start=False))
    g = web_guest(src)
    wait_for_writes(src, g.uuid, 200)
    src.pause(g.uuid)
    memory, regs = src.memory_snapshot(g.uuid), src.get_vcpu_state(g.uuid)
    pieces = save(src, g.uuid)
    assert src.get(g.uuid).state is GuestState.SAVED
    restored = dst.restore_stream(iter(pieces), start=False)
    assert restored.uuid == g.uuid and restored.name == g.name
    assert restored.domid != g.domid  # host-local: 1 here, 2 on src
    assert restored.config == g.config and restored.state is GuestState.PAUSED
    assert np.array_equal(dst.memory_snapshot(g.uuid), memory)
    assert dst.memory_digest(g.uuid) == hashlib.sha256(memory).hexdigest()
    assert dst.get_vcpu_state(g.uuid) == regs
    assert dst.capacity().used_mib == g.memory_mib and dst.capacity().reserved_mib == 0
    # the restored guest runs on from where it was saved
    dst.resume(g.uuid)
    wait_for_writes(dst, g.uuid, restored.pages_written + 20)


def test_restore_on_the_same_host_gets_a_new_domid(host):
    g = web_guest(host, start=False)
    pieces = save(host, g.uuid)
    host.destroy(g.uuid)
    restored = host.restore_stream(pieces)
    assert restored.uuid == g.uuid and restored.domid == g.domid + 1
    assert restored.state is GuestState.RUNNING


def test_save_stream_elides_zero_pages(host):
    g = web_guest(host, mib=16, start=False)
    size = sum(len(p) for p in save(host, g.uuid))
    assert size < 0.5 * 16 * 2**20  # 60 % zero pages are not sent
    empty = host.create(GuestSpec("empty", 16, start=False,
                                  config={"memory_content": {"text": 0, "random": 0}}))
    assert sum(len(p) for p in save(host, empty.uuid)) < 8 * 1024


def test_save_requires_a_paused_guest_and_locks_it(host):
    g = web_guest(host)
    with pytest.raises(InvalidGuestState, match="must be paused"):
        host.save_stream(g.uuid)
    host.pause(g.uuid)
    stream = host.save_stream(g.uuid, batch_pages=64)
    next(stream)
    assert host.get(g.uuid).state is GuestState.SAVING
    for call in (host.resume, host.destroy, host.save_stream, host.begin_migration):
        with pytest.raises(InvalidGuestState):
            call(g.uuid)
    stream.close()  # abandoned save: the guest is simply paused again
    assert host.get(g.uuid).state is GuestState.PAUSED
    never_started = host.save_stream(g.uuid)
    never_started.close()
    assert host.get(g.uuid).state is GuestState.PAUSED
    save(host, g.uuid)
    assert host.resume(g.uuid).state is GuestState.RUNNING  # e.g. the vault refused


@pytest.mark.parametrize("damage, error", [
    (lambda s: s[:len(s) // 2], TruncatedStream),
    (lambda s: s[:-1], TruncatedStream),
    (lambda s: s[:9000] + bytes([s[9000] ^ 0x40]) + s[9001:], SaveStreamError),
    (lambda s: s[:-40] + bytes(40), DigestMismatch),
    (lambda s: s + b"extra", MalformedStream),
])
def test_bad_streams_create_no_guest(hosts, damage, error):
    src, dst = hosts("src"), hosts("dst", 64)
    g = web_guest(src, start=False)
    data = damage(b"".join(save(src, g.uuid)))
    with pytest.raises(error):
        dst.restore_stream([data[i:i + 10_000] for i in range(0, len(data), 10_000)])
    assert dst.list() == []
    cap = dst.capacity()
    assert (cap.used_mib, cap.reserved_mib) == (0, 0)


def test_forged_memory_digest_creates_no_guest(hosts):
    src, dst = hosts("src"), hosts("dst")
    g = web_guest(src, start=False)
    data = bytearray(b"".join(save(src, g.uuid)))
    data[20_000] ^= 0x01  # inside page data; the stream digest is then recomputed
    with pytest.raises(DigestMismatch, match="memory"):
        dst.restore_stream([reseal(bytes(data))])
    assert dst.list() == [] and dst.capacity().free_mib == 256


def test_restore_checks_host_before_reading_pages(hosts):
    src = hosts("src")
    g = web_guest(src, start=False)
    pieces = save(src, g.uuid)
    with pytest.raises(IncompatibleHost, match="vmx"):
        hosts("amd", virt_features=("svm",)).restore_stream(pieces)
    with pytest.raises(InsufficientMemory):
        hosts("small", 4).restore_stream(pieces)
    with pytest.raises(GuestExists):
        src.restore_stream(pieces)


def test_restore_into_a_reservation(hosts):
    src, dst = hosts("src"), hosts("dst", 16)
    g = web_guest(src, start=False)
    pieces = save(src, g.uuid)
    with pytest.raises(ReservationNotFound):
        dst.restore_stream(pieces, reservation_id="nope")
    res = dst.reserve(g.uuid, 8)
    with pytest.raises(GuestExists):  # the reservation holds the UUID
        dst.restore_stream(pieces)
    bad = pieces[:-1]
    with pytest.raises(TruncatedStream):
        dst.restore_stream(bad, reservation_id=res.id)
    assert dst.capacity().reserved_mib == 8  # kept for a retry
    dst.restore_stream(pieces, reservation_id=res.id)
    assert dst.capacity().reserved_mib == 0 and dst.capacity().used_mib == 8


GUEST_UUID = "6f1c2a9e-0b7d-4c1e-9a51-2f7c3d8e4b10"


def test_populate_keeps_an_incoming_container_zero_and_writable():
    driver = SimDriver("hostx", 256)
    reservation = driver.reserve(GUEST_UUID, 16)
    info = driver.commit_reservation(reservation.id, GuestSpec(name="incoming", memory_mib=16,
                                                               vcpus=1, uuid=GUEST_UUID))
    driver.populate(GUEST_UUID, info.npages)
    assert driver.read_pages(GUEST_UUID, [0, info.npages - 1]) == bytes(2 * PAGE_SIZE)
    driver.write_pages(GUEST_UUID, [7], b"\x5a" * PAGE_SIZE)
    assert driver.read_pages(GUEST_UUID, [7]) == b"\x5a" * PAGE_SIZE


def test_populate_refuses_a_guest_that_is_not_a_new_container():
    driver = SimDriver("hostx", 256)
    info = driver.create(GuestSpec(name="paused", memory_mib=16, vcpus=1, start=False))
    with pytest.raises(InvalidRequest):
        driver.populate(info.uuid, info.npages)
