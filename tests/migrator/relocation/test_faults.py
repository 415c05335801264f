"""Failure at every stage leaves exactly one running guest.

Before the commit point: the source's, unchanged, and the destination gives
back everything.  Around the commit point: the ambiguous states are reported
as in doubt on the side that cannot know, and `resolve` settles them.
"""

import socket
import threading

import numpy as np
import pytest

from migrator.hypervisor import PAGE_SIZE, GuestState, SimDriver
from migrator.relocation import HostFacts
from tests.support.polling import wait_for

from .conftest import (
    SUBNET,
    TICKET,
    assert_destination_clean,
    assert_source_unharmed,
    migration,
    snapshot_with_journal,
    web_guest,
)


def prepare(source, dest, mib=16, **config):
    guest = web_guest(source, mib=mib, **config)
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    return guest, snapshot_with_journal(source, guest.uuid), dest.driver.capacity()


# -- stage 2: reservation -----------------------------------------------------
@pytest.mark.parametrize(("dest_kw", "guest_config", "reason"), [
    ({"capacity_mib": 16}, {}, "not enough memory on hostc: guest needs 24 MiB, 16 MiB free"),
    ({"arch": "aarch64"}, {}, "hostc is aarch64"),
    ({"virt_features": ("svm",)}, {}, "with ['svm']"),
    ({}, {"ip": "192.168.1.111"}, "guest IP 192.168.1.111 is outside the subnet of hostc"),
    ({}, {"storage": ["hosta:/xen-storage", "nas:/vol9"]}, "storage not mounted on hostc: "
                                                           "nas:/vol9"),
    ({}, {"disk_gib": 500}, "not enough disk on hostc: guest needs 500 GiB, 100.0 GiB free"),
])
def test_refused_reservation_leaves_the_guest_running(source, drivers, destination, pki,
                                                      dest_kw, guest_config, reason):
    dest = destination(drivers("hostc", **{"capacity_mib": 256, **dest_kw}))
    guest, before, capacity = prepare(source, dest, mib=24, **guest_config)
    result = migration(source, guest.uuid, dest.port, pki).run()

    assert result["state"] == "failed" and result["stage"] == "reservation"
    assert reason in result["reason"]
    assert result["bytes_ratio"] < 0.01 and result["rounds"] == 0
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)
    refused = dest.kinds("refused")
    assert len(refused) == 1 and refused[0]["stage"] == "reservation"
    assert reason in refused[0]["reason"] and refused[0]["peer"] == "hostb"


def test_subnet_given_as_the_hosts_own_address(drivers):
    facts = HostFacts("10.0.0.5/24", ["s"], 1.0)
    assert [str(n) for n in facts.networks] == ["10.0.0.0/24"]
    assert HostFacts([SUBNET, "fd00::/64"]).subnets == (SUBNET, "fd00::/64")


# -- stage 3/4: the link drops ---------------------------------------------------
def test_connection_dropped_during_round_one(source, destination, pki, link):
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    relay = link(dest.port, cut_after=1 << 20)  # ~1 MiB into a ~7 MB first round
    result = migration(source, guest.uuid, relay.port, pki).run()

    assert result["state"] == "failed" and result["stage"] == "pre-copy"
    assert "connection" in result["reason"] or "TLS" in result["reason"]
    assert result["rounds"] == 0
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)
    assert dest.kinds("discarded")


def test_connection_dropped_during_stop_and_copy(source, destination, pki, link):
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    relay = link(dest.port)
    engine = migration(source, guest.uuid, relay.port, pki,
                       hooks={"stop-and-copy": lambda e: relay.cut()})
    result = engine.run()

    # the last sends may still fit in socket buffers: the loss then shows
    # while waiting for COMMITTED - either way before the commit point
    assert result["state"] == "failed" and result["stage"] in ("stop-and-copy", "commitment")
    assert result["downtime_ms"] is None
    assert_source_unharmed(source, guest.uuid, before)  # paused, then resumed
    assert_destination_clean(dest, capacity)


def test_destination_killed_before_commitment(source, destination, pki):
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    result = migration(source, guest.uuid, dest.port, pki, min_dirty_pages=0,
                       downtime_target_ms=0,  # keep iterating: the kill lands mid pre-copy
                       hooks={"round": lambda e: e["round"] == 2 and dest.server.stop()}).run()

    assert result["state"] == "failed"
    assert result["stage"] in ("pre-copy", "stop-and-copy", "commitment")
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)


