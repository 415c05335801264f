"""Scoped API tokens: the Tokens page, /api/v1/tokens/, and what a token can (not) do."""
import json
import uuid
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.utils import timezone
from guardian.shortcuts import assign_perm

from migrator.models import Guest, Host
from portal.accounts import issue_token
from portal.models import APIToken, AuditRecord, Outcome
from portal.scopes import ROLE_SCOPES, SCOPES
from tests.conftest import set_api_rates
from tests.vault.conftest import memory_like, store_image
from vault.models import SavedImage

AUDITOR_SCOPES = sorted(ROLE_SCOPES["auditor"])


def with_token(token):
    return Client(HTTP_AUTHORIZATION=f"Token {token}")


def post_json(client, path, data):
    return client.post(path, json.dumps(data), content_type="application/json")


def body(response):
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)()


def issue_from_page(client, **fields):
    data = {"name": "nightly", "scopes": ["images:read"], "days": 30, "images": ""}
    data.update(fields)
    return client.post("/tokens/", data)


# --- the page -------------------------------------------------------------------

def test_tokens_page_needs_sign_in(db):
    response = Client().get("/tokens/")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=/tokens/")


def test_nav_links_to_tokens_for_every_signed_in_user(outsider_client):
    assert b'href="/tokens/"' in outsider_client.get("/tokens/").content
    assert b'href="/tokens/"' not in Client().get("/login/").content


def test_page_issues_a_token_shown_once_and_stores_only_a_digest(auditor_client):
    response = issue_from_page(auditor_client, name="audit export", scopes=["audit:read"])
    assert response.status_code == 200
    secret = response.context["secret"]
    assert secret.startswith("berth_") and secret.encode() in response.content
    assert "no-store" in response["Cache-Control"]
    stored = APIToken.objects.get()
    assert stored.digest != secret and secret not in stored.digest
    assert stored.token_key == secret[:15]
    row = json.dumps({f.name: str(getattr(stored, f.attname)) for f in APIToken._meta.fields})
    assert secret not in row
    # Never again: the listing names the prefix only.
    listing = auditor_client.get("/tokens/")
    assert stored.token_key.encode() in listing.content and secret.encode() not in listing.content
    entry = AuditRecord.objects.get(action="token.issue")
    assert (entry.actor_kind, entry.actor, entry.outcome) == ("user", "oscar", Outcome.ALLOWED)
    assert secret not in json.dumps(entry.details)
    # And it works, within its scope.
    assert with_token(secret).get("/api/v1/audit/").status_code == 200


def test_page_lists_only_own_tokens_with_prefix_name_scopes_expiry(outsider_user, admin_user,
                                                                  outsider_client):
    mine, _ = issue_token(outsider_user, ["images:read", "jobs:read"], days=7, name="backup job")
    theirs, _ = issue_token(admin_user, ["audit:read"], days=7, name="admin script")
    page = outsider_client.get("/tokens/").content.decode()
    assert mine.token_key in page and "backup job" in page and "jobs:read" in page
    assert mine.expiry.strftime("%Y-%m-%d") in page and "never" in page  # last used
    assert theirs.token_key not in page and "admin script" not in page


def test_page_offers_only_the_roles_scopes(outsider_client):
    page = outsider_client.get("/tokens/").content.decode()
    assert 'value="images:download">' in page
    assert 'value="audit:read" disabled>' in page and 'value="guests:save" disabled>' in page


@pytest.mark.parametrize("client_name,scope", [
    ("auditor_client", "images:delete"),
    ("auditor_client", "guests:save"),
    ("outsider_client", "audit:read"),
    ("outsider_client", "images:write"),
])
def test_page_refuses_a_scope_outside_the_role(request, client_name, scope):
    client = request.getfixturevalue(client_name)
    response = issue_from_page(client, scopes=["images:read", scope])
    assert response.status_code == 400
    assert f"not allowed for your role: {scope}" in response.content.decode()
    assert not APIToken.objects.exists()
    entry = AuditRecord.objects.get(action="token.issue")
    assert entry.outcome == Outcome.DENIED and scope in entry.details["reason"]


