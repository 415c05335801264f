"""Vault housekeeping: key rotation, scheduled verification, start-up cleanup."""
import logging
import time

from django.conf import settings

from portal import audit
from portal.models import Outcome
from vault import format as vformat
from vault import keys as vkeys
from vault import service
from vault.models import SavedImage
from vault.storage import ObjectNotFound

log = logging.getLogger(__name__)


def rotate_keys(*, actor=None, retire=False, progress=None):
    """Re-wrap every image's data key under the newest master key.

    Image data is never rewritten: only each small key envelope is replaced,
    atomically. Safe to interrupt: a re-run first finishes the rotation that
    was under way (envelopes still on an older version) before starting a new
    one. An image whose files do not unwrap (a swapped, altered or missing
    envelope or header) is left as it is and reported, so one damaged image
    cannot stop a rotation; nothing is then retired, as that image's own
    envelope may yet come back from a backup. Returns (new_version,
    rewrapped_count, retired_versions, {image_id: reason} of the images left).
    """
    provider = service.keyring()
    actor = actor or audit.Actor.system()
    if all(v == provider.current_version() for v in _envelope_versions()):
        provider.create_version()
    version = provider.current_version()
    rewrapped, failed = 0, {}
    for image in SavedImage.objects.order_by("created_at").iterator():
        try:
            done = _rewrap(provider, image, version)
        except UNREADABLE as exc:
            failed[str(image.id)] = str(exc) or type(exc).__name__
            log.error("rotation left image %s as it is: %s", image.id, failed[str(image.id)])
            continue
        if done:
            rewrapped += 1
            if progress:
                progress(image)
    retired = _retire_unused(provider, version) if retire and not failed else []
    audit.record("vault.rotate_key", actor=actor, target="vault-keyring",
                 outcome=Outcome.FAILED if failed else Outcome.ALLOWED,
                 details={"version": version, "rewrapped": rewrapped, "retired": retired,
                          **({"failed": failed} if failed else {})})
    return version, rewrapped, retired, failed


# What an image's own files can do to a rotation: another image's envelope,
# an altered header or envelope, a version no longer in the keyring, a missing file.
UNREADABLE = (vformat.FormatError, vkeys.UnknownKeyVersion, ObjectNotFound)


def _envelope_versions():
    store = service.storage()
    for image_id in SavedImage.objects.values_list("id", flat=True):
        try:
            yield vformat.envelope_key_version(store.get_envelope(str(image_id)))
        except UNREADABLE:
            continue  # the rotation reports it


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
