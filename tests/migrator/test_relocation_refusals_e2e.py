"""Relocation refusals reach the portal's audit trail: a real portal, real agent
processes, raw sockets on a relocation port (issue 14, 5: 107 refusals were only in the
agents' logs)."""
import contextlib
import socket
import ssl
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from migrator.relocation.protocol import Channel, Msg
from tests.migrator.test_save_restore_e2e import Deployment
from tests.support.polling import wait_for
from tests.support.server import free_port, manage

INTERVAL = 2  # seconds: the portal's refusal interval in this test


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTH_AUDIT_REFUSAL_INTERVAL_SECONDS", str(INTERVAL))
    system = Deployment(tmp_path).start()
    yield system
    system.stop()


def config(deployment, name):
    return tomllib.loads(Path(deployment.config(name)).read_text())


def tls_client(bundle=None, ca=None):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cafile=ca)
    if bundle is not None:
        context.load_cert_chain(bundle["cert"], bundle["key"])
    return context


def knock(port, context=None, frames=None):
    """Connect to the relocation port; TLS with ``context``; then send ``frames``
    (a callable given the TLS socket) and wait for the server to end it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if context is None:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            with contextlib.suppress(OSError):
                raw.recv(100)
            return
        with contextlib.suppress(OSError, ssl.SSLError):
            with context.wrap_socket(raw) as tls:
                if frames is not None:
                    frames(tls)
                tls.recv(100)


def forged_ticket(tls):
    Channel(tls, io_timeout=10).send_json(Msg.HELLO, {
        "protocol": 1, "ticket": "forged-" + "x" * 32,
        "guest": {"uuid": "7a1c0e8e-3b5c-4e0e-9a57-1f2d3c4b5a69"}})


def garbage(tls):
    tls.sendall(b"\xff" * 64)


def refused_records(deployment, token):
    answer = httpx.get(f"{deployment.portal.url}/api/v1/audit/",
                       params={"action": "relocation.refused"},
                       headers={"Authorization": f"Token {token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def test_refusals_on_a_relocation_port_are_in_the_portals_audit_trail(deployment):
    hostb, hostc = config(deployment, "hostb")["relocation"], config(deployment, "hostc")
    port, ca = hostc["relocation"]["port"], hostc["relocation"]["ca"]
    # A third host of the same CA, certified but on nobody's allow-list.
    manage("hosts", "enroll", "hostd", "--relocation-port", str(free_port()),
           env=deployment.portal.env)
    hostd = config(deployment, "hostd")["relocation"]
    token = deployment.portal.issue_token("auditor", "audit:read")

    knock(port)                                                  # plain TCP: tls
    knock(port, tls_client(ca=ca))                               # no certificate: tls
    knock(port, tls_client(hostd, ca))                           # not allowed: authorize
    knock(port, tls_client(hostb, ca), forged_ticket)            # forged ticket: ticket
    knock(port, tls_client(hostb, ca), garbage)                  # garbage frames: protocol

    time.sleep(INTERVAL + 0.5)  # the intervals close; reading the trail writes aggregates
    records = wait_for(
        lambda: (r := refused_records(deployment, token)) and
        sum(x["details"]["refusals"] for x in r) == 5 and r, "five refusals audited", 30)
    for entry in records:
        assert (entry["actor"], entry["target"], entry["outcome"]) == (
            "host:hostc", "host:hostc", "denied")
        assert entry["source_ip"] == "127.0.0.1"
    firsts = {x["details"]["source"]: x["details"] for x in records
              if not x["details"].get("aggregate")}
    assert set(firsts) == {"hostc:127.0.0.1", "hostc:hostd", "hostc:hostb"}
    assert firsts["hostc:hostd"]["stage"] == "authorize"
    assert firsts["hostc:hostd"]["peer"] == "hostd"
    assert "not on the relocation allow-list" in firsts["hostc:hostd"]["reason"]
    stages = {d["stage"] for d in firsts.values()} | {
        reason.split(":")[0] for x in records if x["details"].get("aggregate")
        for reason in x["details"]["reasons"]}
    assert stages == {"tls", "authorize", "ticket", "protocol"}
    # The agent's own log names the peer of the allow-list refusal (it said peer=-).
    log = Path(deployment.portal.env["BERTH_DATA_DIR"], "agent-hostc.log").read_text()
    assert "stage=authorize peer=hostd address=127.0.0.1" in log
