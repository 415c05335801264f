"""Save and restore end to end: the real portal, real agents (subprocesses), the real vault."""
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from migrator.hypervisor.savestream import SaveStreamParser
from tests.support.polling import wait_for
from tests.support.server import ROOT, PortalServer, free_port, manage

SCOPES = ["guests:read", "guests:save", "guests:migrate", "images:read", "images:download",
          "images:restore", "jobs:read"]


class Deployment:
    """A portal and the demo's two hosts, each agent a process the test controls."""

    def __init__(self, tmp_path):
        ports = f"{free_port()},{free_port()}"
        self.portal = PortalServer(tmp_path, {"BERTH_JOB_AGENT_TIMEOUT_SECONDS": "5",
                                              "BERTH_DEMO_RELOCATION_PORTS": ports})
        self.agents = {}

    def start(self):
        self.portal.start()
        manage("demo", "--setup-only", "--port", str(self.portal.port), env=self.portal.env)
        out = manage("tokens", "issue", "admin", *sum((["--scope", s] for s in SCOPES), []),
                     env=self.portal.env).stdout
        token = out.split("token: ")[1].split()[0]
        self.api = httpx.Client(base_url=self.portal.url, timeout=30,
                                headers={"Authorization": f"Token {token}"})
        for name in ("hostb", "hostc"):
            self.start_agent(name)
        self.wait_for(lambda: all(h["online"] for h in self.get("/api/v1/hosts/")["results"]),
                      "both hosts online")
        return self

    def config(self, name):
        return self.portal.env["BERTH_DATA_DIR"] + f"/agents/{name}/agent.toml"

    def start_agent(self, name):
        log = open(self.portal.env["BERTH_DATA_DIR"] + f"/agent-{name}.log", "ab")  # noqa: SIM115
        self.agents[name] = subprocess.Popen(
            [sys.executable, "manage.py", "relocationd", "--config", self.config(name)],
            cwd=ROOT, env=self.portal.env, stdout=log, stderr=subprocess.STDOUT)

    def kill_agent(self, name):
        self.agents[name].send_signal(signal.SIGKILL)
        self.agents[name].wait(timeout=10)

    def stop(self):
        for process in self.agents.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.portal.stop()

    def get(self, path):
        """GET as a well-behaved automation client: over the API rate (429), wait the
        ``Retry-After`` the portal gives and ask again (the soak's two loops poll hard)."""
        for _ in range(10):
            response = self.api.get(path)
            if response.status_code != 429:
                break
            time.sleep(float(response.headers.get("Retry-After", "1")))
        response.raise_for_status()
        return response.json()

    def wait_for(self, check, what, timeout=60):
        return wait_for(check, what, timeout)

    def guest(self, name):
        guests = self.get("/api/v1/guests/")["results"]
        return next(g for g in guests if g["name"] == name)

    def finished(self, job_id, timeout=90):
        def final():
            job = self.get(f"/api/v1/jobs/{job_id}")
            return job if job["state"] in ("succeeded", "failed", "aborted") else None
        return wait_for(final, f"job {job_id} to end", timeout, interval=0.2)

    def images(self):
        return self.get("/api/v1/images/")["results"]


@pytest.fixture
def deployment(tmp_path):
    system = Deployment(tmp_path).start()
    yield system
    system.stop()


def memory_of(stream: bytes):
    parser = SaveStreamParser()
    parser.feed(stream)
    return parser.close()


def test_save_then_restore_gives_identical_memory_new_domain_id_same_uuid(deployment):
    before = deployment.guest("ubuntu_fuwa_nfs_domu")
    assert before["host"] == "hostb"
    job = deployment.api.post(f"/api/v1/guests/{before['uuid']}/save")
    assert job.status_code == 202, job.text
    saved = deployment.finished(job.json()["id"])
    assert saved["state"] == "succeeded", saved
    at_pause = saved["result"]["memory_sha256"]

    # The guest left its host; the vault holds exactly the memory at the moment of pausing.
    assert deployment.guest("ubuntu_fuwa_nfs_domu")["host"] is None
    content = deployment.api.get(f"/api/v1/images/{saved['image']}/content")
    assert content.status_code == 200
    parsed = memory_of(content.content)
    assert hashlib.sha256(np.ascontiguousarray(parsed.memory)).hexdigest() == at_pause

    job = deployment.api.post(f"/api/v1/images/{saved['image']}/restore", json={"host": "hostb"})
    assert job.status_code == 202, job.text
    restored = deployment.finished(job.json()["id"])
    assert restored["state"] == "succeeded", restored
    assert restored["result"]["memory_sha256"] == at_pause  # byte for byte
    after = deployment.guest("ubuntu_fuwa_nfs_domu")
    assert after["uuid"] == before["uuid"] and after["host"] == "hostb"
    assert after["domain_id"] != before["domain_id"]
    assert [r["domain_id"] for r in after["domain_ids"]][:2] == [after["domain_id"],
                                                                  before["domain_id"]]


