"""Saved guest images: the metadata row beside each encrypted object."""
import uuid

from django.conf import settings
from django.db import models


class SavedImage(models.Model):
    """One image in the vault. The ciphertext lives in vault storage under ``id``.

    Object permissions (django-guardian): view, download, restore, delete.
    The row is created only after the ciphertext is durably committed, so a row
    always names a complete object.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    guest_uuid = models.UUIDField(null=True, blank=True, db_index=True)
    guest_name = models.CharField(max_length=200, blank=True)
    source_host = models.CharField(max_length=200, blank=True, db_index=True)
    plaintext_size = models.BigIntegerField()
    stored_size = models.BigIntegerField()
    sha256 = models.CharField("plaintext SHA-256", max_length=64)
    key_version = models.PositiveIntegerField()
    format_version = models.PositiveSmallIntegerField()
    algorithm = models.CharField(max_length=32)
    chunk_size = models.PositiveIntegerField()
    memory_mib = models.PositiveIntegerField(null=True, blank=True)
    vcpus = models.PositiveSmallIntegerField(null=True, blank=True)
    architecture = models.CharField(max_length=32, blank=True)
    virt_extensions = models.CharField(max_length=100, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL,
                                   related_name="saved_images")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    last_verified_at = models.DateTimeField(null=True, blank=True)
    last_verify_ok = models.BooleanField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        default_permissions = ("view", "delete")
        permissions = [
            ("download_savedimage", "Can download image content"),
            ("restore_savedimage", "Can restore the image onto a host"),
        ]

    def __str__(self):
        return f"{self.name} ({self.id})"

    @property
    def target(self):
        """How audit records name this image."""
        return f"image:{self.id}"
