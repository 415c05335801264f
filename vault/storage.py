"""Where the vault's ciphertext lives.

Two kinds of object per image, both addressed by the image's UUID:

* the **image data** (the encrypted stream of ``vault.format``), written once
  through a ``Writer`` and only visible once complete;
* the **envelope**: the small wrapped-data-key record. It is a separate object
  so that master-key rotation replaces it atomically without touching image
  data, and so that destroying it destroys the image (crypto-shredding).

Storage sees only ciphertext and wrapped keys; it never holds a key.

Django-free on purpose: the portal builds a backend from settings, the host
agent can build one from its own configuration.

All methods block. Asyncio code calls them through a thread, one call at a
time per writer::

    writer = await asyncio.to_thread(store.open_writer, image_id)
    try:
        async for piece in pieces:
            await asyncio.to_thread(writer.write, piece)
        await asyncio.to_thread(writer.commit)
    finally:
        await asyncio.to_thread(writer.abort)   # a no-op after commit
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import re
import secrets
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "StorageError",
    "InvalidImageId",
    "ObjectNotFound",
    "ObjectExists",
    "Writer",
    "TrackedWriter",
    "Storage",
    "LocalStorage",
    "LocalWriter",
    "validate_image_id",
    "is_image_id",
    "check_envelope",
    "MAX_ENVELOPE_BYTES",
]

MAX_ENVELOPE_BYTES = 64 * 1024  # an envelope is a few dozen bytes

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


class StorageError(Exception):
    """Base class of vault storage errors."""


class InvalidImageId(StorageError, ValueError):
    """An image id that is not a UUID (and so could name some other path)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No committed object (or envelope) for this image id."""


class ObjectExists(StorageError, FileExistsError):
    """Image data is written once: this id already has a committed object."""


def validate_image_id(image_id) -> str:
    """The canonical form (lower-case, hyphenated) of a UUID, or ``InvalidImageId``.

    Accepts a ``uuid.UUID`` or its canonical string (any case). Anything else
    (braces, ``urn:uuid:``, no hyphens, slashes, dots) is refused, so an id
    can never name a path outside its shard directory.
    """
    if isinstance(image_id, uuid.UUID):
        return str(image_id)
    if isinstance(image_id, str):
        lowered = image_id.lower()
        if _UUID_RE.match(lowered):
            return lowered
    raise InvalidImageId(f"invalid image id {image_id!r}: expected a UUID string")


def is_image_id(name: str) -> bool:
    """Whether a stored name is a canonical image id (listings skip anything else)."""
    return bool(_UUID_RE.match(name))


def check_envelope(envelope) -> None:
    """Refuse what cannot be an envelope before any backend stores it."""
    if not isinstance(envelope, bytes | bytearray | memoryview):
        raise TypeError("an envelope is bytes")
    if len(envelope) > MAX_ENVELOPE_BYTES:
        raise StorageError(f"envelope of {len(envelope)} bytes is implausibly large")


# --- the interface ---------------------------------------------------------------------

class Writer(ABC):
    """One image object being written. Nothing is visible until ``commit``.

    A context manager: leaving the ``with`` block without ``commit`` aborts.
    Not for concurrent use from several threads at once.
    """

    @abstractmethod
    def write(self, data: bytes) -> int:
        """Append bytes; returns how many."""

    @abstractmethod
    def commit(self) -> None:
        """Make the complete object durable and visible, atomically.

        If committing fails, the write is aborted and the error raised.
        """

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written. Idempotent; a no-op after ``commit``."""

    @property
    @abstractmethod
    def committed(self) -> bool:
        """Whether ``commit`` succeeded."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            self.abort()
        return False


class TrackedWriter(Writer):
    """A writer whose state is ``open``, then ``committed`` or ``aborted``.

    The bookkeeping every backend's writer shares: subclasses set
    ``image_id``, ``bytes_written`` and ``_state = "open"``.
    """

    image_id: str
    bytes_written: int
    _state: str

    def __repr__(self):
        return f"<{type(self).__name__} {self.image_id} {self._state} {self.bytes_written} bytes>"

    @property
    def committed(self) -> bool:
        return self._state == "committed"

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise StorageError(f"{action} a {self._state} writer for image {self.image_id}")


class Storage(ABC):
    """A place for image objects and their envelopes.

    Image data is write-once: ``open_writer`` refuses an id that already has
    an object. Envelopes are replaceable: ``put_envelope`` replaces atomically.
    Deletes are idempotent. Missing objects raise ``ObjectNotFound`` (a
    ``FileNotFoundError``).
    """

    @abstractmethod
    def open_writer(self, image_id) -> Writer:
        """Start writing a new image object."""

    @abstractmethod
    def open_reader(self, image_id) -> BinaryIO:
        """A seekable binary file object over a committed image object."""

    @abstractmethod
    def exists(self, image_id) -> bool:
        """Whether a committed image object exists."""

    @abstractmethod
    def size(self, image_id) -> int:
        """Size in bytes of a committed image object."""

    @abstractmethod
    def mtime(self, image_id) -> float:
        """When the image object was committed (seconds since the epoch)."""

    @abstractmethod
    def delete(self, image_id) -> None:
        """Remove the image data only (not the envelope). To destroy an image use ``shred``."""

    @abstractmethod
    def put_envelope(self, image_id, envelope: bytes) -> None:
        """Store or atomically replace the image's wrapped-data-key record."""

    @abstractmethod
    def get_envelope(self, image_id) -> bytes:
        """The image's envelope."""

    @abstractmethod
    def delete_envelope(self, image_id) -> None:
        """Destroy the envelope (as thoroughly as the backend can)."""

    @abstractmethod
    def list_ids(self) -> list[str]:
        """Ids of all committed image objects, sorted. In-progress writes are not listed."""

    @abstractmethod
    def cleanup_partials(self) -> int:
        """Remove what crashed writes left behind; returns how many objects went.

        Safe to call while other processes write: writes in progress are kept.
        Called at start-up.
        """

    def shred(self, image_id) -> None:
        """Crypto-shred an image: destroy the envelope first, then the data.

        Once the envelope is gone the data key is gone, so whatever remains of
        the ciphertext (a crash before the data is removed, blocks an SSD or a
        copy-on-write filesystem keeps) can no longer be decrypted.
        """
        self.delete_envelope(image_id)
        self.delete(image_id)


