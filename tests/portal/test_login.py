from django.test import Client

from portal.models import AuditRecord, Outcome
from tests.conftest import PASSWORD


def test_login_succeeds_and_is_audited(admin_user):
    client = Client()
    response = client.post("/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200
    entry = AuditRecord.objects.get(action="auth.login")
    assert (entry.actor, entry.outcome, entry.source_ip) == ("alice", Outcome.ALLOWED, "127.0.0.1")


def test_wrong_password_fails_and_is_audited_as_failure(admin_user):
    client = Client()
    response = client.post("/login/", {"username": "alice", "password": "not the password"})
    assert response.status_code == 200
    assert b"Wrong username or password" in response.content
    assert client.get("/").status_code == 302
    entry = AuditRecord.objects.get(action="auth.login")
    assert (entry.actor, entry.outcome) == ("alice", Outcome.FAILED)
    assert "not the password" not in str(entry.details)


def test_logout_is_audited(admin_client):
    response = admin_client.post("/logout/")
    assert response.status_code == 302
    assert admin_client.get("/").status_code == 302
    entry = AuditRecord.objects.get(action="auth.logout")
    assert entry.actor == "alice"


def test_logout_by_get_is_refused(admin_client):
    assert admin_client.get("/logout/").status_code == 405
    assert admin_client.get("/").status_code == 200


def test_login_page_renders_for_anonymous(db):
    response = Client().get("/login/")
    assert response.status_code == 200
    assert b'name="csrfmiddlewaretoken"' in response.content
