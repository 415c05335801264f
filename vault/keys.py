"""Versioned master keys (key-encryption keys, KEKs) for the vault.

Every image has its own random data key (DEK); the DEK is stored only wrapped
by a master key, in a small envelope next to the image (see ``vault.format``
for the envelope and ``vault.storage`` for where it lives). Master keys are
numbered: rotating creates a new version that becomes current, envelopes are
re-wrapped under it (``rewrap_envelope``), and an old version is retired once
no envelope uses it any more.

Django-free on purpose: the portal builds a provider from settings, the host
agent can build one from its own configuration.

Key material never appears in a ``repr``, a log line or an exception message.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
import stat
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "KEY_BYTES",
    "KeyringError",
    "KeyError_",
    "UnknownKeyVersion",
    "InsecureKeyring",
    "MalformedKeyring",
    "ReadOnlyKeyring",
    "KeyProvider",
    "KeyringFileProvider",
    "EnvProvider",
    "new_keyring_json",
    "rewrap_envelope",
]

KEY_BYTES = 32  # AES-256 / ChaCha20 key size
KEYRING_FORMAT = 1
MAX_VERSION = 2**32 - 1  # versions travel in envelopes; keep them in an unsigned 32-bit field
MAX_KEYRING_BYTES = 1024 * 1024  # a keyring is a few hundred bytes per version


class KeyringError(Exception):
    """Base class of every master-key problem."""


# The name the portal glue catches; same class.
KeyError_ = KeyringError


class UnknownKeyVersion(KeyringError, LookupError):
    """The requested master-key version is not in the keyring."""

    def __init__(self, version):
        self.version = version
        super().__init__(
            f"master key version {version!r} is not in the keyring "
            "(retired, or a keyring from another deployment?)")


class InsecureKeyring(KeyringError):
    """The keyring file can be read or changed by other users."""


class MalformedKeyring(KeyringError):
    """The keyring is not valid JSON of the expected shape."""


class ReadOnlyKeyring(KeyringError):
    """The provider cannot create or retire versions."""


# --- the interface -------------------------------------------------------------------

class KeyProvider(ABC):
    """Where master keys come from. A KMS-backed provider can implement this later.

    ``key(version)`` is also the ``kek_lookup`` callable that
    ``vault.format.unwrap_data_key`` expects.
    """

    @abstractmethod
    def current_version(self) -> int:
        """The version new envelopes are wrapped with."""

    @abstractmethod
    def key(self, version: int) -> bytes:
        """The 32-byte master key of ``version``; ``UnknownKeyVersion`` if absent."""

    @abstractmethod
    def versions(self) -> list[int]:
        """All versions still held, ascending."""

    @abstractmethod
    def create_version(self) -> int:
        """Add a fresh random 256-bit key, make it current and return its version."""

    @abstractmethod
    def retire(self, version: int) -> None:
        """Forget an old version. Refuses the current one.

        The provider cannot know which envelopes use a version: the caller
        must have re-wrapped all of them first (anything still wrapped under
        a retired version can never be decrypted again).
        """

    def current_key(self) -> tuple[int, bytes]:
        """``(version, key)`` of the current version."""
        version = self.current_version()
        return version, self.key(version)


# --- parsing and serialising ---------------------------------------------------------

def _parse_version(name) -> int:
    if isinstance(name, bool):
        raise ValueError
    if isinstance(name, int):
        value = name
    elif isinstance(name, str) and name.isascii() and name.isdigit() and name == str(int(name)):
        value = int(name)
    else:
        raise ValueError
    if not 1 <= value <= MAX_VERSION:
        raise ValueError
    return value


def _parse_keyring(text: str | bytes, source: str) -> tuple[int, dict[int, bytes]]:
    """Validate a keyring document; return ``(current, {version: key})``.

    Messages name the source and the problem, never the key bytes.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if hasattr(exc, "lineno") else ""
        raise MalformedKeyring(f"keyring {source} is not valid JSON{where}") from None
    if not isinstance(doc, dict):
        raise MalformedKeyring(f"keyring {source} must be a JSON object")
    if doc.get("format") != KEYRING_FORMAT:
        raise MalformedKeyring(
            f"keyring {source} has format {doc.get('format')!r}; expected {KEYRING_FORMAT}")
    raw_keys = doc.get("keys")
    if not isinstance(raw_keys, dict) or not raw_keys:
        raise MalformedKeyring(f"keyring {source} has no \"keys\" object with at least one key")
    keys: dict[int, bytes] = {}
    for name, encoded in raw_keys.items():
        try:
            version = _parse_version(name)
        except ValueError:
            raise MalformedKeyring(
                f"keyring {source}: key name {name!r} is not a version number "
                f"(1..{MAX_VERSION})") from None
        if not isinstance(encoded, str):
            raise MalformedKeyring(f"keyring {source}: key {version} is not a base64 string")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedKeyring(f"keyring {source}: key {version} is not valid base64") from None
        if len(material) != KEY_BYTES:
            raise MalformedKeyring(
                f"keyring {source}: key {version} is {len(material)} bytes; "
                f"master keys must be {KEY_BYTES} bytes")
        keys[version] = material
    try:
        current = _parse_version(doc.get("current"))
    except ValueError:
        raise MalformedKeyring(f"keyring {source}: \"current\" is not a version number") from None
    if current not in keys:
        raise MalformedKeyring(f"keyring {source}: current version {current} has no key")
    return current, keys