@pytest.mark.parametrize("days", [0, 366, -1])
def test_page_refuses_an_expiry_outside_1_to_365_days(auditor_client, days):
    response = issue_from_page(auditor_client, days=days)
    assert response.status_code == 400
    assert not APIToken.objects.exists()


def test_page_token_expires_after_the_chosen_days(auditor_client):
    issue_from_page(auditor_client, days=3)
    expiry = APIToken.objects.get().expiry
    assert abs(expiry - (timezone.now() + timedelta(days=3))) < timedelta(minutes=1)


def test_unverified_admin_cannot_issue_from_the_page(unverified_admin_client, settings):
    settings.REQUIRE_2FA = True
    page = unverified_admin_client.get("/tokens/")
    assert b"Verify your second factor before issuing a token." in page.content
    response = issue_from_page(unverified_admin_client)
    assert response.status_code == 403
    assert not APIToken.objects.exists()
    entry = AuditRecord.objects.get(action="token.issue")
    assert entry.outcome == Outcome.DENIED and "second factor" in entry.details["reason"]


def test_verified_admin_may_issue_every_scope(admin_client):
    response = issue_from_page(admin_client, scopes=sorted(SCOPES))
    assert response.status_code == 200
    assert APIToken.objects.get().scopes == sorted(SCOPES)


def test_page_revokes_an_own_token_and_it_stops_working(outsider_user, outsider_client):
    instance, secret = issue_token(outsider_user, ["jobs:read"], days=1)
    assert with_token(secret).get("/api/v1/jobs/").status_code == 200
    response = outsider_client.post(f"/tokens/{instance.token_key}/revoke")
    assert response.status_code == 302
    assert not APIToken.objects.exists()
    assert with_token(secret).get("/api/v1/jobs/").status_code == 401
    entry = AuditRecord.objects.get(action="token.revoke")
    assert (entry.actor, entry.target) == ("mallory", f"token:{instance.token_key}")


def test_page_revoke_needs_post(outsider_user, outsider_client):
    instance, _ = issue_token(outsider_user, ["jobs:read"], days=1)
    assert outsider_client.get(f"/tokens/{instance.token_key}/revoke").status_code == 405
    assert APIToken.objects.exists()


def test_page_cannot_revoke_someone_elses_token(admin_user, outsider_client):
    instance, _ = issue_token(admin_user, ["jobs:read"], days=1)
    assert outsider_client.post(f"/tokens/{instance.token_key}/revoke").status_code == 404
    assert APIToken.objects.exists()


# --- the API ----------------------------------------------------------------------

def test_api_lists_own_tokens_never_the_secret(outsider_user, admin_user, outsider_client):
    mine, secret = issue_token(outsider_user, ["jobs:read"], days=1, name="poller")
    issue_token(admin_user, ["audit:read"], days=1)
    response = outsider_client.get("/api/v1/tokens/")
    assert response.status_code == 200
    [row] = response.json()
    assert row["prefix"] == mine.token_key and row["name"] == "poller"
    assert row["scopes"] == ["jobs:read"] and row["images"] == [] and row["expired"] is False
    assert "token" not in row and secret not in response.content.decode()


def test_api_issues_a_token_once_with_201(auditor_client):
    response = post_json(auditor_client, "/api/v1/tokens/",
                         {"name": "reports", "scopes": ["audit:read", "jobs:read"], "days": 10})
    assert response.status_code == 201
    data = response.json()
    secret = data["token"]
    assert data["scopes"] == ["audit:read", "jobs:read"] and data["prefix"] == secret[:15]
    assert "no-store" in response["Cache-Control"]
    assert secret not in auditor_client.get("/api/v1/tokens/").content.decode()
    assert with_token(secret).get("/api/v1/audit/").status_code == 200
    entry = AuditRecord.objects.get(action="token.issue")
    assert entry.actor == "oscar" and entry.details["scopes"] == ["audit:read", "jobs:read"]


def test_api_records_when_a_token_was_last_used(auditor_user, auditor_client):
    _, secret = issue_token(auditor_user, ["audit:read"], days=1)
    assert auditor_client.get("/api/v1/tokens/").json()[0]["last_used"] is None
    with_token(secret).get("/api/v1/audit/")
    assert auditor_client.get("/api/v1/tokens/").json()[0]["last_used"] is not None


