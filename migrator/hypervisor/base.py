"""The hypervisor driver interface used by the host agent.

A driver manages the guests ("domains") of one host.  The simulated driver
(`sim.py`) implements it with real in-memory pages; a QEMU/libvirt driver will
implement the same methods later, so everything above this layer (save,
restore, live migration) is written against this module only.

Conventions shared by every driver:

* Guests are addressed by their UUID as a string (``str(uuid.UUID(...))``).
  The UUID is the stable identity; the domain ID is an int the driver assigns
  from a per-host counter, and a restored or migrated-in guest gets a new one
  (as Xen does).
* Memory is a sequence of ``PAGE_SIZE`` pages, ``memory_mib * PAGES_PER_MIB``
  of them, addressed by page index.
* Every method raises a subclass of `HypervisorError` with a message that can
  be shown to an operator as is.

This module must stay Django-free: the agent runs without Django.
"""

from __future__ import annotations

import abc
import enum
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAGE_SIZE = 4096
PAGES_PER_MIB = (1024 * 1024) // PAGE_SIZE
MAX_VCPUS = 64


class GuestState(enum.StrEnum):
    """Lifecycle state of a guest as the host sees it.

    Whether the vCPUs execute is reported separately (`GuestInfo.active`),
    because a migrating guest runs during pre-copy and is paused during
    stop-and-copy while its state stays ``MIGRATING``.
    """

    RUNNING = "running"      # vCPUs executing
    PAUSED = "paused"        # vCPUs stopped, memory frozen
    SAVING = "saving"        # paused, a save stream is being produced
    SAVED = "saved"          # paused, a complete save stream was produced
    MIGRATING = "migrating"  # source of a live migration (active or not)
    INCOMING = "incoming"    # destination container being filled, not started


class HypervisorError(Exception):
    """Base class of every driver error."""


class GuestNotFound(HypervisorError):
    """No guest with that UUID on this host."""


class GuestExists(HypervisorError):
    """A guest (or reservation) with that UUID already exists on this host."""


class InvalidGuestState(HypervisorError):
    """The guest is busy or in a state that does not allow the operation."""


class InsufficientMemory(HypervisorError):
    """The host's memory capacity cannot fit the request."""


class ReservationNotFound(HypervisorError):
    """No reservation with that id on this host."""


class IncompatibleHost(HypervisorError):
    """Architecture or virtualisation extensions differ from the image's."""


class InvalidRequest(HypervisorError, ValueError):
    """Malformed arguments: bad spec, page index out of range, wrong sizes."""


@dataclass(frozen=True)
class GuestSpec:
    """What to create.  ``config`` holds kernel, ip, mounts, workload, etc."""

    name: str
    memory_mib: int
    vcpus: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    uuid: str | None = None  # None: the driver picks a fresh one
    start: bool = True       # False: create paused


@dataclass(frozen=True)
class GuestInfo:
    """A snapshot of one guest; never a live handle."""

    uuid: str
    name: str
    domid: int
    state: GuestState
    active: bool  # vCPUs executing (workload writing memory)
    memory_mib: int
    vcpus: int
    config: dict[str, Any]
    host: str
    dirty_log: bool
    throttle: float
    pages_written: int  # total page writes by the guest since it was built

    @property
    def npages(self) -> int:
        return self.memory_mib * PAGES_PER_MIB


@dataclass(frozen=True)
class Capacity:
    total_mib: int
    used_mib: int
    reserved_mib: int

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib - self.reserved_mib


@dataclass(frozen=True)
class Reservation:
    id: str
    uuid: str
    memory_mib: int
    host: str


@dataclass(frozen=True)
class HostInfo:
    """What a destination is checked against before save/restore/migrate."""

    name: str
    driver: str
    arch: str
    virt_features: tuple[str, ...]
    capacity_mib: int

    def check_compatible(self, arch: str, virt_features: Iterable[str]) -> None:
        """Refuse an image made on another architecture or with other
        virtualisation extensions (`IncompatibleHost`)."""
        features = tuple(virt_features)
        if arch != self.arch or set(features) != set(self.virt_features):
            raise IncompatibleHost(
                f"image needs {arch} with {','.join(features) or 'no'} extensions; "
                f"host {self.name} is {self.arch} with "
                f"{','.join(self.virt_features) or 'none'}")