# --- the local filesystem -----------------------------------------------------------------

def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_locked(path: Path) -> int:
    """Create ``path`` exclusively (0600), holding an ``flock`` that marks it as in use.

    ``cleanup_partials`` removes only temporary files it can lock, so a write
    in progress in any process is never removed; a crashed process's lock
    went with it.
    """
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # only a cleanup can hold it, for an instant
            if os.fstat(fd).st_nlink:
                return fd
        except BaseException:
            os.close(fd)
            raise
        # A cleanup removed the name between our create and our lock: again.
        os.close(fd)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _writeback_function():
    """Linux's ``sync_file_range`` (absent from ``os``), or None where there is none."""
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_sync_file_range = _writeback_function()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk, without waiting for it.

    Otherwise the dirty pages of a whole image wait in the page cache until the
    commit's fsync, which then stalls the upload for the time the disk needs
    to take all of them (0.2 s per 400 MB here). Best effort: fsync still decides.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class LocalWriter(TrackedWriter):
    """Writes ``.<id>.img.partial-<random>`` beside the final name; commit renames it."""

    def __init__(self, storage: LocalStorage, image_id: str):
        self._storage = storage
        self.image_id = image_id
        self._final = storage._data_path(image_id)
        shard = self._final.parent
        storage._ensure_dir(shard)
        if self._final.exists():
            raise ObjectExists(f"image {image_id} already has a stored object")
        self._partial = shard / f".{self._final.name}.partial-{secrets.token_hex(8)}"
        # Unbuffered: callers write whole records, which a buffer would only copy.
        self._fd = _create_locked(self._partial)
        self.bytes_written = 0
        self._written_back = 0
        self._state = "open"

    def write(self, data: bytes) -> int:
        self._require_open("write to")
        n = len(memoryview(data).cast("B"))
        _write_all(self._fd, data)
        self.bytes_written += n
        if self.bytes_written - self._written_back >= WRITEBACK_BYTES:
            _start_writeback(self._fd, self._written_back, self.bytes_written - self._written_back)
            self._written_back = self.bytes_written
        return n

    def commit(self) -> None:
        self._require_open("commit of")
        renamed = False
        try:
            os.fsync(self._fd)
            if self._final.exists():
                raise ObjectExists(f"image {self.image_id} already has a stored object")
            # Renamed while still open and locked: cleanup never sees an unlocked partial.
            os.replace(self._partial, self._final)
            renamed = True
            _fsync_dir(self._final.parent)
        except BaseException:
            if renamed:  # not known to be durable: take it back rather than half-promise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._final)
            self.abort()
            raise
        self._state = "committed"
        os.close(self._fd)

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        with contextlib.suppress(OSError):
            os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial)


