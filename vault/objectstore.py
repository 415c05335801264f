"""The vault on an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...).

Several portal machines can share one vault this way instead of sharing a
filesystem. Same interface and guarantees as ``LocalStorage``
(``docs/vault-storage.md``); Django-free like it.

Key layout, under an optional prefix (``"berth/"``; a prefix without a
trailing slash gets one)::

    <prefix>images/<id>.img        image data, written once by a multipart upload
    <prefix>envelopes/<id>.key     the wrapped data key, replaced by a plain PUT

How the guarantees map onto S3:

* **Nothing partial is visible.** A writer is a multipart upload: parts are
  not an object, and S3 makes the object appear atomically when the upload is
  completed (``commit``). Aborting the upload (``abort``) discards the parts.
* **Write-once.** ``open_writer`` refuses an id whose object exists (HEAD),
  and ``commit`` checks again with a HEAD just before completing *and*
  completes with ``If-None-Match: *``, so a server that honours conditional
  writes (AWS S3 since 2024, recent MinIO) closes the race between two
  writers of the same id; on a server that ignores the header only the HEAD
  check protects, with a window of one request between HEAD and completion.
* **Envelopes** are single PUTs, which S3 applies atomically: a reader sees
  the old or the new envelope, never a torn one.
* **Bounded memory.** A writer holds one part (8 MiB) at most; a reader one
  read-ahead window (8 MiB).

Credentials come from boto3's usual chain (environment, shared config,
instance role); they are never passed through here, and error messages carry
only the operation, the S3 error code and the HTTP status.
"""
from __future__ import annotations

import io
import logging
import os
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from vault.storage import (
    MAX_ENVELOPE_BYTES,
    ObjectExists,
    ObjectNotFound,
    Storage,
    StorageError,
    TrackedWriter,
    check_envelope,
    is_image_id,
    validate_image_id,
)

__all__ = ["S3Storage", "S3Writer", "S3Reader", "PART_BYTES", "READ_AHEAD_BYTES", "part_bytes_for"]

log = logging.getLogger(__name__)

PART_BYTES = 8 * 1024 * 1024        # S3 refuses parts under 5 MiB, except the last
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PARTS = 10_000                  # S3's limit: 8 MiB parts hold 78 GiB (see part_bytes_for)
READ_AHEAD_BYTES = 8 * 1024 * 1024  # a record is at most ~1 MiB: one GET serves several
# What a read after a jump fetches: enough for a record's length prefix and the
# start of its record, not a whole window that the next jump would waste.
SEEK_FETCH_BYTES = 64 * 1024
# An upload older than this is taken for a crashed one: no lock can tell a
# live multipart upload from a dead one, so age is all there is to go on.
PARTIAL_GRACE_SECONDS = 24 * 3600

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _storage_error(what: str, exc: Exception) -> StorageError:
    """A one-line error naming the operation and what S3 said, nothing more.

    botocore's own messages can carry request details; the code and status
    are enough to act on and cannot leak a credential.
    """
    if isinstance(exc, ClientError):
        code, status = _error_code(exc), _status(exc)
        # A missing bucket is a configuration error, not a missing image.
        if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
            return ObjectNotFound(f"{what}: not found")
        if code in _PRECONDITION or status == 412:
            return ObjectExists(f"{what}: already exists")
        return StorageError(f"{what}: S3 error {code or 'unknown'} (HTTP {status})")
    return StorageError(f"{what}: {type(exc).__name__}")