@pytest.mark.parametrize(("verify", "digest"), [("sampled", "sample_digest"),
                                                ("full", "memory_sha256")])
def test_destination_refusing_the_commit_leaves_the_guest_on_the_source(
        source, drivers, destination, pki, verify, digest):
    """A destination that stores pages wrongly is caught by the commit check
    over actual memory (``incremental`` compares what was sent and received,
    and cannot see this)."""

    class Corrupting(SimDriver):
        def map_memory(self, uuid):
            return None  # every page goes through write_pages

        def write_pages(self, uuid, indices, data):
            data = np.frombuffer(bytearray(data), np.uint8)
            data[::PAGE_SIZE] ^= 0xFF  # the first byte of every page
            super().write_pages(uuid, indices, data.tobytes())

    dest = destination(Corrupting("hostc", 256))
    guest, before, capacity = prepare(source, dest)
    result = migration(source, guest.uuid, dest.port, pki, verify=verify).run()

    assert result["state"] == "failed" and result["stage"] == "commitment"
    assert digest in result["reason"]
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)
    dest.driver.close()


# -- abort ---------------------------------------------------------------------------
def test_abort_during_precopy(source, destination, pki):
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    holder = {}
    engine = migration(source, guest.uuid, dest.port, pki, min_dirty_pages=0,
                       downtime_target_ms=0,
                       hooks={"round": lambda e: holder["engine"].abort("operator said so")})
    holder["engine"] = engine
    result = engine.run()

    assert result["state"] == "aborted" and result["reason"] == "operator said so"
    assert result["stage"] == "pre-copy" and result["rounds"] == 1
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)
    discarded = dest.kinds("discarded")[0]
    assert "the source aborted: operator said so" in discarded["reason"]


def test_abort_from_another_thread_while_waiting_for_the_commit(source, destination, pki):
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    release = threading.Event()
    holder = {}

    def slow_commit(_event):  # the destination dawdles; the operator aborts meanwhile
        threading.Thread(target=lambda: (holder["engine"].abort(), release.set())).start()
        release.wait(5)

    dest.hooks["commitment"] = slow_commit
    holder["engine"] = engine = migration(source, guest.uuid, dest.port, pki)
    result = engine.run()
    assert result["state"] == "aborted" and result["stage"] in ("commitment", "stop-and-copy")
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)


def test_abort_after_the_commit_point_is_refused(source, destination, pki):
    dest = destination()
    guest, _, _ = prepare(source, dest)
    answers = []
    holder = {}
    dest.hooks["activation"] = lambda e: answers.append(holder["engine"].abort())
    holder["engine"] = engine = migration(source, guest.uuid, dest.port, pki)
    result = engine.run()
    assert answers == [False]  # too late: the destination owns the guest
    assert result["state"] == "succeeded"
    assert dest.driver.get(guest.uuid).active and source.list() == []


# -- around the commit point ---------------------------------------------------------
def test_link_reset_before_committed_is_sent(source, destination, pki, link):
    """The destination verified and is about to say COMMITTED; the link is
    reset.  The send fails, so COMMITTED never left and the source cannot
    have committed: both sides roll back, nothing is in doubt."""
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    relay = link(dest.port)

    def reset(_event):
        relay.cut()
        for sock in list(dest.server._conns.values()):  # the reset has reached this end too
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    dest.hooks["commitment"] = reset
    result = migration(source, guest.uuid, relay.port, pki).run()

    assert result["state"] == "failed" and result["stage"] == "commitment"
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)
    assert dest.server.in_doubt() == []


