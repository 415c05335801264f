"""Sign-in lockout (django-axes) and API rate limits (429)."""
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.utils import timezone

from portal.accounts import issue_token
from portal.models import AuditRecord, Outcome, RefusalWindow
from tests.conftest import PASSWORD, set_api_rates

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def documented_limits(settings):
    """The documented defaults, whatever BERTH_LOGIN_* the environment sets."""
    settings.LOGIN_FAILURE_LIMIT = 5
    settings.AXES_FAILURE_LIMIT = 6
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)


def sign_in(username, password, address="127.0.0.1"):
    client = Client(REMOTE_ADDR=address)
    return client, client.post("/login/", {"username": username, "password": password})


def fail(times, username="alice", address="127.0.0.1"):
    return [sign_in(username, "not the password", address)[1] for _ in range(times)]


# --- lockout ----------------------------------------------------------------------

def test_five_failures_are_wrong_passwords_and_the_sixth_locks_out(admin_user):
    first_five = fail(5)
    for response in first_five:
        assert response.status_code == 200
        assert b"Wrong username or password" in response.content
    assert not AuditRecord.objects.filter(action="auth.lockout").exists()
    [sixth] = fail(1)
    assert sixth.status_code == 429
    page = sixth.content.decode()
    assert "Sign-in locked" in page and "15 minutes" in page
    assert sixth["Retry-After"] == str(15 * 60)
    lockout = AuditRecord.objects.get(action="auth.lockout")
    assert (lockout.outcome, lockout.target, lockout.source_ip) == (
        Outcome.DENIED, "user:alice", "127.0.0.1")
    assert lockout.details["failures"] == 6
    assert lockout.details["reason"] == "too many failed sign-ins"


def test_failed_sign_ins_are_still_audited_each_time(admin_user):
    fail(6)
    failed = AuditRecord.objects.filter(action="auth.login", outcome=Outcome.FAILED)
    assert failed.count() == 6
    assert {e.details["reason"] for e in failed} == {"bad credentials"}


def test_the_right_password_is_refused_while_locked_out(admin_user):
    fail(6)
    client, response = sign_in("alice", PASSWORD)
    assert response.status_code == 429
    assert b"Even the right password is refused" in response.content
    assert client.get("/").status_code == 302  # not signed in
    assert not AuditRecord.objects.filter(action="auth.login", outcome=Outcome.ALLOWED).exists()
    refused = AuditRecord.objects.filter(action="auth.login", outcome=Outcome.FAILED).last()
    assert refused.details["reason"] == "locked out"
    again = AuditRecord.objects.filter(action="auth.lockout").last()
    assert again.details["reason"] == "sign-in attempted while locked out"


def test_attempts_during_a_lockout_do_not_extend_it(admin_user):
    fail(6)
    before = AccessAttempt.objects.get()
    fail(3)
    sign_in("alice", PASSWORD)
    after = AccessAttempt.objects.get()
    assert (after.failures_since_start, after.attempt_time) == (6, before.attempt_time)