def _call(what: str, method, **kwargs):
    try:
        return method(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _storage_error(what, exc) from None


class S3Writer(TrackedWriter):
    """A multipart upload; ``commit`` completes it, ``abort`` aborts it."""

    def __init__(self, storage: S3Storage, image_id: str):
        self._storage = storage
        self.image_id = image_id
        self._key = storage._data_key(image_id)
        if storage.exists(image_id):
            raise ObjectExists(f"image {image_id} already has a stored object")
        self._upload_id = _call(f"start upload of image {image_id}",
                                storage.client.create_multipart_upload,
                                Bucket=storage.bucket, Key=self._key)["UploadId"]
        self._buffer = bytearray()
        self._parts: list[dict] = []
        self.bytes_written = 0
        self._state = "open"

    def write(self, data) -> int:
        self._require_open("write to")
        view = memoryview(data).cast("B")
        n = len(view)
        part_bytes = self._storage.part_bytes
        while view:
            take = part_bytes - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) >= part_bytes:
                self._upload_part()
        self.bytes_written += n
        return n

    def _upload_part(self) -> None:
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StorageError(f"image {self.image_id} exceeds S3's {MAX_PARTS} parts of "
                               f"{self._storage.part_bytes} bytes")
        response = _call(f"upload part {number} of image {self.image_id}",
                         self._storage.client.upload_part,
                         Bucket=self._storage.bucket, Key=self._key,
                         UploadId=self._upload_id, PartNumber=number, Body=self._buffer)
        self._parts.append({"PartNumber": number, "ETag": response["ETag"]})
        self._buffer = bytearray()  # the part went as it was (no copy); one buffer at a time

    def commit(self) -> None:
        self._require_open("commit of")
        try:
            # The last part may be short; an empty image is one empty part.
            if self._buffer or not self._parts:
                self._upload_part()
            if self._storage.exists(self.image_id):
                raise ObjectExists(f"image {self.image_id} already has a stored object")
            _call(f"complete upload of image {self.image_id}",
                  self._storage.client.complete_multipart_upload,
                  Bucket=self._storage.bucket, Key=self._key, UploadId=self._upload_id,
                  MultipartUpload={"Parts": self._parts}, IfNoneMatch="*")
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._buffer = bytearray()

    def abort(self) -> None:
        """Abort the upload. Never raises: it runs in ``finally`` blocks, where
        an error would hide the one that led there; a failed abort leaves an
        upload that ``cleanup_partials`` removes later."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = bytearray()
        try:
            _call(f"abort upload of image {self.image_id}",
                  self._storage.client.abort_multipart_upload,
                  Bucket=self._storage.bucket, Key=self._key, UploadId=self._upload_id)
        except ObjectNotFound:
            pass  # NoSuchUpload: already gone
        except StorageError as exc:
            log.warning("vault: %s; cleanup_partials will remove it", exc)


class S3Reader(io.RawIOBase):
    """A seekable, read-only view of one object, read by ranged GETs.

    A read that continues where the previous one ended fetches a window of
    ``read_ahead`` bytes, so a reader that reads small pieces sequentially
    (the vault's ``ImageReader``: a 4-byte length, then a record, then the
    next) makes one request per window rather than per read. A read after a
    jump fetches only ``SEEK_FETCH_BYTES``: ``ImageReader`` builds its chunk
    index by jumping from length prefix to length prefix, and full windows
    there would download the whole image to learn 4 bytes per chunk. Reads are
    pinned to the ETag seen at open, so a replaced object is an error rather
    than a mix of two.
    """

    def __init__(self, client, bucket: str, key: str, size: int, etag: str, *,
                 read_ahead: int = READ_AHEAD_BYTES, name: str = ""):
        super().__init__()
        self._client, self._bucket, self._key = client, bucket, key
        self._size, self._etag = size, etag
        self._read_ahead = read_ahead
        self._pos = 0
        # Where the previous read ended: is this one sequential? Not the first:
        # a header read, or a range in the middle, needs no window from byte 0.
        self._last_end = -1
        self._window_start = 0
        self._window = b""
        self.name = name or key
        self.requests = 0  # GETs made and bytes fetched: the read-ahead is measurable
        self.bytes_fetched = 0

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self._size} bytes at {self._pos}>"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence!r}")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` as far as the object goes (callers read exact lengths)."""
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        sequential = self._pos == self._last_end
        filled = 0
        while filled < len(out) and self._pos < self._size:
            offset = self._pos - self._window_start
            if not 0 <= offset < len(self._window):
                wanted = min(len(out) - filled, self._size - self._pos)
                if wanted >= self._read_ahead:  # a big read: straight into the caller's buffer
                    got = self._get(self._pos, wanted)
                    out[filled:filled + len(got)] = got
                    filled += len(got)
                    self._pos += len(got)
                    continue
                fetch = self._read_ahead if sequential else max(wanted, SEEK_FETCH_BYTES)
                self._window_start = self._pos
                self._window = self._get(self._pos, fetch)
                offset = 0
                sequential = True  # the rest of this read continues what was just fetched
            n = min(len(out) - filled, len(self._window) - offset)
            out[filled:filled + n] = self._window[offset:offset + n]
            filled += n
            self._pos += n
        self._last_end = self._pos
        return filled

    def _get(self, start: int, length: int) -> bytes:
        end = min(start + length, self._size) - 1
        self.requests += 1
        try:
            response = _call(f"read {self.name}", self._client.get_object,
                             Bucket=self._bucket, Key=self._key, Range=f"bytes={start}-{end}",
                             IfMatch=self._etag)
        except ObjectExists:  # 412 on If-Match: not the object this reader opened
            raise StorageError(f"read {self.name}: the object changed while open") from None
        try:
            data = response["Body"].read()
        except (BotoCoreError, OSError) as exc:
            raise _storage_error(f"read {self.name}", exc) from None
        finally:
            response["Body"].close()
        if len(data) != end - start + 1:
            raise StorageError(f"read {self.name}: short ranged read")
        self.bytes_fetched += len(data)
        return data

    def close(self) -> None:
        self._window = b""
        super().close()


