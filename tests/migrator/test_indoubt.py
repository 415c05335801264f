"""The portal settles a migration left in doubt: it asks both agents what they
hold, keeps exactly one running guest (the destination once committed), and
lets an admin decide what the rule cannot."""
import pytest

from migrator import indoubt, inventory, migration
from migrator.models import Host, Job, JobState
from portal.models import AuditRecord
from tests.migrator.conftest import GUEST, hello

pytestmark = pytest.mark.django_db(transaction=True)

PAUSED_IN_DOUBT = {"holds": "paused", "in_doubt": True, "job_running": False}
RUNNING = {"holds": "running", "in_doubt": False, "job_running": False}
NOTHING = {"holds": "none", "in_doubt": False, "job_running": False}


@pytest.mark.parametrize(("source", "destination", "keep"), [
    (PAUSED_IN_DOUBT, PAUSED_IN_DOUBT, "destination"),   # ACTIVATE sent, lost
    ({**PAUSED_IN_DOUBT, "holds": "paused"}, RUNNING, "destination"),  # ACTIVATED lost
    (RUNNING, PAUSED_IN_DOUBT, "source"),                # COMMITTED lost: source rolled back
    (NOTHING, PAUSED_IN_DOUBT, "destination"),           # source copy gone after commit
    (PAUSED_IN_DOUBT, NOTHING, "source"),                # destination never got it
    ({**PAUSED_IN_DOUBT, "in_doubt": False}, PAUSED_IN_DOUBT, "source"),  # never committed
    (NOTHING, NOTHING, None),                            # lost: an admin must look
    ({**RUNNING, "job_running": True}, PAUSED_IN_DOUBT, None),  # source not done yet
    (PAUSED_IN_DOUBT, None, None),                       # no answer yet
])
def test_the_rule_keeps_exactly_one_copy(source, destination, keep):
    assert indoubt.decide(source, destination)[0] == keep


@pytest.fixture
def started(enrolled, admin_client, monkeypatch):
    """A migration of GUEST from hostb to hostc, started; commands land in ``sent``."""
    sent = []
    monkeypatch.setattr("migrator.progress.send_to_host", lambda h, p: sent.append((h, p)))
    for name, guests in (("hostb", [GUEST]), ("hostc", [])):
        inventory.connected(Host.objects.get(name=name), f"chan-{name}", hello(name, guests))
    response = admin_client.post(f"/api/v1/guests/{GUEST['uuid']}/migrate",
                                 {"destination": "hostc"}, content_type="application/json")
    job = Job.objects.get(id=response.json()["id"])
    migration.destination_ready(job)
    sent.clear()
    return job, sent


def host(name):
    return Host.objects.get(name=name)


def commands(sent, action):
    return sorted((h, p.get("keep")) for h, p in sent if p["action"] == action)


def answer(job, name, kind, **fields):
    inventory.record_event(host(name), {"job": str(job.id), "event": {
        "kind": kind, "guest": GUEST["uuid"], **fields}})


def test_lost_activate_is_resolved_to_the_destination(started):
    job, sent = started
    inventory.record_result(host("hostb"), {"job": str(job.id), "state": "in_doubt",
                                            "error": "no answer after ACTIVATE: timed out",
                                            "result": {"state": "in_doubt"}})
    job.refresh_from_db()
    assert job.state == JobState.IN_DOUBT and job.resolution["state"] == "asking"
    assert commands(sent, "migrate.query") == [("hostb", None), ("hostc", None)]
    answer(job, "hostc", "in_doubt", reason="no ACTIVATE")  # the destination says so too
    answer(job, "hostb", "holding", **PAUSED_IN_DOUBT)
    assert commands(sent, "migrate.resolve") == []          # one answer is not enough
    answer(job, "hostc", "holding", **PAUSED_IN_DOUBT)
    assert commands(sent, "migrate.resolve") == [("hostb", "destination"),
                                                 ("hostc", "destination")]
    answer(job, "hostc", "resolved", keep="destination", **RUNNING)
    job.refresh_from_db()
    assert job.state == JobState.IN_DOUBT and job.resolution["pending"] == ["source"]
    answer(job, "hostb", "resolved", keep="destination", **NOTHING)
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED
    assert job.resolution["state"] == "resolved" and job.resolution["by"] == "automatic"
    record = AuditRecord.objects.get(action="guest.migrate.resolved")
    assert record.details["keep"] == "destination"


def test_committed_lost_keeps_the_guest_on_the_source(started):
    """The source never got COMMITTED and took the guest back (job failed);
    the destination holds a paused copy in doubt: it is discarded."""
    job, sent = started
    inventory.record_result(host("hostb"), {"job": str(job.id), "state": "failed",
                                            "error": "commitment: timed out"})
    answer(job, "hostc", "in_doubt", reason="no ACTIVATE")
    assert commands(sent, "migrate.query") == [("hostb", None), ("hostc", None)]
    answer(job, "hostb", "holding", **RUNNING)
    answer(job, "hostc", "holding", **PAUSED_IN_DOUBT)
    assert commands(sent, "migrate.resolve") == [("hostb", "source"), ("hostc", "source")]
    answer(job, "hostb", "resolved", keep="source", **RUNNING)
    answer(job, "hostc", "resolved", keep="source", **NOTHING)
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.resolution["state"] == "resolved"
    assert job.resolution["keep"] == "source"


