"""The host bookkeeping both drivers share: guests, reservations, domain IDs."""

from dataclasses import dataclass

import pytest

from migrator.hypervisor import (
    GuestExists,
    GuestNotFound,
    GuestSpec,
    HostInfo,
    InsufficientMemory,
    InvalidRequest,
    ReservationNotFound,
)
from migrator.hypervisor.accounting import HostAccounting

A = "aaaaaaaa-0000-0000-0000-000000000001"
B = "bbbbbbbb-0000-0000-0000-000000000002"


@dataclass
class Guest:
    uuid: str
    memory_mib: int
    domid: int = -1


def accounting(capacity_mib=64, **kw):
    return HostAccounting(HostInfo("h1", "test", "x86_64", ("vmx",), capacity_mib), **kw)


def test_a_claim_counts_as_reserved_until_its_guest_is_admitted():
    acct = accounting()
    res = acct.claim(A, 16)
    assert (res.uuid, res.memory_mib, res.host) == (A, 16, "h1")
    assert (acct.capacity().used_mib, acct.capacity().reserved_mib) == (0, 16)
    acct.admit(res.id, Guest(A, 16))
    assert (acct.capacity().used_mib, acct.capacity().reserved_mib) == (16, 0)
    assert acct.guest(A.upper()).uuid == A  # looked up by its canonical UUID


def test_a_uuid_is_on_the_host_at_most_once():
    acct = accounting()
    res = acct.claim(A, 8)
    with pytest.raises(GuestExists, match=f"guest {A} is already reserved on h1"):
        acct.claim(A, 8)
    acct.admit(res.id, Guest(A, 8))
    with pytest.raises(GuestExists, match=f"guest {A} already exists on host h1"):
        acct.claim(A, 8)


def test_a_claim_beyond_free_memory_says_what_is_used_and_reserved():
    acct = accounting(64)
    acct.admit(acct.claim(A, 32).id, Guest(A, 32))
    acct.claim(B, 24)
    with pytest.raises(InsufficientMemory, match=r"host h1 cannot fit 9 MiB: 8 MiB free of "
                                                 r"64 MiB \(32 used, 24 reserved\)"):
        acct.claim("cccccccc-0000-0000-0000-000000000003", 9)


def test_reserve_checks_its_arguments_before_claiming():
    acct = accounting()
    with pytest.raises(InvalidRequest, match="invalid guest UUID"):
        acct.reserve("not-a-uuid", 8)
    with pytest.raises(InvalidRequest, match="memory_mib must be an integer"):
        acct.reserve(A, 0)
    assert acct.reserve(A.upper(), 8).uuid == A


def test_releasing_twice_is_refused_but_dropping_is_not():
    acct = accounting()
    res = acct.claim(A, 8)
    acct.release(res.id)
    with pytest.raises(ReservationNotFound, match=f"no reservation {res.id} on h1"):
        acct.release(res.id)
    acct.drop(res.id)
    assert acct.capacity().reserved_mib == 0


def test_a_guest_cannot_take_the_place_of_a_released_reservation():
    acct = accounting()
    res = acct.claim(A, 8)
    acct.release(res.id)
    with pytest.raises(ReservationNotFound, match="was released"):
        acct.admit(res.id, Guest(A, 8))
    with pytest.raises(GuestNotFound, match=f"no guest {A} on host h1"):
        acct.guest(A)
    assert acct.next_domid() == 1  # the failed admission used no domain ID


def test_a_commit_must_fit_its_reservation():
    acct = accounting()
    res = acct.claim(A, 8)
    with pytest.raises(ReservationNotFound):
        acct.reservation_for("nope", GuestSpec("g", 8))
    with pytest.raises(InvalidRequest, match=f"reservation {res.id} is for guest {A}"):
        acct.reservation_for(res.id, GuestSpec("g", 8, uuid=B))
    with pytest.raises(InsufficientMemory, match="reservation holds 8 MiB, guest needs 9 MiB"):
        acct.reservation_for(res.id, GuestSpec("g", 9))
    with pytest.raises(InvalidRequest, match="vcpus"):
        acct.reservation_for(res.id, GuestSpec("g", 8, vcpus=0))
    assert acct.reservation_for(res.id, GuestSpec("g", 8, uuid=A)) == res


def test_domain_ids_grow_and_skip_ids_in_use():
    acct = accounting()
    first, second = Guest(A, 8), Guest(B, 8)
    acct.admit(acct.claim(A, 8).id, first)
    acct.admit(acct.claim(B, 8).id, second)
    assert (first.domid, second.domid) == (1, 2)
    assert [g.uuid for g in acct.by_domid()] == [A, B]
    assert acct.remove(second) and not acct.remove(second)
    assert acct.next_domid() == 3  # never handed out again
    c = "cccccccc-0000-0000-0000-000000000003"
    acct.guests[c] = Guest(c, 8, domid=9)
    assert acct.next_domid() == 10  # a re-attached guest keeps its ID


def test_a_domid_file_carries_the_counter_to_the_next_accounting(tmp_path):
    path = tmp_path / "next_domid"
    assert [accounting(domid_file=path).next_domid() for _ in range(2)] == [1, 2]
    assert path.read_text() == "3"
    path.write_text("garbage")
    assert accounting(domid_file=path).next_domid() == 1


def test_remove_forgets_only_that_record():
    acct = accounting()
    old = Guest(A, 8)
    acct.admit(acct.claim(A, 8).id, old)
    assert acct.remove(old)
    new = Guest(A, 8)
    acct.admit(acct.claim(A, 8).id, new)
    assert not acct.remove(old)  # a stale record does not remove its successor
    assert acct.guest(A) is new
    assert acct.clear() == [new] and acct.capacity().used_mib == 0

