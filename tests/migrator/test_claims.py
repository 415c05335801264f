"""A host speaks only for its own guests: claims against the portal's record are refused,
kept as conflicts, block new jobs, and an admin resolves them."""
import pytest

from migrator import inventory
from migrator.enrollment import HostSpec, enroll
from migrator.models import ClaimConflict, Guest, Host, Job, JobKind, JobState
from portal.models import AuditRecord
from tests.migrator.conftest import GUEST, connect_agent, credential_of, hello
from tests.vault.conftest import store_image

DEBIAN = GUEST["uuid"]
# What an attacker's host reports: the real guest's UUID, its own domain.
FORGED = {**GUEST, "domain_id": 66, "config": {"ip": "10.6.6.6"}}
NEW_GUEST = {**GUEST, "uuid": "5d0c2b8e-8c7e-4b8f-9d55-0f3a9f6a2c11", "name": "brand_new",
             "domain_id": 9}


@pytest.fixture
def hosts(enrolled):
    """hostb runs debian_etch; hostc (empty) and hostd (the attacker) are online."""
    enroll(HostSpec(name="hostd", memory_mib=1024))
    for name, guests in (("hostb", [GUEST]), ("hostc", []), ("hostd", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    return {name: Host.objects.get(name=name) for name in ("hostb", "hostc", "hostd")}


@pytest.fixture
def sent(monkeypatch):
    commands = []
    monkeypatch.setattr("migrator.progress.send_to_host",
                        lambda host, payload: commands.append((host, payload)))
    return commands


def row():
    return Guest.objects.select_related("host").get(uuid=DEBIAN)


def claim(host, *guests):
    inventory.heartbeat(Host.objects.get(pk=host.pk), {"capacity": {}, "guests": list(guests)})


def refusals():
    return AuditRecord.objects.filter(action="host.claim_refused")


def test_another_hosts_claim_does_not_move_the_guest_and_is_audited_once(hosts):
    for _ in range(5):  # every heartbeat repeats it
        claim(hosts["hostd"], FORGED)
    guest = row()
    assert (guest.host.name, guest.domain_id) == ("hostb", GUEST["domain_id"])
    record = refusals().get()
    assert record.outcome == "denied" and record.actor == "host:hostd"
    assert record.target == f"guest:{DEBIAN}" and record.details["recorded_host"] == "hostb"
    conflict = ClaimConflict.objects.get()
    assert (conflict.claimant.name, conflict.state, conflict.reports) == ("hostd", "open", 5)


def test_a_conflict_shows_in_the_api_and_on_the_dashboard(hosts, admin_client):
    claim(hosts["hostd"], FORGED)
    listed = admin_client.get("/api/v1/guests/").json()["results"]
    guest = next(g for g in listed if g["uuid"] == DEBIAN)
    assert guest["host"] == "hostb"
    assert guest["conflict"]["recorded_host"] == "hostb"
    assert [c["host"] for c in guest["conflict"]["claims"]] == ["hostd"]
    assert admin_client.get(f"/api/v1/guests/{DEBIAN}").json()["conflict"]["claims"]
    page = admin_client.get("/").content.decode()
    assert 'id="claim-conflicts"' in page and "Refuse the claim" in page
    assert f'action="/jobs/guests/{DEBIAN}/resolve-conflict"' in page


def test_a_guest_in_conflict_gets_no_new_job(hosts, admin_client, admin_user, sent,
                                             private_vault):
    claim(hosts["hostd"], FORGED)
    save = admin_client.post(f"/api/v1/guests/{DEBIAN}/save")
    assert save.status_code == 409 and save.json()["error"] == "guest_in_conflict"
    migrate = admin_client.post(f"/api/v1/guests/{DEBIAN}/migrate",
                                {"destination": "hostc"}, content_type="application/json")
    assert migrate.status_code == 409 and migrate.json()["error"] == "guest_in_conflict"
    Guest.objects.filter(uuid=DEBIAN).update(host=None)  # saved meanwhile, say
    image = store_image(admin_user, b"x" * 4096, guest_uuid=DEBIAN, guest_name="debian_etch",
                        memory_mib=128, architecture="x86_64", virt_extensions="vmx")
    restore = admin_client.post(f"/api/v1/images/{image.id}/restore", {"host": "hostc"},
                                content_type="application/json")
    assert restore.status_code == 409 and restore.json()["error"] == "guest_in_conflict"
    assert sent == [] and not Job.objects.exists()
    refused = AuditRecord.objects.get(action="guest.save", outcome="failed")
    assert "hostd claims this guest" in refused.details["reason"]


def test_admin_refuses_the_claim_and_the_save_goes_to_the_real_host(hosts, admin_client,
                                                                    sent):
    claim(hosts["hostd"], FORGED)
    answer = admin_client.post(f"/api/v1/guests/{DEBIAN}/resolve-conflict",
                               {"decision": "refuse"}, content_type="application/json")
    assert answer.status_code == 200, answer.content
    assert answer.json()["host"] == "hostb" and answer.json()["conflict"] is None
    resolved = AuditRecord.objects.get(action="guest.claim_resolve")
    assert resolved.actor == "alice" and resolved.details["decision"] == "refuse"
    for _ in range(3):  # the liar goes on: refused without a new conflict or record
        claim(hosts["hostd"], FORGED)
    assert refusals().count() == 1
    assert ClaimConflict.objects.get().state == "refused"
    save = admin_client.post(f"/api/v1/guests/{DEBIAN}/save")
    assert save.status_code == 202, save.content
    assert save.json()["source_host"] == "hostb"
    assert [host for host, _ in sent] == ["hostb"]


def test_admin_accepts_the_claim_and_the_guest_runs_on_the_claimant(hosts, admin_client):
    claim(hosts["hostd"], FORGED)
    answer = admin_client.post(f"/api/v1/guests/{DEBIAN}/resolve-conflict",
                               {"decision": "accept", "host": "hostd"},
                               content_type="application/json")
    assert answer.status_code == 200, answer.content
    assert (row().host.name, row().domain_id) == ("hostd", 66)
    # hostb still lists it: now hostb's claim is the conflict.
    claim(hosts["hostb"], GUEST)
    assert row().host.name == "hostd"
    assert ClaimConflict.objects.get(state="open").claimant.name == "hostb"


def test_resolving_needs_a_verified_admin_and_a_conflict(hosts, auditor_client,
                                                          unverified_admin_client,
                                                          admin_client):
    claim(hosts["hostd"], FORGED)
    url = f"/api/v1/guests/{DEBIAN}/resolve-conflict"
    for client in (auditor_client, unverified_admin_client):
        answer = client.post(url, {"decision": "refuse"}, content_type="application/json")
        assert answer.status_code == 403
    assert AuditRecord.objects.filter(action="guest.claim_resolve", outcome="denied").count() == 2
    wrong = admin_client.post(url, {"decision": "accept", "host": "hostc"},
                              content_type="application/json")
    assert wrong.status_code == 409 and wrong.json()["error"] == "not_a_claimant"
    assert ClaimConflict.objects.get().state == "open" and row().host.name == "hostb"
    assert admin_client.post(url, {"decision": "refuse"},
                             content_type="application/json").status_code == 200
    again = admin_client.post(url, {"decision": "refuse"}, content_type="application/json")
    assert again.status_code == 409 and again.json()["error"] == "no_conflict"


def test_the_page_action_resolves_a_conflict(hosts, admin_client):
    claim(hosts["hostd"], FORGED)
    page = admin_client.post(f"/jobs/guests/{DEBIAN}/resolve-conflict",
                             {"decision": "refuse", "host": "hostd", "next": "guest"})
    assert page.status_code == 302 and page["Location"] == f"/jobs/guests/{DEBIAN}/"
    assert ClaimConflict.objects.get().state == "refused"
    assert AuditRecord.objects.filter(action="guest.claim_resolve", outcome="allowed").exists()


def test_a_guest_in_flight_under_another_hosts_job_is_not_taken(hosts, admin_user):
    Guest.objects.filter(uuid=DEBIAN).update(host=None)
    Job.objects.create(kind=JobKind.RESTORE, requester=admin_user, guest_uuid=DEBIAN,
                       destination_host=hosts["hostc"], state=JobState.RUNNING)
    claim(hosts["hostd"], FORGED)
    assert row().host is None
    assert "in flight under a restore job" in ClaimConflict.objects.get().reason


def test_a_saved_guest_reappearing_on_another_host_is_a_conflict(hosts, admin_user):
    """The attack that matters most: a saved guest 'found' on the attacker's host,
    saved from there, then restored as the real guest."""
    Job.objects.create(kind=JobKind.SAVE, requester=admin_user, guest_uuid=DEBIAN,
                       source_host=hosts["hostb"], state=JobState.SUCCEEDED)
    claim(hosts["hostb"])  # the save destroyed it on hostb
    assert row().host is None
    claim(hosts["hostd"], FORGED)
    assert row().host is None and ClaimConflict.objects.filter(state="open").exists()


# -- what must keep working ----------------------------------------------------
def test_a_brand_new_guest_that_no_host_holds_is_placed(hosts):
    claim(hosts["hostd"], NEW_GUEST)
    assert Guest.objects.get(uuid=NEW_GUEST["uuid"]).host.name == "hostd"
    assert not refusals().exists()


def test_a_guest_put_back_on_its_own_host_is_placed_again(hosts):
    claim(hosts["hostb"])  # missing from one report (mid-save, say)
    assert row().host is None
    claim(hosts["hostb"], GUEST)
    assert row().host.name == "hostb" and not refusals().exists()


def test_a_restore_onto_a_host_places_the_guest_there(hosts, admin_user):
    claim(hosts["hostb"])
    job = Job.objects.create(kind=JobKind.RESTORE, requester=admin_user, guest_uuid=DEBIAN,
                             destination_host=hosts["hostc"], state=JobState.RUNNING)
    claim(hosts["hostc"], {**GUEST, "domain_id": 5})  # listed before the result arrives
    assert row().host.name == "hostc"
    job.finish({})
    job.save()
    claim(hosts["hostc"], {**GUEST, "domain_id": 5})
    assert row().host.name == "hostc" and not refusals().exists()


def test_a_restore_the_sweeper_gave_up_on_is_believed_when_its_host_returns(hosts,
                                                                             admin_user):
    claim(hosts["hostb"])
    job = Job.objects.create(kind=JobKind.RESTORE, requester=admin_user, guest_uuid=DEBIAN,
                             destination_host=hosts["hostc"], state=JobState.RUNNING)
    job.give_up("the agent on hostc went away")
    job.save()
    inventory.connected(Host.objects.get(name="hostc"), "chan-c2",
                        hello("hostc", [{**GUEST, "domain_id": 5}]))
    assert row().host.name == "hostc" and not refusals().exists()


def test_an_incoming_migration_is_placed_on_its_destination(hosts, admin_user):
    Job.objects.create(kind=JobKind.MIGRATE, requester=admin_user, guest_uuid=DEBIAN,
                       source_host=hosts["hostb"], destination_host=hosts["hostc"],
                       state=JobState.RUNNING)
    claim(hosts["hostc"], {**GUEST, "domain_id": 7, "state": "incoming"})
    assert row().host.name == "hostb"
    claim(hosts["hostc"], {**GUEST, "domain_id": 7})
    assert row().host.name == "hostc" and not refusals().exists()


def test_a_failed_migrations_paused_leftover_is_no_claim(hosts, admin_user):
    Job.objects.create(kind=JobKind.MIGRATE, requester=admin_user, guest_uuid=DEBIAN,
                       source_host=hosts["hostb"], destination_host=hosts["hostc"],
                       state=JobState.FAILED)
    claim(hosts["hostc"], {**GUEST, "domain_id": 7, "state": "paused", "active": False})
    assert row().host.name == "hostb" and not ClaimConflict.objects.exists()


@pytest.mark.django_db(transaction=True)
async def test_a_second_agent_socket_claiming_the_guest_is_refused(enrolled, portal_dirs):
    """Over the real agent socket: hostd's hello and heartbeats claim debian_etch."""
    from asgiref.sync import sync_to_async

    path = await sync_to_async(enroll)(HostSpec(name="hostd", memory_mib=1024))
    real = await connect_agent(enrolled["hostb"], "hostb", [GUEST])
    liar = await connect_agent(credential_of(path), "hostd", [FORGED])
    for _ in range(3):
        await liar.send_json_to({"type": "inventory", "capacity": {}, "guests": [FORGED]})
    await real.send_json_to({"type": "inventory", "capacity": {}, "guests": [GUEST]})
    # A round trip through the real socket's consumer: its inventory has been applied.
    await real.send_json_to({"type": "hello", **hello("hostb", [GUEST])})
    assert (await real.receive_json_from(timeout=5))["type"] == "welcome"
    await liar.send_json_to({"type": "hello", **hello("hostd", [FORGED])})
    assert (await liar.receive_json_from(timeout=5))["type"] == "welcome"
    guest = await sync_to_async(row)()
    assert guest.host.name == "hostb"
    assert await sync_to_async(refusals().count)() == 1
    conflict = await sync_to_async(ClaimConflict.objects.select_related("claimant").get)()
    assert conflict.claimant.name == "hostd" and conflict.reports == 5
    await liar.disconnect()
    await real.disconnect()
