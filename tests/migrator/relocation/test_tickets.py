"""Single-use, expiring tickets bound to a guest and a source host."""

import pytest

from migrator.relocation import TicketBook, TicketRefused

GUEST = "6f1c2b1e-8a4d-4c5e-9f00-0123456789ab"
TICKET = "k" * 32


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_matching_ticket_is_accepted_once():
    book = TicketBook()
    book.expect(TICKET, GUEST.upper(), "hostb")  # UUIDs compare canonically
    entry = book.claim(TICKET, GUEST, "hostb")
    assert entry.guest_uuid == GUEST and entry.source_host == "hostb"
    with pytest.raises(TicketRefused, match="unknown, used or expired"):
        book.claim(TICKET, GUEST, "hostb")


@pytest.mark.parametrize(("guest", "source", "message"), [
    ("11111111-2222-3333-4444-555555555555", "hostb", "is for guest"),
    (GUEST, "hostd", "is for source host 'hostb', not 'hostd'"),
    ("not-a-uuid", "hostb", "malformed"),
])
def test_a_mismatching_ticket_is_refused_and_spent(guest, source, message):
    book = TicketBook()
    book.expect(TICKET, GUEST, "hostb")
    with pytest.raises(TicketRefused, match=message):
        book.claim(TICKET, guest, source)
    with pytest.raises(TicketRefused, match="unknown, used or expired"):
        book.claim(TICKET, GUEST, "hostb")  # burnt: a guess cannot be retried


def test_tickets_expire_and_can_be_cancelled():
    clock = Clock()
    book = TicketBook(clock)
    book.expect(TICKET, GUEST, "hostb", expires_in=60)
    book.expect("z" * 32, GUEST, "hostb")
    clock.now += 61
    assert book.pending() == 1
    with pytest.raises(TicketRefused):
        book.claim(TICKET, GUEST, "hostb")
    assert book.cancel("z" * 32) and not book.cancel("z" * 32)
    assert book.pending() == 0


@pytest.mark.parametrize("presented", [None, "", 42, "x" * 300])
def test_absent_or_malformed_tickets_are_refused(presented):
    book = TicketBook()
    with pytest.raises(TicketRefused):
        book.claim(presented, GUEST, "hostb")


@pytest.mark.parametrize("kwargs", [
    {"ticket": "short"}, {"ticket": "x" * 300}, {"guest_uuid": "nope"},
    {"source_host": ""}, {"expires_in": 0},
])
def test_bad_announcements_are_errors(kwargs):
    args = {"ticket": TICKET, "guest_uuid": GUEST, "source_host": "hostb", **kwargs}
    with pytest.raises(ValueError):
        TicketBook().expect(**args)


def test_only_digests_are_kept():
    book = TicketBook()
    entry = book.expect(TICKET, GUEST, "hostb")
    assert TICKET not in repr(book.__dict__) and TICKET not in repr(entry)
