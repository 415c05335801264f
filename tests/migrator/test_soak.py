"""Soak: save → restore → migrate, over and over, while an agent and the portal restart.

Each demo guest runs its own loop (running: save; saved: restore onto the next host;
restored: live-migrate to the other host). Meanwhile hostb's agent is killed and
started again, and the portal is restarted. Jobs caught by a restart may fail; what
must hold afterwards is consistency: every job final, every guest running on exactly
one host, the audit chain intact, every saved image present and whole, nothing partial.

With the sim driver an agent *is* its hypervisor, so killing hostb's agent is a host
crash: a guest running there either boots again from hostb's config (both demo guests
live there unless saved or migrated off it) or is gone, and its loop restores it from
its latest image. Either way it must end up running exactly once. hostc is left
running: the restarts are one agent and the portal.

Runs for --soak-seconds (or BERTH_SOAK_SECONDS); make test-scaleout gives it 60.
"""
import os
import threading
import time
from datetime import datetime

import httpx
import pytest

from tests.migrator.test_save_restore_e2e import Deployment
from tests.support.server import manage

pytestmark = pytest.mark.soak
FINAL = ("succeeded", "failed", "aborted")
HOSTS = ("hostb", "hostc")


@pytest.fixture
def soak_seconds(request):
    seconds = request.config.getoption("--soak-seconds") or os.environ.get("BERTH_SOAK_SECONDS")
    if not seconds:
        pytest.skip("the soak runs with --soak-seconds=N or BERTH_SOAK_SECONDS=N "
                    "(make test-scaleout gives it 60)")
    return float(seconds)


@pytest.fixture
def deployment(tmp_path):
    system = Deployment(tmp_path).start()
    yield system
    system.stop()


class GuestLoop(threading.Thread):
    """One guest's save → restore → migrate cycle through the API, until told to stop."""

    def __init__(self, deployment, uuid, stop):
        super().__init__(daemon=True, name=f"soak-{uuid[:8]}")
        self.system, self.uuid, self.stop = deployment, uuid, stop
        self.image = None  # the latest image saved from this guest
        self.last = None  # the kind of its latest successful job
        self.restores = 0
        self.jobs, self.log, self.server_errors = [], [], []

    def run(self):
        while not self.stop.is_set():
            try:
                self.step()
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code >= 500:
                    self.server_errors.append(f"{exc.request.url}: {exc.response.text[:200]}")
                time.sleep(0.5)
            except (httpx.TransportError, AssertionError) as exc:  # a portal restart
                self.log.append(f"retry after {type(exc).__name__}: {str(exc)[:100]}")
                time.sleep(0.5)

    def step(self):
        guest = guest_by_uuid(self.system, self.uuid)
        if guest["host"] is None:
            # Its newest image, as a user would restore: a save the portal had failed
            # (its agent seemed gone) may have been reported succeeded since.
            self.image = latest_image(self.system, self.uuid) or self.image
            if self.image is None:
                time.sleep(0.5)  # its save's outcome is not in yet
                return
            self.restores += 1
            self.request("restore", f"/api/v1/images/{self.image}/restore",
                         {"host": HOSTS[self.restores % 2]})
        elif self.last == "restore":
            other = HOSTS[1 - HOSTS.index(guest["host"])]
            self.request("migrate", f"/api/v1/guests/{self.uuid}/migrate",
                         {"destination": other, "live": True})
        else:
            self.request("save", f"/api/v1/guests/{self.uuid}/save", None)

    def request(self, kind, path, body):
        response = self.system.api.post(path, json=body)
        if response.status_code >= 500:
            self.server_errors.append(f"{kind}: {response.status_code} {response.text[:200]}")
        if response.status_code != 202:  # busy, offline host, … : look again shortly
            self.log.append(f"{kind} refused {response.status_code}")
            time.sleep(0.5)
            return
        job_id = response.json()["id"]
        self.jobs.append(job_id)
        job = self.system.finished(job_id, timeout=120)
        if job["state"] == "succeeded":
            self.last = kind
            self.image = job["image"] if kind == "save" else self.image
        self.log.append(f"{kind} {job['state']} {job['error'][:120]}")


def guest_by_uuid(system, uuid):
    return system.get(f"/api/v1/guests/{uuid}")


def latest_image(system, uuid):
    newest = system.get(f"/api/v1/images/?guest={uuid}")["results"]
    return newest[0]["id"] if newest else None


def every(system, path):
    """All pages of a list endpoint."""
    items = []
    while path:
        body = system.get(path)
        items += body["results"]
        path = body["next"]
    return items