def test_committed_lost_in_transit_leaves_the_destination_in_doubt(source, destination, pki,
                                                                   link):
    """COMMITTED leaves the destination but never arrives.  The source, not
    having it, resumes; the destination cannot tell whether ACTIVATE was
    sent, so it holds the complete paused copy in doubt until resolved."""
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    relay = link(dest.port)
    dest.hooks["commitment"] = lambda e: relay.blackhole("down", then_cut_after=0.3)
    result = migration(source, guest.uuid, relay.port, pki).run()

    assert result["state"] == "failed" and result["stage"] == "commitment"
    assert_source_unharmed(source, guest.uuid, before)
    _wait(lambda: dest.server.in_doubt())
    held = dest.driver.get(guest.uuid)  # paused, complete, not running
    assert not held.active and held.state is GuestState.INCOMING
    assert dest.kinds("in_doubt")[0]["guest"] == guest.uuid
    assert dest.server.resolve(guest.uuid, activate=False) is None  # the portal: source kept it
    assert_destination_clean(dest, capacity)
    with pytest.raises(KeyError):
        dest.server.resolve(guest.uuid, activate=True)


def test_activate_that_cannot_be_sent_is_no_commit(source, destination, pki, link):
    """The link is reset as the source is about to send ACTIVATE: the send
    fails, so the destination cannot have it.  The source takes the guest
    back; the destination, which cannot know, holds it in doubt."""
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    relay = link(dest.port)

    def reset(_event):
        relay.cut()
        engine._chan.shutdown()  # the reset has surely reached this end too

    engine = migration(source, guest.uuid, relay.port, pki, hooks={"commitment": reset})
    result = engine.run()

    assert result["state"] == "failed" and "ACTIVATE could not be sent" in result["reason"]
    assert_source_unharmed(source, guest.uuid, before)
    _wait(lambda: dest.server.in_doubt())
    dest.server.resolve(guest.uuid, activate=False)
    assert_destination_clean(dest, capacity)


def test_activate_lost_in_transit_both_sides_hold_it_in_doubt(source, destination, pki, link):
    """ACTIVATE leaves the source but never arrives: neither side may guess.
    Both keep a complete paused copy; the portal resolves toward the
    destination."""
    dest = destination()
    guest, _, _ = prepare(source, dest)
    relay = link(dest.port)
    engine = migration(source, guest.uuid, relay.port, pki,
                       hooks={"commitment": lambda e: relay.blackhole("up", 0.3)})
    result = engine.run()

    assert result["state"] == "in_doubt" and "ACTIVATE" in result["reason"]
    src = source.get(guest.uuid)
    assert not src.active and src.state is GuestState.MIGRATING
    _wait(lambda: dest.server.in_doubt())
    assert not dest.driver.get(guest.uuid).active       # neither runs ...
    info = dest.server.resolve(guest.uuid, activate=True)  # ... until resolved
    assert info.active
    final = engine.resolve(destination_running=True)
    assert final["state"] == "succeeded" and source.list() == []


def test_in_doubt_resolved_back_to_the_source(source, destination, pki, link):
    dest = destination()
    guest, before, capacity = prepare(source, dest)
    relay = link(dest.port)
    engine = migration(source, guest.uuid, relay.port, pki,
                       hooks={"commitment": lambda e: relay.blackhole("up", 0.3)})
    assert engine.run()["state"] == "in_doubt"
    _wait(lambda: dest.server.in_doubt())
    dest.server.resolve(guest.uuid, activate=False)
    assert engine.resolve(destination_running=False)["state"] == "failed"
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)
    with pytest.raises(RuntimeError):
        engine.resolve(destination_running=True)


def test_destination_activated_but_the_answer_was_lost(source, drivers, destination, pki,
                                                       link):
    """The destination resumed the guest; ACTIVATED never reaches the source,
    which holds its paused copy in doubt until told the destination runs it."""
    relay_box = {}

    class CutAfterResume(SimDriver):
        def resume(self, uuid):
            info = super().resume(uuid)
            relay_box["relay"].cut()
            return info

    dest = destination(CutAfterResume("hostc", 256))
    guest, _, _ = prepare(source, dest)
    relay_box["relay"] = link(dest.port)
    engine = migration(source, guest.uuid, relay_box["relay"].port, pki)
    result = engine.run()

    assert result["state"] == "in_doubt"
    assert dest.driver.get(guest.uuid).active            # one running guest: there
    assert not source.get(guest.uuid).active             # the source's copy is paused
    assert dest.server.in_doubt() == []                  # the destination knows
    engine.resolve(destination_running=True)
    assert source.list() == []
    dest.driver.close()


def _wait(predicate, timeout=5.0):
    wait_for(predicate, "the condition", timeout, interval=0.01)
