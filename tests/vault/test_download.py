import pytest
from asgiref.sync import async_to_sync

from portal.models import AuditRecord
from tests.vault.conftest import memory_like, store_image
from vault import format as vformat
from vault import service


def body(response):
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    return async_to_sync(collect)()


@pytest.fixture
def data():
    return memory_like(3 * 1024 * 1024 + 12345)


@pytest.fixture
def image(admin_user, data):
    return store_image(admin_user, data)


def test_download_returns_the_exact_bytes(admin_client, image, data):
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert response.status_code == 200
    assert int(response["Content-Length"]) == len(data)
    assert body(response) == data
    assert AuditRecord.objects.filter(action="image.download", outcome="allowed").exists()


@pytest.mark.parametrize("header,span", [
    ("bytes=0-99", (0, 100)),
    ("bytes=1048570-1048600", (1048570, 1048601)),
    ("bytes=3000000-", (3000000, None)),
    ("bytes=-500", (-500, None)),
])
def test_range_requests_return_206_with_the_slice(admin_client, image, data, header, span):
    response = admin_client.get(f"/api/v1/images/{image.id}/content", HTTP_RANGE=header)
    assert response.status_code == 206
    expected = data[span[0]:span[1]]
    assert body(response) == expected
    assert response["Content-Range"].endswith(f"/{len(data)}")


def test_unsatisfiable_range_is_416(admin_client, image, data):
    response = admin_client.get(f"/api/v1/images/{image.id}/content",
                                HTTP_RANGE=f"bytes={len(data)}-")
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("header", [f"bytes={'9' * 5000}-", f"bytes=0-{'9' * 5000}",
                                    f"bytes=-{'9' * 5000}", f"bytes={'1' * 20}-{'2' * 20}"])
def test_a_range_with_thousands_of_digits_is_416_not_500(admin_client, image, data, header):
    response = admin_client.get(f"/api/v1/images/{image.id}/content", HTTP_RANGE=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(data)}"


def test_tampered_chunk_ends_the_download_before_its_bytes_and_is_audited(
        admin_client, image, data):
    path = service.storage().root
    files = [p for p in path.rglob("*.img")]
    assert len(files) == 1
    raw = bytearray(files[0].read_bytes())
    raw[-100] ^= 0x01  # inside the last chunk
    files[0].write_bytes(bytes(raw))
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    received = bytearray()

    async def collect():
        async for chunk in response.streaming_content:
            received.extend(chunk)

    with pytest.raises(vformat.TamperedChunk):
        async_to_sync(collect)()
    assert len(received) < len(data)
    assert bytes(received) == data[:len(received)]
    assert len(received) % (1024 * 1024) == 0  # only whole verified chunks went out
    assert AuditRecord.objects.filter(action="image.download", outcome="failed").exists()


def test_verify_reports_tampering(admin_client, image):
    files = list(service.storage().root.rglob("*.img"))
    raw = bytearray(files[0].read_bytes())
    raw[200] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    response = admin_client.post(f"/api/v1/images/{image.id}/verify")
    assert response.status_code == 422
    assert response.json()["ok"] is False
    image.refresh_from_db()
    assert image.last_verify_ok is False


def test_delete_shreds_key_then_data_and_row(admin_client, image):
    store = service.storage()
    assert admin_client.delete(f"/api/v1/images/{image.id}").status_code == 204
    assert not store.exists(str(image.id))
    with pytest.raises(FileNotFoundError):
        store.get_envelope(str(image.id))
    assert list(store.root.rglob("*")) == [p for p in store.root.rglob("*") if p.is_dir()]
    assert AuditRecord.objects.filter(action="image.delete", target=image.target).exists()