def test_a_token_cannot_issue_tokens(admin_user):
    _, secret = issue_token(admin_user, sorted(SCOPES), days=1)
    response = post_json(with_token(secret), "/api/v1/tokens/",
                         {"name": "child", "scopes": ["images:read"], "days": 1})
    assert response.status_code == 403
    assert "browser session" in response.json()["detail"]
    assert APIToken.objects.count() == 1
    entry = AuditRecord.objects.get(action="token.issue", outcome=Outcome.DENIED)
    assert entry.actor == f"alice:token:{secret[:15]}"


def test_api_unverified_admin_cannot_issue(unverified_admin_client, settings):
    settings.REQUIRE_2FA = True
    response = post_json(unverified_admin_client, "/api/v1/tokens/",
                         {"name": "x", "scopes": ["images:read"], "days": 1})
    assert response.status_code == 403
    assert "second factor" in response.json()["detail"]
    assert not APIToken.objects.exists()


@pytest.mark.parametrize("change,field,reason", [
    ({"scopes": ["everything"]}, "scopes", "unknown scope(s): everything"),
    ({"scopes": []}, "scopes", ""),
    ({"scopes": ["images:read", "guests:save"]}, "scopes",
     "not allowed for your role: guests:save"),
    ({"days": 0}, "days", ""),
    ({"days": 366}, "days", ""),
    ({"days": "soon"}, "days", ""),
    ({"images": ["not-an-id"]}, "images", ""),
    ({"images": [str(uuid.UUID(int=7))]}, "images", "no such image"),
    ({"name": ""}, "name", ""),
])
def test_api_bad_fields_are_400_naming_the_field(auditor_client, change, field, reason):
    data = {"name": "x", "scopes": ["images:read"], "days": 5, **change}
    response = post_json(auditor_client, "/api/v1/tokens/", data)
    assert response.status_code == 400
    error = response.json()
    assert error["error"] == "invalid" and field in error["detail"]
    assert reason in json.dumps(error["detail"][field])
    assert not APIToken.objects.exists()


def test_api_token_days_default_to_the_portal_lifetime(auditor_client, settings):
    response = post_json(auditor_client, "/api/v1/tokens/", {"name": "x", "scopes": ["jobs:read"]})
    assert response.status_code == 201
    expiry = APIToken.objects.get().expiry
    expected = timezone.now() + settings.REST_KNOX["TOKEN_TTL"]
    assert abs(expiry - expected) < timedelta(minutes=1)


def test_api_revokes_own_token_with_204_and_it_stops_working(auditor_user, auditor_client):
    instance, secret = issue_token(auditor_user, ["audit:read"], days=1)
    response = auditor_client.delete(f"/api/v1/tokens/{instance.token_key}")
    assert response.status_code == 204
    assert with_token(secret).get("/api/v1/audit/").status_code == 401
    assert AuditRecord.objects.get(action="token.revoke").actor == "oscar"


def test_a_token_may_revoke_itself(auditor_user):
    instance, secret = issue_token(auditor_user, ["audit:read"], days=1)
    assert with_token(secret).delete(f"/api/v1/tokens/{instance.token_key}").status_code == 204
    assert not APIToken.objects.exists()


def test_api_non_admins_cannot_revoke_someone_elses_token(admin_user, outsider_client):
    instance, _ = issue_token(admin_user, ["audit:read"], days=1)
    response = outsider_client.delete(f"/api/v1/tokens/{instance.token_key}")
    assert response.status_code == 404
    assert APIToken.objects.exists()


def test_admins_revoke_anyones_token_audited(outsider_user, admin_client):
    instance, _ = issue_token(outsider_user, ["jobs:read"], days=1)
    response = admin_client.delete(f"/api/v1/tokens/{instance.token_key}")
    assert response.status_code == 204
    assert not APIToken.objects.exists()
    entry = AuditRecord.objects.get(action="token.revoke")
    assert (entry.actor, entry.details["user"]) == ("alice", "mallory")


