"""Shared fixtures: an admin, an auditor and an outsider, as in every Berth test."""
import pytest
from django.test import Client

from portal.accounts import create_user

PASSWORD = "correct horse battery staple"


@pytest.fixture
def admin_user(db):
    return create_user("alice", "admin", PASSWORD)[0]


@pytest.fixture
def auditor_user(db):
    return create_user("oscar", "auditor", PASSWORD)[0]


@pytest.fixture
def outsider_user(db):
    return create_user("mallory", None, PASSWORD)[0]


def _client_for(user):
    client = Client()
    client.force_login(user)
    return client


def verify_second_factor(client, user):
    """Give ``user`` an authenticator and mark the client's session verified with it."""
    from django_otp import DEVICE_ID_SESSION_KEY
    from django_otp.plugins.otp_totp.models import TOTPDevice

    device = TOTPDevice.objects.create(user=user, name="test", confirmed=True)
    session = client.session
    session[DEVICE_ID_SESSION_KEY] = device.persistent_id
    session.save()
    return device


@pytest.fixture
def admin_client(admin_user):
    """An admin whose session has a verified second factor, as admin actions need."""
    client = _client_for(admin_user)
    verify_second_factor(client, admin_user)
    return client


@pytest.fixture
def unverified_admin_client(admin_user):
    return _client_for(admin_user)


@pytest.fixture
def auditor_client(auditor_user):
    return _client_for(auditor_user)


@pytest.fixture
def outsider_client(outsider_user):
    return _client_for(outsider_user)
