"""The vault's operations: store, open, verify, delete, rotate, clean up.

Glue between the Django-free cores (vault.format, vault.keys, vault.storage)
and the rest of the portal. Every function that touches an image takes the
already-authorised image; access checks live in vault.access.
"""
import os
import time
import uuid
from functools import lru_cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone
from guardian.shortcuts import assign_perm

from portal import audit
from portal.models import Outcome
from vault import format as vformat
from vault import keys as vkeys
from vault import signals
from vault.access import ACTIONS, PERMISSIONS
from vault.models import SavedImage
from vault.serializers import SavedImageSerializer
from vault.storage import LocalStorage, ObjectNotFound

ALGORITHMS = {"aes-256-gcm": vformat.ALG_AES_256_GCM,
              "chacha20-poly1305": vformat.ALG_CHACHA20_POLY1305}


@lru_cache(maxsize=1)
def storage():
    """The vault's storage backend, as ``BERTH_VAULT_STORAGE`` says."""
    if settings.VAULT_STORAGE == "local":
        return LocalStorage(settings.VAULT_DIR)
    if settings.VAULT_STORAGE == "s3":
        if not settings.VAULT_S3_BUCKET:
            raise ImproperlyConfigured("BERTH_VAULT_STORAGE=s3 needs BERTH_VAULT_S3_BUCKET")
        from vault.objectstore import S3Storage, part_bytes_for  # boto3 only when used

        return S3Storage(settings.VAULT_S3_BUCKET, prefix=settings.VAULT_S3_PREFIX,
                         endpoint_url=settings.VAULT_S3_ENDPOINT or None,
                         region=settings.VAULT_S3_REGION or None,
                         part_bytes=part_bytes_for(settings.VAULT_MAX_IMAGE_BYTES))
    raise ImproperlyConfigured(
        f"BERTH_VAULT_STORAGE must be 'local' or 's3', not {settings.VAULT_STORAGE!r}")


@lru_cache(maxsize=1)
def keyring():
    if settings.VAULT_KEYRING_ENV:
        return vkeys.EnvProvider(settings.VAULT_KEYRING_ENV)
    return vkeys.KeyringFileProvider(settings.VAULT_KEYRING)


def reset_caches():
    """Forget cached backends (tests change settings between runs)."""
    storage.cache_clear()
    keyring.cache_clear()


class ImageSink:
    """Encrypts plaintext pieces into a new, not yet visible, vault object.

    Blocking methods; async callers use ``asyncio.to_thread``. Holds the data
    key only in memory; it is written to storage solely in wrapped form.
    """

    def __init__(self):
        self.image_id = uuid.uuid4()
        self._dek = os.urandom(32)
        self._encoder = vformat.ChunkEncoder(
            self._dek, self.image_id, chunk_size=settings.VAULT_CHUNK_MIB * 1024 * 1024,
            algorithm=ALGORITHMS[settings.VAULT_ALGORITHM], compress=settings.VAULT_COMPRESS)
        self.header = self._encoder.header
        self.chunk_size = self._encoder.chunk_size
        self._writer = storage().open_writer(str(self.image_id))
        self._writer.write(self.header)

    def write(self, data: bytes):
        for record in self._encoder.feed(data):
            self._writer.write(record)

    def seal(self, data: bytes):
        """``write`` without the plaintext digest: ``hash`` must see the same pieces
        (on another thread, at the same time if the caller likes, in stream order)."""
        for record in self._encoder.seal(data):
            self._writer.write(record)

    def hash(self, data: bytes):
        self._encoder.hash(data)

    def finish(self, expected_sha256=None):
        """Seal the stream and, if its digest is the expected one, make the
        object and its key envelope durable. Returns the image's stats."""
        for record in self._encoder.finish():
            self._writer.write(record)
        stats = self._encoder.stats
        if expected_sha256 and expected_sha256 != stats.sha256:
            raise DigestMismatch(stats.sha256, expected_sha256)
        version, kek = keyring().current_key()
        envelope = vformat.wrap_data_key(kek, version, self._dek, self.header)
        storage().put_envelope(str(self.image_id), envelope)
        self._writer.commit()
        self.key_version = version
        self._dek = None
        return stats

    def abort(self):
        """Remove every trace: the partial write, or the committed object and envelope."""
        if self._writer.committed:
            storage().shred(str(self.image_id))
        else:
            self._writer.abort()
            storage().delete_envelope(str(self.image_id))
        self._dek = None