class LocalStorage(Storage):
    """Objects on the local filesystem.

    Layout (directories 0700, files 0600)::

        root/ab/abcdef01-....img       image data (committed)
        root/ab/abcdef01-....key       envelope
        root/ab/.abcdef01-....img.partial-<hex>   a write in progress (or crashed)
        root/ab/.abcdef01-....key.partial-<hex>   an envelope write in progress (or crashed)

    ``ab`` is the first two hex digits of the id. Every write goes to a
    temporary name in the same directory, is fsynced, renamed over the final
    name with ``os.replace`` and the directory fsynced: a reader sees the
    whole object or none.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._ensure_dir(self.root)

    def __repr__(self):
        return f"{type(self).__name__}(root={str(self.root)!r})"

    # Paths.
    @staticmethod
    def _ensure_dir(path: Path) -> None:
        if not path.is_dir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _shard(self, image_id: str) -> Path:
        return self.root / image_id[:2]

    def _data_path(self, image_id: str) -> Path:
        return self._shard(image_id) / f"{image_id}.img"

    def _envelope_path(self, image_id: str) -> Path:
        return self._shard(image_id) / f"{image_id}.key"

    def _stat(self, image_id) -> os.stat_result:
        image_id = validate_image_id(image_id)
        try:
            return os.stat(self._data_path(image_id))
        except FileNotFoundError:
            raise ObjectNotFound(f"no stored object for image {image_id}") from None

    # Image data.
    def open_writer(self, image_id) -> LocalWriter:
        return LocalWriter(self, validate_image_id(image_id))

    def open_reader(self, image_id) -> BinaryIO:
        image_id = validate_image_id(image_id)
        try:
            return open(self._data_path(image_id), "rb")  # the caller closes it
        except FileNotFoundError:
            raise ObjectNotFound(f"no stored object for image {image_id}") from None

    def exists(self, image_id) -> bool:
        return self._data_path(validate_image_id(image_id)).is_file()

    def size(self, image_id) -> int:
        return self._stat(image_id).st_size

    def mtime(self, image_id) -> float:
        return self._stat(image_id).st_mtime

    def delete(self, image_id) -> None:
        path = self._data_path(validate_image_id(image_id))
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def list_ids(self) -> list[str]:
        ids = []
        for shard in self._shards():
            for entry in os.scandir(shard):
                name = entry.name
                if name.endswith(".img") and _UUID_RE.match(name[:-4]) \
                        and name.startswith(shard.name) and entry.is_file(follow_symlinks=False):
                    ids.append(name[:-4])
        return sorted(ids)

    def _shards(self):
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(Path(e.path) for e in entries
                      if len(e.name) == 2 and re.fullmatch(r"[0-9a-f]{2}", e.name)
                      and e.is_dir(follow_symlinks=False))

    # Envelopes.
    def put_envelope(self, image_id, envelope: bytes) -> None:
        image_id = validate_image_id(image_id)
        check_envelope(envelope)
        final = self._envelope_path(image_id)
        self._ensure_dir(final.parent)
        partial = final.parent / f".{final.name}.partial-{secrets.token_hex(8)}"
        fd = _create_locked(partial)
        try:
            try:
                _write_all(fd, envelope)
                os.fsync(fd)
                os.replace(partial, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial)
                raise
        finally:
            os.close(fd)
        _fsync_dir(final.parent)

    def get_envelope(self, image_id) -> bytes:
        image_id = validate_image_id(image_id)
        try:
            with open(self._envelope_path(image_id), "rb") as f:
                data = f.read(MAX_ENVELOPE_BYTES + 1)
        except FileNotFoundError:
            raise ObjectNotFound(f"no key envelope for image {image_id}") from None
        if len(data) > MAX_ENVELOPE_BYTES:
            raise StorageError(f"key envelope of image {image_id} is implausibly large")
        return data

    def delete_envelope(self, image_id) -> None:
        """Overwrite the envelope with zeros, fsync, then unlink it.

        The overwrite is best effort: SSDs (wear levelling), copy-on-write and
        log-structured filesystems (btrfs, ZFS, ...), snapshots and backups can
        keep the old bytes. The design does not rely on it: the data key only
        ever exists wrapped by a master key, so removing the envelope and, in
        time, retiring the master key versions it was wrapped with, is what
        makes the ciphertext undecryptable.
        """
        self._shred_file(self._envelope_path(validate_image_id(image_id)))

    @staticmethod
    def _shred_file(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            if size:
                _write_all(fd, bytes(min(size, MAX_ENVELOPE_BYTES)))
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    # Housekeeping.
    def cleanup_partials(self) -> int:
        """Remove temporary files of crashed writes, and envelopes whose write crashed.

        A temporary file is removed only if no process holds its lock (a
        write in progress always does). An envelope is removed (shredded) if
        its image has no object and no write in progress: with the order
        ``open_writer`` - ``put_envelope`` - ``commit``, that is a write that
        crashed after storing its envelope.
        """
        removed = 0
        for shard in self._shards():
            for entry in os.scandir(shard):
                if entry.name.startswith(".") and ".partial-" in entry.name \
                        and self._remove_if_unlocked(Path(entry.path)):
                    removed += 1
            for entry in os.scandir(shard):
                name = entry.name
                if not (name.endswith(".key") and _UUID_RE.match(name[:-4])):
                    continue
                image_id = name[:-4]
                # In this order: a writer renames its partial before unlocking it.
                if any(shard.glob(f".{image_id}.img.partial-*")):
                    continue
                if self._data_path(image_id).exists():
                    continue
                if self._shred_file(Path(entry.path)):
                    removed += 1
        return removed

    @staticmethod
    def _remove_if_unlocked(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # gone already, or not a file we wrote (a symlink)
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a write in progress
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True
        finally:
            os.close(fd)
