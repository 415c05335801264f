"""The portal's side of a live migration, with agents played by WebSocket clients."""
import pytest
from asgiref.sync import sync_to_async

from migrator import migration
from migrator.models import Guest, Host, Job
from migrator.orchestrate import OperationError
from portal.models import AuditRecord
from tests.migrator.conftest import GUEST, connect_agent
from tests.migrator.test_consumers import as_request, jobs_socket

pytestmark = pytest.mark.django_db(transaction=True)


async def test_ticketed_two_step_start_rounds_and_outcome(enrolled, admin_user):
    hostb = await connect_agent(enrolled["hostb"], "hostb")
    hostc = await connect_agent(enrolled["hostc"], "hostc", guests=[])
    job = await sync_to_async(migration.request_migrate)(as_request(admin_user), GUEST["uuid"],
                                                         "hostc", downtime_ms=20)
    expect = await hostc.receive_json_from(timeout=5)
    assert expect["action"] == "migrate.expect" and expect["source"] == "hostb"
    assert await hostb.receive_nothing(timeout=0.2)  # the source waits for the destination
    await hostc.send_json_to({"type": "job.event", "job": str(job.id),
                              "event": {"kind": "expecting"}})
    start = await hostb.receive_json_from(timeout=5)
    assert start["action"] == "migrate" and start["ticket"] == expect["ticket"]
    assert start["destination"] == {"host": "hostc", "address": "127.0.0.1", "port": 8002}
    assert start["parameters"]["downtime_ms"] == 20 and start["parameters"]["live"] is True
    assert start["parameters"]["max_seconds"] == 600  # MIGRATION_MAX_SECONDS' default
    assert start["parameters"]["verify"] == "sampled"  # MIGRATION_VERIFY's default
    assert (await Job.objects.aget(id=job.id)).pending_ticket == ""

    watcher = await jobs_socket(admin_user, f"/ws/jobs/{job.id}/")
    assert (await watcher.connect())[0]
    await watcher.receive_json_from()
    for number, dirty in ((1, 500), (2, 120)):
        await hostb.send_json_to({"type": "job.event", "job": str(job.id), "event": {
            "kind": "round", "stage": "pre-copy", "round": number, "pages_sent": 4096,
            "dirty_pages": dirty, "dirty_rate": 1000.0, "bandwidth_mbps": 800.0,
            "expected_downtime_ms": 3.0, "elapsed": 0.1 * number, "bytes_sent": 1}})
        event = await watcher.receive_json_from(timeout=5)
        assert event["type"] == "round" and event["job"]["rounds"][-1]["dirty_pages"] == dirty
    percents = [event["job"]["percent"]]
    moved = {**GUEST, "domain_id": 7, "state": "running"}
    await hostb.send_json_to({"type": "job.result", "job": str(job.id), "state": "succeeded",
                              "result": {"guest": moved, "downtime_ms": 4.2, "rounds": 2,
                                         "stop_reason": "downtime target met"}})
    await hostb.receive_json_from(timeout=5)  # ack
    final = await watcher.receive_json_from(timeout=5)
    assert final["job"]["state"] == "succeeded" and final["job"]["percent"] >= percents[-1]
    guest = await Guest.objects.select_related("host").aget(uuid=GUEST["uuid"])
    assert guest.host.name == "hostc" and guest.domain_id == 7
    for socket in (hostb, hostc, watcher):
        await socket.disconnect()


@pytest.mark.parametrize("destination,status,code", [
    ("hostb", 409, "same_host"), ("nowhere", 404, "not_found")])
async def test_bad_destinations_are_refused(enrolled, admin_user, destination, status, code):
    hostb = await connect_agent(enrolled["hostb"], "hostb")
    with pytest.raises(OperationError) as refused:
        await sync_to_async(migration.request_migrate)(as_request(admin_user), GUEST["uuid"],
                                                       destination)
    assert (refused.value.status, refused.value.code) == (status, code)
    assert not await Job.objects.aexists()
    await hostb.disconnect()


async def test_offline_destination_is_409(enrolled, admin_user):
    hostb = await connect_agent(enrolled["hostb"], "hostb")
    with pytest.raises(OperationError) as refused:
        await sync_to_async(migration.request_migrate)(as_request(admin_user), GUEST["uuid"],
                                                       "hostc")
    assert refused.value.status == 409 and "offline" in refused.value.detail
    # Refused inside the transaction that rolled back, audited after it.
    assert await AuditRecord.objects.filter(action="guest.migrate", outcome="failed",
                                            details__reason=refused.value.detail).aexists()
    await hostb.disconnect()


def test_migrate_api_and_precheck_page(admin_client, enrolled, monkeypatch):
    from migrator import inventory
    from tests.migrator.conftest import hello

    sent = []
    monkeypatch.setattr("migrator.progress.send_to_host", lambda h, p: sent.append((h, p)))
    for name, guests in (("hostb", [GUEST]), ("hostc", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    page = admin_client.get(f"/jobs/guests/{GUEST['uuid']}/migrate?destination=hostc")
    assert page.status_code == 200
    assert all(ok for _, ok, _ in page.context["checks"]), page.context["checks"]
    Host.objects.filter(name="hostc").update(subnet="10.0.0.0/8")
    page = admin_client.get(f"/jobs/guests/{GUEST['uuid']}/migrate?destination=hostc")
    assert ("subnet", False) in [(n, ok) for n, ok, _ in page.context["checks"]]
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/migrate",
                                 {"destination": "hostc", "live": True},
                                 content_type="application/json")
    assert response.status_code == 202 and response.json()["kind"] == "migrate"
    assert sent[0][0] == "hostc" and sent[0][1]["action"] == "migrate.expect"
    assert admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/migrate", {"destination": "hostc"},
                             content_type="application/json").status_code == 409


