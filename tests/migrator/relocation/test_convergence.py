"""A guest that dirties memory faster than the channel sends it: pre-copy
ends by its round or data limit, or auto-converge slows the guest down until
it fits - never an endless loop."""

import time

import pytest

from .conftest import TICKET, migration, web_guest

# Every page is hot: 64 MiB (16 384 pages) rewritten at 300 000 pages/s.  Large
# enough that a round (~50 ms) outlasts any stretch in which a loaded machine
# does not schedule the guest's workload thread: a round in which it wrote
# nothing would really converge.
STORM = {"profile": "db", "rate": 300_000, "hot_fraction": 1.0, "hot_share": 1.0}
# Only a round with nothing dirty could meet these: what ends the migration is
# the limit under test.
NEVER = {"downtime_target_ms": 0, "min_dirty_pages": 0}


@pytest.fixture
def storm(source, destination):
    dest = destination()
    guest = web_guest(source, mib=64, workload=STORM)
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    return dest, guest


def test_max_rounds_ends_a_migration_that_cannot_converge(storm, source, pki):
    dest, guest = storm
    t = time.monotonic()
    result = migration(source, guest.uuid, dest.port, pki, **NEVER,
                       max_rounds=6, max_data_factor=100, verify="full").run()
    assert time.monotonic() - t < 20
    assert result["state"] == "succeeded", result["reason"]
    assert result["stop_reason"] == "max_rounds" and result["rounds"] == 6
    # every round re-sent most of memory: the guest really outran the channel
    assert all(r["dirty_pages"] > 0.25 * guest.npages for r in result["round_log"])
    assert dest.driver.get(guest.uuid).active  # and the full digest matched


def test_max_data_ends_a_migration_that_cannot_converge(storm, source, pki):
    dest, guest = storm
    result = migration(source, guest.uuid, dest.port, pki, **NEVER,
                       max_data_factor=2.0).run()
    assert result["state"] == "succeeded", result["reason"]
    assert result["stop_reason"] == "max_data" and result["rounds"] < 30
    # the limit is checked before each round: at most one stop-and-copy beyond it
    assert result["bytes_ratio"] <= 2.0 + 1.05


def test_max_time_ends_a_migration_that_cannot_converge(storm, source, pki):
    dest, guest = storm
    result = migration(source, guest.uuid, dest.port, pki, **NEVER,
                       max_rounds=1000, max_data_factor=100, max_precopy_s=0.5).run()
    assert result["state"] == "succeeded", result["reason"]
    assert result["stop_reason"] == "max_time" and 1 < result["rounds"] < 1000
    assert dest.driver.get(guest.uuid).active


def test_auto_converge_throttles_the_guest_until_it_fits(storm, source, pki):
    dest, guest = storm
    engine = migration(source, guest.uuid, dest.port, pki, downtime_target_ms=5,
                       auto_converge=True, max_data_factor=100)
    result = engine.run()
    assert result["state"] == "succeeded", result["reason"]
    assert result["stop_reason"] == "downtime_target"
    throttles = [e["throttle"] for e in engine.events if e["kind"] == "throttle"]
    assert throttles and throttles == sorted(throttles)  # 20 %, 30 %, ... never back
    assert throttles[0] == pytest.approx(0.2) and max(throttles) <= 0.99
    assert result["throttle"] == throttles[-1]
    assert dest.driver.get(guest.uuid).throttle == 1.0  # the guest runs at full speed there


def test_throttle_is_dropped_when_a_throttled_migration_fails(storm, source, pki):
    dest, guest = storm
    holder = {}

    def abort_once_throttled(event):
        holder["engine"].abort("enough")

    holder["engine"] = engine = migration(
        source, guest.uuid, dest.port, pki, downtime_target_ms=1, auto_converge=True,
        converge_trigger=0.0,  # throttle from round 1 on, whatever the guest did
        max_data_factor=100, hooks={"throttle": abort_once_throttled})
    result = engine.run()
    assert result["state"] == "aborted" and result["throttle"] > 0
    info = source.get(guest.uuid)
    assert info.throttle == 1.0 and info.active and info.state.value == "running"


def test_settings_are_validated():
    from migrator.relocation import MigrationSettings

    for bad in ({"verify": "none"}, {"batch_pages": 0}, {"batch_pages": 4096},
                {"max_rounds": 0}, {"max_data_factor": 0.5}, {"throttle_initial": 0},
                {"throttle_max": 1.0}, {"max_precopy_s": -1}):
        with pytest.raises(ValueError):
            MigrationSettings(**bad)