def test_killing_the_agent_mid_save_leaves_the_guest_and_no_image(deployment):
    guest = deployment.guest("ubuntu_fuwa_nfs_domu")
    job_id = deployment.api.post(f"/api/v1/guests/{guest['uuid']}/save").json()["id"]
    deployment.wait_for(lambda: deployment.get(f"/api/v1/jobs/{job_id}")["stage"]
                        in ("pausing", "measuring", "saving"), "the save to begin", 30)
    deployment.kill_agent("hostb")
    deployment.start_agent("hostb")
    failed = deployment.finished(job_id)
    assert failed["state"] == "failed" and failed["error"]
    assert deployment.images() == []
    back = deployment.wait_for(
        lambda: (g := deployment.guest("ubuntu_fuwa_nfs_domu"))["host"] == "hostb" and g,
        "the guest to run on hostb again")
    assert back["uuid"] == guest["uuid"] and back["state"] == "running"


def test_restore_refusals_change_nothing(deployment):
    guest = deployment.guest("debian_etch")
    saved = deployment.finished(
        deployment.api.post(f"/api/v1/guests/{guest['uuid']}/save").json()["id"])
    image = saved["image"]
    unknown = deployment.api.post(f"/api/v1/images/{image}/restore", json={"host": "nowhere"})
    assert unknown.status_code == 404
    busy_first = deployment.api.post(f"/api/v1/images/{image}/restore", json={"host": "hostc"})
    assert busy_first.status_code == 202
    again = deployment.api.post(f"/api/v1/images/{image}/restore", json={"host": "hostb"})
    assert again.status_code == 409
    assert deployment.finished(busy_first.json()["id"])["state"] == "succeeded"
    running = deployment.api.post(f"/api/v1/images/{image}/restore", json={"host": "hostb"})
    assert running.status_code == 409 and "already running" in running.json()["detail"]


def test_an_image_whose_files_were_replaced_on_disk_is_refused_everywhere(deployment):
    """Issue 14, section 3: someone with write access to the vault's files (not the
    database, not the keyring) copies image A's object and envelope over B's."""
    images = {}
    for name in ("debian_etch", "ubuntu_fuwa_nfs_domu"):
        guest = deployment.guest(name)
        saved = deployment.finished(
            deployment.api.post(f"/api/v1/guests/{guest['uuid']}/save").json()["id"])
        assert saved["state"] == "succeeded", saved
        images[name] = saved["image"]
    a, b = images["debian_etch"], images["ubuntu_fuwa_nfs_domu"]
    plain_a = deployment.api.get(f"/api/v1/images/{a}/content").content
    vault = Path(deployment.portal.env["BERTH_DATA_DIR"]) / "vault"
    for suffix in (".img", ".key"):
        (source,) = vault.rglob(f"{a}{suffix}")
        (target,) = vault.rglob(f"{b}{suffix}")
        target.write_bytes(source.read_bytes())

    download = deployment.api.get(f"/api/v1/images/{b}/content")
    assert download.status_code == 409, download.status_code
    assert download.json()["error"] == "integrity_error"
    assert plain_a[-4096:] not in download.content and len(download.content) < 1000

    job = deployment.api.post(f"/api/v1/images/{b}/restore", json={"host": "hostb"})
    assert job.status_code == 202, job.text
    failed = deployment.finished(job.json()["id"])
    assert failed["state"] == "failed"
    assert f"image {b} failed its integrity check" in failed["error"]
    assert deployment.guest("ubuntu_fuwa_nfs_domu")["host"] is None  # nothing restored

    verify = manage("vault", "verify", "--all", env=deployment.portal.env, check=False)
    assert verify.returncode != 0
    assert f"{b}  FAILED" in verify.stdout and f"image id is {a}" in verify.stdout
    assert f"{a}  OK" in verify.stdout
    assert "Traceback" not in verify.stderr and verify.stderr.strip().count("\n") == 0

    out = manage("tokens", "issue", "admin", "--scope", "audit:read",
                 env=deployment.portal.env).stdout
    auditor = httpx.Client(base_url=deployment.portal.url, timeout=30, headers={
        "Authorization": f"Token {out.split('token: ')[1].split()[0]}"})
    records = auditor.get("/api/v1/audit/", params={"action": "image.download",
                                                     "target": b}).json()["results"]
    assert records and {r["outcome"] for r in records} == {"failed"}
    assert all(f"image id is {a}" in r["details"]["reason"] for r in records)
    assert len(records) == 2  # the API's download and the agent's, neither allowed