class DigestMismatch(Exception):
    def __init__(self, actual, expected):
        super().__init__(f"Content SHA-256 is {actual}, not the declared {expected}.")
        self.actual, self.expected = actual, expected


def upload_metadata(request, meta):
    """The metadata an upload's image will carry: its headers', unless a receiver of
    ``upload_started`` imposes its own (the migrator, for a job's upload: from the job
    record). A refusal is audited; a name is required either way."""
    try:
        for _, imposed in signals.upload_started.send(SavedImage, request=request, meta=meta):
            if imposed:
                meta = {**meta, **imposed}
    except signals.StoreRefused as exc:
        audit.record_request(request, "image.upload", target="vault", outcome=Outcome.DENIED,
                             details={"reason": exc.detail, "error": exc.error})
        raise
    if not meta.get("name"):
        refusal = signals.StoreRefused(400, "invalid", "X-Berth-Name is required.")
        audit.record_request(request, "image.upload", target="vault", outcome=Outcome.DENIED,
                             details={"reason": refusal.detail, "error": refusal.error})
        raise refusal
    return meta


def register_image(request, sink, stats, meta):
    """Create the row for a committed object; undo the object if that fails."""
    try:
        with transaction.atomic():
            image = SavedImage.objects.create(
                id=sink.image_id, name=meta["name"], guest_uuid=meta.get("guest_uuid"),
                guest_name=meta.get("guest_name", ""), source_host=meta.get("source_host", ""),
                plaintext_size=stats.plaintext_size, stored_size=stats.stored_size,
                sha256=stats.sha256, key_version=sink.key_version,
                format_version=vformat.FORMAT_VERSION, algorithm=settings.VAULT_ALGORITHM,
                chunk_size=settings.VAULT_CHUNK_MIB * 1024 * 1024,
                memory_mib=meta.get("memory_mib"), vcpus=meta.get("vcpus"),
                architecture=meta.get("architecture", ""),
                virt_extensions=meta.get("virt_extensions", ""),
                created_by=request.user)
            for action in ACTIONS:
                assign_perm(PERMISSIONS[action], request.user, image)
            audit.record_request(request, "image.upload", target=image.target,
                                 details={"name": image.name, "size": image.plaintext_size,
                                          "stored": image.stored_size})
            signals.image_stored.send(SavedImage, image=image, request=request)
    except BaseException as exc:
        storage().shred(str(sink.image_id))
        if isinstance(exc, signals.StoreRefused):  # its record went with the rollback
            audit.record_request(request, "image.upload", target="vault",
                                 outcome=Outcome.DENIED, details={"reason": exc.detail})
        raise
    return image


def image_json(image):
    return SavedImageSerializer(image).data


class ImageIntegrityError(Exception):
    """The stored object does not answer to its record: another image's object or
    envelope, an altered or truncated header, an envelope that does not unwrap, a
    missing object. ``reason`` is the precise cause (for the audit trail and the
    log; it may name another image); ``str()`` is the one line a client may see."""

    def __init__(self, image_id, reason):
        self.image_id, self.reason = image_id, reason
        super().__init__(f"Image {image_id} failed its integrity check: its stored object "
                         "does not match its record. Nothing was sent.")


