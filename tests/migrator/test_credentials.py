"""Job credentials: stored as digests, good for one transfer of a running job."""
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.test import APIRequestFactory

from migrator import credentials
from migrator.models import Job, JobCredential, JobKind
from portal import audit
from portal.models import AuditRecord
from tests.migrator.conftest import GUEST, host


@pytest.fixture
def job(enrolled, admin_user):
    return Job.objects.create(kind=JobKind.SAVE, requester=admin_user, source_host=host("hostb"),
                              guest_uuid=GUEST["uuid"], guest_name=GUEST["name"])


def authenticate(secret, host_secret):
    request = APIRequestFactory().get("/", HTTP_AUTHORIZATION=f"Job {secret}",
                                      HTTP_X_BERTH_HOST_CREDENTIAL=host_secret)
    return credentials.JobCredentialAuthentication().authenticate(request)


def test_only_the_digest_is_stored(job):
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    stored = JobCredential.objects.get()
    assert stored.digest == credentials.digest(secret) and secret not in str(stored.__dict__)
    assert stored.expires_at <= timezone.now() + credentials.JOB_CREDENTIAL_TTL


def test_a_credential_acts_for_the_requester_once(job, admin_user, enrolled):
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    user, credential = authenticate(secret, enrolled["hostb"])
    assert user == admin_user and credential.job == job
    assert JobCredential.objects.get().used_at is not None  # spent by its presentation
    with pytest.raises(exceptions.AuthenticationFailed, match="used"):
        authenticate(secret, enrolled["hostb"])


def test_a_credential_is_bound_to_the_host_of_its_job(job, enrolled):
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    assert JobCredential.objects.get().host.name == "hostb"
    for presenter in (enrolled["hostc"], "", "hc_" + "x" * 43):  # another host; none; forged
        with pytest.raises(exceptions.AuthenticationFailed, match="another host"):
            authenticate(secret, presenter)
    refused = AuditRecord.objects.filter(action="job.credential_refused").order_by("seq")
    # Repeatable at will (a refusal does not spend it): one record per presenter and
    # interval, the repeats counted into the interval's aggregate.
    assert [(r.outcome, r.actor, r.target) for r in refused] == [
        ("denied", "host:hostc", f"job:{job.id}"),
        ("denied", "unknown agent", f"job:{job.id}")]
    audit.flush_refusals(timezone.now() + timedelta(hours=1))
    aggregate = AuditRecord.objects.filter(action="job.credential_refused").last()
    assert (aggregate.actor, aggregate.details["refusals"]) == ("unknown agent", 1)
    # Refused presentations did not spend it: its own host still can.
    assert authenticate(secret, enrolled["hostb"])[1].job == job


def test_a_credential_issued_before_hosts_were_bound_is_refused(job, enrolled):
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    JobCredential.objects.update(host=None)
    with pytest.raises(exceptions.AuthenticationFailed, match="another host"):
        authenticate(secret, enrolled["hostb"])


@pytest.mark.django_db(transaction=True)  # the threads' connections must see the rows
def test_concurrent_presentations_of_one_credential_let_one_through(job, enrolled):
    """Two requests read the credential unused; only one may spend it."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    if connection.vendor == "sqlite":  # one in-memory test database per thread
        credential = JobCredential.objects.get(digest=credentials.digest(
            credentials.issue_job_credential(job, JobCredential.UPLOAD)))
        assert [credentials.consume(credential) for _ in range(2)] == [True, False]
        return
    secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)

    def one():
        try:
            return authenticate(secret, enrolled["hostb"]) is not None
        except exceptions.AuthenticationFailed:
            return False
        finally:
            connection.close()
    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(lambda _: one(), range(4))) == [False, False, False, True]


def test_an_expired_credential_or_one_of_an_ended_job_is_refused(job, enrolled):
    host_secret = enrolled["hostb"]
    expired = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    JobCredential.objects.filter(digest=credentials.digest(expired)).update(
        expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(exceptions.AuthenticationFailed, match="expired"):
        authenticate(expired, host_secret)
    fresh = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    job.fail("the agent went away")
    job.save()
    with pytest.raises(exceptions.AuthenticationFailed, match="is over"):
        authenticate(fresh, host_secret)
    with pytest.raises(exceptions.AuthenticationFailed):
        authenticate("jc_" + "x" * 43, host_secret)  # never issued
