"""vault.service: which storage backend the settings choose, and the portal on S3."""
import pytest
from django.core.exceptions import ImproperlyConfigured

from portal.models import AuditRecord
from tests.vault.conftest import memory_like, store_image
from tests.vault.test_download import body
from vault import maintenance, service
from vault.objectstore import S3Storage, part_bytes_for
from vault.storage import LocalStorage


@pytest.fixture
def s3_settings(settings, s3_endpoint, s3_bucket):
    settings.VAULT_STORAGE = "s3"
    settings.VAULT_S3_BUCKET = s3_bucket
    settings.VAULT_S3_PREFIX = "berth"
    settings.VAULT_S3_ENDPOINT = s3_endpoint
    settings.VAULT_S3_REGION = "us-east-1"
    service.reset_caches()
    yield settings
    service.reset_caches()


def test_local_storage_is_the_default(settings):
    assert settings.VAULT_STORAGE == "local"
    assert isinstance(service.storage(), LocalStorage)


def test_s3_storage_is_built_from_the_settings(s3_settings):
    store = service.storage()
    assert isinstance(store, S3Storage)
    assert (store.bucket, store.prefix) == (s3_settings.VAULT_S3_BUCKET, "berth/")
    assert store.part_bytes == part_bytes_for(s3_settings.VAULT_MAX_IMAGE_BYTES)


@pytest.mark.parametrize("backend,bucket,message", [
    ("s3", "", "BERTH_VAULT_S3_BUCKET"),
    ("ftp", "bucket", "must be 'local' or 's3'"),
])
def test_a_misconfigured_backend_is_one_clear_line(settings, backend, bucket, message):
    settings.VAULT_STORAGE, settings.VAULT_S3_BUCKET = backend, bucket
    service.reset_caches()
    with pytest.raises(ImproperlyConfigured, match=message) as raised:
        service.storage()
    assert "\n" not in str(raised.value)
    service.reset_caches()


def test_the_portal_stores_downloads_and_shreds_images_in_s3(s3_settings, admin_user,
                                                              admin_client):
    data = memory_like(2 * 1024 * 1024 + 4321)
    image = store_image(admin_user, data)
    store = service.storage()
    assert store.list_ids() == [str(image.id)]
    response = admin_client.get(f"/api/v1/images/{image.id}/content")
    assert response.status_code == 200 and body(response) == data
    response = admin_client.get(f"/api/v1/images/{image.id}/content",
                                HTTP_RANGE="bytes=1048570-1048600")
    assert response.status_code == 206 and body(response) == data[1048570:1048601]
    assert service.verify(image) == (True, "")
    assert maintenance.cleanup_at_startup() == (0, 0)
    assert admin_client.delete(f"/api/v1/images/{image.id}").status_code == 204
    listing = store.client.list_objects_v2(Bucket=store.bucket)
    assert listing.get("KeyCount") == 0


def test_verify_names_another_images_files_copied_over_an_image(admin_user):
    image_a = store_image(admin_user, memory_like(1024 * 1024 + 5, seed=3), name="A")
    image_b = store_image(admin_user, memory_like(1024 * 1024 + 5, seed=4), name="B")
    root = service.storage().root
    for suffix in (".img", ".key"):
        (source,) = root.rglob(f"{image_a.id}{suffix}")
        (target,) = root.rglob(f"{image_b.id}{suffix}")
        target.write_bytes(source.read_bytes())
    ok, reason = service.verify(image_b)
    assert not ok
    assert reason == (f"the stored header's image id is {image_a.id}, the record's is "
                      f"{image_b.id}")
    assert AuditRecord.objects.filter(action="image.verify", target=image_b.target,
                                      outcome="failed", details__reason=reason).exists()
    assert service.verify(image_a) == (True, "")


def test_on_s3_another_images_objects_copied_over_an_image_are_refused(
        s3_settings, admin_user, admin_client):
    data_a = memory_like(1024 * 1024 + 5, seed=5)
    image_a = store_image(admin_user, data_a, name="A")
    image_b = store_image(admin_user, memory_like(1024 * 1024 + 5, seed=6), name="B")
    store = service.storage()
    # Someone with write access to the bucket (not the database, not the keyring).
    for folder, suffix in (("images", ".img"), ("envelopes", ".key")):
        store.client.copy_object(
            Bucket=store.bucket, Key=f"berth/{folder}/{image_b.id}{suffix}",
            CopySource={"Bucket": store.bucket, "Key": f"berth/{folder}/{image_a.id}{suffix}"})
    response = admin_client.get(f"/api/v1/images/{image_b.id}/content")
    assert response.status_code == 409 and response.json()["error"] == "integrity_error"
    assert data_a[:4096] not in response.content
    (record,) = AuditRecord.objects.filter(action="image.download", target=image_b.target)
    assert record.outcome == "failed" and str(image_a.id) in record.details["reason"]
    ok, reason = service.verify(image_b)
    assert not ok and f"image id is {image_a.id}" in reason
