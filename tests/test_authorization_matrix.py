"""Every route × every kind of caller: the exact outcome of tests/authz_matrix.py, and that
each refused access to an image is in the audit trail. A route without a row fails here."""
import uuid

import pytest
from asgiref.sync import async_to_sync
from django.urls import URLResolver, get_resolver, resolve
from django.urls.exceptions import Resolver404

from portal.models import ActorKind, AuditRecord, Outcome
from portal.routing import websocket_application
from portal.scopes import SCOPES
from tests.authz_matrix import CALLERS, OPERATIONS, REFUSALS, matrix
from tests.support.authz import (
    SESSION_FIXTURES,
    World,
    asgi_upload,
    client_for,
    outcome_of,
    send,
    websocket_outcome,
)

MATRIX = matrix()
CELLS = [pytest.param(route, method, caller, expected, id=f"{route} {method} as {caller}")
         for (route, method), row in MATRIX.items() for caller, expected in row.items()]
HTTP_CELLS = [c for c in CELLS if c.values[1] != "WS"]
WS_CELLS = [c for c in CELLS if c.values[1] == "WS"]


@pytest.fixture(autouse=True)
def fast_passwords(settings):
    # Each cell makes its accounts afresh; Argon2 would spend ~150 ms on every one.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def _last_seq():
    return AuditRecord.objects.order_by("-seq").values_list("seq", flat=True).first() or 0


def _actor_kind(caller, outcome):
    """Who the audit trail should name for a refusal."""
    if outcome in ("in", "401", "rej"):
        return ActorKind.ANONYMOUS  # no credential the portal accepts here
    return ActorKind.USER if caller in SESSION_FIXTURES else ActorKind.TOKEN


def _assert_refusal_audited(before, target, caller, outcome):
    denied = AuditRecord.objects.filter(seq__gt=before, target=target, outcome=Outcome.DENIED)
    assert denied.exists(), f"the refusal ({outcome}) was not audited on {target}"
    kind = _actor_kind(caller, outcome)
    assert denied.filter(actor_kind=kind).exists(), \
        f"the refusal was audited, but not as a {kind}: {list(denied.values('actor_kind'))}"


@pytest.mark.django_db
@pytest.mark.parametrize(("route", "method", "caller", "expected"), HTTP_CELLS)
def test_http_route(route, method, caller, expected, request, private_vault):
    operation, world = OPERATIONS[(route, method)], World()
    client = client_for(caller, world, request.getfixturevalue)
    path, data = world.fill(operation.path), world.fill_data(operation.data)
    probe = world.fill(operation.probe) if operation.probe else None
    target = world.fill(operation.audit) if operation.audit else None
    before = _last_seq()
    if operation.transport == "asgi":
        response = asgi_upload(client, path)
    else:
        response = send(client, method, path, data, as_json=operation.json)
    observed = outcome_of(response, probe)
    assert observed == expected, (
        f"{method} {path} as {caller}: expected {expected}, got {observed}: "
        f"{getattr(response, 'content', b'')[:300]!r}")
    if target and expected in REFUSALS:
        _assert_refusal_audited(before, target, caller, expected)


@pytest.mark.django_db(transaction=True)  # the consumers read the database from threads
@pytest.mark.parametrize(("route", "method", "caller", "expected"), WS_CELLS)
def test_websocket_route(route, method, caller, expected, request, settings, private_vault):
    # Who may open which socket does not depend on the channel layer; with channels-redis
    # (the scale-out pass) a layer task once hung asyncio.run's shutdown here, so the
    # matrix uses the in-process layer. tests/migrator/test_scaleout_e2e.py covers Redis.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    operation, world = OPERATIONS[(route, method)], World()
    client = client_for(caller, world, request.getfixturevalue)
    path = world.fill(operation.path)
    probe = world.fill(operation.probe) if operation.probe else None
    target = world.fill(operation.audit) if operation.audit else None
    before = _last_seq()
    observed = async_to_sync(websocket_outcome)(path, client, probe,
                                                browser=route != "ws/agent/")
    assert observed == expected, f"{path} as {caller}: expected {expected}, got {observed}"
    if target and expected in REFUSALS:
        _assert_refusal_audited(before, target, caller, expected)


# --- completeness: a route without a row fails ---------------------------------------

def _url_patterns(patterns=None):
    """(name, callback) of every URL pattern, through every include()."""
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(pattern, URLResolver):
            yield from _url_patterns(pattern.url_patterns)
        else:
            yield pattern.name, pattern.callback


def _websocket_routes(router=websocket_application, prefix=""):
    for route in router.routes:
        inner = getattr(route.callback, "routes", None)
        if inner is not None:  # a nested URLRouter
            yield from _websocket_routes(route.callback, prefix + str(route.pattern))
        else:
            yield prefix + str(route.pattern)


def test_every_url_route_has_a_row():
    routes = {name for name, _ in _url_patterns()}
    assert None not in routes, "every URL pattern needs a name to have a row in the matrix"
    rows = {route for route, method in MATRIX if method != "WS"}
    assert sorted(routes - rows) == [], "routes without a row in tests/authz_matrix.py"
    assert sorted(rows - routes) == [], "rows for routes that do not exist"


def test_every_method_of_an_api_view_has_a_row():
    for name, callback in _url_patterns():
        view = getattr(callback, "cls", None)  # DRF views; a page's row names its methods
        if view is None:
            continue
        methods = {m.upper() for m in view.http_method_names
                   if m not in ("options", "head") and hasattr(view, m)}
        rows = {method for route, method in MATRIX if route == name}
        assert sorted(methods - rows) == [], f"{name}: methods without a row"


def test_every_websocket_route_has_a_row():
    routes = set(_websocket_routes())
    rows = {route for route, method in MATRIX if method == "WS"}
    assert routes == rows, f"without a row: {sorted(routes - rows)}; stale: {sorted(rows - routes)}"


def test_the_raw_upload_route_has_a_row():
    from vault import upload

    name = resolve(upload.UPLOAD_PATH).url_name
    assert OPERATIONS[(name, "POST")].transport == "asgi"
    assert OPERATIONS[(name, "POST")].path == upload.UPLOAD_PATH


def test_every_row_sends_its_request_to_its_own_route():
    fake = {"image": uuid.uuid4(), "job": uuid.uuid4(), "guest": uuid.uuid4(),
            "doubtful": uuid.uuid4(), "unknown": uuid.uuid4(), "conflicted": uuid.uuid4(),
            "token": "abc"}
    assert MATRIX.keys() == OPERATIONS.keys()
    for (route, method), operation in OPERATIONS.items():
        if method == "WS":
            continue
        try:
            resolved = resolve(operation.path.format(**fake)).url_name
        except Resolver404:
            resolved = None
        assert resolved == route, f"{route} {method} sends {operation.path}"


def test_every_scope_has_a_column():
    assert {f"token {scope}" for scope in SCOPES} <= set(CALLERS.values())
