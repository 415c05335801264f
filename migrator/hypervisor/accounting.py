"""One host's bookkeeping, shared by every driver: its guests, the memory
held for incoming guests (reservations) and the domain-ID counter.

The drivers differ in what a guest is (pages in this process, a QEMU
process); what they account is the same: a guest uses its memory, a
reservation holds memory for a guest still to come, a UUID is on a host at
most once, and each guest gets the next domain ID.  Both drivers hold one
`HostAccounting`, so a claim is checked and counted the same way on both.

Django-free.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from .base import (
    Capacity,
    GuestExists,
    GuestNotFound,
    GuestSpec,
    HostInfo,
    InsufficientMemory,
    InvalidRequest,
    Reservation,
    ReservationNotFound,
    check_shape,
    norm_uuid,
)


class Accounted(Protocol):
    """What the accounting needs of a driver's guest record."""

    uuid: str
    memory_mib: int
    domid: int


G = TypeVar("G", bound=Accounted)


class HostAccounting(Generic[G]):
    """Guests (by UUID), reservations (by id) and the domain-ID counter of
    one host.  ``lock`` is re-entrant: a driver holds it to make a few of
    these calls, or its own change to ``guests``, one step."""

    def __init__(self, host: HostInfo, *, domid_file: Path | None = None):
        self.host = host
        self.lock = threading.RLock()
        self.guests: dict[str, G] = {}
        self.reservations: dict[str, Reservation] = {}
        # With a file the counter survives the driver (QEMU guests outlive
        # the agent); without one it lives in memory.
        self._domid_file = domid_file
        self._next_domid = 1  # 0 is dom0, as on Xen

    # -- memory ---------------------------------------------------------------
    def capacity(self) -> Capacity:
        with self.lock:
            return Capacity(self.host.capacity_mib,
                            sum(g.memory_mib for g in self.guests.values()),
                            sum(r.memory_mib for r in self.reservations.values()))

    def claim(self, uuid: str, memory_mib: int) -> Reservation:
        """Hold ``memory_mib`` for guest ``uuid`` (already normalised)."""
        name = self.host.name
        with self.lock:
            if uuid in self.guests:
                raise GuestExists(f"guest {uuid} already exists on host {name}")
            if any(r.uuid == uuid for r in self.reservations.values()):
                raise GuestExists(f"guest {uuid} is already reserved on {name}")
            cap = self.capacity()
            if memory_mib > cap.free_mib:
                raise InsufficientMemory(
                    f"host {name} cannot fit {memory_mib} MiB: "
                    f"{cap.free_mib} MiB free of {cap.total_mib} MiB "
                    f"({cap.used_mib} used, {cap.reserved_mib} reserved)")
            res = Reservation(uuidlib.uuid4().hex, uuid, memory_mib, name)
            self.reservations[res.id] = res
            return res

    # -- reservations -----------------------------------------------------------
    def reserve(self, uuid: str, memory_mib: int) -> Reservation:
        """`HypervisorDriver.reserve`: check the arguments, then claim."""
        check_shape("reservation", memory_mib, 1)
        return self.claim(norm_uuid(uuid), memory_mib)

    def reservation(self, reservation_id: str) -> Reservation:
        with self.lock:
            res = self.reservations.get(reservation_id)
        if res is None:
            raise ReservationNotFound(f"no reservation {reservation_id} on {self.host.name}")
        return res

    def reservation_for(self, reservation_id: str, spec: GuestSpec) -> Reservation:
        """The reservation `commit_reservation` turns into a guest of ``spec``:
        it must be for the spec's guest (if the spec names one) and hold
        enough memory."""
        res = self.reservation(reservation_id)
        if spec.uuid and norm_uuid(spec.uuid) != res.uuid:
            raise InvalidRequest(f"reservation {res.id} is for guest {res.uuid}")
        check_shape(spec.name, spec.memory_mib, spec.vcpus)
        if spec.memory_mib > res.memory_mib:
            raise InsufficientMemory(f"reservation holds {res.memory_mib} MiB, "
                                     f"guest needs {spec.memory_mib} MiB")
        return res

    def release(self, reservation_id: str) -> None:
        """`HypervisorDriver.release_reservation`."""
        with self.lock:
            if self.reservations.pop(reservation_id, None) is None:
                raise ReservationNotFound(
                    f"no reservation {reservation_id} on {self.host.name}")

    def drop(self, reservation_id: str) -> None:
        """Release a reservation that may be gone already."""
        with self.lock:
            self.reservations.pop(reservation_id, None)

    # -- guests -------------------------------------------------------------------
    def admit(self, reservation_id: str, guest: G) -> None:
        """Swap a reservation for its guest and give the guest the next
        domain ID, in one step (a build that failed used no ID)."""
        with self.lock:
            if self.reservations.pop(reservation_id, None) is None:
                raise ReservationNotFound(f"reservation {reservation_id} was released")
            guest.domid = self.next_domid()
            self.guests[guest.uuid] = guest

    def guest(self, uuid: str) -> G:
        key = norm_uuid(uuid)
        with self.lock:
            guest = self.guests.get(key)
        if guest is None:
            raise GuestNotFound(f"no guest {key} on host {self.host.name}")
        return guest

    def by_domid(self) -> list[G]:
        with self.lock:
            return sorted(self.guests.values(), key=lambda g: g.domid)

    def remove(self, guest: G) -> bool:
        """Forget this guest record (not another with the same UUID);
        False if it was not on the host."""
        with self.lock:
            if self.guests.get(guest.uuid) is not guest:
                return False
            del self.guests[guest.uuid]
            return True

    def clear(self) -> list[G]:
        """Forget every guest and reservation; returns the guests."""
        with self.lock:
            guests = list(self.guests.values())
            self.guests.clear()
            self.reservations.clear()
            return guests

    def next_domid(self) -> int:
        """A domain ID above every one handed out or in use on this host."""
        with self.lock:
            domid = max([self._stored_domid(), *(g.domid + 1 for g in self.guests.values())])
            self._next_domid = domid + 1
            if self._domid_file is not None:
                self._domid_file.write_text(str(domid + 1))
            return domid

    def _stored_domid(self) -> int:
        if self._domid_file is None:
            return self._next_domid
        try:
            return int(self._domid_file.read_text())
        except (OSError, ValueError):
            return 1
