"""What agents report about their guests, and when the portal believes it."""
import pytest

from migrator import inventory
from migrator.models import Guest, Host, Job, JobKind, JobState
from tests.migrator.conftest import GUEST

INCOMING = {**GUEST, "domain_id": 7, "state": "incoming", "active": False}
ARRIVED = {**GUEST, "domain_id": 7}


@pytest.fixture
def migrating(enrolled, admin_user):
    """GUEST runs on hostb; a live migration to hostc is under way."""
    hostb, hostc = Host.objects.get(name="hostb"), Host.objects.get(name="hostc")
    inventory.sync_guests(hostb, [GUEST])
    return Job.objects.create(kind=JobKind.MIGRATE, requester=admin_user, source_host=hostb,
                              destination_host=hostc, guest_uuid=GUEST["uuid"],
                              guest_name=GUEST["name"], state=JobState.RUNNING)


def guest_row():
    return Guest.objects.select_related("host").get(uuid=GUEST["uuid"])


def test_the_destination_listing_an_incoming_guest_does_not_move_it(migrating):
    inventory.sync_guests(Host.objects.get(name="hostc"), [INCOMING])
    row = guest_row()
    assert (row.host.name, row.domain_id) == ("hostb", GUEST["domain_id"])


def test_a_failed_migration_leaves_the_guest_on_its_source_not_on_no_host(migrating):
    hostc = Host.objects.get(name="hostc")
    inventory.sync_guests(hostc, [INCOMING])
    migrating.fail("the agent on hostb went away")
    migrating.save()
    inventory.sync_guests(hostc, [])  # the destination dropped its incoming copy
    assert guest_row().host.name == "hostb"  # so no restore can start a second copy


def test_a_guest_running_on_the_destination_is_believed_before_the_result(migrating):
    """The result may be late (a portal restart); the guest must not look homeless."""
    inventory.sync_guests(Host.objects.get(name="hostc"), [ARRIVED])
    inventory.sync_guests(Host.objects.get(name="hostb"), [])  # the source let it go
    row = guest_row()
    assert (row.host.name, row.domain_id) == ("hostc", 7)


def test_once_the_migration_is_over_the_destination_is_believed(migrating):
    migrating.finish({})
    migrating.save()
    inventory.sync_guests(Host.objects.get(name="hostc"), [ARRIVED])
    row = guest_row()
    assert (row.host.name, row.domain_id) == ("hostc", 7)


def test_a_late_result_is_shown_and_believed_but_the_job_stays_final(migrating, client,
                                                                      admin_user):
    """The portal failed the job (the agent seemed gone); the agent then reports
    that the migration succeeded.  Final stays final, but the page says what
    happened, the audit trail has it, and the guest's row follows at once."""
    from portal.models import AuditRecord

    migrating.fail("the agent on hostb went away and did not come back within 60 s")
    migrating.save()
    hostb = Host.objects.get(name="hostb")
    late = {"job": str(migrating.id), "state": "succeeded", "result": {"guest": ARRIVED}}
    for _ in range(2):  # the agent re-sends until acknowledged: noted once
        assert inventory.record_result(hostb, late) == str(migrating.id)
    job = Job.objects.get(id=migrating.id)
    assert job.state == JobState.FAILED and "went away" in job.error
    assert job.result["late_report"]["state"] == "succeeded"
    assert job.result["late_report"]["host"] == "hostb"
    assert (guest_row().host.name, guest_row().domain_id) == ("hostc", 7)
    assert AuditRecord.objects.filter(action="job.late_result").count() == 1
    client.force_login(admin_user)
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert "reported it <strong>succeeded</strong>" in page


def test_a_re_sent_result_of_the_same_outcome_adds_nothing(migrating):
    migrating.fail("boom")
    migrating.save()
    inventory.record_result(Host.objects.get(name="hostb"),
                            {"job": str(migrating.id), "state": "failed", "error": "boom"})
    assert "late_report" not in Job.objects.get(id=migrating.id).result


@pytest.fixture
def saving(enrolled, admin_user, private_vault):
    """A save of GUEST on hostb whose upload the vault has stored: (job, image)."""
    from tests.vault.conftest import memory_like, store_image

    image = store_image(admin_user, memory_like(64 * 1024), guest_uuid=GUEST["uuid"])
    job = Job.objects.create(kind=JobKind.SAVE, requester=admin_user,
                             source_host=Host.objects.get(name="hostb"),
                             guest_uuid=GUEST["uuid"], guest_name=GUEST["name"],
                             state=JobState.RUNNING, image=image)
    return job, image


def image_gone(image):
    from vault import service
    from vault.models import SavedImage

    return (not SavedImage.objects.filter(id=image.id).exists()
            and not service.storage().exists(str(image.id)))


@pytest.mark.django_db(transaction=True)  # the discard runs once the result is committed
@pytest.mark.parametrize("already_failed", [False, True])
def test_a_save_the_agent_reports_failed_leaves_no_image(saving, already_failed):
    """The upload was stored but its answer never reached the agent (a portal restart),
    so the agent put the guest back and reports the save failed - on time, or after the
    portal had failed the job itself. The image nobody was given is crypto-shredded."""
    from portal.models import AuditRecord

    job, image = saving
    if already_failed:
        job.fail("the agent on hostb went away and did not come back within 5 s")
        job.save()
    report = {"job": str(job.id), "state": "failed", "error": "upload failed: connection reset"}
    inventory.record_result(Host.objects.get(name="hostb"), report)
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.image_id is None
    assert job.result["discarded_image"] == str(image.id)
    assert image_gone(image)
    shred = AuditRecord.objects.get(action="image.delete")
    assert shred.target == image.target and "connection reset" in shred.details["reason"]


@pytest.mark.django_db(transaction=True)
def test_a_save_reported_succeeded_keeps_its_image_even_when_late(saving):
    job, image = saving
    job.fail("the agent on hostb went away and did not come back within 5 s")
    job.save()
    report = {"job": str(job.id), "state": "succeeded", "result": {"image": str(image.id)}}
    inventory.record_result(Host.objects.get(name="hostb"), report)
    job.refresh_from_db()
    assert job.image_id == image.id and job.result["late_report"]["state"] == "succeeded"
    assert not image_gone(image)


@pytest.mark.django_db(transaction=True)
def test_a_save_whose_agent_restarted_after_storing_its_image_keeps_it(saving):
    """The host crashed between the vault's 201 and the agent's report: the image is
    whole, and may be the guest's last state, so the failed job keeps it and says so."""
    from tests.migrator.conftest import hello

    job, image = saving
    inventory.connected(Host.objects.get(name="hostb"), "chan-again", hello("hostb", []))
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "no longer knows this job" in job.error
    assert "image it had uploaded is whole and kept" in job.error
    assert job.image_id == image.id and not image_gone(image)


def test_a_job_whose_command_a_connected_agent_never_got_is_failed_not_unknown(
        enrolled, admin_user, settings):
    from datetime import timedelta

    from django.utils import timezone

    hostc = Host.objects.get(name="hostc")
    inventory.connected(hostc, "chan-hostc", {"guests": []})
    job = Job.objects.create(kind=JobKind.RESTORE, requester=admin_user, destination_host=hostc,
                             guest_uuid=GUEST["uuid"], guest_name=GUEST["name"])
    Job.objects.filter(id=job.id).update(created_at=timezone.now() - timedelta(
        seconds=settings.JOB_START_TIMEOUT_SECONDS + 1))
    assert inventory.expire_stale_jobs() == 1
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "did not start" in job.error
    assert "unknown" not in job.result  # the agent is there: it gets the abort
