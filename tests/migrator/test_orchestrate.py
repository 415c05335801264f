"""The checks before a save or restore changes anything, through the API."""
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone

from migrator import inventory, orchestrate
from migrator.models import Guest, Host, Job
from portal.accounts import issue_token
from portal.models import AuditRecord
from tests.migrator.conftest import GUEST, hello
from tests.vault.conftest import store_image

IMAGE_META = {"guest_uuid": "0b6a3d7e-29f5-4c1f-8d0e-3d8c2f7b9a10", "guest_name": "etch",
              "memory_mib": 128, "architecture": "x86_64", "virt_extensions": "vmx"}


@pytest.fixture
def online(enrolled):
    """hostb online with one guest, hostc online and empty (as a hello would make them)."""
    for name, guests in (("hostb", [GUEST]), ("hostc", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    return enrolled


@pytest.fixture
def sent(monkeypatch):
    """Commands the portal sent to agents, captured instead of delivered."""
    commands = []
    monkeypatch.setattr("migrator.progress.send_to_host",
                        lambda host, payload: commands.append((host, payload)))
    return commands


@pytest.fixture
def image(admin_user, private_vault):
    return store_image(admin_user, b"\x00" * 4096 + b"state" * 1000, **IMAGE_META)


def test_save_returns_202_with_the_job_and_commands_the_agent(admin_client, online, sent):
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save")
    assert response.status_code == 202
    body = response.json()
    assert body["kind"] == "save" and body["state"] == "queued"
    assert sent[0][0] == "hostb" and sent[0][1]["job"] == body["id"]


def test_save_of_unknown_guest_is_404(admin_client, online, sent):
    response = admin_client.post("/api/v1/guests/00000000-0000-0000-0000-000000000000/save")
    assert response.status_code == 404 and sent == []


def test_save_on_offline_host_is_409_with_the_reason(admin_client, online, sent):
    Host.objects.filter(name="hostb").update(online=False)
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save")
    assert response.status_code == 409
    assert "offline" in response.json()["detail"] and sent == []


def test_save_on_a_silent_host_is_409_unresponsive(admin_client, online, sent, settings):
    stale = timezone.now() - timedelta(seconds=settings.HOST_UNRESPONSIVE_SECONDS + 1)
    Host.objects.filter(name="hostb").update(last_seen=stale)
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save")
    assert response.status_code == 409 and response.json()["error"] == "host_unresponsive"
    assert sent == [] and not Job.objects.exists()
    assert AuditRecord.objects.filter(action="guest.save", outcome="failed").exists()


def test_second_operation_on_a_busy_guest_is_409(admin_client, online, sent):
    assert admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save").status_code == 202
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save")
    assert response.status_code == 409 and response.json()["error"] == "guest_busy"
    assert len(sent) == 1


def test_auditor_cannot_save(auditor_client, online, sent):
    assert auditor_client.post(f"/api/v1/guests/{GUEST['uuid']}/save").status_code == 403
    assert sent == [] and not Job.objects.exists()
    assert AuditRecord.objects.filter(action="guest.save", outcome="denied").exists()


def test_token_needs_the_save_scope(admin_user, online, sent, client):
    _, token = issue_token(admin_user, ["jobs:read"], days=1)
    response = client.post(f"/api/v1/guests/{GUEST['uuid']}/save",
                           HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 403


def test_restore_returns_202_and_sends_a_download_credential(admin_client, online, sent, image):
    response = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                 content_type="application/json")
    assert response.status_code == 202, response.json()
    host, command = sent[0]
    assert host == "hostc" and command["action"] == "restore"
    assert command["download"]["url"] == f"api/v1/images/{image.id}/content"


def test_restore_without_permission_is_403_and_audited(outsider_client, online, sent, image):
    response = outsider_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                    content_type="application/json")
    assert response.status_code == 403 and sent == []
    assert AuditRecord.objects.filter(target=image.target, outcome="denied").exists()


def test_restore_to_unknown_host_is_404(admin_client, online, sent, image):
    response = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "nowhere"},
                                 content_type="application/json")
    assert response.status_code == 404 and sent == []


def test_restore_to_a_host_without_memory_is_409(admin_client, online, sent, image):
    Host.objects.filter(name="hostc").update(used_mib=1000)
    response = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                 content_type="application/json")
    assert response.status_code == 409 and "MiB" in response.json()["detail"]


def test_restore_to_a_different_architecture_is_409(admin_client, online, sent, image):
    Host.objects.filter(name="hostc").update(arch="aarch64")
    response = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                 content_type="application/json")
    assert response.status_code == 409 and "aarch64" in response.json()["detail"]


def test_restore_of_a_guest_already_running_is_409(admin_client, online, sent, image):
    image.guest_uuid = GUEST["uuid"]
    image.save()
    response = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                 content_type="application/json")
    assert response.status_code == 409 and "already running" in response.json()["detail"]


