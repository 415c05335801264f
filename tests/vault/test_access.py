"""Permission matrix: owner, other admin, auditor, outsider, anonymous × every action."""
import uuid

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import Client

from portal.accounts import create_user
from portal.models import AuditRecord, RefusalWindow
from tests.conftest import PASSWORD, verify_second_factor
from tests.vault.conftest import request_as, store_image
from vault import access

ACTIONS = ["view", "download", "restore", "delete"]
EXPECTED = {  # who: (view, download, restore, delete, grant)
    "owner": (True, True, True, True, True),
    "other_admin": (True, True, True, True, True),
    "auditor": (True, False, False, False, False),
    "outsider": (False, False, False, False, False),
    "anonymous": (False, False, False, False, False),
}


@pytest.fixture
def people(db):
    owner = create_user("owner", "admin", PASSWORD)[0]
    return {
        "owner": owner,
        "other_admin": create_user("admin2", "admin", PASSWORD)[0],
        "auditor": create_user("aud", "auditor", PASSWORD)[0],
        "outsider": create_user("out", None, PASSWORD)[0],
        "anonymous": AnonymousUser(),
    }


@pytest.fixture
def image(people):
    return store_image(people["owner"], b"\x01" * 10000)


def client_for(people, who, verified=True):
    client = Client()
    if who != "anonymous":
        client.force_login(people[who])
    if verified and who in ("owner", "other_admin"):
        verify_second_factor(client, people[who])
    return client


@pytest.mark.parametrize("who", EXPECTED)
def test_access_helper_matches_the_matrix(people, image, who):
    request = request_as(people[who])
    assert tuple(access.can(request, a, image) for a in ACTIONS) == EXPECTED[who][:4]
    assert access.can_grant(request) == EXPECTED[who][4]


@pytest.mark.parametrize("who", EXPECTED)
def test_api_listing_shows_only_viewable_images(people, image, who):
    response = client_for(people, who).get("/api/v1/images/")
    if who == "anonymous":
        assert response.status_code == 401
        return
    ids = [row["id"] for row in response.json()["results"]]
    assert ids == ([str(image.id)] if EXPECTED[who][0] else [])


@pytest.mark.parametrize("who", EXPECTED)
def test_api_view_download_verify_follow_the_matrix(people, image, who):
    client = client_for(people, who)
    refused = 401 if who == "anonymous" else 403
    view_ok, download_ok = EXPECTED[who][0], EXPECTED[who][1]
    assert client.get(f"/api/v1/images/{image.id}").status_code == (200 if view_ok else refused)
    assert client.get(f"/api/v1/images/{image.id}/content").status_code == (
        200 if download_ok else refused)
    assert client.post(f"/api/v1/images/{image.id}/verify").status_code == (
        200 if view_ok else refused)


@pytest.mark.parametrize("who", EXPECTED)
def test_api_grant_and_delete_follow_the_matrix(people, image, who):
    client = client_for(people, who)
    refused = 401 if who == "anonymous" else 403
    grant = client.post(f"/api/v1/images/{image.id}/grants",
                        {"user": "out", "permission": "view"}, content_type="application/json")
    assert grant.status_code == (201 if EXPECTED[who][4] else refused)
    delete = client.delete(f"/api/v1/images/{image.id}")
    assert delete.status_code == (204 if EXPECTED[who][3] else refused)


@pytest.mark.parametrize("who", ["auditor", "outsider"])
def test_api_refusals_are_audited(people, image, who):
    client = client_for(people, who)
    client.get(f"/api/v1/images/{image.id}/content")
    client.delete(f"/api/v1/images/{image.id}")
    denied = AuditRecord.objects.filter(target=image.target, outcome="denied")
    assert {r.action for r in denied} >= {"image.download", "image.delete"}
    assert all(r.actor == people[who].username for r in denied)


@pytest.mark.parametrize("who", EXPECTED)
def test_pages_follow_the_matrix(people, image, who):
    client = client_for(people, who)
    detail = client.get(f"/vault/{image.id}/")
    delete = client.post(f"/vault/{image.id}/delete")
    if who == "anonymous":
        assert detail.status_code == 302 and delete.status_code == 302
        return
    assert detail.status_code == (200 if EXPECTED[who][0] else 403)
    assert delete.status_code == (302 if EXPECTED[who][3] else 403)


def test_page_refusal_is_audited(people, image):
    client_for(people, "outsider").get(f"/vault/{image.id}/")
    assert AuditRecord.objects.filter(action="image.view", outcome="denied",
                                      actor="out").exists()


