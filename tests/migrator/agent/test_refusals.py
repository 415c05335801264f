"""The agent forwards its relocation port's refusals to the portal: counted, bounded,
kept while the portal is away."""
import contextlib
import dataclasses
import socket

import pytest

from migrator.agent import Agent
from migrator.agent.config import RelocationConfig
from migrator.agent.outbox import RefusalReports
from migrator.hypervisor import SimDriver
from tests.migrator.relocation.conftest import TICKET, pki  # noqa: F401 - the pki fixture

from .conftest import FakeWsPortal, agent_config
from .test_agent import wait_until


@pytest.fixture
def hostc(tmp_path, pki):  # noqa: F811 - pki is the relocation tests' fixture
    """hostc's in-process agent with its relocation port (allowing hostb only)."""
    portal = FakeWsPortal().start()
    host = pki["hostc"]
    config = dataclasses.replace(agent_config(tmp_path, portal.url, name="hostc"),
                                 relocation=RelocationConfig(
                                     address="127.0.0.1", port=0, hosts_allow=("hostb",),
                                     cert=str(host.cert), key=str(host.key), ca=str(host.ca)))
    agent = Agent(config, SimDriver("hostc", 256), backoff=(0.05, 0.2), poll=0.1).start()
    wait_until(agent.connected.is_set)
    yield agent, portal
    agent.stop()
    agent.driver.close()
    portal.stop()


def knock(port, payload=b"GET / HTTP/1.0\r\n\r\n"):
    """Plain TCP garbage on the relocation port: a TLS refusal."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        with contextlib.suppress(OSError):
            s.recv(100)


def reports(portal, after=0):
    return [m for m in portal.messages[after:] if m["type"] == "relocation.refused"]


def test_a_refusal_reaches_the_portal_with_stage_address_and_reason(hostc):
    agent, portal = hostc
    knock(agent.relocation.server.port)
    report = portal.wait_for(lambda m: m["type"] == "relocation.refused")
    assert (report["stage"], report["address"], report["count"]) == ("tls", "127.0.0.1", 1)
    assert report["peer"] is None and "TLS handshake failed" in report["reason"]


def test_a_certified_peers_forged_ticket_is_reported_with_its_name(hostc, pki):  # noqa: F811
    from migrator.relocation.protocol import Channel, Msg

    agent, portal = hostc
    with socket.create_connection(("127.0.0.1", agent.relocation.server.port)) as raw:
        with pki["hostb"].client().wrap_socket(raw) as tls:
            chan = Channel(tls, io_timeout=5)
            chan.send_json(Msg.HELLO, {"protocol": 1, "ticket": TICKET,
                                       "guest": {"uuid": "7a1c0e8e-3b5c-4e0e-9a57-1f2d3c4b5a69"}})
            with contextlib.suppress(OSError):
                tls.recv(100)
    report = portal.wait_for(lambda m: m["type"] == "relocation.refused")
    assert (report["stage"], report["peer"]) == ("ticket", "hostb")
    assert "unknown, used or expired ticket" in report["reason"]


def test_refusals_while_the_portal_is_away_are_kept_counted_and_sent_on_return(hostc):
    agent, portal = hostc
    port = portal.port
    portal.stop()
    wait_until(lambda: not agent.connected.is_set())
    for _ in range(150):
        knock(agent.relocation.server.port)
    wait_until(lambda: agent.refusals.waiting() == 150, timeout=30)
    # One peer: one entry per stage ("tls"; "connect" too if a knock found the server
    # at its connection limit, as on a loaded machine), however many refusals.
    assert len(agent.refusals) <= 2
    back = FakeWsPortal().start(port)
    try:
        wait_until(lambda: sum(r["count"] for r in reports(back)) == 150, timeout=15)
        sent = reports(back)
        assert len(sent) == len({r["stage"] for r in sent}) <= 2
        assert all(r["address"] == "127.0.0.1" and r["first"] <= r["last"] for r in sent)
    finally:
        agent.stop()
        back.stop()


def test_reports_are_bounded_and_nothing_goes_uncounted():
    book = RefusalReports(max_keys=3)
    for i in range(100):
        book.add({"kind": "refused", "stage": "tls", "peer": None, "address": f"10.0.0.{i}",
                  "reason": f"TLS handshake failed {i % 9}"})
    assert len(book) == 4  # three peers, and everyone else together
    taken = book.take()
    assert sum(r["count"] for r in taken) == 100 and len(book) == 0
    shared = [r for r in taken if r.get("overflow")]
    assert shared and shared[0]["count"] == 97 and len(shared[0]["reasons"]) == 5
    book.put_back(taken)  # not sent: merged back, counts and samples kept
    again = book.take()
    assert sum(r["count"] for r in again) == 100
    assert all(len(r["reasons"]) == len(set(r["reasons"])) for r in again)
