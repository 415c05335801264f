"""The relocation port's front door under attack: sockets without a
certificate - idle, or stalled in the middle of a TLS handshake, or dripping
it a byte at a time - cannot keep a certified, allowed host from migrating,
and a destination that is really busy says so."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import pytest

from tests.support.strangers import ATTACKER, client_hello, closed_by_server, hold, stranger

from .conftest import TICKET, migration, web_guest


def wait_until(check, timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def timed_migration(source, destination, pki) -> tuple[dict, float]:
    guest = web_guest(source)
    destination.tickets.expect(TICKET, guest.uuid, "hostb")
    t = time.monotonic()
    result = migration(source, guest.uuid, destination.port, pki).run()
    return result, time.monotonic() - t


def test_a_migration_succeeds_while_one_address_holds_64_idle_and_64_slow_handshakes(
        source, destination, pki, caplog):
    caplog.set_level(logging.INFO, logger="berth.relocation")
    # Without the attack first, on a destination of its own: the reference figure.
    calm = destination()
    result, calm_s = timed_migration(source, calm, pki)
    assert result["state"] == "succeeded", result

    dest = destination()
    held = hold(dest.port, idle=64, slow=64)
    try:
        result, attacked_s = timed_migration(source, dest, pki)
        assert result["state"] == "succeeded", result
        # The flood pushed out only its own older connections; the host's
        # peers were never touched.
        assert all(e["address"] == ATTACKER for e in dest.kinds("refused"))
        still_open = sum(not closed_by_server(s) for s in held)
        assert still_open <= dest.server.max_unauthenticated_per_address
    finally:
        for sock in held:
            sock.close()
    print(f"\nmigration of a 16 MiB guest: {calm_s * 1000:.0f} ms without attack, "
          f"{attacked_s * 1000:.0f} ms with 64 idle + 64 slow-handshake sockets held "
          f"from {ATTACKER}")


def test_a_migration_succeeds_while_one_address_keeps_opening_connections(
        source, destination, pki):
    dest = destination()
    half = client_hello()[:60]
    stop, opened = threading.Event(), [0]

    def flood() -> None:  # as fast as it can, 128 open at a time, half of them stalled
        held: list[socket.socket] = []
        try:
            while not stop.is_set():
                try:
                    held.append(stranger(dest.port, send=half if opened[0] % 2 else b""))
                except OSError:
                    continue
                opened[0] += 1
                if len(held) > 128:
                    held.pop(0).close()
        finally:
            for sock in held:
                sock.close()

    attacker = threading.Thread(target=flood)
    attacker.start()
    try:
        wait_until(lambda: opened[0] >= 256, what="the flood to be under way")
        result, took = timed_migration(source, dest, pki)
    finally:
        stop.set()
        attacker.join(10)
    assert result["state"] == "succeeded", result
    print(f"\nmigrated in {took * 1000:.0f} ms; the attacker opened {opened[0]} connections")


def test_a_handshake_dripped_a_byte_at_a_time_is_cut_at_its_deadline(destination):
    dest = destination(handshake_timeout=1.0)
    hello = client_hello()
    t = time.monotonic()
    sock = stranger(dest.port)
    try:
        for byte in hello:  # each byte well within a per-read timeout of 1 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if closed_by_server(sock, wait=0.3) or time.monotonic() - t > 4:
                break
        took = time.monotonic() - t
    finally:
        sock.close()
    assert took < 2.0, f"a dripped handshake held the connection for {took:.1f} s"
    wait_until(lambda: dest.kinds("refused"), what="the refusal")
    refusal = dest.kinds("refused")[0]
    assert refusal["stage"] == "tls" and "not completed within 1" in refusal["reason"]


def test_past_the_cap_per_address_the_oldest_stranger_from_it_makes_room(destination):
    dest = destination(max_unauthenticated_per_address=4)
    mine = [stranger(dest.port) for _ in range(6)]
    other = [stranger(dest.port, address="127.0.0.3") for _ in range(3)]
    try:
        wait_until(lambda: closed_by_server(mine[0]) and closed_by_server(mine[1]),
                   what="the two oldest connections from the address to be closed")
        assert not any(closed_by_server(s, wait=0.2) for s in mine[2:] + other)
    finally:
        for sock in mine + other:
            sock.close()
    refused = dest.kinds("refused")
    assert refused and refused[0]["stage"] == "connect" and refused[0]["address"] == ATTACKER


def test_past_the_total_cap_the_oldest_stranger_makes_room(destination):
    dest = destination(max_unauthenticated=4, max_unauthenticated_per_address=4)
    socks = [stranger(dest.port, address=f"127.0.0.{n}") for n in (2, 3, 4, 5, 6)]
    try:
        wait_until(lambda: closed_by_server(socks[0]), what="the oldest to be closed")
        assert not any(closed_by_server(s, wait=0.2) for s in socks[1:])
    finally:
        for sock in socks:
            sock.close()


def test_strangers_take_no_migration_slot(source, destination, pki):
    dest = destination(max_connections=1)
    held = [stranger(dest.port, address=f"127.0.0.{n}") for n in (2, 3, 4)]
    try:
        result, _ = timed_migration(source, dest, pki)
        assert result["state"] == "succeeded", result
    finally:
        for sock in held:
            sock.close()


def authenticated_idle(pki, port: int) -> ssl.SSLSocket:
    """A certified, allowed peer that completes the handshake and sends nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return pki["hostb"].client().wrap_socket(sock, server_hostname=None)


