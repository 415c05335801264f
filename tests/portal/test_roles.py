import pytest
from django.test import Client

from portal.accounts import issue_token

ADMIN_ONLY_PAGES = ["/people/"]
READER_PAGES = ["/", "/audit/", "/vault/", "/jobs/"]


@pytest.mark.parametrize("path", ADMIN_ONLY_PAGES + READER_PAGES)
def test_anonymous_users_are_sent_to_login(db, path):
    response = Client().get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=")


@pytest.mark.parametrize("path", ADMIN_ONLY_PAGES)
def test_auditors_cannot_reach_admin_only_pages(auditor_client, path):
    response = auditor_client.get(path)
    assert response.status_code == 403
    assert b"Not allowed" in response.content


@pytest.mark.parametrize("path", ADMIN_ONLY_PAGES + READER_PAGES)
def test_admins_reach_every_page(admin_client, path):
    assert admin_client.get(path).status_code == 200


@pytest.mark.parametrize("path", READER_PAGES)
def test_auditors_reach_reader_pages(auditor_client, path):
    assert auditor_client.get(path).status_code == 200


@pytest.mark.parametrize("path", ["/audit/", "/people/"])
def test_users_without_a_role_are_refused(outsider_client, path):
    assert outsider_client.get(path).status_code == 403


def test_users_without_a_role_see_only_their_own_jobs(outsider_client):
    response = outsider_client.get("/jobs/")
    assert response.status_code == 200
    assert list(response.context["jobs"]) == []


def test_users_without_a_role_see_only_granted_images(outsider_client):
    # Images can be granted to anyone, so the vault list is open to every account.
    response = outsider_client.get("/vault/")
    assert response.status_code == 200
    assert list(response.context["page"].object_list) == []


def test_admin_creates_a_user_with_a_role(admin_client):
    response = admin_client.post("/people/", {"username": "bob", "role": "auditor",
                                              "password": "a long enough passphrase"})
    assert response.status_code == 302
    page = admin_client.get("/people/")
    assert b"bob" in page.content


def test_weak_password_is_refused_with_a_message(admin_client):
    response = admin_client.post("/people/", {"username": "bob", "role": "auditor",
                                              "password": "123456789012"})
    assert response.status_code == 400
    assert b"too common" in response.content or b"entirely numeric" in response.content


def test_api_without_credentials_is_401(db):
    response = Client().get("/api/v1/audit/")
    assert response.status_code == 401
    assert response.json()["error"] == "not_authenticated"


def test_api_with_a_bad_token_is_401(db):
    response = Client().get("/api/v1/audit/", HTTP_AUTHORIZATION="Token berth_nonsense")
    assert response.status_code == 401


def test_api_refuses_users_without_a_reader_role(outsider_client):
    response = outsider_client.get("/api/v1/audit/")
    assert response.status_code == 403
    assert "admins and auditors" in response.json()["detail"]


def test_api_accepts_a_token_with_the_scope(auditor_user):
    _, token = issue_token(auditor_user, ["audit:read"], days=1)
    response = Client().get("/api/v1/audit/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 200


def test_api_refuses_a_token_without_the_scope(auditor_user):
    _, token = issue_token(auditor_user, ["images:read"], days=1)
    response = Client().get("/api/v1/audit/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 403


def test_unknown_api_path_is_json_404(admin_client):
    response = admin_client.get("/api/v1/nothing-here/")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_unknown_object_in_the_api_is_a_json_not_found(admin_client):
    response = admin_client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": response.json()["detail"]}
