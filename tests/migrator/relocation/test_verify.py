"""The commit check: sampled pages, completeness, the three modes."""

import hashlib

import numpy as np
import pytest

from migrator.hypervisor import PAGE_SIZE, GuestSpec, SimDriver
from migrator.relocation.verify import SAMPLE_PAGES, commit_digests, prepare, sample_indices

from .conftest import IP, STORAGE, TICKET, assert_destination_clean, migration


def test_a_small_guest_is_sampled_whole():
    assert sample_indices(b"s" * 32, 100).tolist() == list(range(100))
    assert len(sample_indices(b"s" * 32, SAMPLE_PAGES)) == SAMPLE_PAGES


def test_the_sample_follows_the_documented_formula_and_the_seed():
    npages = 262144
    idx = sample_indices(b"s" * 32, npages)
    raw = hashlib.shake_256(b"berth-relocation-sample-v1" + b"s" * 32).digest(8 * SAMPLE_PAGES)
    expected = sorted({int.from_bytes(raw[i:i + 8], "little") % npages
                       for i in range(0, len(raw), 8)})
    assert idx.tolist() == expected
    assert len(idx) > 0.99 * SAMPLE_PAGES and idx[-1] < npages
    assert not np.array_equal(sample_indices(b"t" * 32, npages), idx)


def _guest(driver, mib=8):
    guest = driver.create(GuestSpec("g", mib, config={"ip": IP, "storage": [STORAGE]}))
    driver.pause(guest.uuid)
    return guest


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_digests_of_actual_memory_see_one_changed_sampled_page(mode):
    a, b = SimDriver("a", 64), SimDriver("b", 64)
    try:
        ga, gb = _guest(a), _guest(b)
        seed = b"k" * 32
        page = int(sample_indices(seed, ga.npages)[7])
        b.write_pages(gb.uuid, [page], b"\x01" + bytes(PAGE_SIZE - 1))

        def digests(driver, uuid):
            return commit_digests(mode, driver, uuid, b"vcpu", *prepare(mode, seed, ga.npages))

        mine, theirs = digests(a, ga.uuid), digests(b, gb.uuid)
        changed = {k for k in mine if mine[k] != theirs[k]}
        assert changed == {"sample_digest" if mode == "sampled" else "memory_sha256"}
        assert mine["fingerprint_root"] is None and mine["vcpu_sha256"] == theirs["vcpu_sha256"]
    finally:
        a.close()
        b.close()


def test_an_image_with_a_page_that_never_arrived_is_not_committed(source, destination, pki):
    """Completeness is checked in every mode: the destination counts the
    pages that arrived before any digest is compared."""
    dest = destination()
    guest = source.create(GuestSpec("idle", 4, config={"ip": IP, "storage": [STORAGE]}))
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    capacity = dest.driver.capacity()
    engine = migration(source, guest.uuid, dest.port, pki, live=False)
    send = engine._send_pages
    engine._send_pages = lambda idx: send(idx[idx != 5])  # page 5 is lost on the way

    result = engine.run()
    assert result["state"] == "failed" and result["stage"] == "commitment"
    assert "incomplete image: 1 of 1024 pages never arrived" in result["reason"]
    assert source.get(guest.uuid).state.value == "running"
    assert_destination_clean(dest, capacity)


def test_the_sample_is_the_same_through_mapped_memory_or_page_reads():
    class Unmapped(SimDriver):
        def map_memory(self, uuid):
            return None

    a, b = SimDriver("a", 64), Unmapped("b", 64)
    try:
        ga, gb = _guest(a, mib=16), _guest(b, mib=16)  # 4096 pages: a real sample
        data = np.random.default_rng(3).integers(0, 256, (ga.npages, PAGE_SIZE), np.uint8)
        for driver, guest in ((a, ga), (b, gb)):
            driver.write_pages(guest.uuid, np.arange(guest.npages), data.tobytes())
        seed = b"m" * 32
        digests = [commit_digests("sampled", d, g.uuid, b"", *prepare("sampled", seed, g.npages))
                   for d, g in ((a, ga), (b, gb))]
        assert digests[0] == digests[1] and digests[0]["sample_digest"]
    finally:
        a.close()
        b.close()