def test_auditor_cannot_migrate(auditor_client, enrolled):
    response = auditor_client.post(f"/api/v1/guests/{GUEST['uuid']}/migrate",
                                   {"destination": "hostc"}, content_type="application/json")
    assert response.status_code == 403


def test_the_commit_check_is_chosen_per_migration_and_checked(admin_client, enrolled,
                                                               monkeypatch):
    from migrator import inventory
    from tests.migrator.conftest import hello

    monkeypatch.setattr("migrator.progress.send_to_host", lambda h, p: None)
    for name, guests in (("hostb", [GUEST]), ("hostc", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    url = f"/api/v1/guests/{GUEST['uuid']}/migrate"
    refused = admin_client.post(url, {"destination": "hostc", "verify": "none"},
                                content_type="application/json")
    assert refused.status_code == 400 and "verify" in refused.json()["detail"]
    page = f"/jobs/guests/{GUEST['uuid']}/migrate"
    assert 'name="verify"' in admin_client.get(page + "?destination=hostc").content.decode()
    response = admin_client.post(page, {"destination": "hostc", "live": "1", "verify": "nope"},
                                 follow=True)
    assert "Unknown commit check" in response.content.decode()
    assert not Job.objects.exists()
    admin_client.post(page, {"destination": "hostc", "live": "1", "verify": "full"})
    assert Job.objects.get().parameters["verify"] == "full"


@pytest.fixture
def both_online(enrolled, monkeypatch):
    from migrator import inventory
    from tests.migrator.conftest import hello

    sent = []
    monkeypatch.setattr("migrator.progress.send_to_host", lambda h, p: sent.append((h, p)))
    for name, guests in (("hostb", [GUEST]), ("hostc", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    return sent


@pytest.mark.parametrize("bad", [0, -5, 100_001, 2.5, "fast", "", None, True])
def test_a_bandwidth_cap_that_is_not_a_positive_bounded_whole_number_is_a_clear_400(
        admin_client, both_online, bad):
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/migrate",
                                 {"destination": "hostc", "max_bandwidth_mbps": bad},
                                 content_type="application/json")
    body = response.json()
    assert response.status_code == 400 and body["error"] == "invalid", body
    assert body["detail"]["max_bandwidth_mbps"] == [migration.BANDWIDTH_HINT], body
    assert not Job.objects.exists() and both_online == []


def test_the_bandwidth_cap_is_carried_to_the_source_and_shown_on_the_job(
        admin_client, both_online, settings):
    settings.MIGRATION_MAX_BANDWIDTH_MBPS = 50
    url = f"/api/v1/guests/{GUEST['uuid']}/migrate"
    response = admin_client.post(url, {"destination": "hostc", "max_bandwidth_mbps": 120},
                                 content_type="application/json")
    assert response.status_code == 202, response.json()
    job = Job.objects.get()
    assert response.json()["parameters"]["max_bandwidth_mbps"] == 120
    # The source's migrate command carries it in the migration's parameters.
    migration.destination_ready(job)
    start = [p for h, p in both_online if h == "hostb"][-1]
    assert start["action"] == "migrate" and start["parameters"]["max_bandwidth_mbps"] == 120
    assert AuditRecord.objects.get(action="guest.migrate").details["max_bandwidth_mbps"] == 120
    page = admin_client.get(f"/jobs/{job.id}/").content.decode()
    assert 'id="job-bandwidth-cap">Bandwidth cap: <strong>120 MB/s</strong>' in page
    # Without one, the setting's default; 0 there means no cap.
    Job.objects.all().delete()
    admin_client.post(url, {"destination": "hostc"}, content_type="application/json")
    assert Job.objects.get().parameters["max_bandwidth_mbps"] == 50
    Job.objects.all().delete()
    settings.MIGRATION_MAX_BANDWIDTH_MBPS = 0
    admin_client.post(url, {"destination": "hostc"}, content_type="application/json")
    job = Job.objects.get()
    assert job.parameters["max_bandwidth_mbps"] == 0
    assert 'id="job-bandwidth-cap">Bandwidth cap: none' in admin_client.get(
        f"/jobs/{job.id}/").content.decode()


def test_the_migrate_page_offers_the_cap_and_checks_it(admin_client, both_online, settings):
    settings.MIGRATION_MAX_BANDWIDTH_MBPS = 40
    page = f"/jobs/guests/{GUEST['uuid']}/migrate"
    shown = admin_client.get(page + "?destination=hostc").content.decode()
    assert 'name="max_bandwidth_mbps"' in shown and "default 40 MB/s" in shown
    response = admin_client.post(page, {"destination": "hostc", "live": "1",
                                        "max_bandwidth_mbps": "0"}, follow=True)
    assert "The bandwidth cap is a whole number of MB/s" in response.content.decode()
    assert not Job.objects.exists() and both_online == []
    admin_client.post(page, {"destination": "hostc", "live": "1", "max_bandwidth_mbps": " 25 "})
    assert Job.objects.get().parameters["max_bandwidth_mbps"] == 25
    Job.objects.all().delete()
    admin_client.post(page, {"destination": "hostc", "live": "1", "max_bandwidth_mbps": ""})
    assert Job.objects.get().parameters["max_bandwidth_mbps"] == 40