def test_a_source_still_running_its_job_is_asked_again_when_it_ends(started):
    job, sent = started
    answer(job, "hostc", "in_doubt", reason="no ACTIVATE")
    answer(job, "hostb", "holding", **{**PAUSED_IN_DOUBT, "in_doubt": False,
                                      "job_running": True})
    answer(job, "hostc", "holding", **PAUSED_IN_DOUBT)
    job.refresh_from_db()
    assert job.resolution["state"] == "undecided"
    sent.clear()
    inventory.record_result(host("hostb"), {"job": str(job.id), "state": "failed",
                                            "error": "commitment: timed out"})
    assert commands(sent, "migrate.query") == [("hostb", None), ("hostc", None)]


def test_agent_restart_reports_its_in_doubt_record_and_the_portal_asks(started):
    job, sent = started
    record = {"job": str(job.id), "role": "destination", "guest": GUEST["uuid"],
              "reason": "no ACTIVATE", **PAUSED_IN_DOUBT}
    inventory.connected(host("hostc"), "chan-hostc-2", hello("hostc", [], in_doubt=[record]))
    job.refresh_from_db()
    assert job.resolution["in_doubt"] == {"destination": True}
    assert commands(sent, "migrate.query") == [("hostb", None), ("hostc", None)]


def test_admin_resolves_what_the_rule_cannot(started, admin_client, auditor_client,
                                             unverified_admin_client):
    job, sent = started
    Host.objects.filter(name="hostc").update(online=False)  # the destination is gone
    inventory.record_result(host("hostb"), {"job": str(job.id), "state": "in_doubt",
                                            "error": "no answer after ACTIVATE"})
    assert commands(sent, "migrate.query") == [("hostb", None)]
    answer(job, "hostb", "holding", **PAUSED_IN_DOUBT)
    url = f"/api/v1/jobs/{job.id}/resolve"
    assert auditor_client.post(url, {"keep": "source"},
                               content_type="application/json").status_code == 403
    assert unverified_admin_client.post(url, {"keep": "source"},
                                        content_type="application/json").status_code == 403
    refused = admin_client.post(url, {"keep": "destination"}, content_type="application/json")
    assert refused.status_code == 409 and refused.json()["error"] == "unsafe"
    assert admin_client.post(url, {"keep": "sideways"},
                             content_type="application/json").status_code == 400
    page = admin_client.get(f"/jobs/{job.id}/")
    assert b"In doubt" in page.content and b'id="resolve-form"' in page.content
    guest_page = admin_client.get(f"/jobs/guests/{GUEST['uuid']}/")
    assert b"Migration in doubt" in guest_page.content

    response = admin_client.post(url, {"keep": "source"}, content_type="application/json")
    assert response.status_code == 202, response.content
    assert response.json()["resolution"]["by"] == "admin:alice"
    assert commands(sent, "migrate.resolve") == [("hostb", "source")]  # hostc is offline
    assert AuditRecord.objects.filter(action="job.resolve").exists()
    assert admin_client.post(url, {"keep": "source"},
                             content_type="application/json").status_code == 409
    answer(job, "hostb", "resolved", keep="source", **RUNNING)
    sent.clear()
    inventory.connected(host("hostc"), "chan-hostc-2", hello("hostc", []))  # it comes back
    assert commands(sent, "migrate.resolve") == [("hostc", "source")]      # told as well
    answer(job, "hostc", "resolved", keep="source", note="nothing was in doubt here",
           **NOTHING)
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "stays on the source" in job.error


def test_admin_cannot_keep_the_source_while_the_destination_runs_it(started, admin_client):
    job, _ = started
    inventory.record_result(host("hostb"), {"job": str(job.id), "state": "in_doubt",
                                            "error": "no answer after ACTIVATE"})
    answer(job, "hostb", "holding", **{**PAUSED_IN_DOUBT, "job_running": True})
    answer(job, "hostc", "holding", **RUNNING)
    response = admin_client.post(f"/api/v1/jobs/{job.id}/resolve", {"keep": "source"},
                                 content_type="application/json")
    assert response.status_code == 409 and "two running copies" in response.json()["detail"]


def test_a_job_not_in_doubt_cannot_be_resolved_or_an_in_doubt_one_aborted(started,
                                                                         admin_client):
    job, _ = started
    response = admin_client.post(f"/api/v1/jobs/{job.id}/resolve", {"keep": "source"},
                                 content_type="application/json")
    assert response.status_code == 409 and response.json()["error"] == "not_in_doubt"
    inventory.record_result(host("hostb"), {"job": str(job.id), "state": "in_doubt",
                                            "error": "no answer after ACTIVATE"})
    response = admin_client.post(f"/api/v1/jobs/{job.id}/abort")
    assert response.status_code == 409 and response.json()["error"] == "in_doubt"
