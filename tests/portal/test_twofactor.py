from django.test import Client
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from portal.models import AuditRecord
from tests.conftest import PASSWORD


def code_for(device):
    code = totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits, drift=0)
    return f"{code:06d}"


def enrol(client, user):
    page = client.get("/account/2fa/")
    assert page.status_code == 200 and b"data:image/svg+xml;base64," in page.content
    device = TOTPDevice.objects.get(user=user, confirmed=False)
    return device, client.post("/account/2fa/", {"code": code_for(device)})


def test_enrolment_by_qr_code_confirms_and_shows_backup_codes(unverified_admin_client,
                                                               admin_user):
    device, response = enrol(unverified_admin_client, admin_user)
    assert response.status_code == 200 and b"backup codes" in response.content
    device.refresh_from_db()
    assert device.confirmed
    assert AuditRecord.objects.filter(action="2fa.enroll", outcome="allowed").exists()


def test_wrong_enrolment_code_is_refused(unverified_admin_client, admin_user):
    unverified_admin_client.get("/account/2fa/")
    response = unverified_admin_client.post("/account/2fa/", {"code": "000000"})
    assert response.status_code == 400 and b"not right" in response.content
    assert not TOTPDevice.objects.filter(confirmed=True).exists()


def test_login_with_a_device_asks_for_the_second_factor(admin_user):
    setup = Client()
    setup.force_login(admin_user)
    device, _ = enrol(setup, admin_user)
    client = Client()
    response = client.post("/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302 and response["Location"].startswith("/login/verify/")
    assert client.post("/login/verify/", {"code": "123456"}).status_code == 400
    assert AuditRecord.objects.filter(action="2fa.verify", outcome="failed").exists()
    # The enrolment used this 30 s step's code and the failure armed the throttle;
    # stand in for the next step, as a person would simply wait for it.
    device.refresh_from_db()
    device.last_t, device.throttling_failure_count = -1, 0
    device.save()
    response = client.post("/login/verify/", {"code": code_for(device), "next": "/"})
    assert response.status_code == 302
    assert AuditRecord.objects.filter(action="2fa.verify", outcome="allowed").exists()


def test_backup_code_works_once(admin_user):
    setup = Client()
    setup.force_login(admin_user)
    device, page = enrol(setup, admin_user)
    backup = page.context["codes"][0]
    first, second = Client(), Client()
    for client in (first, second):
        client.force_login(admin_user)
    assert first.post("/login/verify/", {"code": backup}).status_code == 302
    assert second.post("/login/verify/", {"code": backup}).status_code == 400


def test_unverified_admin_is_told_and_cannot_create_accounts(unverified_admin_client):
    page = unverified_admin_client.get("/people/")
    assert b"Admin actions need a second factor" in page.content
    response = unverified_admin_client.post("/people/", {
        "username": "bob", "role": "auditor", "password": "a long enough passphrase"})
    assert response.status_code == 403
    assert AuditRecord.objects.filter(action="user.create", outcome="denied").exists()


def test_setting_relaxes_the_requirement_for_the_demo(unverified_admin_client, settings):
    settings.REQUIRE_2FA = False
    response = unverified_admin_client.post("/people/", {
        "username": "bob", "role": "auditor", "password": "a long enough passphrase"})
    assert response.status_code == 302


def test_a_password_alone_cannot_replace_the_authenticator(admin_user, settings):
    settings.REQUIRE_2FA = True
    setup = Client()
    setup.force_login(admin_user)
    original, _ = enrol(setup, admin_user)
    thief = Client()
    thief.post("/login/", {"username": "alice", "password": PASSWORD})
    response = thief.get("/account/2fa/")
    assert response.status_code == 302
    assert response["Location"] == "/login/verify/?next=%2Faccount%2F2fa%2F"
    assert thief.post("/account/2fa/", {"code": "000000"}).status_code == 302
    assert list(TOTPDevice.objects.filter(user=admin_user)) == [original]
    # Without the second factor the session stays unverified: no admin actions.
    assert thief.post("/tokens/", {"name": "x", "scopes": ["images:delete"],
                                   "days": 30}).status_code == 403


def test_a_verified_session_may_replace_the_authenticator(admin_client, admin_user):
    old = TOTPDevice.objects.get(user=admin_user, confirmed=True)
    device, response = enrol(admin_client, admin_user)
    assert response.status_code == 200
    assert list(TOTPDevice.objects.filter(user=admin_user, confirmed=True)) == [device]
    assert device.pk != old.pk
