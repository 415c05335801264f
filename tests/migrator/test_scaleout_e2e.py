"""Two portal processes sharing PostgreSQL and Redis: commands and events cross between them.

Agents hold their socket on portal 1; the API request and the browser are on portal 2.
Only the Redis channel layer can carry a command from 2 to 1 and the job's events back.
"""
import os

import httpx
import pytest

from tests.migrator.test_save_restore_e2e import Deployment
from tests.support.browser_socket import JobSocket, sign_in
from tests.support.server import PortalServer, PostgresDatabase, free_port, on_postgresql

pytestmark = [
    pytest.mark.scaleout,
    pytest.mark.skipif(not (on_postgresql() and os.environ.get("BERTH_REDIS_URL")),
                       reason="needs PostgreSQL (DATABASE_URL) and Redis (BERTH_REDIS_URL): "
                              "make test-scaleout starts both"),
]
AUDITOR_PASSWORD = "scale-out auditor password"


class TwoPortals(Deployment):
    """The demo's hosts on portal 1; portal 2 shares its database, Redis, vault and keys."""

    def __init__(self, tmp_path):
        shared = tmp_path / "shared"
        self.database = PostgresDatabase()
        env = {"DATABASE_URL": self.database.url, "BERTH_DATA_DIR": str(shared),
               "BERTH_REDIS_PREFIX": f"berth-{self.database.name}",
               "BERTH_JOB_AGENT_TIMEOUT_SECONDS": "5",
               "BERTH_DEMO_AUDITOR_PASSWORD": AUDITOR_PASSWORD,
               "BERTH_DEMO_RELOCATION_PORTS": f"{free_port()},{free_port()}"}
        for name in ("shared", "portal1", "portal2"):
            (tmp_path / name).mkdir()
        self.portal = PortalServer(tmp_path / "portal1", env)
        self.second = PortalServer(tmp_path / "portal2", env)
        self.agents = {}

    def start(self):
        super().start()  # portal 1, the demo set-up (agents dial portal 1), both agents online
        self.second.start()
        self.api2 = httpx.Client(base_url=self.second.url, timeout=30,
                                 headers=self.api.headers)
        return self

    def stop(self):
        try:
            super().stop()
            self.second.stop()
        finally:
            self.database.drop()


@pytest.fixture
def portals(tmp_path):
    system = TwoPortals(tmp_path).start()
    yield system
    system.stop()


def final_seq(portals, job_id):
    return portals.finished(job_id)["event_seq"]


def test_a_save_through_portal_2_reaches_the_agent_on_portal_1_and_every_event_comes_back(
        portals):
    session = sign_in(portals.second.url, "auditor", AUDITOR_PASSWORD)
    everything_on_2 = JobSocket(portals.second.url, session)
    everything_on_1 = JobSocket(portals.portal.url, sign_in(portals.portal.url, "auditor",
                                                            AUDITOR_PASSWORD))
    try:
        guest = portals.guest("ubuntu_fuwa_nfs_domu")
        response = portals.api2.post(f"/api/v1/guests/{guest['uuid']}/save")
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        one_job_on_2 = JobSocket(portals.second.url, session, job_id)

        saved = portals.finished(job_id)
        assert saved["state"] == "succeeded", saved
        last = saved["event_seq"]
        # Subscribed before the job existed: events 1…last, gap-free, in order, on both.
        events = everything_on_2.wait_for_seq(job_id, last)
        summary = [(e["seq"], e["type"], e["job"]["state"], e["job"]["stage"]) for e in events]
        assert [e["seq"] for e in events] == list(range(1, last + 1)), summary
        assert events[-1]["type"] == "final" and events[-1]["job"]["state"] == "succeeded", \
            summary
        assert {"saving"} <= {e["job"]["stage"] for e in events}
        assert [e["seq"] for e in everything_on_1.wait_for_seq(job_id, last)] == \
            [e["seq"] for e in events]
        # The job's own socket: its snapshot, then every later event. It subscribes before
        # reading the snapshot, so an event the snapshot already holds may come too.
        seen = one_job_on_2.wait_for_seq(job_id, last)
        start = one_job_on_2.snapshot_of(job_id)["event_seq"]
        assert [e["seq"] for e in seen if e["seq"] > start] == list(range(start + 1, last + 1))
        one_job_on_2.close()
    finally:
        everything_on_1.close()
        everything_on_2.close()

    # The image exists for both portals, and a restore issued on portal 1 works as well.
    assert [i["id"] for i in portals.images()] == [saved["image"]]
    restore = portals.api.post(f"/api/v1/images/{saved['image']}/restore",
                               json={"host": "hostc"})
    assert restore.status_code == 202, restore.text
    assert portals.finished(restore.json()["id"])["state"] == "succeeded"
    assert portals.guest("ubuntu_fuwa_nfs_domu")["host"] == "hostc"


def test_a_live_migration_through_portal_2_streams_every_round_to_a_browser_on_portal_2(
        portals):
    session = sign_in(portals.second.url, "auditor", AUDITOR_PASSWORD)
    watcher = JobSocket(portals.second.url, session)
    try:
        guest = portals.guest("ubuntu_fuwa_nfs_domu")
        response = portals.api2.post(f"/api/v1/guests/{guest['uuid']}/migrate",
                                     json={"destination": "hostc", "live": True})
        assert response.status_code == 202, response.text
        job = portals.finished(response.json()["id"])
        assert job["state"] == "succeeded", job
        events = watcher.wait_for_seq(job["id"], job["event_seq"])
    finally:
        watcher.close()
    assert [e["seq"] for e in events] == list(range(1, job["event_seq"] + 1))
    rounds = [e for e in events if e["type"] == "round"]
    assert len(rounds) == len(job["rounds"]) >= 1
    assert events[-1]["job"]["rounds"] == job["rounds"]
    assert portals.guest("ubuntu_fuwa_nfs_domu")["host"] == "hostc"
