"""Job credentials: stored as digests, good for one transfer of a running job."""
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.test import APIRequestFactory

from migrator import credentials
from migrator.models import Job, JobCredential, JobKind
from tests.migrator.conftest import GUEST, host


@pytest.fixture
def job(enrolled, admin_user):
    return Job.objects.create(kind=JobKind.SAVE, requester=admin_user, source_host=host("hostb"),
                              guest_uuid=GUEST["uuid"], guest_name=GUEST["name"])


def authenticate(secret):
    request = APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Job {secret}")
    return credentials.JobCredentialAuthentication().authenticate(request)


def test_only_the_digest_is_stored(job):
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    stored = JobCredential.objects.get()
    assert stored.digest == credentials.digest(secret) and secret not in str(stored.__dict__)
    assert stored.expires_at <= timezone.now() + credentials.JOB_CREDENTIAL_TTL


def test_a_credential_acts_for_the_requester_until_used(job, admin_user):
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    user, credential = authenticate(secret)
    assert user == admin_user and credential.job == job
    credentials.consume(credential)
    with pytest.raises(exceptions.AuthenticationFailed, match="used"):
        authenticate(secret)


def test_an_expired_credential_or_one_of_an_ended_job_is_refused(job):
    expired = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    JobCredential.objects.filter(digest=credentials.digest(expired)).update(
        expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(exceptions.AuthenticationFailed, match="expired"):
        authenticate(expired)
    fresh = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    job.fail("the agent went away")
    job.save()
    with pytest.raises(exceptions.AuthenticationFailed, match="is over"):
        authenticate(fresh)
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate("jc_" + "x" * 43)  # never issued
