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
    # Inside chunk 2 of 4 (the final chunk is proven before the answer starts:
    # see test_a_tampered_final_chunk_is_refused_before_the_first_byte).
    pos = 64
    for _ in range(2):
        pos += 4 + int.from_bytes(raw[pos:pos + 4], "big")
    raw[pos + 20] ^= 0x01
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


def test_a_tampered_final_chunk_is_refused_before_the_first_byte(admin_client, image):
    img, _ = files_of(image)
    raw = bytearray(img.read_bytes())
    raw[-10] ^= 0x01
    img.write_bytes(bytes(raw))
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert_refused_as_integrity_error(response, image, "chunk 3 failed authentication")


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


# -- a stored object answers only to its own record (issue 14, section 3) ------------------
# The attacker can write vault storage, not the database nor the keyring: they move,
# swap, alter and cut real files on disk, then download through the real endpoint.

def files_of(image):
    """(data file, key envelope) of ``image`` on disk."""
    (img,) = service.storage().root.rglob(f"{image.id}.img")
    return img, img.with_suffix(".key")


@pytest.fixture
def two_images(admin_user):
    """Images A and B, each of its own recognisable plaintext."""
    data_a = memory_like(2 * 1024 * 1024 + 777, seed=11)
    data_b = memory_like(2 * 1024 * 1024 + 777, seed=22)
    assert data_a != data_b
    return (store_image(admin_user, data_a, name="A"), data_a,
            store_image(admin_user, data_b, name="B"), data_b)


def assert_refused_as_integrity_error(response, image, why):
    """409 integrity_error before any byte, audited as a failed download naming ``why``."""
    assert response.status_code == 409, response.status_code
    assert response["Content-Type"] == "application/json"
    answer = response.json()
    assert answer["error"] == "integrity_error"
    assert "failed its integrity check" in answer["detail"]
    records = AuditRecord.objects.filter(action="image.download", target=image.target)
    assert [r.outcome for r in records] == ["failed"]  # never "allowed"
    assert why in records[0].details["reason"]
    assert records[0].details["reason"].startswith("integrity check failed: ")


def assert_no_plaintext_of(response, data):
    """Not one random page of ``data`` (the other image) is in the answer."""
    pages = [data[i:i + 4096] for i in range(0, len(data) - 4095, 4096)]
    samples = [page[:64] for page in pages if len(set(page)) > 200]  # random, unique pages
    assert len(samples) > 10
    content = body(response) if response.streaming else response.content
    assert not [s for s in samples if s in content]


@pytest.mark.parametrize("span", [None, "bytes=0-99"])
def test_a_copy_of_another_images_files_is_refused_without_a_byte_of_it(
        admin_client, two_images, span):
    image_a, data_a, image_b, _ = two_images
    img_a, key_a = files_of(image_a)
    img_b, key_b = files_of(image_b)
    img_b.write_bytes(img_a.read_bytes())
    key_b.write_bytes(key_a.read_bytes())
    extra = {"HTTP_RANGE": span} if span else {}
    response = admin_client.get(f"/api/v1/images/{image_b.id}/content", **extra)
    assert_refused_as_integrity_error(response, image_b,
                                      f"image id is {image_a.id}, the record's is {image_b.id}")
    assert str(image_a.id) not in response.json()["detail"]  # the other image stays unnamed
    assert_no_plaintext_of(response, data_a)
    # A itself is untouched and still downloads.
    response = admin_client.get(f"/api/v1/images/{image_a.id}/content")
    assert response.status_code == 200 and body(response) == data_a


def test_swapped_key_envelopes_are_refused_for_both_images(admin_client, two_images, caplog):
    image_a, data_a, image_b, data_b = two_images
    _, key_a = files_of(image_a)
    _, key_b = files_of(image_b)
    envelope_a, envelope_b = key_a.read_bytes(), key_b.read_bytes()
    key_a.write_bytes(envelope_b)
    key_b.write_bytes(envelope_a)
    for image, other in ((image_a, data_b), (image_b, data_a)):
        response = admin_client.get(f"/api/v1/images/{image.id}/content")
        assert_refused_as_integrity_error(response, image, "key envelope is for image")
        assert_no_plaintext_of(response, other)
    assert not [r for r in caplog.records if r.exc_info]  # one line each, no traceback
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "ERROR"] == [
        f"download of {image_a.id} refused", f"download of {image_b.id} refused"]


@pytest.mark.parametrize("offset,why", [
    (0, "bad magic"),
    (9, "unknown algorithm"),
    (12, "image id is"),           # the image id
    (30, "chunk size"),
    (35, "cannot unwrap the data key"),  # the nonce prefix: the envelope is bound to the header
    (40, "reserved header bytes"),
    (60, "cannot unwrap the data key"),  # the header tag
])
def test_a_flipped_header_byte_is_refused(admin_client, image, data, offset, why):
    img, _ = files_of(image)
    raw = bytearray(img.read_bytes())
    raw[offset] ^= 0x01
    img.write_bytes(bytes(raw))
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert_refused_as_integrity_error(response, image, why)


@pytest.mark.parametrize("keep", [
    30,                      # inside the header
    64 + 2,                  # inside the first length prefix
    64 + 4 + 1000,           # inside the first record
    "boundary",              # after a whole record: the final chunk is gone
])
def test_a_truncated_image_is_refused_before_its_first_byte(admin_client, image, data, keep):
    img, _ = files_of(image)
    raw = img.read_bytes()
    if keep == "boundary":
        keep = 64 + 4 + int.from_bytes(raw[64:68], "big")
    img.write_bytes(raw[:keep])
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert_refused_as_integrity_error(response, image, "ends")


def test_a_missing_key_envelope_or_object_is_refused(admin_client, two_images):
    image_a, _, image_b, _ = two_images
    img_a, _ = files_of(image_a)
    _, key_b = files_of(image_b)
    img_a.unlink()
    key_b.unlink()
    assert_refused_as_integrity_error(
        admin_client.get(f"/api/v1/images/{image_a.id}/content"), image_a,
        "stored object is missing")
    assert_refused_as_integrity_error(
        admin_client.get(f"/api/v1/images/{image_b.id}/content"), image_b,
        "key envelope is missing")


def test_a_record_whose_size_the_object_does_not_prove_is_refused(admin_client, image):
    # Content-Length and Range come from the record: the object must prove them first.
    type(image).objects.filter(id=image.id).update(plaintext_size=image.plaintext_size + 1)
    image.refresh_from_db()
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert_refused_as_integrity_error(response, image, "bytes, the record says")


def test_a_rolled_back_key_envelope_is_refused(admin_client, image):
    # Rotation updates the row only after the envelope: a row newer than its
    # envelope means an old envelope was put back.
    type(image).objects.filter(id=image.id).update(key_version=image.key_version + 1)
    image.refresh_from_db()
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert_refused_as_integrity_error(response, image, "rolled back")
