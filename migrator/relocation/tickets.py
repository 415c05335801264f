"""Single-use migration tickets, announced to the destination by the portal.

A certificate proves WHO a peer is; a ticket proves that the portal asked for
THIS migration: guest G from host S, once, soon.  So a correctly certified
host cannot push a guest the portal never scheduled, nor replay an old one.

The portal generates the ticket (an opaque random string), sends it to the
destination agent (``TicketBook.expect``) and to the source agent, which
presents it in its first frame.  A ticket is consumed by its first
presentation, matching or not: a guessed or stolen ticket can be burnt but
never used twice.  Only SHA-256 digests of tickets are kept.

Django-free.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass

MAX_TICKET_LENGTH = 256
DEFAULT_EXPIRY = 300.0  # seconds: a migration starts within minutes of being scheduled


class TicketRefused(Exception):
    """The presented ticket does not authorise this migration."""


@dataclass(frozen=True)
class Ticket:
    digest: str
    guest_uuid: str
    source_host: str
    expires_at: float  # on the book's clock


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


def _uuid(value: str) -> str:
    return str(uuidlib.UUID(str(value)))


class TicketBook:
    """The destination's list of expected migrations.  Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._tickets: dict[str, Ticket] = {}

    def expect(self, ticket: str, guest_uuid: str, source_host: str,
               expires_in: float = DEFAULT_EXPIRY) -> Ticket:
        """Announce a migration.  Raises ValueError on a malformed argument."""
        if not isinstance(ticket, str) or not 16 <= len(ticket) <= MAX_TICKET_LENGTH:
            raise ValueError(f"a ticket is a string of 16..{MAX_TICKET_LENGTH} characters")
        if not source_host:
            raise ValueError("source_host is required")
        if not expires_in > 0:
            raise ValueError("expires_in must be positive")
        entry = Ticket(_digest(ticket), _uuid(guest_uuid), source_host,
                       self._clock() + expires_in)
        with self._lock:
            self._purge()
            self._tickets[entry.digest] = entry
        return entry

    def cancel(self, ticket: str) -> bool:
        """Withdraw an announced ticket (the portal cancelled the job)."""
        with self._lock:
            return self._tickets.pop(_digest(ticket), None) is not None

    def claim(self, ticket: object, guest_uuid: object, source_host: str) -> Ticket:
        """Consume the ticket; return it if it authorises ``source_host``
        (the AUTHENTICATED peer) to send ``guest_uuid`` now, else raise
        `TicketRefused` with the reason."""
        if not isinstance(ticket, str) or not ticket or len(ticket) > MAX_TICKET_LENGTH:
            raise TicketRefused("no ticket presented")
        with self._lock:
            self._purge()
            entry = self._tickets.pop(_digest(ticket), None)
        if entry is None:
            raise TicketRefused("unknown, used or expired ticket")
        try:
            wanted = _uuid(str(guest_uuid))
        except ValueError:
            raise TicketRefused("the ticket's guest UUID is malformed") from None
        # Constant-time compares: cheap, and no timing hints about the entry.
        if not hmac.compare_digest(entry.guest_uuid, wanted):
            raise TicketRefused(f"the ticket is for guest {entry.guest_uuid}, not {wanted}")
        if not hmac.compare_digest(entry.source_host.encode(), source_host.encode()):
            raise TicketRefused(f"the ticket is for source host {entry.source_host!r}, "
                                f"not {source_host!r}")
        return entry

    def pending(self) -> int:
        with self._lock:
            self._purge()
            return len(self._tickets)

    def _purge(self) -> None:  # caller holds the lock
        now = self._clock()
        for digest in [d for d, t in self._tickets.items() if t.expires_at <= now]:
            del self._tickets[digest]