def test_grant_lets_an_outsider_view_and_download(people, image):
    admin = client_for(people, "owner")
    for permission in ("view", "download"):
        admin.post(f"/api/v1/images/{image.id}/grants", {"user": "out", "permission": permission},
                   content_type="application/json")
    outsider = client_for(people, "outsider")
    assert outsider.get(f"/api/v1/images/{image.id}").status_code == 200
    assert outsider.get(f"/api/v1/images/{image.id}/content").status_code == 200
    assert outsider.delete(f"/api/v1/images/{image.id}").status_code == 403
    admin.delete(f"/api/v1/images/{image.id}/grants", {"user": "out", "permission": "download"},
                 content_type="application/json")
    assert outsider.get(f"/api/v1/images/{image.id}/content").status_code == 403


def test_group_grant_applies_to_members(people, image):
    from django.contrib.auth.models import Group

    group = Group.objects.create(name="operators")
    people["outsider"].groups.add(group)
    client_for(people, "owner").post(f"/api/v1/images/{image.id}/grants",
                                     {"group": "operators", "permission": "view"},
                                     content_type="application/json")
    assert client_for(people, "outsider").get(f"/api/v1/images/{image.id}").status_code == 200


def test_grant_to_unknown_user_is_a_400_with_a_reason(people, image):
    response = client_for(people, "owner").post(
        f"/api/v1/images/{image.id}/grants", {"user": "nobody", "permission": "view"},
        content_type="application/json")
    assert response.status_code == 400
    assert "No such user" in str(response.json()["detail"])


def test_unknown_image_is_404(people):
    response = client_for(people, "owner").get(
        "/api/v1/images/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404


def test_admin_without_second_factor_cannot_download_delete_restore_or_grant(people, image):
    request = request_as(people["owner"], verified=False)
    assert access.can(request, "view", image)
    assert not access.can(request, "download", image)
    assert not access.can(request, "restore", image)
    assert not access.can(request, "delete", image)
    assert not access.can_grant(request)
    client = client_for(people, "owner", verified=False)
    assert client.delete(f"/api/v1/images/{image.id}").status_code == 403
    assert AuditRecord.objects.filter(action="image.delete", outcome="denied").exists()


def test_a_restore_credential_downloads_its_own_image_only(people, image):
    from migrator import credentials
    from migrator.models import Host, Job, JobCredential, JobKind, JobState
    from tests.support.authz import World

    other = store_image(people["owner"], b"\x02" * 10000, name="other")
    world = World()
    host = Host.objects.get(name=world.hostc)
    job = Job.objects.create(kind=JobKind.RESTORE, state=JobState.RUNNING,
                             requester=people["owner"], guest_uuid=uuid.uuid4(), image=image,
                             destination_host=host)

    def agent():  # single use: each request its own, beside its host's credential
        return Client(HTTP_AUTHORIZATION="Job " + credentials.issue_job_credential(
            job, JobCredential.DOWNLOAD, image.id), HTTP_X_BERTH_HOST_CREDENTIAL=world.hostc_secret)
    assert agent().get(f"/api/v1/images/{other.id}/content").status_code == 403
    assert AuditRecord.objects.filter(target=other.target, outcome="denied").exists()
    assert agent().get(f"/api/v1/images/{image.id}/content").status_code == 200
    # The same kind of credential in another host's hands (beside hostb's credential).
    stolen = Client(HTTP_AUTHORIZATION="Job " + credentials.issue_job_credential(
        job, JobCredential.DOWNLOAD, image.id), HTTP_X_BERTH_HOST_CREDENTIAL=world.host_secret
        if world.hostb else "")
    answer = stolen.get(f"/api/v1/images/{image.id}/content")
    assert answer.status_code == 401 and "another host" in answer.json()["detail"]
    assert AuditRecord.objects.filter(action="job.credential_refused", actor="host:hostb",
                                      outcome="denied").exists()


def test_a_flood_of_anonymous_page_requests_is_one_audit_record(people, image):
    """Pages have no rate limit: each anonymous refusal was a row of its own."""
    client = Client(REMOTE_ADDR="10.7.7.7")
    for _ in range(100):
        assert client.get(f"/vault/{image.id}/").status_code == 302
    [entry] = AuditRecord.objects.filter(action="image.view", outcome="denied")
    assert (entry.actor_kind, entry.source_ip, entry.target) == (
        "anonymous", "10.7.7.7", image.target)
    assert RefusalWindow.objects.get(action="image.view").count == 100
