"""A QEMU migration of the real Linux guest under a bandwidth cap, and the
job's final figures: QEMU's max-bandwidth is the cap (query-migrate-parameters
says so while it runs), its measured rate stays near the cap, and the final
record's throttle, pages_sent and data_pages are the rounds' figures."""
from __future__ import annotations

import secrets
import threading

import pytest

from migrator.hypervisor import GuestSpec
from tests.migrator.relocation import test_qemu_sequences as sequences
from tests.migrator.relocation.conftest import IP, STORAGE
from tests.migrator.relocation.test_qemu_sequences import (
    MEMORY_MIB,
    migrate,
    only_on,
    ticking_after,
)
from tests.support.polling import wait_for

pair = sequences.pair  # two QEMU hosts with relocation servers (a fixture)

pytestmark = pytest.mark.slow
CAP_MBPS = 16          # MB/s; the idle guest's ~30-60 MB of data take seconds at it
DIRTY_CAP_MBPS = 24    # well below what the dirtying guest rewrites
DIRTY_MIB = 96         # the guest rewrites a 96 MiB tmpfs file in a loop ...
DIRTY_GUEST_MIB = 256  # ... and needs 256 MiB for it (tests/support/guest_image.py)


def boot(drivers, real_guest, memory_mib: int, **config) -> tuple[str, int]:
    info = drivers["hostb"].create(GuestSpec("web-1", memory_mib, 1, real_guest.config(
        seed=secrets.token_hex(8), ip=IP, storage=[STORAGE], **config)))
    return info.uuid, ticking_after(drivers["hostb"], info.uuid, 3)


def test_qemu_migrates_at_the_cap_and_says_so_while_it_runs(pair, pki, real_guest):
    drivers, servers, books = pair
    uuid, count = boot(drivers, real_guest, MEMORY_MIB)
    mig = migrate(drivers, servers, books, pki, uuid, "hostb", "hostc",
                  max_bandwidth_mbps=CAP_MBPS)
    seen: dict = {}

    def watch():
        # QEMU's own view of its migration while the stream flows.
        wait_for(lambda: drivers["hostb"].migration_status(uuid).get("status") == "active",
                 "QEMU's pre-copy", 60)
        seen.update(drivers["hostb"].query_migration_parameters(uuid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = mig.run()
    watcher.join(60)
    assert result["state"] == "succeeded", result
    assert seen["max-bandwidth"] == CAP_MBPS * 1_000_000, seen
    assert result["max_bandwidth_mbps"] == CAP_MBPS

    # Measured: QEMU's stream over its pre-copy (setup excluded) ran near the
    # cap. QEMU paces in 100 ms windows and sends the last pages (in the
    # downtime) unpaced, so a little above is allowed; far below is not.
    q = result["qemu"]
    precopy_s = (q["total_time_ms"] - q["setup_time_ms"] - q["downtime_ms"]) / 1000
    rate = q["transferred"] / precopy_s / 1e6
    print(f"\ncap {CAP_MBPS} MB/s: {q['transferred']} bytes in {precopy_s:.2f} s "
          f"= {rate:.1f} MB/s, total {result['total_time_s']} s")
    assert q["transferred"] > 4 * CAP_MBPS * 1e6 * 0.1  # more than a few windows' worth
    assert 0.6 * CAP_MBPS <= rate <= 1.15 * CAP_MBPS, rate
    assert result["total_time_s"] >= 0.85 * q["transferred"] / (CAP_MBPS * 1e6)
    ticking_after(drivers["hostc"], uuid, count)
    only_on(drivers, "hostc", uuid)


def test_a_dirtying_guest_under_a_low_cap_ends_with_the_rounds_figures_on_one_host(
        pair, pki, real_guest):
    drivers, servers, books = pair
    uuid, count = boot(drivers, real_guest, DIRTY_GUEST_MIB, dirty_mib=DIRTY_MIB)
    events: list[dict] = []
    mig = migrate(drivers, servers, books, pki, uuid, "hostb", "hostc",
                  max_bandwidth_mbps=DIRTY_CAP_MBPS, auto_converge=True, max_rounds=6,
                  max_data_factor=10)
    mig._on_event = events.append
    result = mig.run()
    assert result["state"] == "succeeded", result
    rounds = result["round_log"]
    print(f"\nstop {result['stop_reason']}, throttle {result['throttle']}, "
          f"pages {result['pages_sent']} data {result['data_pages']}, rounds "
          + ", ".join(f"{r['round_bytes']} B in {r['duration_s']} s "
                      f"thr {r['throttle']}" for r in rounds))
    # A clear stop reason: QEMU converged (with auto-converge) or a limit stopped it.
    assert result["stop_reason"] in ("downtime_target", "max_rounds", "max_data", "max_time")
    # The final figures are the rounds': the throttle the last round ran under
    # (auto-converge never lowers it within a migration), and pages counted as
    # the rounds count them (QEMU's normal + duplicate; data: normal).
    assert result["throttle"] == max(r["throttle"] for r in rounds)
    assert result["throttle"] > 0, rounds  # the guest outran the cap: it was throttled
    assert result["pages_sent"] >= sum(r["pages_sent"] for r in rounds) > 0
    ram = mig.qemu_status["ram"]
    assert result["pages_sent"] == ram["normal"] + ram["duplicate"]
    assert 0 < result["data_pages"] == ram["normal"] <= result["pages_sent"]
    final = [e for e in events if e["kind"] == "result"][-1]
    assert (final["throttle"], final["pages_sent"], final["data_pages"]) == (
        result["throttle"], result["pages_sent"], result["data_pages"])
    # The cap held in every pre-copy round. (QEMU sends what is left once it has
    # paused the guest unpaced, and its bitmap syncs then show as further rounds.)
    for r in rounds[:6]:
        assert r["round_bytes"] / r["duration_s"] <= 1.15 * DIRTY_CAP_MBPS * 1e6, r
    # The guest survives, once: its counter goes on, on hostc only.
    ticking_after(drivers["hostc"], uuid, count)
    only_on(drivers, "hostc", uuid)