def test_admin_revoking_others_needs_a_verified_session_not_a_token(outsider_user, admin_user,
                                                                     unverified_admin_client,
                                                                     settings):
    settings.REQUIRE_2FA = True
    instance, _ = issue_token(outsider_user, ["jobs:read"], days=1)
    _, admin_secret = issue_token(admin_user, sorted(SCOPES), days=1)
    assert unverified_admin_client.delete(
        f"/api/v1/tokens/{instance.token_key}").status_code == 403
    assert with_token(admin_secret).delete(
        f"/api/v1/tokens/{instance.token_key}").status_code == 403
    assert APIToken.objects.filter(user=outsider_user).exists()
    assert AuditRecord.objects.filter(action="token.revoke", outcome=Outcome.DENIED).count() == 2


def test_token_issuing_has_its_own_stricter_rate(auditor_client, settings):
    set_api_rates(settings, token_issue="2/hour")
    body_ = {"name": "x", "scopes": ["jobs:read"], "days": 1}
    assert post_json(auditor_client, "/api/v1/tokens/", body_).status_code == 201
    assert post_json(auditor_client, "/api/v1/tokens/", body_).status_code == 201
    response = post_json(auditor_client, "/api/v1/tokens/", body_)
    assert response.status_code == 429 and response.json()["error"] == "throttled"
    assert "Retry-After" in response
    assert issue_from_page(auditor_client).status_code == 429  # the page shares the budget
    assert APIToken.objects.count() == 2
    assert auditor_client.get("/api/v1/tokens/").status_code == 200  # listing is not limited


# --- expiry and revocation ---------------------------------------------------------

def test_expired_token_is_refused_with_401_and_deleted(auditor_user):
    instance, secret = issue_token(auditor_user, ["audit:read"], days=1)
    APIToken.objects.filter(digest=instance.digest).update(
        expiry=timezone.now() - timedelta(seconds=1))
    response = with_token(secret).get("/api/v1/audit/")
    assert response.status_code == 401
    assert not APIToken.objects.exists()


def test_revoked_token_is_refused_with_401(auditor_user):
    from portal.accounts import revoke_token

    instance, secret = issue_token(auditor_user, ["audit:read"], days=1)
    revoke_token(instance.token_key)
    assert with_token(secret).get("/api/v1/audit/").status_code == 401


# --- a token never does more than its user may ------------------------------------------

@pytest.fixture
def running_guest(db):
    host = Host.objects.create(name="hostb", address="10.0.0.2", credential_digest="d" * 64,
                               online=True, memory_mib=1024)
    return Guest.objects.create(uuid=uuid.uuid4(), name="debian_etch", host=host,
                                memory_mib=128, state="running", active=True)


def test_auditor_token_with_every_scope_still_cannot_save_or_delete(
        private_vault, admin_user, auditor_user, running_guest):
    image = store_image(admin_user, memory_like(64 * 1024))
    _, secret = issue_token(auditor_user, sorted(SCOPES), days=1)
    client = with_token(secret)
    save = client.post(f"/api/v1/guests/{running_guest.uuid}/save")
    assert save.status_code == 403
    delete = client.delete(f"/api/v1/images/{image.id}")
    assert delete.status_code == 403
    restore = post_json(client, f"/api/v1/images/{image.id}/restore", {"host": "hostb"})
    assert restore.status_code == 403
    grant = post_json(client, f"/api/v1/images/{image.id}/grants",
                      {"user": "oscar", "permission": "delete"})
    assert grant.status_code == 403
    assert SavedImage.objects.filter(pk=image.pk).exists()
    assert AuditRecord.objects.filter(action="guest.save", outcome=Outcome.DENIED).exists()
    assert AuditRecord.objects.filter(action="image.delete", outcome=Outcome.DENIED).exists()
    # What the role does allow, the token still does.
    assert client.get("/api/v1/audit/").status_code == 200
    assert client.get(f"/api/v1/images/{image.id}").status_code == 200


def test_outsider_token_with_every_scope_cannot_read_audit_or_inventory(outsider_user):
    _, secret = issue_token(outsider_user, sorted(SCOPES), days=1)
    client = with_token(secret)
    assert client.get("/api/v1/audit/").status_code == 403
    assert client.get("/api/v1/guests/").status_code == 403
    assert client.get("/api/v1/hosts/").status_code == 403


