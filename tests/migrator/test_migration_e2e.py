"""Live migration end to end: real portal, real agents, the mutual-TLS relocation channel."""
import pytest

from tests.migrator.test_save_restore_e2e import Deployment


@pytest.fixture
def deployment(tmp_path):
    system = Deployment(tmp_path).start()
    yield system
    system.stop()


def test_live_migration_of_a_busy_guest_moves_it_with_its_memory(deployment):
    before = deployment.guest("ubuntu_fuwa_nfs_domu")
    assert before["host"] == "hostb"
    response = deployment.api.post(f"/api/v1/guests/{before['uuid']}/migrate",
                                   json={"destination": "hostc", "live": True})
    assert response.status_code == 202, response.text
    job = deployment.finished(response.json()["id"])
    assert job["state"] == "succeeded", job
    stages = [step["stage"] for step in job["timeline"]]
    for stage in ("pre-migration", "reservation", "pre-copy", "stop-and-copy", "commitment",
                  "activation"):
        assert stage in stages, stages
    assert job["rounds"] and job["result"]["stop_reason"]
    assert job["result"]["downtime_ms"] is not None
    after = deployment.wait_for(
        lambda: (g := deployment.guest("ubuntu_fuwa_nfs_domu"))["host"] == "hostc" and g,
        "the guest on hostc")
    assert after["uuid"] == before["uuid"]
    assert after["domain_id"] == job["result"]["destination_domid"]
    hostb = [g for g in deployment.get("/api/v1/guests/")["results"]
             if g["host"] == "hostb"]
    assert [g["name"] for g in hostb] == ["debian_etch"]  # it runs only on the destination


def test_migration_to_its_own_host_is_refused(deployment):
    guest = deployment.guest("debian_etch")
    response = deployment.api.post(f"/api/v1/guests/{guest['uuid']}/migrate",
                                   json={"destination": "hostb"})
    assert response.status_code == 409 and response.json()["error"] == "same_host"


def test_non_live_migration_pauses_copies_once_and_resumes_on_the_destination(deployment):
    before = deployment.guest("ubuntu_fuwa_nfs_domu")
    response = deployment.api.post(f"/api/v1/guests/{before['uuid']}/migrate",
                                   json={"destination": "hostc", "live": False})
    assert response.status_code == 202, response.text
    job = deployment.finished(response.json()["id"])
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["rounds"] == 1 and result["stop_reason"] == "not_live"
    assert len(job["rounds"]) == 1 and job["rounds"][0]["dirty_pages"] == 0
    stages = [step["stage"] for step in job["timeline"]]
    assert "pre-copy" not in stages and "stop-and-copy" in stages
    # the guest was paused for the whole copy: the downtime covers the round
    assert result["downtime_ms"] >= job["rounds"][0]["duration_s"] * 1000
    after = deployment.wait_for(
        lambda: (g := deployment.guest("ubuntu_fuwa_nfs_domu"))["host"] == "hostc" and g,
        "the guest on hostc")
    assert after["uuid"] == before["uuid"] and after["state"] == "running"


def test_a_capped_migration_keeps_under_its_cap_and_says_so_in_its_record(deployment):
    cap = 64  # MB/s
    before = deployment.guest("ubuntu_fuwa_nfs_domu")
    response = deployment.api.post(f"/api/v1/guests/{before['uuid']}/migrate",
                                   json={"destination": "hostc", "max_bandwidth_mbps": cap})
    assert response.status_code == 202, response.text
    assert response.json()["parameters"]["max_bandwidth_mbps"] == cap
    job = deployment.finished(response.json()["id"])
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["max_bandwidth_mbps"] == cap  # the final record, from the source agent
    precopy_bytes = job["rounds"][-1]["bytes_sent"]
    print(f"\n{precopy_bytes} bytes of pre-copy in {result['total_time_s']} s, rounds "
          + ", ".join(f"{r['bandwidth_mbps']}" for r in job["rounds"]))
    assert result["total_time_s"] >= 0.9 * precopy_bytes / (cap * 1e6)
    assert all(r["bandwidth_mbps"] <= cap * 1.07 for r in job["rounds"]
               if r["round_bytes"] >= 1 << 20), job["rounds"]
    deployment.wait_for(
        lambda: deployment.guest("ubuntu_fuwa_nfs_domu")["host"] == "hostc", "the guest on hostc")