def _dump_keyring(current: int, keys: Mapping[int, bytes]) -> bytes:
    doc = {
        "format": KEYRING_FORMAT,
        "current": current,
        "keys": {str(v): base64.b64encode(keys[v]).decode("ascii") for v in sorted(keys)},
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def new_keyring_json() -> str:
    """A fresh keyring document with one random key (for ``EnvProvider`` deployments)."""
    return _dump_keyring(1, {1: secrets.token_bytes(KEY_BYTES)}).decode("ascii")


class _Keys:
    """An immutable snapshot of a keyring. Its repr shows versions, never keys."""

    __slots__ = ("current", "_keys")

    def __init__(self, current: int, keys: Mapping[int, bytes]):
        self.current = current
        self._keys = dict(keys)

    def get(self, version) -> bytes:
        try:
            return self._keys[version]
        except (KeyError, TypeError):
            raise UnknownKeyVersion(version) from None

    def __contains__(self, version) -> bool:
        return version in self._keys

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def __repr__(self):
        return f"<keys versions={self.versions()} current={self.current}>"


# --- a keyring file ------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class KeyringFileProvider(KeyProvider):
    """Master keys in a JSON file readable by its owner only.

    Format::

        {"format": 1, "current": 2, "keys": {"1": "<base64 32 bytes>", "2": "..."}}

    * Created on first use (not at construction) with one version: written
      to a temporary file (``O_EXCL``, mode 0600) in the same directory,
      fsynced, then hard-linked to its final name, which fails if another
      process got there first; the loser reads the winner's keyring. The
      parent directory is created 0700.
    * Every change (``create_version``, ``retire``) is a read-modify-write
      under an exclusive ``flock`` on ``.<name>.lock`` beside the file, written
      to a temporary file, fsynced, ``os.replace``-d over the keyring and the
      directory fsynced: a crash leaves either the old or the new keyring.
    * Refused with a clear ``KeyringError``: a file any group or other user
      may access, not a regular file, bad JSON, or keys that are not 32 bytes.
    * Other processes' changes are picked up: the file is re-read whenever
      its inode, size or modification time changes.

    Thread-safe. Reading needs no write access to the directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mutex = threading.RLock()
        self._snapshot: _Keys | None = None
        self._signature = None
        self._lock_depth = 0  # _locked() nests within one thread (the mutex is held)

    def __repr__(self):
        return f"{type(self).__name__}(path={str(self.path)!r})"

    # The interface.
    def current_version(self) -> int:
        return self._keys().current

    def key(self, version: int) -> bytes:
        return self._keys().get(version)

    def versions(self) -> list[int]:
        return self._keys().versions()

    def create_version(self) -> int:
        with self._mutex, self._locked():
            current = self._load_or_create(force=True)
            version = max(current.versions()) + 1
            if version > MAX_VERSION:
                raise KeyringError("no key version numbers left")
            keys = dict(current._keys)
            keys[version] = secrets.token_bytes(KEY_BYTES)
            self._replace(_dump_keyring(version, keys))
            self._snapshot, self._signature = _Keys(version, keys), None
            return version

    def retire(self, version: int) -> None:
        with self._mutex, self._locked():
            current = self._load_or_create(force=True)
            if version not in current:
                raise UnknownKeyVersion(version)
            if version == current.current:
                raise KeyringError(
                    f"refusing to retire master key version {version}: it is the current one")
            keys = {v: k for v, k in current._keys.items() if v != version}
            self._replace(_dump_keyring(current.current, keys))
            self._snapshot, self._signature = _Keys(current.current, keys), None

    # Loading.
    def _keys(self) -> _Keys:
        with self._mutex:
            return self._load_or_create()

    def _load_or_create(self, force=False) -> _Keys:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._create()
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if force or self._snapshot is None or signature != self._signature:
            self._read()
        return self._snapshot

    def _read(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise KeyringError(f"keyring {self.path} cannot be read by this user") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            self._check_file(st)
            data = f.read(MAX_KEYRING_BYTES + 1)
        if len(data) > MAX_KEYRING_BYTES:
            raise MalformedKeyring(f"keyring {self.path} is larger than {MAX_KEYRING_BYTES} bytes")
        current, keys = _parse_keyring(data, str(self.path))
        self._snapshot = _Keys(current, keys)
        self._signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _check_file(self, st) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise InsecureKeyring(f"keyring {self.path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise InsecureKeyring(
                f"keyring {self.path} has mode {mode:04o}: group and other users must have "
                f"no access to master keys; run `chmod 600 {self.path}` if nobody else has "
                "read it, otherwise rotate the keys")

    # Writing.
    def _create(self) -> _Keys:
        """Write a first keyring unless another thread or process already did."""
        with self._locked():
            if self.path.exists():
                self._read()
                return self._snapshot
            keys = {1: secrets.token_bytes(KEY_BYTES)}
            tmp = self._write_temp(_dump_keyring(1, keys))
            try:
                try:
                    os.link(tmp, self.path)  # atomic and never replaces: O_EXCL for a name
                except FileExistsError:
                    pass  # lost a race with a process that does not take the lock
                except OSError:  # a filesystem without hard links
                    self._create_in_place(keys)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _fsync_dir(self.path.parent)
            self._read()  # the winner's keyring, whoever won
            return self._snapshot

    def _create_in_place(self, keys) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, _dump_keyring(1, keys))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.path.parent / f".{self.path.name}.tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _replace(self, data: bytes) -> None:
        tmp = self._write_temp(data)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive lock, across processes, for creating or changing the keyring.

        Callers hold ``self._mutex``; nested use is a no-op (``flock`` on a
        second descriptor of the same file would wait for ourselves).
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        parent = self.path.parent
        if not parent.is_dir():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = parent / f".{self.path.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_depth = 1
            self._remove_stale_temps()
            yield
        finally:
            self._lock_depth = 0
            os.close(fd)  # releases the lock

    def _remove_stale_temps(self) -> None:
        """Temporary files of a crashed change (they hold key material). Lock held."""
        prefix = f".{self.path.name}.tmp-"
        for entry in os.scandir(self.path.parent):
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


# --- a keyring in the environment -------------------------------------------------------

class EnvProvider(KeyProvider):
    """Master keys from an environment variable holding a keyring JSON document.

    Same format as the file. Read once, at construction. Read-only: rotating
    needs a writable keyring (``KeyringFileProvider``, or a KMS provider).
    ``new_keyring_json()`` makes a first document.
    """

    def __init__(self, variable: str, environ: Mapping[str, str] | None = None):
        self.variable = variable
        environ = os.environ if environ is None else environ
        text = environ.get(variable)
        if text is None or not text.strip():
            raise KeyringError(f"environment variable {variable} holds no keyring")
        current, keys = _parse_keyring(text, f"in environment variable {variable}")
        self._snapshot = _Keys(current, keys)

    def __repr__(self):
        return f"{type(self).__name__}(variable={self.variable!r})"

    def current_version(self) -> int:
        return self._snapshot.current

    def key(self, version: int) -> bytes:
        return self._snapshot.get(version)

    def versions(self) -> list[int]:
        return self._snapshot.versions()

    def create_version(self) -> int:
        raise ReadOnlyKeyring(
            f"the keyring in environment variable {self.variable} is read-only: key rotation "
            "needs a writable keyring (a keyring file); add the new version to the variable "
            "by hand, or switch to a keyring file")

    def retire(self, version: int) -> None:
        raise ReadOnlyKeyring(
            f"the keyring in environment variable {self.variable} is read-only: retire "
            f"version {version} by removing it from the variable")


# --- re-wrapping ------------------------------------------------------------------------

def rewrap_envelope(provider: KeyProvider, envelope: bytes, header: bytes) -> bytes | None:
    """Re-wrap an image's data key under the provider's current master key.

    Returns the new envelope, or ``None`` when ``envelope`` already uses the
    current version. Image data is not involved: the caller replaces the
    envelope object (``Storage.put_envelope``, which is atomic). The new
    envelope is checked to unwrap to the same data key before it is returned,
    because it is about to replace the only copy.
    """
    from vault import format as vformat  # imported late: format may import from here

    current = provider.current_version()
    if vformat.envelope_key_version(envelope) == current:
        return None
    dek = vformat.unwrap_data_key(provider.key, envelope, header)
    new = vformat.wrap_data_key(provider.key(current), current, dek, header)
    if not secrets.compare_digest(vformat.unwrap_data_key(provider.key, new, header), dek):
        raise KeyringError("re-wrapped envelope does not unwrap to the same data key")
    return new

