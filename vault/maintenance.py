"""Vault housekeeping: key rotation, scheduled verification, start-up cleanup."""
import logging
import time

from django.conf import settings

from portal import audit
from vault import format as vformat
from vault import keys as vkeys
from vault import service
from vault.models import SavedImage

log = logging.getLogger(__name__)


def rotate_keys(*, actor=None, retire=False, progress=None):
    """Re-wrap every image's data key under the newest master key.

    Image data is never rewritten: only each small key envelope is replaced,
    atomically. Safe to interrupt: a re-run first finishes the rotation that
    was under way (envelopes still on an older version) before starting a new
    one. Returns (new_version, rewrapped_count, retired_versions).
    """
    provider = service.keyring()
    actor = actor or audit.Actor.system()
    if all(v == provider.current_version() for v in _envelope_versions()):
        provider.create_version()
    version = provider.current_version()
    rewrapped = 0
    for image in SavedImage.objects.order_by("created_at").iterator():
        if _rewrap(provider, image, version):
            rewrapped += 1
            if progress:
                progress(image)
    retired = _retire_unused(provider, version) if retire else []
    audit.record("vault.rotate_key", actor=actor, target="vault-keyring",
                 details={"version": version, "rewrapped": rewrapped, "retired": retired})
    return version, rewrapped, retired


def _envelope_versions():
    store = service.storage()
    for image_id in SavedImage.objects.values_list("id", flat=True):
        yield vformat.envelope_key_version(store.get_envelope(str(image_id)))


def _rewrap(provider, image, version):
    store = service.storage()
    envelope = store.get_envelope(str(image.id))
    with store.open_reader(str(image.id)) as f:
        header = vformat.read_header(f)
    new = vkeys.rewrap_envelope(provider, envelope, header)
    if new is not None:
        store.put_envelope(str(image.id), new)
    if image.key_version != version:
        SavedImage.objects.filter(id=image.id).update(key_version=version)
    return new is not None


def _retire_unused(provider, current):
    in_use = set(_envelope_versions())
    retired = [v for v in provider.versions() if v != current and v not in in_use]
    for v in retired:
        provider.retire(v)
    return retired


def verify_images(images, *, actor=None):
    """Authenticate every chunk of each image; yield (image, ok, reason)."""
    for image in images:
        ok, reason = service.verify(image, actor=actor)
        yield image, ok, reason


def cleanup_at_startup():
    """Remove partial writes and objects no row refers to (older than a grace period)."""
    store = service.storage()
    partials = store.cleanup_partials()
    known = {str(i) for i in SavedImage.objects.values_list("id", flat=True)}
    orphans = 0
    cutoff = time.time() - settings.VAULT_ORPHAN_GRACE_SECONDS
    for image_id in store.list_ids():
        if image_id not in known and store.mtime(image_id) < cutoff:
            store.shred(image_id)
            orphans += 1
    if partials or orphans:
        log.warning("vault cleanup removed %d partial write(s) and %d orphan object(s)",
                    partials, orphans)
    return partials, orphans
