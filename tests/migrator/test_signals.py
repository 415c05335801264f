"""A save's upload, made with its job credential, belongs to that job - while it runs."""
import json

import pytest
from asgiref.sync import sync_to_async

from migrator import credentials
from migrator.models import Job, JobCredential, JobKind
from portal.models import AuditRecord, Outcome
from tests.migrator.conftest import GUEST, host
from tests.vault.conftest import memory_like
from tests.vault.test_upload import nothing_stored, scope_for
from vault.models import SavedImage
from vault.upload import handle_upload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("private_vault")]
DATA = memory_like(1024 * 1024 + 12345)
IMAGE_NAME = "debian_etch 2026-12-06 21:00:00"  # as the portal named it in the save command


@pytest.fixture
def save_job(enrolled, admin_user):
    job = Job.objects.create(kind=JobKind.SAVE, requester=admin_user,
                             source_host=host("hostb"), guest_uuid=GUEST["uuid"],
                             guest_name=GUEST["name"], parameters={"image": {
                                 "name": IMAGE_NAME, "memory_mib": 128, "vcpus": 1,
                                 "architecture": "x86_64", "virt_extensions": "vmx"}})
    job.start()
    job.save()
    return job, credentials.issue_job_credential(job, JobCredential.UPLOAD), enrolled["hostb"]


async def upload_as_agent(secret, host_secret, halfway=None, **extra_headers):
    """Post DATA in two halves with the job credential; ``halfway`` runs between them."""
    half = len(DATA) // 2
    messages = [{"type": "http.request", "body": DATA[:half], "more_body": True},
                {"type": "http.request", "body": DATA[half:], "more_body": False}]
    sent = []

    async def receive():
        if len(messages) == 1 and halfway is not None:
            await sync_to_async(halfway)()
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = {"Authorization": f"Job {secret}", "X-Berth-Host-Credential": host_secret,
               "Content-Type": "application/octet-stream", "Content-Length": str(len(DATA)),
               "X-Berth-Name": IMAGE_NAME, "X-Berth-Guest-UUID": GUEST["uuid"],
               **extra_headers}
    await handle_upload(scope_for(headers), receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


async def test_the_upload_of_a_running_save_is_linked_to_its_job(save_job):
    job, secret, host_secret = save_job
    status, body = await upload_as_agent(secret, host_secret)
    assert status == 201, body
    await sync_to_async(job.refresh_from_db)()
    assert str(job.image_id) == body["id"]


async def test_a_save_ended_while_its_body_arrived_stores_nothing_and_says_why(save_job):
    # The portal presumed the agent gone (say, slow to reconnect after a portal restart)
    # and failed the job; the agent's upload, already under way, must not leave an image
    # behind a failed save: the agent is told, resumes the guest, and the guest runs on.
    job, secret, host_secret = save_job

    def portal_ends_the_job():
        job.fail("the agent on hostb went away and did not come back within 5 s")
        job.save()

    status, body = await upload_as_agent(secret, host_secret, halfway=portal_ends_the_job)
    assert status == 409 and body["error"] == "job_over", body
    assert "went away" in body["detail"] and "Nothing was stored" in body["detail"]
    assert await sync_to_async(nothing_stored)()
    await sync_to_async(job.refresh_from_db)()
    assert job.image_id is None
    refusal = await sync_to_async(AuditRecord.objects.get)(action="image.upload")
    assert refusal.outcome == Outcome.DENIED and "went away" in refusal.details["reason"]
    assert not await sync_to_async(SavedImage.objects.exists)()


async def test_a_jobs_image_takes_its_metadata_from_the_job_not_the_headers(save_job):
    """The headers name only the image and the guest: the source host, memory and the
    rest come from the job record (what the portal knew when it issued the save)."""
    job, secret, host_secret = save_job
    status, body = await upload_as_agent(secret, host_secret)
    assert status == 201, body
    image = await sync_to_async(SavedImage.objects.get)(id=body["id"])
    assert (image.name, str(image.guest_uuid), image.guest_name, image.source_host,
            image.memory_mib, image.vcpus, image.architecture, image.virt_extensions) == (
        IMAGE_NAME, GUEST["uuid"], GUEST["name"], "hostb", 128, 1, "x86_64", "vmx")


@pytest.mark.parametrize("header, value", [
    ("X-Berth-Guest-UUID", "0b6a3d7e-29f5-4c1f-8d0e-3d8c2f7b9a10"),
    ("X-Berth-Source-Host", "hostd"),
    ("X-Berth-Guest-Name", "ubuntu_fuwa"),
    ("X-Berth-Name", "ubuntu_fuwa 2026-12-06"),
])
async def test_headers_that_contradict_the_job_refuse_the_upload(save_job, header, value):
    job, secret, host_secret = save_job
    status, body = await upload_as_agent(secret, host_secret, **{header: value})
    assert status == 409 and body["error"] == "metadata_mismatch", body
    assert value in body["detail"] and "Nothing was stored" in body["detail"]
    assert await sync_to_async(nothing_stored)()
    refusal = await sync_to_async(AuditRecord.objects.get)(action="image.upload")
    assert refusal.outcome == Outcome.DENIED and value in refusal.details["reason"]


async def test_an_upload_credential_presented_by_another_host_is_refused(save_job, enrolled):
    job, secret, _ = save_job
    status, body = await upload_as_agent(secret, enrolled["hostc"])
    assert status == 401 and "another host" in body["detail"], body
    assert await sync_to_async(nothing_stored)()
    refusal = await sync_to_async(AuditRecord.objects.get)(action="job.credential_refused")
    assert refusal.actor == "host:hostc" and refusal.target == f"job:{job.id}"
    await sync_to_async(job.refresh_from_db)()
    assert job.image_id is None
