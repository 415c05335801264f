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


@pytest.fixture
def admin_client(admin_user):
    return _client_for(admin_user)


@pytest.fixture
def auditor_client(auditor_user):
    return _client_for(auditor_user)


@pytest.fixture
def outsider_client(outsider_user):
    return _client_for(outsider_user)
