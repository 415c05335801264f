"""The claim attack end to end: the real portal, the demo's agents, and a third agent
process enrolled as hostd whose config claims debian_etch's UUID (as an attacker who
holds hostd's credential would). The portal must not move the guest; the admin's Save
must go to hostb, and the image's metadata must come from the job."""
import subprocess
import sys

import pytest

from tests.migrator.test_save_restore_e2e import Deployment
from tests.support.polling import wait_for
from tests.support.server import ROOT, free_port, manage


@pytest.fixture
def deployment(tmp_path):
    system = Deployment(tmp_path).start()
    yield system
    system.stop()


def start_liar(deployment, victim):
    """Enrol hostd, give its agent a guest with the victim's UUID, run it in its own process."""
    env = deployment.portal.env
    manage("hosts", "enroll", "hostd", "--relocation-port", str(free_port()),
           "--storage", "hosta:/xen-storage", "--portal-url", deployment.portal.url, env=env)
    config = deployment.config("hostd")
    with open(config, "a") as f:
        f.write(f'\n[[guests]]\nname = "{victim["name"]}"\nuuid = "{victim["uuid"]}"\n'
                f'memory_mib = {victim["memory_mib"]}\nvcpus = 1\nip = "192.168.1.66"\n')
    log = open(env["BERTH_DATA_DIR"] + "/agent-hostd.log", "ab")  # noqa: SIM115
    deployment.agents["hostd"] = subprocess.Popen(
        [sys.executable, "manage.py", "relocationd", "--config", config],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_a_second_agent_claiming_a_guest_moves_nothing_and_the_save_goes_to_the_real_host(
        deployment):
    victim = deployment.guest("debian_etch")
    assert victim["host"] == "hostb" and not victim.get("conflict")
    start_liar(deployment, victim)
    wait_for(lambda: any(h["name"] == "hostd" and h["online"]
                         for h in deployment.get("/api/v1/hosts/")["results"]),
             "hostd online", 60)
    # Its hello, which listed the guest, has been applied with the host's facts.
    assert deployment.guest("debian_etch")["host"] == "hostb"

    def claimed_twice():  # its hello, then a heartbeat: the same claim again
        guest = deployment.guest("debian_etch")
        claims = (guest["conflict"] or {}).get("claims") or []
        return guest if claims and claims[0]["reports"] >= 2 else None
    guest = wait_for(claimed_twice, "hostd's claim, twice", 60)
    assert guest["host"] == "hostb" and guest["domain_id"] == victim["domain_id"]
    assert guest["conflict"]["recorded_host"] == "hostb"
    assert [c["host"] for c in guest["conflict"]["claims"]] == ["hostd"]
    audit = deployment.api.get("/api/v1/audit/", params={"action": "host.claim_refused"},
                               headers={"Authorization": "Token " + deployment.portal.issue_token(
                                   "admin", "audit:read")}).json()["results"]
    assert [(r["actor"], r["target"]) for r in audit] == [
        ("host:hostd", f"guest:{victim['uuid']}")]  # once, not once per heartbeat

    refused = deployment.api.post(f"/api/v1/guests/{victim['uuid']}/save")
    assert refused.status_code == 409 and refused.json()["error"] == "guest_in_conflict"
    resolver = deployment.portal.issue_token("admin", "guests:migrate")
    settled = deployment.api.post(f"/api/v1/guests/{victim['uuid']}/resolve-conflict",
                                  json={"decision": "refuse"},
                                  headers={"Authorization": f"Token {resolver}"})
    assert settled.status_code == 200, settled.text
    assert settled.json()["host"] == "hostb" and settled.json()["conflict"] is None

    job = deployment.api.post(f"/api/v1/guests/{victim['uuid']}/save")
    assert job.status_code == 202, job.text
    assert job.json()["source_host"] == "hostb"
    saved = deployment.finished(job.json()["id"])
    assert saved["state"] == "succeeded", saved
    image = deployment.get(f"/api/v1/images/{saved['image']}")
    assert (image["guest_uuid"], image["source_host"]) == (victim["uuid"], "hostb")
    assert image["name"].startswith("debian_etch ")
    # hostd still runs its copy and claims it: the saved guest stays on no host.
    assert deployment.agents["hostd"].poll() is None
    assert deployment.guest("debian_etch")["host"] is None