def _check_record(image, info, key_version):
    """The header's and envelope's fields against what the row relies on.

    Only the structure has been checked here; ``open_reader`` then proves both
    authentic (envelope under the master key, header by its tag under the data
    key), and no plaintext can be read before both checks pass.
    """
    expected = {"image id": (info.image_id, image.id),
                "format version": (vformat.FORMAT_VERSION, image.format_version),
                "algorithm": (info.algorithm, ALGORITHMS.get(image.algorithm)),
                "chunk size": (info.chunk_size, image.chunk_size)}
    for field, (stored, recorded) in expected.items():
        if stored != recorded:
            raise ImageIntegrityError(image.id, f"the stored header's {field} is {stored}, "
                                                f"the record's is {recorded}")
    # Rotation replaces the envelope before it updates the row, so an envelope
    # newer than the row is an interrupted rotation; an older one was rolled back.
    if key_version < image.key_version:
        raise ImageIntegrityError(image.id, f"the key envelope is wrapped with master key "
                                            f"version {key_version}, older than the "
                                            f"record's {image.key_version} (rolled back)")


def open_reader(image, *, prove_size=True):
    """An ImageReader over the stored object, proven to be this record's image.

    Before any plaintext can be read: the header names this record's id, format
    version, algorithm and chunk size, the envelope (bound to the id, its key
    version and the header's digest) unwraps, the header's tag authenticates
    under the data key, and the final chunk proves the record's plaintext size.
    Any failure raises ``ImageIntegrityError``; storage and keyring faults that
    are not the object's (an unreachable S3, an unreadable keyring) propagate.
    ``prove_size=False`` skips the last step for a caller that reads every chunk
    and compares the size itself (``verify``): indexing costs one small read per
    chunk, a ranged GET each on S3.
    """
    try:
        f = storage().open_reader(str(image.id))
    except ObjectNotFound:
        raise ImageIntegrityError(image.id, "the stored object is missing") from None
    try:
        header = vformat.read_header(f)
        envelope = storage().get_envelope(str(image.id))
        _check_record(image, vformat.parse_header(header), vformat.envelope_key_version(envelope))
        dek = vformat.unwrap_data_key(keyring().key, envelope, header)
        f.seek(0)
        reader = vformat.ImageReader(f, dek)
        if prove_size and reader.plaintext_size != image.plaintext_size:
            raise ImageIntegrityError(image.id, f"the stored object holds "
                                                f"{reader.plaintext_size} bytes, the record "
                                                f"says {image.plaintext_size}")
        return reader
    except ObjectNotFound:
        f.close()
        raise ImageIntegrityError(image.id, "the key envelope is missing") from None
    except (vformat.FormatError, vkeys.UnknownKeyVersion) as exc:
        f.close()
        raise ImageIntegrityError(image.id, str(exc) or type(exc).__name__) from None
    except BaseException:
        f.close()
        raise


def verify(image, *, actor=None, request=None):
    """Authenticate every chunk without keeping plaintext; record the outcome."""
    started = time.monotonic()
    try:
        reader = open_reader(image, prove_size=False)  # verify() reads every chunk
        try:
            stats = reader.verify()
        finally:
            reader.close()
        ok = stats.sha256 == image.sha256 and stats.plaintext_size == image.plaintext_size
        reason = "" if ok else "content digest differs from the recorded one"
    except ImageIntegrityError as exc:
        ok, reason = False, exc.reason
    except (vformat.FormatError, vkeys.KeyringError, FileNotFoundError) as exc:
        ok, reason = False, str(exc) or type(exc).__name__
    SavedImage.objects.filter(id=image.id).update(last_verified_at=timezone.now(),
                                                   last_verify_ok=ok)
    details = {"ok": ok, "reason": reason, "seconds": round(time.monotonic() - started, 3)}
    outcome = Outcome.ALLOWED if ok else Outcome.FAILED
    if request is not None:
        audit.record_request(request, "image.verify", target=image.target, outcome=outcome,
                             details=details)
    else:
        audit.record("image.verify", actor=actor or audit.Actor.system(), target=image.target,
                     outcome=outcome, details=details)
    return ok, reason


def delete(image, request=None, *, reason=""):
    """Crypto-shred: the wrapped data key goes first, then ciphertext, then the row.
    Without a request the portal itself deletes the image, and says why."""
    storage().shred(str(image.id))
    target = image.target
    image.delete()
    if request is None:
        audit.record("image.delete", actor=audit.Actor.system(), target=target,
                     details={"reason": reason})
    else:
        audit.record_request(request, "image.delete", target=target)
