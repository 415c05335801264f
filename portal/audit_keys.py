"""The audit trail's keys: versions, and which records each one MACs.

Until the first rotation there is one key (``BERTH_AUDIT_KEY`` or
``var/keys/audit.key``): version 1, for every record. ``audit rotate-key``
writes a keyring file (``BERTH_AUDIT_KEYRING``, default
``var/keys/audit-keyring.json``, 0600) that holds every version with the
sequence number of the first record it MACs, so each record's key follows
from its position in the chain::

    {"format": 1, "versions": [
        {"version": 1, "key": "<hex>", "first_seq": 1, "created": "..."},
        {"version": 2, "key": "<hex>", "first_seq": 5012, "created": "..."}]}

Why the ranges live in the file and not in the database: an attacker who has
an old key and can write the database could otherwise re-MAC the records after
the rotation with the old key and claim they were never rotated. The file
pins where each key begins. Old versions stay: they are what verifies the
records they MACed (a leaked old key endangers only the records before its
successor's ``first_seq``).

Several processes write the chain (portal workers, management commands): each
checks the file before every record it writes (a ``stat``), so a rotation by
one process reaches the others at once. Django-free on purpose.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from portal.secrets import write_atomic

FORMAT = 1


class AuditKeyError(Exception):
    """The keyring is unreadable, inconsistent, or lacks a needed version."""


@dataclass(frozen=True)
class KeyVersion:
    version: int
    key: bytes
    first_seq: int
    created: str = ""


class AuditKeyring:
    """Key versions by the sequence numbers they cover; thread-safe."""

    def __init__(self, path: Path, legacy_key: bytes):
        self.path = Path(path)
        self._legacy = legacy_key
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._versions: list[KeyVersion] = []
        self._reload()

    def key_for(self, seq: int) -> KeyVersion:
        """The version that MACs record ``seq`` (the latest beginning at or before it)."""
        with self._lock:
            self._reload()
            return covering(self._versions, seq)

    def versions(self) -> list[KeyVersion]:
        with self._lock:
            self._reload()
            return list(self._versions)

    def rotate(self, first_seq: int) -> KeyVersion:
        """Add a new version MACing records from ``first_seq`` on; written before
        it is returned. The caller holds the chain's head lock."""
        with self._lock:
            self._reload()
            current = self._versions[-1]
            if first_seq <= current.first_seq:
                raise AuditKeyError(f"a new audit key must begin after record "
                                    f"{current.first_seq}, not at {first_seq}")
            new = KeyVersion(current.version + 1, secrets.token_hex(32).encode(), first_seq,
                             dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            self._write([*self._versions, new])
            self._reload()
            return new

    # -- the file ---------------------------------------------------------------
    def _reload(self) -> None:  # caller holds the lock
        stamp = _stamp(self.path)
        if stamp == self._stamp and self._versions:
            return
        self._versions = self._read() if stamp is not None else [KeyVersion(1, self._legacy, 1)]
        self._stamp = stamp

    def _read(self) -> list[KeyVersion]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            versions = [KeyVersion(int(v["version"]), str(v["key"]).encode(),
                                   int(v["first_seq"]), str(v.get("created", "")))
                        for v in data["versions"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuditKeyError(f"audit keyring {self.path} is unreadable: {exc}") from None
        _check(versions, self.path)
        if self._legacy and versions[0].key != self._legacy:
            raise AuditKeyError(f"BERTH_AUDIT_KEY is not version 1 of the audit keyring "
                                f"{self.path}: unset it (the keyring holds every version)")
        return versions

    def _write(self, versions: list[KeyVersion]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {"format": FORMAT, "versions": [
            {"version": v.version, "key": v.key.decode(), "first_seq": v.first_seq,
             "created": v.created} for v in versions]}
        write_atomic(self.path, json.dumps(data, indent=1).encode())


def covering(versions: list[KeyVersion], seq: int) -> KeyVersion:
    """Of ``versions`` (oldest first), the one that MACs record ``seq``."""
    chosen = None
    for version in versions:
        if version.first_seq <= seq:
            chosen = version
    if chosen is None:
        raise AuditKeyError(f"no audit key version covers record {seq}")
    return chosen


def _stamp(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _check(versions: list[KeyVersion], path: Path) -> None:
    if not versions or versions[0].version != 1 or versions[0].first_seq != 1:
        raise AuditKeyError(f"audit keyring {path} must begin with version 1 at record 1")
    for before, after in zip(versions, versions[1:], strict=False):
        if after.version != before.version + 1 or after.first_seq <= before.first_seq:
            raise AuditKeyError(f"audit keyring {path}: versions must count up by one and "
                                f"begin at increasing records (version {after.version})")
    if any(len(v.key) < 32 for v in versions):
        raise AuditKeyError(f"audit keyring {path}: a key is shorter than 32 characters")
