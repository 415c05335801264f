"""`manage.py hosts revoke` in its own process bites at once, everywhere.

The portal runs under uvicorn in another process; hostc's agent is a real
`relocationd` process; the test plays the revoked host (hostb): it holds hostb's
agent socket with hostb's credential and knocks on hostc's relocation port with
hostb's certificate. Within 2 s of the command, the socket is closed, what hostb
sent after the revocation is not applied, and hostc refuses the certificate
without a restart. Default deployment (one portal, in-memory channel layer) and
scaled out (two portals on PostgreSQL + Redis; the command shares neither
portal's memory).
"""
import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.migrator.conftest import credential_of, hello
from tests.migrator.test_save_restore_e2e import SCOPES, Deployment
from tests.support.relocation import relocation_probe
from tests.support.server import PortalServer, PostgresDatabase, free_port, manage, on_postgresql

LIMIT = 2.0  # seconds, from the host row's revoked_at (set in the revocation's transaction)


class RevocationDeployment(Deployment):
    """A portal (or two), hostc's agent as a process; hostb is played by the test."""

    def __init__(self, tmp_path, scaled=False):
        self.ports = [free_port(), free_port()]
        env = {"BERTH_JOB_AGENT_TIMEOUT_SECONDS": "5",
               "BERTH_DEMO_RELOCATION_PORTS": ",".join(map(str, self.ports))}
        self.database, self.second = None, None
        if scaled:
            self.database = PostgresDatabase()
            env |= {"DATABASE_URL": self.database.url, "BERTH_DATA_DIR": str(tmp_path / "shared"),
                    "BERTH_REDIS_PREFIX": f"berth-{self.database.name}"}
            for name in ("shared", "portal1", "portal2"):
                (tmp_path / name).mkdir()
            self.portal = PortalServer(tmp_path / "portal1", env)
            self.second = PortalServer(tmp_path / "portal2", env)
        else:
            self.portal = PortalServer(tmp_path, env)
        self.agents = {}

    def start(self):
        self.portal.start()
        manage("demo", "--setup-only", "--port", str(self.portal.port), env=self.portal.env)
        out = manage("tokens", "issue", "admin", *sum((["--scope", s] for s in SCOPES), []),
                     env=self.portal.env).stdout
        token = out.split("token: ")[1].split()[0]
        self.api = httpx.Client(base_url=self.portal.url, timeout=30,
                                headers={"Authorization": f"Token {token}"})
        self.start_agent("hostc")
        self.wait_for(lambda: self.host("hostc")["online"], "hostc online")
        if self.second is not None:
            self.second.start()
        return self

    def stop(self):
        try:
            super().stop()
            if self.second is not None:
                self.second.stop()
        finally:
            if self.database is not None:
                self.database.drop()

    def host(self, name):
        return next(h for h in self.get("/api/v1/hosts/")["results"] if h["name"] == name)

    def bundle(self, name):
        return Path(self.portal.env["BERTH_DATA_DIR"]) / "agents" / name

    def revoke(self, name):
        """The command in its own process: through the second portal's environment when
        scaled out (it shares the database and Redis, no portal's memory)."""
        env = (self.second or self.portal).env
        started = time.monotonic()
        done = manage("hosts", "revoke", name, env=env, check=False)
        assert done.returncode == 0, done.stderr
        return started, time.monotonic(), done


def agent_socket(deployment, name):
    """hostb's agent socket, held by the test with hostb's credential (use with `with`)."""
    url = deployment.portal.url.replace("http://", "ws://") + "/ws/agent/"
    credential = credential_of(deployment.bundle(name) / "agent.toml")
    return connect(url, additional_headers={"Authorization": f"Host {credential}"},
                   open_timeout=10)


def probe(bundle, port):
    return relocation_probe(bundle / "cert.pem", bundle / "key.pem", bundle / "ca.pem", port)


def wait_closed(ws, seconds):
    """Wait for the portal to close the socket; the (wall-clock) time it did, or None."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        return None
    except ConnectionClosed:
        return time.time()
    return None


def wait_refused(bundle, port, seconds):
    """Knock until the port refuses the certificate; the (wall-clock) time it did, or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not probe(bundle, port):
            return time.time()
        time.sleep(0.05)
    return None


def in_thread(function, *args):
    out = []
    thread = threading.Thread(target=lambda: out.append(function(*args)), daemon=True)
    thread.start()
    return thread, out


def run_revocation(deployment, figures):
    hostb = deployment.bundle("hostb")
    port = deployment.ports[1]  # hostc's relocation port
    with agent_socket(deployment, "hostb") as ws:
        ws.send(json.dumps(hello("hostb", guests=())))
        assert json.loads(ws.recv(timeout=10))["type"] == "welcome"
        assert probe(hostb, port), "hostc refused hostb before the revocation"

        # The socket stays silent: only the portal's own check can close it. Both
        # watchers run from before the command, the revocation's moment is its row's.
        closing, closed = in_thread(wait_closed, ws, 30)
        refusing, refused = in_thread(wait_refused, hostb, port, 30)
        started, ended, done = deployment.revoke("hostb")
        assert "revoked hostb" in done.stdout
        closing.join(30)
        refusing.join(30)
        close_code = ws.close_code
    revoked_at = datetime.fromisoformat(deployment.host("hostb")["revoked_at"]).timestamp()
    closed_after = closed[0] - revoked_at if closed and closed[0] else None
    refused_after = refused[0] - revoked_at if refused and refused[0] else None
    figures.update(command_s=round(ended - started, 3),
                   socket_closed_s=closed_after and round(closed_after, 3),
                   relocation_refused_s=refused_after and round(refused_after, 3))
    print(f"revocation figures (seconds after revoked_at): {figures}")

    assert closed_after is not None and closed_after <= LIMIT, figures
    assert close_code == 4003, close_code
    assert refused_after is not None and refused_after <= LIMIT, figures
    assert deployment.host("hostb")["online"] is False
    # hostc was not restarted: the refusal came from the running agent.
    assert deployment.agents["hostc"].poll() is None
    # And the revoked credential cannot come back.
    with pytest.raises(InvalidStatus, match="403"), agent_socket(deployment, "hostb"):
        pass
    return figures


def test_revoke_command_closes_the_socket_and_peers_refuse_the_certificate(tmp_path):
    deployment = RevocationDeployment(tmp_path).start()
    try:
        run_revocation(deployment, {"deployment": "embedded"})
    finally:
        deployment.stop()


@pytest.mark.scaleout
@pytest.mark.skipif(not (on_postgresql() and os.environ.get("BERTH_REDIS_URL")),
                    reason="needs PostgreSQL (DATABASE_URL) and Redis (BERTH_REDIS_URL): "
                           "make test-scaleout starts both")
def test_revoke_command_bites_at_once_when_scaled_out(tmp_path):
    deployment = RevocationDeployment(tmp_path, scaled=True).start()
    try:
        run_revocation(deployment, {"deployment": "scaled-out"})
    finally:
        deployment.stop()
