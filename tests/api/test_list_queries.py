"""The list endpoints cost a fixed number of queries, however many rows a page holds.

bench/load.py times them with 10,000 images and 100,000 audit records; this keeps an
N+1 (a query per row) from coming back unnoticed.
"""
import uuid

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from migrator.models import DomainIdRecord, Guest, Host, Job
from portal import audit
from portal.accounts import issue_token
from vault.models import SavedImage

pytestmark = pytest.mark.django_db

# Queries for a full page of 50: authentication, permission, count, the page, and the
# endpoint's own fixed extras (the image list audits itself; the job list looks for
# stale jobs; the guest list prefetches domain IDs).
LISTS = {"/api/v1/images/": 11, "/api/v1/audit/": 6, "/api/v1/jobs/": 7,
         "/api/v1/guests/": 7}


@pytest.fixture
def api(admin_user):
    _, token = issue_token(admin_user, ["images:read", "audit:read", "jobs:read",
                                        "guests:read"])
    return Client(HTTP_AUTHORIZATION=f"Token {token}")


def add_rows(n, user):
    """``n`` more rows behind each list, every one with its relations filled in."""
    source, destination = (Host.objects.create(name=f"h{uuid.uuid4().hex[:8]}", address="x",
                                               credential_digest=uuid.uuid4().hex)
                           for _ in range(2))
    for i in range(n):
        image = SavedImage.objects.create(
            name=f"image {i}", guest_name="g", plaintext_size=1, stored_size=1, sha256="0" * 64,
            key_version=1, format_version=1, algorithm="aes-256-gcm", chunk_size=1,
            created_by=user)
        guest = Guest.objects.create(uuid=uuid.uuid4(), name=f"g{i}", host=source)
        for domain_id in (1, 2):
            DomainIdRecord.objects.create(guest=guest, host_name=source.name,
                                          domain_id=domain_id)
        Job.objects.create(kind="migrate", state="succeeded", requester=user,
                           guest_uuid=guest.uuid, source_host=source,
                           destination_host=destination, image=image)
    audit.record_many({"action": "test.event", "actor": audit.Actor.system()}
                      for _ in range(n))


def page_queries(api, path):
    with CaptureQueriesContext(connection) as queries:
        response = api.get(path)
    assert response.status_code == 200, response.content
    return len(queries), len(response.json()["results"])


@pytest.mark.parametrize("path", LISTS)
def test_a_full_page_costs_no_more_queries_than_a_page_of_two(api, admin_user, path,
                                                               django_assert_max_num_queries):
    add_rows(2, admin_user)
    few, rows = page_queries(api, path)
    assert rows >= 2
    add_rows(60, admin_user)
    with django_assert_max_num_queries(min(few, LISTS[path])):
        response = api.get(path)
    assert len(response.json()["results"]) == 50
