"""`manage.py demo --port P` in its own process: the agents it starts send image
bytes to P, the portal they are enrolled with, and nowhere else, even when
``BERTH_PORTAL_URL`` names another address (the old default, port 8000, where
anything may listen on a shared machine)."""
import socket
import threading

import httpx
import pytest

from tests.support.polling import wait_for
from tests.support.server import PortalServer, free_port


class Listener:
    """A decoy on a loopback port: counts every byte anyone sends it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = 0
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn):
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    with self._lock:
                        self.received += len(data)
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def decoy():
    listener = Listener()
    yield listener
    listener.close()


def test_demo_agents_upload_only_to_the_port_the_demo_serves(tmp_path, decoy):
    ports = f"{free_port()},{free_port()}"
    server = PortalServer(tmp_path, {"BERTH_PORTAL_URL": decoy.url,
                                     "BERTH_DEMO_RELOCATION_PORTS": ports}, agents=True)
    try:
        server.start()
        token = server.issue_token("admin", "guests:read", "guests:save", "images:read",
                                   "jobs:read")
        api = httpx.Client(base_url=server.url, timeout=30,
                           headers={"Authorization": f"Token {token}"})

        def hosts_online():
            hosts = api.get("/api/v1/hosts/").json()["results"]
            return len(hosts) == 2 and all(h["online"] for h in hosts)

        wait_for(hosts_online, "both demo agents online", 60, interval=0.2)
        guests = api.get("/api/v1/guests/").json()["results"]
        guest = next(g for g in guests if g["name"] == "debian_etch")
        job = api.post(f"/api/v1/guests/{guest['uuid']}/save")
        assert job.status_code == 202, job.text

        def ended():
            state = api.get(f"/api/v1/jobs/{job.json()['id']}").json()
            return state if state["state"] in ("succeeded", "failed", "aborted") else None

        saved = wait_for(ended, "the save to end", 90, interval=0.2)
        # The decoy heard nothing at all, and the image is in the demo's vault.
        assert (decoy.connections, decoy.received) == (0, 0)
        assert saved["state"] == "succeeded", saved
        image = api.get(f"/api/v1/images/{saved['image']}").json()
        assert image["plaintext_size"] > 0
    finally:
        server.stop()
    # The bundles the demo wrote name its own address.
    config = (tmp_path / "agents" / "hostb" / "agent.toml").read_text()
    assert f'url = "{server.url}"' in config