def test_restore_with_an_idempotency_key_returns_the_same_job(admin_client, online, sent, image):
    def post():
        return admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                 content_type="application/json", HTTP_IDEMPOTENCY_KEY="abc-1")
    first, second = post(), post()
    assert first.json()["id"] == second.json()["id"] and len(sent) == 1


def test_an_idempotency_key_reused_for_another_image_is_409(admin_client, admin_user, online,
                                                          sent, image):
    other = store_image(admin_user, b"other" * 1000, **IMAGE_META)
    for target in (image, other):
        response = admin_client.post(f"/api/v1/images/{target.id}/restore", {"host": "hostc"},
                                     content_type="application/json",
                                     HTTP_IDEMPOTENCY_KEY="abc-2")
    assert response.status_code == 409
    assert response.json()["error"] == "idempotency_key_reused" and len(sent) == 1


def test_an_idempotency_key_reused_with_another_host_is_409_not_the_first_job(
        admin_client, online, sent, image):
    """Stripe's semantics: a key names one request; the same key with another body
    is a client bug to report, not the first request's job returned silently."""
    def post(host):
        return admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": host},
                                 content_type="application/json",
                                 HTTP_IDEMPOTENCY_KEY="abc-4")
    assert post("hostc").status_code == 202
    response = post("hostb")
    assert response.status_code == 409, response.json()
    assert response.json()["error"] == "idempotency_key_reused" and len(sent) == 1
    assert AuditRecord.objects.filter(action="image.restore", outcome="failed").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("hosts", [["hostc"] * 4, ["hostc", "hostb"]])