def test_a_busy_destination_says_busy_and_the_source_reports_it(source, destination, pki,
                                                               caplog):
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest = destination(max_connections=1)
    holder = authenticated_idle(pki, dest.port)
    try:
        wait_until(lambda: len(dest.server.active()) == 1, what="the slot to be taken")
        result, _ = timed_migration(source, dest, pki)
    finally:
        holder.close()
    assert result["state"] == "failed" and result["stage"] == "reservation"
    assert "hostc's relocation port is busy" in result["reason"], result["reason"]
    assert "authenticate" not in result["reason"]
    busy = [e for e in dest.kinds("refused") if e["stage"] == "busy"]
    assert len(busy) == 1 and busy[0]["peer"] == "hostb"
    assert dest.tickets.pending() == 1  # never read: the ticket was not burnt


def test_a_freed_slot_takes_the_next_migration(source, destination, pki):
    dest = destination(max_connections=1)
    holder = authenticated_idle(pki, dest.port)
    wait_until(lambda: len(dest.server.active()) == 1, what="the slot to be taken")
    holder.close()
    wait_until(lambda: not dest.server.active(), what="the slot to be freed")
    result, _ = timed_migration(source, dest, pki)
    assert result["state"] == "succeeded", result


@pytest.mark.parametrize(("address", "key"), [
    ("10.0.0.5", "10.0.0.5"),
    ("::ffff:10.0.0.5", "10.0.0.5"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_one_ipv6_slash_64_counts_as_one_address(address, key):
    from migrator.relocation.admission import address_key
    assert address_key(address) == key


def test_a_handshake_cut_by_the_destination_is_not_reported_as_failed_authentication(
        source, pki):
    # What a source sees when the destination's front door closes its
    # connection to make room: EOF in the middle of the handshake.
    guest = web_guest(source)
    with socket.create_server(("127.0.0.1", 0)) as door:
        engine = migration(source, guest.uuid, door.getsockname()[1], pki)
        done = threading.Thread(target=engine.run)
        done.start()
        conn, _ = door.accept()
        conn.recv(4096)  # the ClientHello...
        conn.close()     # ...and no room for it
        done.join(10)
    result = engine.result
    assert result["state"] == "failed" and result["stage"] == "reservation"
    assert "hostc closed the connection during the TLS handshake" in result["reason"]
    assert "authenticate" not in result["reason"]


def refusal_lines(caplog):
    return [r.getMessage() for r in caplog.records if "relocation refused" in r.getMessage()]


def test_a_flood_of_strangers_is_logged_once_then_counted(destination, caplog):
    """Every refusal is an event (the agent counts them for the portal's audit trail,
    which aggregates them); the log gets the first line and then one summary."""
    caplog.set_level(logging.INFO, logger="berth.relocation")
    dest = destination()
    flood = [stranger(dest.port) for _ in range(40)]  # 32 past the cap of 8 per address
    try:
        wait_until(lambda: sum(closed_by_server(s) for s in flood) == 32,
                   what="32 connections to be closed")
        wait_until(lambda: len(dest.kinds("refused")) == 32, what="32 refusals counted")
        assert len(refusal_lines(caplog)) == 1  # not one line per connection
        dest.server.stop()  # the count so far is logged when the port closes
    finally:
        for sock in flood:
            sock.close()
    refused = dest.kinds("refused")
    assert len(refused) == 32
    assert {(e["stage"], e["address"]) for e in refused} == {("connect", ATTACKER)}
    first, summary = refusal_lines(caplog)
    assert "stage=connect" in first and f"address={ATTACKER}" in first
    assert "31 more unauthenticated connections from 127.0.0.2" in summary


def test_the_count_of_a_flood_is_logged_when_its_window_ends(destination, monkeypatch,
                                                            caplog):
    from migrator.relocation import admission
    caplog.set_level(logging.INFO, logger="berth.relocation")
    monkeypatch.setattr(admission, "REPORT_WINDOW", 0.5)
    dest = destination(max_unauthenticated_per_address=2)
    flood = [stranger(dest.port) for _ in range(6)]  # 4 closed to make room

    def accounted() -> int:  # refusals logged one by one, plus those counted
        return sum(int(line.split(": ")[-1].split()[0]) if " more " in line else 1
                   for line in refusal_lines(caplog))

    try:
        wait_until(lambda: accounted() == 4, what="every closed connection to be accounted")
    finally:
        for sock in flood:
            sock.close()
    lines = refusal_lines(caplog)
    assert len(lines) < 4  # counted, not one line each, and without stopping the server
    assert any(line.endswith("(handshake deadline, caps, or failed handshakes)")
               for line in lines)
    assert len(dest.kinds("refused")) == 4  # each one an event, for the audit trail