def test_the_right_password_works_again_after_the_cool_off(admin_user, settings):
    fail(6)
    AccessAttempt.objects.update(
        attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))
    client, response = sign_in("alice", PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200


def test_lockout_by_address_covers_every_username_from_it(admin_user):
    for name in ("root", "admin", "bob", "carol", "dave", "erin"):
        fail(1, username=name, address="203.0.113.9")
    _, response = sign_in("alice", PASSWORD, address="203.0.113.9")
    assert response.status_code == 429
    # The same account from elsewhere is not locked: only the address is.
    _, elsewhere = sign_in("alice", PASSWORD, address="198.51.100.7")
    assert elsewhere.status_code == 302


def test_lockout_by_username_covers_every_address(admin_user):
    for n in range(6):
        fail(1, address=f"198.51.100.{n + 1}")
    _, response = sign_in("alice", PASSWORD, address="192.0.2.50")
    assert response.status_code == 429


def test_failures_for_one_user_do_not_lock_another(admin_user, auditor_user):
    fail(5, address="198.51.100.1")
    _, response = sign_in("oscar", PASSWORD, address="198.51.100.2")
    assert response.status_code == 302


def test_signed_in_test_clients_are_untouched_by_lockout(admin_user, admin_client):
    fail(6)
    # force_login() never authenticates, so an existing session keeps working.
    assert admin_client.get("/").status_code == 200


def settings_in_a_fresh_process(tmp_path, **env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BERTH_LOGIN_", "BERTH_API_RATE_"))}
    clean.update({"BERTH_DATA_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "portal.settings",
                  **env})
    code = ("from django.conf import settings as s; "
            "print(s.LOGIN_FAILURE_LIMIT, s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME, "
            "s.AXES_LOCKOUT_PARAMETERS, "
            "sorted(s.REST_FRAMEWORK['DEFAULT_THROTTLE_RATES'].items()))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def test_defaults_are_five_failures_fifteen_minutes_and_generous_api_rates(tmp_path):
    assert settings_in_a_fresh_process(tmp_path) == (
        "5 6 0:15:00 ['username', 'ip_address'] "
        "[('anon', '60/min'), ('token-issue', '30/hour'), ('user', '1200/min')]")


def test_limits_and_rates_come_from_the_environment(tmp_path):
    out = settings_in_a_fresh_process(
        tmp_path, BERTH_LOGIN_FAILURE_LIMIT="3", BERTH_LOGIN_COOLOFF_MINUTES="2",
        BERTH_API_RATE_ANON="10/min", BERTH_API_RATE_USER="99/min",
        BERTH_API_RATE_TOKEN_ISSUE="1/hour")
    assert out == ("3 4 0:02:00 ['username', 'ip_address'] "
                   "[('anon', '10/min'), ('token-issue', '1/hour'), ('user', '99/min')]")


# --- API rate limits -------------------------------------------------------------------

def test_a_flood_of_anonymous_api_requests_gets_429(db, settings):
    set_api_rates(settings, anon="5/min")
    client = Client()
    statuses = [client.get("/api/v1/images/").status_code for _ in range(5)]
    assert statuses == [401] * 5
    flooded = client.get("/api/v1/images/")
    assert flooded.status_code == 429
    assert flooded.json()["error"] == "throttled" and int(flooded["Retry-After"]) > 0


def test_forged_forwarded_for_headers_do_not_escape_the_anonymous_limit(db, settings):
    set_api_rates(settings, anon="3/min")
    statuses = [Client(HTTP_X_FORWARDED_FOR=f"10.9.8.{n}").get("/api/v1/jobs/").status_code
                for n in range(5)]
    assert statuses == [401, 401, 401, 429, 429]


def test_bad_tokens_count_against_the_anonymous_limit(db, settings):
    set_api_rates(settings, anon="3/min")
    client = Client(HTTP_AUTHORIZATION="Token berth_0123456789abcdef")
    statuses = [client.get("/api/v1/audit/").status_code for _ in range(4)]
    assert statuses == [401, 401, 401, 429]


def test_anonymous_downloads_are_limited_too(db, settings):
    set_api_rates(settings, anon="2/min")
    client = Client()
    path = f"/api/v1/images/{uuid.uuid4()}/content"
    statuses = [client.get(path).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]


def test_anonymous_flood_leaves_signed_in_callers_alone(db, settings, auditor_client):
    set_api_rates(settings, anon="2/min")
    for _ in range(4):
        Client().get("/api/v1/audit/")
    assert auditor_client.get("/api/v1/audit/").status_code == 200


def test_signed_in_callers_have_their_own_rate(auditor_user, settings):
    set_api_rates(settings, user="3/min")
    _, secret = issue_token(auditor_user, ["audit:read"], days=1)
    client = Client(HTTP_AUTHORIZATION=f"Token {secret}")
    statuses = [client.get("/api/v1/audit/").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


def test_a_flood_of_sign_ins_during_a_lockout_is_counted_not_written_each_time(admin_user):
    """Each attempt while locked out wrote two records, as often as anyone liked."""
    fail(6)  # five failures and the lockout: six records of their own, one lockout
    before = AuditRecord.objects.count()
    for _ in range(50):
        assert sign_in("alice", "guess")[1].status_code == 429
    written = AuditRecord.objects.order_by("seq")[before:]
    assert [(r.action, r.outcome, r.details["reason"]) for r in written] == [
        ("auth.login", Outcome.FAILED, "locked out"),
        ("auth.lockout", Outcome.DENIED, "sign-in attempted while locked out")]
    assert sorted(RefusalWindow.objects.values_list("action", "count")) == [
        ("auth.lockout", 50), ("auth.login", 50)]