def test_save_restore_migrate_loops_survive_agent_and_portal_restarts(deployment, soak_seconds):
    stop = threading.Event()
    loops = [GuestLoop(deployment, deployment.guest(name)["uuid"], stop)
             for name in ("debian_etch", "ubuntu_fuwa_nfs_domu")]
    for loop in loops:
        loop.start()
    started = time.monotonic()
    disruptions = [(soak_seconds / 3, restart_hostb), (2 * soak_seconds / 3, restart_portal)]
    for at, disrupt in disruptions:
        time.sleep(max(0.0, started + at - time.monotonic()))
        disrupt(deployment)
    time.sleep(max(0.0, started + soak_seconds - time.monotonic()))
    stop.set()
    for loop in loops:
        loop.join(timeout=180)
        assert not loop.is_alive(), f"{loop.name} is stuck"

    history = {loop.uuid[:8]: loop.log for loop in loops}
    assert sum((loop.server_errors for loop in loops), []) == [], history
    # A loop that lost sight of its job (the portal restarting under its poll) has left
    # it in flight: give such jobs the time any job gets to end, then judge them all.
    jobs = settled_jobs(deployment, timeout=120)
    # Every job has a final state (jobs a restart caught end failed, with a reason).
    assert [j for j in jobs if j["state"] not in FINAL] == [], history
    assert all(j["error"] for j in jobs if j["state"] != "succeeded")
    succeeded = {kind: sum(j["state"] == "succeeded" and j["kind"] == kind for j in jobs)
                 for kind in ("save", "restore", "migrate")}
    assert all(succeeded.values()), (succeeded, history)  # the loops did go round
    print(f"soak: {len(jobs)} jobs, succeeded {succeeded}, history {history}")

    # Agents reconnect with back-off (up to 30 s after a restart), so wait for them.
    deployment.wait_for(lambda: all(h["online"] for h in
                                    deployment.get("/api/v1/hosts/")["results"]),
                        "both agents back after the soak", timeout=90)
    for loop in loops:  # a guest left saved runs again, for the check below
        if guest_by_uuid(deployment, loop.uuid)["host"] is None:
            job = deployment.api.post(f"/api/v1/images/{loop.image}/restore",
                                      json={"host": "hostc"})
            assert job.status_code == 202, job.text
            assert deployment.finished(job.json()["id"])["state"] == "succeeded"
    assert_each_guest_runs_exactly_once(deployment, [loop.uuid for loop in loops])
    assert_audit_and_vault_whole(deployment, jobs)


def settled_jobs(system, timeout):
    """Every job, once all are final or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = every(system, "/api/v1/jobs/")
        if all(j["state"] in FINAL for j in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def restart_hostb(system):
    system.kill_agent("hostb")
    system.start_agent("hostb")


def restart_portal(system):
    system.portal.restart()


def assert_each_guest_runs_exactly_once(system, uuids):
    """After a portal restart both agents list all their guests in their hello, and again
    at each heartbeat (10 s): a guest running on two hosts has its row moved to each in
    turn, and a domain-ID record for each. One new record is fine: the row catching up
    (a job a restart caught is failed though its agent finished it)."""
    restarted = time.time()
    system.portal.restart()
    system.wait_for(lambda: all(h["online"] for h in system.get("/api/v1/hosts/")["results"]),
                    "both agents back")
    time.sleep(12)  # both hellos handled, and a heartbeat from each after them
    for uuid in uuids:
        guest = guest_by_uuid(system, uuid)
        assert guest["host"] in HOSTS and guest["state"] == "running", guest
        since = {r["host"] for r in guest["domain_ids"]
                 if datetime.fromisoformat(r["seen_at"]).timestamp() > restarted}
        assert len(since) <= 1, f"guest {guest['name']} runs on {sorted(since)}: {guest}"


def assert_audit_and_vault_whole(system, jobs):
    env = system.portal.env
    assert manage("audit", "verify", env=env, check=False).returncode == 0
    verify = manage("vault", "verify", "--all", env=env, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # No image lost, none left by a failed save - but for a save whose agent was lost
    # after the vault had stored its image (a crash): that image is the guest's last
    # state, and is kept. One the agent reports succeeded after the portal had given
    # up on it is kept too; one it reports failed (it resumed the guest) is shredded.
    jobs = every(system, "/api/v1/jobs/")  # as they are now, late reports included
    saves = [j for j in jobs if j["kind"] == "save"]
    assert all(j["image"] for j in saves if reported_succeeded(j))
    saved = {j["image"] for j in saves if j["image"] and (
        reported_succeeded(j) or agent_lost_after_storing(j))}
    stored = {i["id"] for i in every(system, "/api/v1/images/")}
    # Name the jobs behind any difference, so a failure says which path left (or lost) it.
    odd = [j for j in jobs if j["image"] in stored ^ saved]
    assert stored == saved, (odd, stored - saved)
    vault = os.path.join(env["BERTH_DATA_DIR"], "vault")
    partial = [name for _, _, names in os.walk(vault) for name in names if ".partial-" in name]
    assert partial == []


def reported_succeeded(job):
    return job["state"] == "succeeded" or (
        job["result"].get("late_report", {}).get("state") == "succeeded")


def agent_lost_after_storing(job):
    # Unknown: the portal gave up while the agent was away; the image stays until
    # the agent's report (or an admin) settles the job.
    return "image it had uploaded is whole and kept" in job["error"] or job["state"] == "unknown"