def test_concurrent_restores_with_one_idempotency_key_get_one_job(admin_client, online, sent,
                                                                   image, monkeypatch, hosts):
    """Retries racing each other (a client that timed out and asked again, on another
    connection): all past the key lookup before any creates the job - the barrier
    makes sure - then each commits on its own connection. The same request gets the
    same job, 202 each time; the same key with another host is 409."""
    barrier = threading.Barrier(len(hosts), timeout=20)
    check_fits = orchestrate._check_fits

    def check_fits_together(*args):
        check_fits(*args)
        barrier.wait()

    monkeypatch.setattr(orchestrate, "_check_fits", check_fits_together)
    answers = [None] * len(hosts)

    def restore(index, host):
        client = Client()
        client.cookies = admin_client.cookies  # the same verified session
        try:
            response = client.post(f"/api/v1/images/{image.id}/restore", {"host": host},
                                   content_type="application/json",
                                   HTTP_IDEMPOTENCY_KEY="retry-1")
            answers[index] = (host, response.status_code, response.json())
        finally:
            connection.close()

    threads = [threading.Thread(target=restore, args=(i, h)) for i, h in enumerate(hosts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert Job.objects.filter(idempotency_key="retry-1").count() == 1, answers
    job = Job.objects.get(idempotency_key="retry-1")
    for host, code, body in answers:
        if host == job.destination_host.name:
            assert (code, body.get("id")) == (202, str(job.id)), body
        else:
            assert (code, body["error"]) == (409, "idempotency_key_reused"), body
    assert len(sent) == 1  # one command to one agent


def test_a_known_idempotency_key_does_not_pass_the_permission_check(admin_client, admin_user,
                                                                    online, sent, image):
    first = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                              content_type="application/json", HTTP_IDEMPOTENCY_KEY="abc-3")
    assert first.status_code == 202
    _, secret = issue_token(admin_user, ["jobs:read"], days=1)
    response = Client(HTTP_AUTHORIZATION=f"Token {secret}").post(
        f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
        content_type="application/json", HTTP_IDEMPOTENCY_KEY="abc-3")
    assert response.status_code == 403 and "id" not in response.json()


def test_jobs_api_lists_and_aborts(admin_client, online, sent):
    job_id = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save").json()["id"]
    assert admin_client.get("/api/v1/jobs/").json()["results"][0]["id"] == job_id
    assert admin_client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "queued"
    assert admin_client.post(f"/api/v1/jobs/{job_id}/abort").status_code == 202
    assert sent[-1][1] == {"type": "command", "job": job_id, "action": "abort",
                           "reason": "aborted by alice"}  # the agent reports who asked


def test_hosts_and_guests_api(auditor_client, online):
    hosts = auditor_client.get("/api/v1/hosts/").json()["results"]
    assert [h["name"] for h in hosts] == ["hostb", "hostc"] and hosts[0]["online"]
    guest = auditor_client.get(f"/api/v1/guests/{GUEST['uuid']}").json()
    assert guest["host"] == "hostb" and guest["domain_ids"][0]["domain_id"] == 1


def test_dashboard_shows_hosts_and_guests(admin_client, online):
    page = admin_client.get("/")
    assert b"hostb" in page.content and b"debian_etch" in page.content
    assert b"Save</button>" in page.content


def test_a_connected_host_that_stopped_talking_is_shown_unresponsive(admin_client, online,
                                                                       settings):
    """Its socket is open (a frozen or overloaded agent): online, but not to be relied on."""
    settings.HOST_UNRESPONSIVE_SECONDS = 30
    Host.objects.filter(name="hostb").update(last_seen=timezone.now() - timedelta(seconds=45))
    hosts = {h["name"]: h for h in admin_client.get("/api/v1/hosts/").json()["results"]}
    assert (hosts["hostb"]["online"], hosts["hostb"]["unresponsive"]) == (True, True)
    assert (hosts["hostc"]["online"], hosts["hostc"]["unresponsive"]) == (True, False)
    page = admin_client.get("/").content.decode()
    hostb = page[page.index('id="host-hostb"'):page.index('id="host-hostc"')]
    assert ">unresponsive</span>" in hostb and ">online</span>" not in hostb
    assert ">online</span>" in page[page.index('id="host-hostc"'):]


def test_auditor_dashboard_has_no_save_button(auditor_client, online):
    page = auditor_client.get("/")
    assert b"debian_etch" in page.content and b"Save</button>" not in page.content


def restore(client, image, host):
    return client.post(f"/api/v1/images/{image.id}/restore", {"host": host},
                       content_type="application/json")


@pytest.fixture
def restore_given_up(admin_client, online, sent, image, settings):
    """A restore onto hostc that the portal gave up on because hostc's agent went away
    (the agent may have booted the guest all the same); hostb is still online."""
    job = Job.objects.get(id=restore(admin_client, image, "hostc").json()["id"])
    job.start()
    job.save()
    away = timezone.now() - timedelta(seconds=settings.JOB_AGENT_TIMEOUT_SECONDS + 1)
    Host.objects.filter(name="hostc").update(online=False, last_seen=away)
    assert inventory.expire_stale_jobs() == 1
    return Job.objects.get(id=job.id)


def test_a_restore_given_up_on_is_unknown_and_blocks_another_until_its_host_reports(
        admin_client, online, image, restore_given_up):
    job = restore_given_up
    assert job.state == "unknown" and not job.is_final and job.finished_at is None
    assert "went away" in job.result["unknown"]["reason"] and "went away" in job.error
    page = admin_client.get(f"/jobs/{job.id}/").content.decode()
    assert "The outcome of this job is unknown" in page and "cannot be restored" in page
    assert 'id="settle-form"' in page and 'id="abort-form"' not in page
    api = admin_client.get(f"/api/v1/jobs/{job.id}").json()
    assert api["state"] == "unknown" and api["result"]["unknown"]["reason"]
    response = restore(admin_client, image, "hostb")
    assert response.status_code == 409 and response.json()["error"] == "outcome_unknown"
    assert "hostc" in response.json()["detail"]
    assert AuditRecord.objects.filter(action="image.restore", outcome="failed").exists()
    # hostc comes back without the guest or the job: it never ran there.
    inventory.connected(Host.objects.get(name="hostc"), "chan-hostc-2", hello("hostc", []))
    job.refresh_from_db()
    assert job.state == "failed" and "does not know this job" in job.error
    assert job.result["settled"]["by"] == "host:hostc"
    assert restore(admin_client, image, "hostb").status_code == 202


def test_a_late_success_settles_an_unknown_restore_to_succeeded(admin_client, online, image,
                                                                restore_given_up):
    guest = {**GUEST, "uuid": IMAGE_META["guest_uuid"], "name": "etch", "domain_id": 9}
    assert inventory.record_result(Host.objects.get(name="hostc"), {
        "job": str(restore_given_up.id), "state": "succeeded",
        "result": {"guest": guest}}) == str(restore_given_up.id)
    job = Job.objects.get(id=restore_given_up.id)
    assert job.state == "succeeded" and job.error == "" and job.finished_at is not None
    assert job.result["settled"] == {**job.result["settled"], "state": "succeeded",
                                     "by": "host:hostc"}
    assert "late_report" not in job.result  # not late: the job was waiting for it
    assert Guest.objects.get(uuid=IMAGE_META["guest_uuid"]).host.name == "hostc"
    assert AuditRecord.objects.filter(action="image.restore.succeeded").exists()
    # The guest runs on hostc now: restoring it elsewhere is refused for that reason.
    assert restore(admin_client, image, "hostb").json()["error"] == "guest_running"


def test_a_late_failure_settles_an_unknown_restore_to_failed(admin_client, online, image,
                                                             restore_given_up):
    inventory.record_result(Host.objects.get(name="hostc"), {
        "job": str(restore_given_up.id), "state": "failed", "error": "no such image"})
    job = Job.objects.get(id=restore_given_up.id)
    assert job.state == "failed" and job.error == "no such image"
    assert restore(admin_client, image, "hostb").status_code == 202


def test_an_unknown_job_whose_agent_still_runs_it_runs_again(admin_client, online, image,
                                                             restore_given_up):
    inventory.connected(Host.objects.get(name="hostc"), "chan-hostc-2",
                        {**hello("hostc", []), "jobs": [{"job": str(restore_given_up.id)}]})
    job = Job.objects.get(id=restore_given_up.id)
    assert job.state == "running" and job.error == ""
    assert restore(admin_client, image, "hostb").json()["error"] == "guest_busy"


def test_revoking_a_host_gone_for_good_lets_the_guest_be_restored(admin_client, online, image,
                                                                  restore_given_up):
    Host.objects.filter(name="hostc").update(revoked_at=timezone.now())
    assert restore(admin_client, image, "hostb").status_code == 202


def test_a_restore_aborted_while_its_host_was_offline_is_unknown_then_aborted(
        admin_client, online, sent, image):
    job_id = restore(admin_client, image, "hostc").json()["id"]
    Host.objects.filter(name="hostc").update(online=False)
    assert admin_client.post(f"/api/v1/jobs/{job_id}/abort").status_code == 202
    job = Job.objects.get(id=job_id)
    assert job.state == "unknown" and job.result["unknown"]["abort_requested"]
    assert restore(admin_client, image, "hostb").json()["error"] == "outcome_unknown"
    again = admin_client.post(f"/api/v1/jobs/{job_id}/abort")
    assert again.status_code == 409 and again.json()["error"] == "outcome_unknown"
    inventory.connected(Host.objects.get(name="hostc"), "chan-hostc-2", hello("hostc", []))
    assert Job.objects.get(id=job_id).state == "aborted"


def settle(client, job, state, reason="looked on hostc"):
    return client.post(f"/api/v1/jobs/{job.id}/settle", {"state": state, "reason": reason},
                       content_type="application/json")


def test_an_admin_settles_an_unknown_job_and_it_is_audited(admin_client, image,
                                                           restore_given_up):
    response = settle(admin_client, restore_given_up, "failed", "hostc was wiped")
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["state"] == "failed" and body["error"] == "hostc was wiped"
    assert body["result"]["settled"]["by"] == "admin:alice"
    record = AuditRecord.objects.get(action="job.settle")
    assert record.outcome == "allowed" and record.details["state"] == "failed"
    assert restore(admin_client, image, "hostb").status_code == 202
    # Settled is final: settling again, or a late report, does not change it.
    again = settle(admin_client, restore_given_up, "succeeded")
    assert again.status_code == 409 and again.json()["error"] == "not_unknown"
    inventory.record_result(Host.objects.get(name="hostc"), {
        "job": str(restore_given_up.id), "state": "succeeded", "result": {}})
    job = Job.objects.get(id=restore_given_up.id)
    assert job.state == "failed" and job.result["late_report"]["state"] == "succeeded"


def test_settling_is_for_admins_only_and_refusals_are_audited(auditor_client, admin_user,
                                                               restore_given_up):
    response = settle(auditor_client, restore_given_up, "succeeded")
    assert response.status_code == 403
    assert Job.objects.get(id=restore_given_up.id).state == "unknown"
    assert AuditRecord.objects.filter(action="job.settle", outcome="denied").exists()
    _, secret = issue_token(admin_user, ["jobs:read"], days=1)
    response = Client(HTTP_AUTHORIZATION=f"Token {secret}").post(
        f"/api/v1/jobs/{restore_given_up.id}/settle", {"state": "succeeded"},
        content_type="application/json")
    assert response.status_code == 403


def test_settling_checks_the_state_asked_and_a_save_without_image(admin_client, online, sent):
    job_id = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/save").json()["id"]
    job = Job.objects.get(id=job_id)
    assert settle(admin_client, job, "succeeded").json()["error"] == "not_unknown"
    job.give_up("the agent on hostb went away")
    job.save()
    assert settle(admin_client, job, "maybe").status_code == 400
    refused = settle(admin_client, job, "succeeded")
    assert refused.status_code == 409 and refused.json()["error"] == "no_image"
    assert settle(admin_client, job, "failed").json()["state"] == "failed"


def test_the_job_page_settles_an_unknown_job(admin_client, restore_given_up):
    response = admin_client.post(f"/jobs/{restore_given_up.id}/settle",
                                 {"state": "succeeded", "reason": "it runs on hostc"})
    assert response.status_code == 302
    job = Job.objects.get(id=restore_given_up.id)
    assert job.state == "succeeded" and job.result["settled"]["reason"] == "it runs on hostc"
    page = admin_client.get(f"/jobs/{job.id}/").content.decode()
    assert "settled <strong>succeeded</strong> by admin:alice" in page
