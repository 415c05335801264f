"""The raw ASGI upload endpoint, driven in-process with hand-made ASGI messages."""
import errno
import hashlib
import json
import os

import pytest
from asgiref.sync import sync_to_async

from portal.accounts import issue_token
from portal.models import AuditRecord
from tests.vault.conftest import memory_like
from vault import service
from vault.models import SavedImage
from vault.upload import BUFFERS, FEED_BYTES, handle_upload

pytestmark = pytest.mark.django_db(transaction=True)


def scope_for(headers, path="/api/v1/images/"):
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
            "query_string": b"", "headers": [(k.lower().encode(), v.encode())
                                             for k, v in headers.items()],
            "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000), "scheme": "http",
            "http_version": "1.1", "asgi": {"version": "3.0"}}


async def post(headers, pieces, *, disconnect_after=None):
    """Run the upload app; return (status, json body) or (None, None) if nothing was sent."""
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
                for i, p in enumerate(pieces)]
    if disconnect_after is not None:
        messages = messages[:disconnect_after] + [{"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await handle_upload(scope_for(headers), receive, send)
    if not sent:
        return None, None
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.fixture
def token(admin_user):
    return issue_token(admin_user, ["images:write", "images:read"], days=1)[1]


def headers_for(token, size, **extra):
    return {"Authorization": f"Token {token}", "Content-Type": "application/octet-stream",
            "Content-Length": str(size), "X-Berth-Name": "etch", **extra}


def pieces_of(data, size=256 * 1024):
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def nothing_stored():
    store = service.storage()
    files = [p for p in store.root.rglob("*") if p.is_file()] if store.root.exists() else []
    return files == [] and not SavedImage.objects.exists()


async def test_upload_streams_into_the_vault_and_returns_the_record(token):
    data = memory_like(2 * 1024 * 1024 + 999)
    status, body = await post(headers_for(token, len(data), **{
        "X-Berth-Guest-Name": "debian_etch", "X-Berth-Memory-MiB": "128",
        "X-Berth-SHA256": hashlib.sha256(data).hexdigest()}), pieces_of(data))
    assert status == 201, body
    assert body["plaintext_size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["guest_name"] == "debian_etch" and body["memory_mib"] == 128
    assert body["stored_size"] < len(data)  # zero pages cost nothing


async def test_body_spanning_several_feed_buffers_is_stored_byte_for_byte(token):
    # Odd-sized messages: buffers fill across message boundaries, each of the BUFFERS is
    # filled again after both lanes are done with it, and a partial one is left.
    data = memory_like((BUFFERS + 2) * FEED_BYTES + 3 * 1024 * 1024 + 777)
    status, body = await post(headers_for(token, len(data)), pieces_of(data, 300_001))
    assert status == 201, body
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    image = await sync_to_async(SavedImage.objects.get)(pk=body["id"])
    reader = await sync_to_async(service.open_reader)(image)
    try:
        assert b"".join(reader.iter_chunks()) == data
    finally:
        reader.close()


async def test_client_dropping_mid_stream_leaves_no_object_and_no_row(token):
    data = memory_like(3 * 1024 * 1024)
    status, _ = await post(headers_for(token, len(data)), pieces_of(data), disconnect_after=5)
    assert status is None
    assert await sync_to_async(nothing_stored)()


@pytest.mark.parametrize(("error", "status", "code"), [
    (errno.ENOSPC, 507, "insufficient_storage"), (errno.EIO, 500, "storage_error")])
async def test_storage_failing_mid_body_is_a_json_error_and_stores_nothing(
        token, monkeypatch, error, status, code):
    sealed = []
    real_seal = service.ImageSink.seal

    def seal_then_fail(sink, data):  # the disk fills up after the first buffer
        if sealed:
            raise OSError(error, os.strerror(error))
        sealed.append(len(data))
        real_seal(sink, data)

    monkeypatch.setattr(service.ImageSink, "seal", seal_then_fail)
    data = memory_like(4 * FEED_BYTES)
    answer, body = await post(headers_for(token, len(data)), pieces_of(data))
    assert (answer, body["error"]) == (status, code)
    assert os.strerror(error) in body["detail"] and "Nothing was stored" in body["detail"]
    assert sealed and await sync_to_async(nothing_stored)()


async def test_body_shorter_than_content_length_stores_nothing(token):
    data = memory_like(1024 * 1024)
    status, body = await post(headers_for(token, len(data) + 10), pieces_of(data))
    assert status == 400 and body["error"] == "length_mismatch"
    assert await sync_to_async(nothing_stored)()


async def test_body_longer_than_content_length_stores_nothing(token):
    data = memory_like(1024 * 1024)
    status, body = await post(headers_for(token, len(data) - 10), pieces_of(data))
    assert status == 400
    assert await sync_to_async(nothing_stored)()


async def test_oversized_upload_is_413_before_reading(token, settings):
    settings.VAULT_MAX_IMAGE_BYTES = 1000
    status, body = await post(headers_for(token, 5000), [b"x" * 5000])
    assert status == 413 and "limited" in body["detail"]
    assert await sync_to_async(nothing_stored)()


async def test_oversized_chunked_upload_is_413(token, settings):
    settings.VAULT_MAX_IMAGE_BYTES = 1000
    headers = headers_for(token, 0)
    del headers["Content-Length"]
    status, _ = await post(headers, [b"x" * 600, b"x" * 600])
    assert status == 413
    assert await sync_to_async(nothing_stored)()


async def test_digest_mismatch_is_422_and_stores_nothing(token):
    status, body = await post(headers_for(token, 4, **{"X-Berth-SHA256": "0" * 64}), [b"abcd"])
    assert status == 422 and body["error"] == "digest_mismatch"
    assert await sync_to_async(nothing_stored)()


async def test_missing_name_is_400(token):
    headers = headers_for(token, 4)
    del headers["X-Berth-Name"]
    status, body = await post(headers, [b"abcd"])
    assert status == 400 and "X-Berth-Name" in body["detail"]


@pytest.mark.parametrize(("header", "value"), [("X-Berth-VCPUs", "32768"),
                                                ("X-Berth-Memory-MiB", str(2**31)),
                                                ("X-Berth-VCPUs", "0")])
async def test_numbers_beyond_their_column_are_400_on_every_database(token, header, value):
    status, body = await post(headers_for(token, 4, **{header: value}), [b"abcd"])
    assert status == 400 and body["error"] == "invalid" and value in body["detail"], body
    assert await sync_to_async(nothing_stored)()


async def test_wrong_content_type_is_415(token):
    status, _ = await post(headers_for(token, 4, **{"Content-Type": "multipart/form-data"}),
                           [b"abcd"])
    assert status == 415


async def test_anonymous_upload_is_401():
    status, body = await post({"Content-Type": "application/octet-stream",
                               "X-Berth-Name": "x"}, [b"abcd"])
    assert status == 401


@pytest.fixture
def auditor_token(auditor_user):
    return issue_token(auditor_user, ["images:write"], days=1)[1]


@pytest.fixture
def read_only_token(admin_user):
    return issue_token(admin_user, ["images:read"], days=1)[1]


async def test_auditor_upload_is_403_and_audited(auditor_token):
    token = auditor_token
    status, _ = await post(headers_for(token, 4), [b"abcd"])
    assert status == 403
    assert await AuditRecord.objects.filter(action="image.upload", outcome="denied").aexists()


async def test_token_without_write_scope_is_403(read_only_token):
    status, _ = await post(headers_for(read_only_token, 4), [b"abcd"])
    assert status == 403


async def test_an_empty_upload_is_400_stores_nothing_and_is_audited(token):
    status, body = await post(headers_for(token, 0), [b""])
    assert (status, body["error"]) == (400, "empty_image"), body
    assert await sync_to_async(nothing_stored)()
    assert await AuditRecord.objects.filter(action="image.upload", outcome="failed").aexists()


async def test_an_empty_chunked_upload_is_400_and_stores_nothing(token):
    headers = headers_for(token, 0)
    del headers["Content-Length"]
    status, body = await post(headers, [b""])
    assert (status, body["error"]) == (400, "empty_image"), body
    assert await sync_to_async(nothing_stored)()


def browser_headers(client, size, csrf=True):
    """What the upload page's script sends: the session cookie and (normally) the CSRF
    token, besides the image's own headers."""
    from tests.support.authz import credential_headers

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size),
               "X-Berth-Name": "etch"}
    for name, value in credential_headers(client):
        if csrf or name != b"x-csrftoken":
            headers[name.decode()] = value.decode()
    return headers


async def test_a_verified_admin_uploads_from_the_browser(admin_client):
    headers = await sync_to_async(browser_headers)(admin_client, 4)
    status, body = await post(headers, [b"abcd"])
    assert status == 201 and body["name"] == "etch"


async def test_a_browser_upload_without_the_csrf_token_is_refused(admin_client):
    headers = await sync_to_async(browser_headers)(admin_client, 4, csrf=False)
    status, body = await post(headers, [b"abcd"])
    assert status == 403 and "CSRF" in body["detail"]
    assert await sync_to_async(nothing_stored)()


async def upload_records():
    return [r async for r in AuditRecord.objects.filter(action="image.upload").order_by("seq")]


async def test_an_interrupted_upload_is_audited(token):
    data = memory_like(3 * 1024 * 1024)
    await post(headers_for(token, len(data)), pieces_of(data), disconnect_after=5)
    [entry] = await upload_records()
    assert (entry.outcome, entry.actor_kind, entry.target) == ("failed", "token", "vault")
    assert entry.details["error"] == "interrupted"
    assert entry.details["declared_size"] == len(data) and entry.details["name"] == "etch"


@pytest.mark.parametrize(("headers", "body", "code"), [
    ({"X-Berth-SHA256": "0" * 64}, b"abcd", "digest_mismatch"),
    ({"Content-Length": "14"}, b"abcd", "length_mismatch"),
    ({"X-Berth-Name": ""}, b"abcd", "invalid")])
async def test_an_upload_failing_its_own_checks_is_audited(token, headers, body, code):
    status, answer = await post({**headers_for(token, len(body)), **headers}, [body])
    assert answer["error"] == code
    [entry] = await upload_records()
    assert (entry.outcome, entry.details["error"]) == ("denied", code)
    assert entry.details["reason"] == answer["detail"]