def test_image_restricted_token_downloads_only_the_listed_image(
        private_vault, admin_user, outsider_user, outsider_client):
    data = memory_like(2 * 1024 * 1024 + 99)
    listed = store_image(admin_user, data, name="listed")
    other = store_image(admin_user, memory_like(4096, seed=2), name="other")
    for image in (listed, other):
        for action in ("view", "download"):
            assign_perm(f"vault.{action}_savedimage", outsider_user, image)
    response = post_json(outsider_client, "/api/v1/tokens/", {
        "name": "fetch one", "scopes": ["images:read", "images:download"], "days": 1,
        "images": [str(listed.id)]})
    assert response.status_code == 201
    assert response.json()["images"] == [str(listed.id)]
    assert APIToken.objects.get().image_ids == [str(listed.id)]
    client = with_token(response.json()["token"])
    ok = client.get(f"/api/v1/images/{listed.id}/content")
    assert ok.status_code == 200 and body(ok) == data
    refused = client.get(f"/api/v1/images/{other.id}/content")
    assert refused.status_code == 403
    assert AuditRecord.objects.filter(action="image.download", target=other.target,
                                      outcome=Outcome.DENIED).exists()
    assert [i["id"] for i in client.get("/api/v1/images/").json()["results"]] == [str(listed.id)]
    assert client.get(f"/api/v1/images/{other.id}").status_code == 403


def test_cannot_restrict_a_token_to_an_image_one_may_not_see(private_vault, admin_user,
                                                             outsider_client):
    hidden = store_image(admin_user, memory_like(4096), name="hidden")
    response = post_json(outsider_client, "/api/v1/tokens/", {
        "name": "probe", "scopes": ["images:read"], "days": 1, "images": [str(hidden.id)]})
    assert response.status_code == 400
    # The same answer as for an image that does not exist: nothing is revealed.
    assert response.json()["detail"]["images"] == [f"no such image: {hidden.id}"]
    assert AuditRecord.objects.filter(action="token.issue", outcome=Outcome.DENIED).exists()


def test_page_restricts_a_token_to_listed_images(private_vault, admin_user, admin_client):
    one = store_image(admin_user, memory_like(4096), name="one")
    two = store_image(admin_user, memory_like(4096, seed=3), name="two")
    response = issue_from_page(admin_client, scopes=["images:read", "images:download"],
                               images=f"{one.id},\n{two.id}")
    assert response.status_code == 200
    assert sorted(APIToken.objects.get().image_ids) == sorted([str(one.id), str(two.id)])
    assert str(one.id).encode() in admin_client.get("/tokens/").content


def test_issue_token_refuses_images_that_do_not_exist(private_vault, admin_user):
    from portal.accounts import AccountError

    with pytest.raises(AccountError, match="no such image"):
        issue_token(admin_user, ["images:read"], days=1, images=[str(uuid.uuid4())])
    assert not APIToken.objects.exists()


def test_an_admin_token_cannot_manage_grants(private_vault, admin_user):
    image = store_image(admin_user, memory_like(4096))
    _, secret = issue_token(admin_user, sorted(SCOPES), days=1)
    response = post_json(with_token(secret), f"/api/v1/images/{image.id}/grants",
                         {"user": "alice", "permission": "view"})
    assert response.status_code == 403
    assert AuditRecord.objects.filter(action="image.grant", outcome=Outcome.DENIED).exists()


def test_a_token_cannot_revoke_its_owners_other_tokens(admin_user):
    other, _ = issue_token(admin_user, ["images:read"], days=1)
    _, secret = issue_token(admin_user, ["jobs:read"], days=1)
    response = with_token(secret).delete(f"/api/v1/tokens/{other.token_key}")
    assert response.status_code == 403
    assert "only that token" in response.json()["detail"]
    assert APIToken.objects.filter(token_key=other.token_key).exists()
    assert AuditRecord.objects.filter(action="token.revoke", outcome=Outcome.DENIED,
                                      target=f"token:{other.token_key}").exists()
