"""The relocation port refuses whoever is not an expected, certified,
allowed host with a ticket - each refusal logged, none touching the guest."""

import contextlib
import logging
import socket
import ssl
import time

import pytest

from migrator.hypervisor import GuestState

from .conftest import (
    TICKET,
    assert_destination_clean,
    assert_source_unharmed,
    migration,
    snapshot_with_journal,
    web_guest,
)


@pytest.fixture
def setup(source, destination):
    dest = destination()
    guest = web_guest(source)
    before = snapshot_with_journal(source, guest.uuid)
    return dest, guest, before, dest.driver.capacity()


def no_certificate_context(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=pki["ca"])
    ctx.check_hostname = False
    return ctx


def refused_once(dest, caplog, stage, needle):
    deadline = time.monotonic() + 5  # a TLS alert can reach the peer before the log line
    while not dest.kinds("refused"):
        assert time.monotonic() < deadline, "no refusal reported"
        time.sleep(0.01)
    refused = dest.kinds("refused")
    assert len(refused) == 1, refused
    assert refused[0]["stage"] == stage and needle in refused[0]["reason"]
    lines = [r.getMessage() for r in caplog.records if "relocation refused" in r.getMessage()]
    assert len(lines) == 1 and f"stage={stage}" in lines[0]
    return refused[0]


@pytest.mark.parametrize(("who", "stage", "needle"), [
    ("no certificate", "tls", "TLS handshake failed"),
    ("another CA", "tls", "TLS handshake failed"),
    ("not allowed", "authorize", "not on the relocation allow-list"),
    ("revoked", "authorize", "revoked"),
])
def test_uncertified_or_unwelcome_peers_are_refused(setup, destination, pki, caplog,
                                                    source, who, stage, needle):
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest, guest, before, capacity = setup
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    context = {"no certificate": no_certificate_context(pki),
               "another CA": pki["rogue_hostb"].client(),
               "not allowed": pki["hostd"].client(),
               "revoked": pki["hostb"].client()}[who]
    if who == "revoked":
        dest.server.revoked_serials = {pki["hostb"].serial}
    result = migration(source, guest.uuid, dest.port, pki, context=context).run()

    assert result["state"] == "failed" and result["stage"] == "reservation"
    refusal = refused_once(dest, caplog, stage, needle)
    assert refusal["address"] == "127.0.0.1"
    assert dest.tickets.pending() == 1  # never got as far as reading the ticket
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)


@pytest.mark.parametrize(("announce", "needle"), [
    (None, "unknown, used or expired ticket"),
    ("other-guest", "the ticket is for guest"),
    ("other-source", "the ticket is for source host 'hostd', not 'hostb'"),
])
def test_certified_host_without_the_right_ticket_is_refused(setup, pki, caplog, source,
                                                           announce, needle):
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest, guest, before, capacity = setup
    if announce == "other-guest":
        dest.tickets.expect(TICKET, "11111111-2222-3333-4444-555555555555", "hostb")
    elif announce == "other-source":
        dest.tickets.expect(TICKET, guest.uuid, "hostd")
    result = migration(source, guest.uuid, dest.port, pki).run()

    assert result["state"] == "failed" and result["stage"] == "reservation"
    assert needle in result["reason"]  # the source is told why
    refusal = refused_once(dest, caplog, "ticket", needle)
    assert refusal["peer"] == "hostb" and refusal["guest"] is None
    assert dest.tickets.pending() == 0  # a presented ticket is spent, right or wrong
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)


def test_a_ticket_is_single_use(setup, pki, source):
    dest, guest, _, _ = setup
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    assert migration(source, guest.uuid, dest.port, pki).run()["state"] == "succeeded"
    back = web_guest(source)  # a second guest, same ticket: refused
    result = migration(source, back.uuid, dest.port, pki).run()
    assert "unknown, used or expired" in result["reason"]


def test_source_refuses_a_destination_that_is_not_the_host_it_meant(setup, pki, source):
    dest, guest, before, capacity = setup
    dest.tickets.expect(TICKET, guest.uuid, "hostb")
    # hostc answers, but the source meant hostd: nothing of the guest is sent
    result = migration(source, guest.uuid, dest.port, pki, dest_name="hostd").run()
    assert result["state"] == "failed" and "peer is 'hostc', expected 'hostd'" in \
        result["reason"]
    assert result["bytes_sent"] == 0
    assert dest.tickets.pending() == 1
    assert_source_unharmed(source, guest.uuid, before)
    assert_destination_clean(dest, capacity)


def test_garbage_and_plain_tcp_are_refused_without_harm(setup, pki, caplog):
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest, guest, _, capacity = setup
    with socket.create_connection(("127.0.0.1", dest.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(OSError):
            s.recv(100)  # an alert, the end of the stream or a reset
    refused_once(dest, caplog, "tls", "TLS handshake failed")
    assert_destination_clean(dest, capacity)


def test_unreachable_destination_fails_cleanly(source, pki):
    guest = web_guest(source)
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed when the block ends: nobody listens
    result = migration(source, guest.uuid, port, pki).run()
    assert result["state"] == "failed" and "cannot connect" in result["reason"]
    assert source.get(guest.uuid).state is GuestState.RUNNING


@pytest.mark.parametrize(("who", "peer"), [("not allowed", "hostd"), ("revoked", "hostb")])
def test_a_refusal_after_the_certificate_was_verified_names_the_peer(
        setup, pki, caplog, source, who, peer):
    """Issue 14, 5: the allow-list refusal's log line said ``peer=-``."""
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest, guest, _, _ = setup
    if who == "revoked":
        dest.server.revoked_serials = {pki["hostb"].serial}
    migration(source, guest.uuid, dest.port, pki, context=pki[peer].client()).run()
    refusal = refused_once(dest, caplog, "authorize", "")
    assert refusal["peer"] == peer
    [line] = [r.getMessage() for r in caplog.records if "relocation refused" in r.getMessage()]
    assert f"peer={peer} " in line


def test_garbage_frames_from_a_certified_peer_are_a_protocol_refusal(setup, pki, caplog):
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest, _, _, capacity = setup
    with socket.create_connection(("127.0.0.1", dest.port), timeout=5) as raw:
        with pki["hostb"].client().wrap_socket(raw) as tls:
            tls.sendall(b"\xff" * 64)  # no frame type this protocol knows
            with contextlib.suppress(OSError):
                tls.recv(100)
    refusal = refused_once(dest, caplog, "protocol", "unknown frame type")
    assert (refusal["peer"], refusal["address"]) == ("hostb", "127.0.0.1")
    assert_destination_clean(dest, capacity)