class S3Storage(Storage):
    """Image objects and envelopes in one bucket, under an optional key prefix."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, client=None, part_bytes: int = PART_BYTES,
                 read_ahead_bytes: int = READ_AHEAD_BYTES,
                 partial_grace_seconds: float = PARTIAL_GRACE_SECONDS):
        if not bucket:
            raise ValueError("an S3 vault needs a bucket")
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"S3 parts are at least {MIN_PART_BYTES} bytes")
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.part_bytes = part_bytes
        self.read_ahead_bytes = read_ahead_bytes
        self.partial_grace_seconds = partial_grace_seconds
        self.client = client or _make_client(endpoint_url, region)

    def __repr__(self):
        return f"{type(self).__name__}(bucket={self.bucket!r}, prefix={self.prefix!r})"

    # Keys.
    def _data_key(self, image_id: str) -> str:
        return f"{self.prefix}images/{image_id}.img"

    def _envelope_key(self, image_id: str) -> str:
        return f"{self.prefix}envelopes/{image_id}.key"

    def _head(self, image_id) -> dict:
        image_id = validate_image_id(image_id)
        return _call(f"image {image_id}", self.client.head_object,
                     Bucket=self.bucket, Key=self._data_key(image_id))

    # Image data.
    def open_writer(self, image_id) -> S3Writer:
        return S3Writer(self, validate_image_id(image_id))

    def open_reader(self, image_id) -> S3Reader:
        image_id = validate_image_id(image_id)
        head = self._head(image_id)
        return S3Reader(self.client, self.bucket, self._data_key(image_id),
                        head["ContentLength"], head["ETag"],
                        read_ahead=self.read_ahead_bytes, name=f"image {image_id}")

    def exists(self, image_id) -> bool:
        try:
            self._head(image_id)
        except ObjectNotFound:
            return False
        return True

    def size(self, image_id) -> int:
        return self._head(image_id)["ContentLength"]

    def mtime(self, image_id) -> float:
        """S3's Last-Modified. For a multipart object AWS may give when the
        upload *started* rather than completed: older, never younger, so an
        orphan grace period must outlast the longest upload."""
        return self._head(image_id)["LastModified"].timestamp()

    def delete(self, image_id) -> None:
        image_id = validate_image_id(image_id)
        _call(f"delete image {image_id}", self.client.delete_object,
              Bucket=self.bucket, Key=self._data_key(image_id))

    def list_ids(self) -> list[str]:
        return sorted(self._ids_under("images/", ".img"))

    def _ids_under(self, folder: str, suffix: str) -> dict[str, float]:
        """{id: last-modified} of ``<prefix><folder><id><suffix>`` keys; others are ignored."""
        start = self.prefix + folder
        found = {}
        for obj in self._pages("list_objects_v2", "Contents", Prefix=start):
            name = obj["Key"][len(start):]
            if name.endswith(suffix) and is_image_id(name[:-len(suffix)]):
                found[name[:-len(suffix)]] = obj["LastModified"].timestamp()
        return found

    def _pages(self, operation: str, field: str, **kwargs):
        try:
            for page in self.client.get_paginator(operation).paginate(Bucket=self.bucket,
                                                                        **kwargs):
                yield from page.get(field, [])
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(f"list {kwargs.get('Prefix', '')!r}", exc) from None

    # Envelopes.
    def put_envelope(self, image_id, envelope: bytes) -> None:
        image_id = validate_image_id(image_id)
        check_envelope(envelope)
        _call(f"store key envelope of image {image_id}", self.client.put_object,
              Bucket=self.bucket, Key=self._envelope_key(image_id), Body=bytes(envelope))

    def get_envelope(self, image_id) -> bytes:
        image_id = validate_image_id(image_id)
        what = f"key envelope of image {image_id}"
        response = _call(what, self.client.get_object,
                         Bucket=self.bucket, Key=self._envelope_key(image_id))
        try:
            data = response["Body"].read(MAX_ENVELOPE_BYTES + 1)
        except (BotoCoreError, OSError) as exc:
            raise _storage_error(what, exc) from None
        finally:
            response["Body"].close()
        if len(data) > MAX_ENVELOPE_BYTES:
            raise StorageError(f"{what} is implausibly large")
        return data

    def delete_envelope(self, image_id) -> None:
        """Delete the envelope object. With bucket versioning on, S3 keeps the
        old version: keep versioning off for the vault's bucket (see
        docs/operations.md). As with LocalStorage's overwrite, the design does
        not rely on it: retiring the master-key versions is what makes a
        surviving copy useless."""
        image_id = validate_image_id(image_id)
        _call(f"delete key envelope of image {image_id}", self.client.delete_object,
              Bucket=self.bucket, Key=self._envelope_key(image_id))

    # Audit anchors (portal/audit_anchor.py): small objects written once beside
    # the vault, so a portal with a shared bucket keeps its audit anchors off the
    # database too. Never listed as images (other folder).
    def put_audit_anchor(self, name: str, data: bytes) -> None:
        if not name or "/" in name:
            raise ValueError("an audit anchor's name is one path segment")
        _call(f"store audit anchor {name}", self.client.put_object, Bucket=self.bucket,
              Key=f"{self.prefix}audit-anchors/{name}", Body=bytes(data), IfNoneMatch="*")

    def audit_anchors(self):
        """Each stored audit anchor's bytes, in key order (oldest sequence first)."""
        start = self.prefix + "audit-anchors/"
        for obj in self._pages("list_objects_v2", "Contents", Prefix=start):
            response = _call(f"read audit anchor {obj['Key'][len(start):]}",
                             self.client.get_object, Bucket=self.bucket, Key=obj["Key"])
            try:
                yield response["Body"].read(64 * 1024)
            except (BotoCoreError, OSError) as exc:
                raise _storage_error("read audit anchor", exc) from None
            finally:
                response["Body"].close()

    # Housekeeping.
    def cleanup_partials(self, grace_seconds: float | None = None) -> int:
        """Abort multipart uploads of this prefix older than ``grace_seconds``
        (default: the storage's ``partial_grace_seconds``), then delete
        envelopes older than that whose image has neither an object nor an
        upload in progress: with the order ``open_writer`` - ``put_envelope`` -
        ``commit``, that is a write that crashed after storing its envelope.

        Unlike LocalStorage there is no lock to tell a live upload from a
        crashed one, so the grace period must outlast the longest upload.
        Returns how many uploads and envelopes went.
        """
        grace = self.partial_grace_seconds if grace_seconds is None else grace_seconds
        cutoff = time.time() - grace
        removed = 0
        in_progress = set()
        for upload in self._uploads():
            image_id = upload["Key"][len(self.prefix + "images/"):-len(".img")]
            if upload["Initiated"].timestamp() >= cutoff:
                in_progress.add(image_id)
                continue
            try:
                _call(f"abort upload of image {image_id}", self.client.abort_multipart_upload,
                      Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            except ObjectNotFound:
                continue  # finished or aborted by its writer meanwhile
            removed += 1
        images = set(self._ids_under("images/", ".img"))
        for image_id, modified in self._ids_under("envelopes/", ".key").items():
            if modified < cutoff and image_id not in images and image_id not in in_progress:
                self.delete_envelope(image_id)
                removed += 1
        return removed

    def _uploads(self):
        """Multipart uploads in progress for image keys of this prefix."""
        start = self.prefix + "images/"
        for upload in self._pages("list_multipart_uploads", "Uploads", Prefix=start):
            name = upload["Key"][len(start):]
            if name.endswith(".img") and is_image_id(name[:-4]):
                yield upload


def part_bytes_for(max_object_bytes: int) -> int:
    """The part size (whole MiB, at least ``PART_BYTES``) that fits an object
    of ``max_object_bytes`` into S3's 10,000 parts, with 1% to spare for the
    format's per-chunk overhead."""
    mib = 1024 * 1024
    needed = -(-max_object_bytes * 101 // 100 // MAX_PARTS)
    return max(PART_BYTES, -(-needed // mib) * mib)


def _make_client(endpoint_url, region):
    """An S3 client from boto3's credential chain (never from our settings).

    Path-style addressing with a custom endpoint: MinIO and most S3-compatible
    servers expect it, and it needs no wildcard DNS for bucket names.
    """
    config = Config(retries={"mode": "standard", "max_attempts": 5},
                    s3={"addressing_style": "path" if endpoint_url else "auto"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None,
                                          region_name=region or None, config=config)

