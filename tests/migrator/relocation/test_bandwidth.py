"""The bandwidth cap of a live migration on the relocation channel: a token
bucket on the socket writer (protocol.TokenBucket, MigrationSettings.max_bandwidth_mbps)."""

import threading
import time

import pytest

from migrator.relocation import MigrationSettings
from migrator.relocation.protocol import TokenBucket

from .conftest import TICKET, migration, web_guest

CAP_MBPS = 8  # MB/s: well below what loopback TLS carries (hundreds of MB/s)
# Every page hot, rewritten far faster than 8 MB/s (300 000 pages/s = 1.2 GB/s).
STORM = {"profile": "db", "rate": 300_000, "hot_fraction": 1.0, "hot_share": 1.0}


def test_the_bucket_lets_no_more_than_burst_plus_rate_times_time_leave():
    bucket = TokenBucket(4e6)  # 4 MB/s, burst 64 KiB
    sent, started = 0, time.monotonic()
    for piece in bucket.pieces(bytes(2_000_000)):
        bucket.take(len(piece))
        sent += len(piece)
    took = time.monotonic() - started
    assert sent == 2_000_000
    assert took >= (sent - bucket.burst) / bucket.rate  # 0.48 s at least
    assert took < 2.0  # and not much more (a loaded machine sleeps late)


def test_closing_the_bucket_wakes_a_sender_waiting_for_tokens():
    bucket = TokenBucket(1000.0, burst=1000)  # 1 kB/s: a 1000-byte piece waits ~1 s
    bucket.take(1000)
    errors = []

    def send():
        try:
            bucket.take(1000)
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=send)
    started = time.monotonic()
    thread.start()
    time.sleep(0.05)
    bucket.close()
    thread.join(2)
    assert errors and time.monotonic() - started < 0.5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_negative_or_unbounded_cap_is_refused(bad):
    with pytest.raises(ValueError, match="max_bandwidth_mbps"):
        MigrationSettings(max_bandwidth_mbps=bad)


def test_a_capped_migration_takes_at_least_bytes_over_the_cap_and_no_round_exceeds_it(
        source, destination, pki):
    dest = destination()
    guest = web_guest(source, mib=8)
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    result = migration(source, guest.uuid, dest.port, pki, max_bandwidth_mbps=CAP_MBPS,
                       min_dirty_pages=8).run()
    assert result["state"] == "succeeded", result["reason"]
    assert result["max_bandwidth_mbps"] == CAP_MBPS
    rate, burst = CAP_MBPS * 1e6, TokenBucket(CAP_MBPS * 1e6).burst
    # The cap paces pre-copy: everything sent until the guest was paused.
    sent, took = result["round_log"][-1]["bytes_sent"], result["total_time_s"]
    assert sent > 20 * burst  # enough bytes for the cap to decide the time
    # Measured: the migration took at least those bytes / cap (less one burst).
    assert took >= (sent - burst) / rate, (sent, took)
    assert took >= 0.9 * sent / rate
    # Every round stays under the cap: at most one burst beyond rate x its time.
    for r in result["round_log"]:
        assert r["round_bytes"] <= burst + rate * r["duration_s"] * 1.01, r
        if r["round_bytes"] >= 1 << 20:
            assert r["bandwidth_mbps"] <= CAP_MBPS * 1.07, r
    # ... and the cap is a cap, not a slowdown: round 1 ran close to it.
    first = result["round_log"][0]
    assert first["bandwidth_mbps"] >= 0.5 * CAP_MBPS, first
    assert dest.driver.get(guest.uuid).active and source.list() == []


def test_a_cap_well_below_the_dirty_rate_ends_by_a_limit_and_one_copy_survives(
        source, destination, pki):
    dest = destination()
    guest = web_guest(source, mib=8, workload=STORM)
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    result = migration(source, guest.uuid, dest.port, pki, max_bandwidth_mbps=CAP_MBPS,
                       max_rounds=3, max_data_factor=100, auto_converge=False,
                       io_timeout=15.0).run()
    assert result["state"] == "succeeded", result["reason"]
    assert result["stop_reason"] == "max_rounds", result  # the clear reason
    # What was left once the guest was paused went unpaced (as QEMU does it):
    # the cap does not stretch the downtime.
    last = result["bytes_sent"] - result["round_log"][-1]["bytes_sent"]
    assert last > 0.25 * guest.npages * 4096
    assert result["downtime_ms"] < 0.5 * 1000 * last / (CAP_MBPS * 1e6), (last, result)
    # The guest outran the capped channel: every round re-sent most of memory.
    assert all(r["dirty_pages"] > 0.25 * guest.npages for r in result["round_log"])
    assert all(r["bandwidth_mbps"] <= CAP_MBPS * 1.07 for r in result["round_log"])
    # Exactly one copy, running on the destination.
    assert source.list() == []
    assert [g.uuid for g in dest.driver.list()] == [guest.uuid]
    assert dest.driver.get(guest.uuid).active


def test_an_abort_under_a_low_cap_is_prompt_and_the_destination_hears_it(
        source, destination, pki):
    """A sender pacing a 4 MiB frame at 1 MB/s holds the channel for 4 s: the
    abort must neither wait for it nor leave the destination guessing."""
    dest = destination()
    guest = web_guest(source, mib=16)
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    engine = migration(source, guest.uuid, dest.port, pki, max_bandwidth_mbps=1)
    thread = threading.Thread(target=engine.run)
    thread.start()
    deadline = time.monotonic() + 10
    while engine._chan is None or engine._chan.bytes_out < 1_000_000:
        assert time.monotonic() < deadline, "pre-copy never started"
        time.sleep(0.01)
    asked = time.monotonic()
    assert engine.abort("operator said so")
    thread.join(10)
    took = time.monotonic() - asked
    assert engine.result["state"] == "aborted", engine.result
    assert took < 1.0, took
    assert source.get(guest.uuid).active
    deadline = time.monotonic() + 5
    while not dest.kinds("discarded"):
        assert time.monotonic() < deadline, "the destination kept the guest"
        time.sleep(0.01)
    assert "the source aborted: operator said so" in dest.kinds("discarded")[0]["reason"]