def norm_uuid(value: str) -> str:
    """A guest UUID in its canonical string form, or `InvalidRequest`."""
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError as exc:
        raise InvalidRequest(f"invalid guest UUID {value!r}") from exc


def check_shape(name: str, memory_mib: int, vcpus: int) -> None:
    """Refuse a guest name, memory size or vCPU count no driver accepts."""
    if not isinstance(name, str) or not 1 <= len(name) <= 255:
        raise InvalidRequest("guest name must be 1..255 characters")
    for label, value, top in (("memory_mib", memory_mib, 1 << 20),
                              ("vcpus", vcpus, MAX_VCPUS)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise InvalidRequest(f"{label} must be an integer in 1..{top}")


class HypervisorDriver(abc.ABC):
    """One host's hypervisor.  Implementations must be thread-safe."""

    # -- host --------------------------------------------------------------
    @abc.abstractmethod
    def host_info(self) -> HostInfo:
        """Name, driver kind, architecture, virtualisation extensions."""

    @abc.abstractmethod
    def capacity(self) -> Capacity:
        """Memory accounting: total, used by guests, held by reservations."""

    # -- guest lifecycle ---------------------------------------------------
    @abc.abstractmethod
    def create(self, spec: GuestSpec) -> GuestInfo:
        """Build and (if ``spec.start``) start a guest with a new domain ID.

        Raises `InsufficientMemory` if it does not fit, `GuestExists` if the
        UUID is taken, `InvalidRequest` for a bad spec.
        """

    @abc.abstractmethod
    def list(self) -> list[GuestInfo]:
        """All guests on this host (any state), ordered by domain ID."""

    @abc.abstractmethod
    def get(self, uuid: str) -> GuestInfo:
        """One guest, or `GuestNotFound`."""

    @abc.abstractmethod
    def pause(self, uuid: str) -> GuestInfo:
        """Stop the vCPUs.  When this returns, memory no longer changes and no
        new dirty bit appears.  Idempotent on a guest that is not active."""

    @abc.abstractmethod
    def resume(self, uuid: str) -> GuestInfo:
        """Start the vCPUs (paused, saved or incoming guest -> running; a
        migrating guest stays migrating but becomes active).  Refused while a
        save stream is open."""

    @abc.abstractmethod
    def destroy(self, uuid: str) -> None:
        """Remove the guest and free its memory.  Refused while saving."""

    # -- save / restore ----------------------------------------------------
    @abc.abstractmethod
    def save_stream(self, uuid: str, *, batch_pages: int = 256) -> Iterator[bytes]:
        """Serialise a paused guest as a save stream (see savestream.py).

        The guest must be paused; it is ``SAVING`` while the stream is open,
        ``SAVED`` once the last piece was produced, and back to ``PAUSED`` if
        the iterator is closed early.  Memory use is bounded by one batch.
        The guest is not destroyed: the caller does that once the image is
        safely stored (or resumes it if storing failed).
        """

    @abc.abstractmethod
    def restore_stream(
        self,
        chunks: Iterable[bytes],
        *,
        start: bool = True,
        reservation_id: str | None = None,
    ) -> GuestInfo:
        """Build a guest from a save stream: same UUID, new domain ID.

        Pieces may have any size.  The whole stream is verified before the
        guest appears; on any error (malformed, truncated, digest mismatch,
        no memory, incompatible host) no guest is created and the memory
        claimed for it is returned.  With ``reservation_id`` the memory of
        that reservation is used (and consumed on success).
        """

    # -- live migration support ---------------------------------------------
    @abc.abstractmethod
    def begin_migration(self, uuid: str) -> GuestInfo:
        """Mark a running or paused guest as the source of a migration."""

    @abc.abstractmethod
    def end_migration(self, uuid: str, *, succeeded: bool) -> None:
        """Finish the source side: destroy the guest if the destination
        committed, else return it to running/paused and drop any throttle."""

    @abc.abstractmethod
    def dirty_log_start(self, uuid: str) -> None:
        """Enable log-dirty mode with an empty log."""

    @abc.abstractmethod
    def dirty_log_stop(self, uuid: str) -> None:
        """Disable log-dirty mode and drop the log."""

    @abc.abstractmethod
    def dirty_log_read_and_clear(self, uuid: str) -> np.ndarray:
        """Atomically return the sorted indices (int64) of pages written since
        the previous call (or since start) and clear the log."""

    @abc.abstractmethod
    def throttle(self, uuid: str, factor: float) -> None:
        """Scale the guest's execution speed by ``factor`` in [0, 1]
        (auto-converge).  1.0 is full speed."""

    @abc.abstractmethod
    def read_pages(self, uuid: str, indices: Sequence[int] | np.ndarray) -> bytes:
        """The bytes of the given pages, concatenated in the given order."""

    def populate(self, uuid: str, npages: int) -> None:
        """Make every page of a new, zeroed container exist now (the
        destination of a migration calls this before any page is written).  This
        default writes zeros through `write_pages`; a driver that owns the
        memory can fault it in more cheaply."""
        zeros = bytes(2048 * PAGE_SIZE)
        for start in range(0, npages, 2048):
            idx = np.arange(start, min(start + 2048, npages))
            self.write_pages(uuid, idx, zeros[:len(idx) * PAGE_SIZE])

    def read_pages_into(self, uuid: str, indices: Sequence[int] | np.ndarray,
                        out: bytearray | memoryview) -> memoryview:
        """`read_pages` into ``out`` (at least ``len(indices) * PAGE_SIZE``
        bytes, reused by the caller): returns the filled part.  Live migration
        reads every page this way - a driver that copies straight into the
        buffer saves an allocation and a copy per batch.  This default copies
        `read_pages`' result."""
        data = self.read_pages(uuid, indices)
        view = memoryview(out).cast("B")[:len(data)]
        view[:] = data
        return view

    def map_memory(self, uuid: str) -> np.ndarray | None:
        """The guest's memory mapped into this process, as a (pages,
        PAGE_SIZE) uint8 array, or None when the driver cannot map it (the
        default; then pages go through `read_pages_into` / `write_pages`).
        Live migration sends pages straight from it and receives them
        straight into it, as Xen's libxenguest maps guest frames.  Writes
        through it bypass the dirty log: only the destination of a migration
        writes, into a container that is not running, after `populate`."""
        return None

    @abc.abstractmethod
    def write_pages(
        self, uuid: str, indices: Sequence[int] | np.ndarray, data: bytes
    ) -> None:
        """Overwrite pages of a guest that is not active (incoming or paused);
        ``data`` is ``len(indices) * PAGE_SIZE`` bytes."""

    @abc.abstractmethod
    def get_vcpu_state(self, uuid: str) -> bytes:
        """The opaque vCPU state blob (consistent only while paused)."""

    @abc.abstractmethod
    def set_vcpu_state(self, uuid: str, blob: bytes) -> None:
        """Load a vCPU blob into a guest that is not active."""

    @abc.abstractmethod
    def memory_digest(self, uuid: str) -> str:
        """Hex SHA-256 over all of the guest's memory, page 0 first.  Taken
        atomically; on an active guest it briefly stalls the vCPUs."""

    # -- reservations (migration destination) -------------------------------
    @abc.abstractmethod
    def reserve(self, uuid: str, memory_mib: int) -> Reservation:
        """Hold memory for an incoming guest.  Raises `InsufficientMemory`,
        or `GuestExists` if that UUID is already here (or reserved)."""

    @abc.abstractmethod
    def commit_reservation(self, reservation_id: str, spec: GuestSpec) -> GuestInfo:
        """Turn a reservation into an ``INCOMING`` guest with zeroed memory and
        a new domain ID, ready for `write_pages` / `set_vcpu_state`; start it
        with `resume`."""

    @abc.abstractmethod
    def release_reservation(self, reservation_id: str) -> None:
        """Give the reserved memory back."""

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release driver resources (threads, connections)."""
