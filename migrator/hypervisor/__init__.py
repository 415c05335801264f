"""Hypervisor drivers for the host agent (Django-free).

`base` defines the driver interface, `accounting` the host bookkeeping
(guests, reservations, domain IDs) every driver holds, `sim` the simulated
driver with real memory, `qemu` the QEMU driver, `workload` the guest workload
profiles, `savestream` the save-stream format.
"""

from .base import (
    PAGE_SIZE,
    PAGES_PER_MIB,
    Capacity,
    GuestExists,
    GuestInfo,
    GuestNotFound,
    GuestSpec,
    GuestState,
    HostInfo,
    HypervisorDriver,
    HypervisorError,
    IncompatibleHost,
    InsufficientMemory,
    InvalidGuestState,
    InvalidRequest,
    Reservation,
    ReservationNotFound,
)
from .savestream import DigestMismatch, MalformedStream, SaveStreamError, TruncatedStream
from .sim import SimDriver
from .workload import PROFILES, WorkloadProfile, resolve_profile

__all__ = [
    "PAGE_SIZE", "PAGES_PER_MIB", "PROFILES", "Capacity", "DigestMismatch",
    "GuestExists", "GuestInfo", "GuestNotFound", "GuestSpec", "GuestState",
    "HostInfo", "HypervisorDriver", "HypervisorError", "IncompatibleHost",
    "InsufficientMemory", "InvalidGuestState", "InvalidRequest", "MalformedStream",
    "Reservation", "ReservationNotFound", "SaveStreamError", "SimDriver",
    "TruncatedStream", "WorkloadProfile", "resolve_profile",
]
