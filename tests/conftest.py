"""Shared fixtures: an admin, an auditor and an outsider, as in every Berth test."""
import pytest
from django.test import Client

from portal.accounts import create_user

PASSWORD = "correct horse battery staple"


def pytest_addoption(parser):
    parser.addoption("--soak-seconds", type=float, default=None,
                     help="run the soak test this long (also BERTH_SOAK_SECONDS); "
                          "without either it is skipped")


@pytest.fixture(autouse=True)
def close_sync_to_async_connections():
    """Async tests reach the database through asgiref's one sync thread, whose
    connection nobody closes: close it after each test, so PostgreSQL can drop the
    test database at the end instead of finding it still in use."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture
def admin_user(db):
    return create_user("alice", "admin", PASSWORD)[0]


@pytest.fixture
def auditor_user(db):
    return create_user("oscar", "auditor", PASSWORD)[0]


@pytest.fixture
def outsider_user(db):
    return create_user("mallory", None, PASSWORD)[0]


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """API rate-limit counters live in the cache, which outlives a test's database:
    start every test with none, so tests never throttle one another."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


def set_api_rates(settings, **rates):
    """Change API rates for one test, e.g. ``set_api_rates(settings, anon="3/min")``;
    use ``token_issue=`` for the ``token-issue`` scope."""
    current = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    rates = {name.replace("_", "-"): rate for name, rate in rates.items()}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {**current, **rates}}


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


@pytest.fixture
def private_vault(settings, tmp_path):
    """A vault and keyring of this test's own, so tests never share images or keys."""
    from vault import service

    settings.VAULT_DIR = tmp_path / "vault"
    settings.VAULT_KEYRING = tmp_path / "keys" / "vault-keyring.json"
    settings.VAULT_KEYRING_ENV = None
    settings.VAULT_CHUNK_MIB = 1
    service.reset_caches()
    yield settings.VAULT_DIR
    service.reset_caches()
