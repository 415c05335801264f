"""Anchors: the audit chain's head, signed and written outside the database.

Someone who can write the database but has no key can still cut records off
the end of the trail and roll ``AuditHead`` back to the new last record; the
MAC chain alone cannot show it. An anchor (``portal/audit_verifier.py`` has
the format) is the head at a moment: sequence number, MAC, plain SHA-256
digest and time, MACed with the audit key and signed with the Ed25519 anchor
key (``BERTH_AUDIT_ANCHOR_KEY``, a file apart from the database and from the
audit key). It goes to every configured sink:

* an append-only file (``BERTH_AUDIT_ANCHOR_FILE``, on by default),
* syslog (``BERTH_AUDIT_ANCHOR_SYSLOG``: a socket path or ``host:port`` UDP),
* an object in the vault's bucket when ``BERTH_VAULT_STORAGE=s3``.

``audit verify --anchors SOURCE`` then fails, naming the missing range, when
the chain ends before an anchored head. An anchor is only ever written for a
chain whose MACs verify up to the head it names: the portal never signs a
broken or cut chain.

Each portal process anchors on a timer (``start_timer``); ``manage.py audit
anchor`` does it on demand or from a system timer.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import socket
import stat
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.conf import settings
from django.db import connections

from portal import audit
from portal.audit_keys import AuditKeyError
from portal.audit_verifier import (
    ANCHOR_FORMAT,
    EXPORT_FORMAT,
    EXPORT_NAME,
    anchor_body,
    anchor_is_signed,
    anchor_signed_bytes,
    format_public_key,
    key_id,
    missing_range,
    parse_anchor_line,
    raw_public_key,
)
from portal.models import AuditHead, AuditRecord, Outcome
from portal.secrets import load_or_create

log = logging.getLogger(__name__)

SYSLOG_TAG = "berth-audit-anchor: "
SYSLOG_PRIORITY = 4 * 8 + 6  # facility auth, severity info
HMAC_CONTEXT = b"berth-audit-anchor\x00"  # an anchor's MAC can never pass for a record's


class AnchorError(Exception):
    """No anchor could be made or read; the message says why (never key material)."""


# -- the key ----------------------------------------------------------------------
def signing_key() -> Ed25519PrivateKey:
    """The anchor key: 32 random bytes (hex) in their own 0600 file, made on first use."""
    path = Path(settings.AUDIT_ANCHOR_KEY)
    try:
        seed = load_or_create(path, 32)
        mode = path.stat().st_mode
    except (OSError, RuntimeError) as exc:
        raise AnchorError(f"audit anchor key {path} is unusable: "
                          f"{exc.__class__.__name__}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AnchorError(f"audit anchor key {path} is open to other users: chmod 600 it")
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
    except ValueError:
        raise AnchorError(f"audit anchor key {path} is not 64 hex digits") from None


def public_key_text() -> str:
    """``ed25519:<base64>``: what auditors pass to ``--public-key``."""
    return format_public_key(raw_public_key(signing_key().public_key()))


# -- making anchors ---------------------------------------------------------------
def _audit_key_for(seq: int) -> bytes:
    return audit.keyring().key_for(max(seq, 1)).key


def anchor_hmac(anchor: dict) -> str:
    return hmac.new(_audit_key_for(anchor["seq"]), HMAC_CONTEXT + anchor_body(anchor),
                    hashlib.sha256).hexdigest()


def make_anchor(point: audit.ChainPoint, when: dt.datetime | None = None) -> dict:
    key = signing_key()
    anchor = {"anchor": ANCHOR_FORMAT, "seq": point.seq, "mac": point.mac,
              "sha256": point.sha256,
              "time": (when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(
                  timespec="microseconds"),
              "key_id": key_id(raw_public_key(key.public_key()))}
    anchor["hmac"] = anchor_hmac(anchor)
    anchor["sig"] = base64.b64encode(key.sign(anchor_signed_bytes(anchor))).decode()
    return anchor


_verified_lock = threading.Lock()
_verified = audit.ChainPoint()  # the furthest point this process has verified


def verified_head() -> audit.ChainPoint:
    """The chain's head with both chains' values, after checking every MAC up to it.

    Reads the head first and walks up to it, so writers appending meanwhile do
    not look like a cut. Starts from the last point this process verified, or the
    newest genuine anchor in the anchor file (its record must still carry the same
    MAC), so a timer does not re-read the whole trail each time; a head behind
    that point is a cut tail, and is refused.
    """
    global _verified
    head = AuditHead.objects.filter(id=1).values_list("seq", "mac").first() or (0, "")
    start = last_anchored(head[0])
    point = start
    try:
        for _, reached in audit.walk_chain(start, upto=head[0]):
            point = reached
    except audit.ChainBroken as exc:
        raise AnchorError(f"audit chain broken at record {exc.verification.broken_seq}: "
                          f"{exc.verification.reason}; nothing anchored") from None
    except AuditKeyError as exc:
        raise AnchorError(str(exc)) from None
    if point.seq != head[0] or not hmac.compare_digest(point.mac, head[1]):
        raise AnchorError(f"audit chain ends at record {point.seq} but its head says "
                          f"{head[0]}; nothing anchored")
    with _verified_lock:
        if point.seq > _verified.seq:
            _verified = point
    return point


def last_anchored(head_seq: int) -> audit.ChainPoint:
    """The furthest point already verified and anchored (this process's, or the
    newest genuine anchor in the anchor file), after checking the chain still
    reaches it: a head behind it is a cut tail, and a different MAC there means
    records were cut and written again under the same numbers. Either way the
    portal must not sign on (AnchorError)."""
    with _verified_lock:
        start = _verified
    if not start.seq:
        start = _last_file_anchor()
    if start.seq > head_seq:
        raise AnchorError(f"{missing_range(head_seq + 1, start.seq)}: the chain's head is at "
                          f"{head_seq} but record {start.seq} was verified and anchored; "
                          "nothing anchored")
    if start.seq:
        stored = AuditRecord.objects.filter(seq=start.seq).values_list("mac", flat=True)
        if not stored or not hmac.compare_digest(stored[0], start.mac):
            raise AnchorError(f"record {start.seq} no longer carries the MAC it was "
                              "verified and anchored with; nothing anchored")
    return start


TAIL_BYTES = 64 * 1024  # the last anchors of the file, not all of it


def _last_file_anchor() -> audit.ChainPoint:
    """Where the newest anchor in the anchor file left off, if it is genuine (signed
    and MACed by this portal); else the chain's start.

    A genuine anchor was only ever made after a full check up to it, and its record
    must still carry the anchored MAC (checked by the caller), so a new process --
    or each run of `audit anchor` from a timer -- reads only the records since.
    """
    path = settings.AUDIT_ANCHOR_FILE
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
        public_key = signing_key().public_key()
    except (OSError, TypeError, AnchorError):
        return audit.ChainPoint()
    for line in reversed(lines):
        anchor = parse_anchor_line(line)
        if (anchor and isinstance(anchor.get("seq"), int) and anchor["seq"] > 0
                and anchor_is_ours(anchor, public_key)):
            return audit.ChainPoint(anchor["seq"], anchor["mac"], anchor["sha256"])
    return audit.ChainPoint()


def forget_verified() -> None:
    """Tests: start the next anchor from record 1."""
    global _verified
    with _verified_lock:
        _verified = audit.ChainPoint()


def anchor_now() -> tuple[dict, list[str], list[str]]:
    """Anchor the current head: (anchor, sinks written, sink failures)."""
    anchor = make_anchor(verified_head())
    written, failed = write_anchor(anchor)
    return anchor, written, failed


# -- sinks ------------------------------------------------------------------------
def anchor_line(anchor: dict) -> str:
    return json.dumps(anchor, sort_keys=True, separators=(",", ":"))


def write_anchor(anchor: dict) -> tuple[list[str], list[str]]:
    """Write ``anchor`` to every configured sink; one failing does not stop the others."""
    written, failed = [], []
    for name, sink in _sinks():
        try:
            sink(anchor)
            written.append(name)
        except (OSError, AnchorError) as exc:
            failed.append(f"{name}: {exc}")
    return written, failed


def _sinks():
    if settings.AUDIT_ANCHOR_FILE:
        yield "file", _to_file
    if settings.AUDIT_ANCHOR_SYSLOG:
        yield "syslog", _to_syslog
    if settings.VAULT_STORAGE == "s3":
        yield "s3", _to_object_store


def _to_file(anchor: dict) -> None:
    """One line appended with one write (O_APPEND): concurrent portal processes'
    lines never interleave; fsynced before the anchor counts as written."""
    path = Path(settings.AUDIT_ANCHOR_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (anchor_line(anchor) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_syslog(anchor: dict) -> None:
    target = settings.AUDIT_ANCHOR_SYSLOG
    message = f"<{SYSLOG_PRIORITY}>{SYSLOG_TAG}{anchor_line(anchor)}".encode()
    if target.startswith("/"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, target)
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise AnchorError(f"BERTH_AUDIT_ANCHOR_SYSLOG must be a socket path or host:port, "
                          f"not {target!r}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as sock:
        sock.sendto(message, (host.strip("[]"), int(port)))


def _to_object_store(anchor: dict) -> None:
    from vault.service import storage
    from vault.storage import StorageError

    name = f"{anchor['seq']:012d}-{hashlib.sha256(anchor['sig'].encode()).hexdigest()[:16]}.json"
    try:
        storage().put_audit_anchor(name, anchor_line(anchor).encode())
    except StorageError as exc:  # one line naming the operation and S3's code, no secrets
        raise AnchorError(str(exc)) from None


# -- reading anchors back ---------------------------------------------------------
def read_anchors(source: str) -> list[tuple[str, dict]]:
    """(where, anchor) from ``source``: ``s3`` (the vault's bucket), or a file of
    anchor lines (the anchor file, or a syslog file that carries them)."""
    if source == "s3":
        if settings.VAULT_STORAGE != "s3":
            raise AnchorError("--anchors s3 needs BERTH_VAULT_STORAGE=s3")
        from vault.service import storage
        from vault.storage import StorageError

        try:
            found = [(f"s3 object {n}", parse_anchor_line(data.decode("utf-8", "replace")))
                     for n, data in enumerate(storage().audit_anchors(), start=1)]
        except StorageError as exc:
            raise AnchorError(str(exc)) from None
    else:
        try:
            with open(source, encoding="utf-8", errors="replace") as f:
                found = [(f"{source} line {n}", parse_anchor_line(line))
                         for n, line in enumerate(f, start=1)]
        except OSError as exc:
            raise AnchorError(f"cannot read anchors from {source}: "
                              f"{exc.strerror or exc.__class__.__name__}") from None
    return [(where, anchor) for where, anchor in found if anchor is not None]


def anchor_is_ours(anchor: dict, public_key=None) -> bool:
    """Signed by this portal's anchor key and MACed with its audit key.
    ``public_key``: the anchor key's public half, when checking many anchors."""
    if not anchor_is_signed(anchor, public_key or signing_key().public_key()):
        return False
    try:
        return hmac.compare_digest(str(anchor.get("hmac", "")), anchor_hmac(anchor))
    except AuditKeyError:
        return False


def verify_with_anchors(source: str) -> audit.Verification:
    """``verify_chain``, then every anchor in ``source`` against the chain: an anchor
    past the chain's end names the records cut off; one that disagrees with its
    record names that record."""
    result = audit.verify_chain()
    if not result.ok:
        return result
    anchors = read_anchors(source)
    if not anchors:
        raise AnchorError(f"no anchors in {source}")
    public_key = signing_key().public_key()
    for where, anchor in anchors:
        if not anchor_is_ours(anchor, public_key):
            return audit.Verification(False, result.count, None,
                                      f"the anchor at {where} is not signed by this "
                                      "portal's anchor key and audit key")
    furthest = max((a for _, a in anchors), key=lambda a: a["seq"])
    if furthest["seq"] > result.count:
        return audit.Verification(False, result.count, result.count + 1, (
            f"{missing_range(result.count + 1, furthest['seq'])}: the chain ends at "
            f"{result.count} but was anchored at {furthest['seq']} on {furthest['time']}"))
    wanted = {a["seq"]: a for _, a in anchors if a["seq"] > 0}
    stored = dict(AuditRecord.objects.filter(seq__in=wanted).values_list("seq", "mac"))
    for seq in sorted(wanted):
        if not hmac.compare_digest(stored.get(seq, ""), wanted[seq]["mac"]):
            return audit.Verification(False, result.count, seq, (
                f"record {seq} does not match the anchor signed on {wanted[seq]['time']}"))
    return audit.Verification(True, result.count, mac=result.mac, sha256=result.sha256)


def verify_with_local_anchors() -> audit.Verification:
    """What the audit page's *Verify chain* does: against the anchor file when there
    is one (a cut tail shows there too), otherwise the MAC chain alone."""
    path = settings.AUDIT_ANCHOR_FILE
    if not path or not Path(path).exists():
        return audit.verify_chain()
    try:
        return verify_with_anchors(path)
    except AnchorError as exc:
        result = audit.verify_chain()
        if not result.ok:
            return result
        return audit.Verification(False, result.count, None, str(exc))


# -- exports ----------------------------------------------------------------------
def chain_export(batch_size=1000):
    """The ``berth-audit-chain`` export as chunks of JSON Lines (see audit_verifier).

    Every record from 1 to the head as it was when the export began, each with its
    plain SHA-256 digest; MACs are checked on the way, and a break ends the export
    with an ``error`` line and no closing anchor. Then the stored anchors it spans,
    and last a fresh anchor of its last record (also written to the sinks).
    """
    head_seq = AuditHead.objects.filter(id=1).values_list("seq", flat=True).first() or 0
    header = {"type": "header", "export": EXPORT_NAME, "format": EXPORT_FORMAT,
              "head_seq": head_seq}
    try:
        header["public_key"] = public_key_text()
    except AnchorError as exc:  # nothing could be signed: say so rather than stream records
        yield _line(header)
        yield _line({"type": "error", "detail": str(exc)})
        return
    yield _line(header)
    point, lines = audit.ChainPoint(), []
    try:
        for entry, point in audit.walk_chain(upto=head_seq, batch_size=batch_size):
            lines.append(_line({"type": "record", **audit.canonical_values(entry),
                                "mac": entry.mac, "sha256": point.sha256}))
            if len(lines) >= batch_size:
                yield "".join(lines)
                lines = []
    except (audit.ChainBroken, AuditKeyError) as exc:
        yield "".join(lines)
        yield _line({"type": "error", "detail": f"audit chain broken: {exc}"})
        return
    yield "".join(lines)
    if point.seq != head_seq:
        yield _line({"type": "error", "detail": f"audit chain ends at record {point.seq} "
                                                f"but its head says {head_seq}"})
        return
    yield "".join(_line({"type": "anchor", **a}) for a in _stored_anchors())
    try:
        last_anchored(head_seq)  # never close an export of a chain cut below an anchor
        closing = make_anchor(point)
    except (AnchorError, AuditKeyError) as exc:
        yield _line({"type": "error", "detail": str(exc)})
        return
    _, failed = write_anchor(closing)
    for failure in failed:
        log.warning("audit anchor of an export not written to %s", failure)
    yield _line({"type": "anchor", **closing})


def _stored_anchors() -> list[dict]:
    """This portal's stored anchors, oldest first: those past the export's end too,
    so that an export of a cut chain shows the records missing from it."""
    found = []
    sources = ([settings.AUDIT_ANCHOR_FILE] if settings.AUDIT_ANCHOR_FILE
               and Path(settings.AUDIT_ANCHOR_FILE).exists() else [])
    sources += ["s3"] if settings.VAULT_STORAGE == "s3" else []
    seen, public_key = set(), signing_key().public_key()
    for source in sources:
        try:
            anchors = read_anchors(source)
        except AnchorError as exc:
            log.warning("audit export: %s", exc)
            continue
        for _, anchor in anchors:
            if (isinstance(anchor.get("seq"), int) and anchor["seq"] >= 1
                    and anchor.get("sig") not in seen and anchor_is_ours(anchor, public_key)):
                seen.add(anchor["sig"])
                found.append(anchor)
    return sorted(found, key=lambda a: (a["seq"], a["time"]))


def _line(value: dict) -> str:
    return json.dumps(value, default=str, separators=(",", ":")) + "\n"


# -- the timer --------------------------------------------------------------------
class AnchorTimer:
    """Anchors the head every ``interval`` seconds when it has moved since this
    process last anchored it. A daemon thread: it must never hold a process up."""

    def __init__(self, interval: float):
        self.interval = interval
        self.stop_event = threading.Event()
        self._last: tuple | None = None
        self._failing = False
        self.thread = threading.Thread(target=self._run, name="berth-audit-anchor",
                                       daemon=True)

    def start(self) -> AnchorTimer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the timer must outlive a database hiccup; say why
                log.exception("audit anchor timer")
            finally:
                connections.close_all()  # this thread's own connections

    def tick(self) -> dict | None:
        head = AuditHead.objects.filter(id=1).values_list("seq", "mac").first() or (0, "")
        if head == self._last:
            return None
        try:
            anchor, _, failed = anchor_now()
        except AnchorError as exc:
            self._failed(str(exc))
            return None
        if failed:
            self._failed("; ".join(failed))
        else:
            self._failing = False
        self._last = (anchor["seq"], anchor["mac"])
        return anchor

    def _failed(self, reason: str) -> None:
        log.warning("audit anchor: %s", reason)
        # One record per run of failures, not one per tick: the record itself moves
        # the head, and a broken chain stays broken until someone looks.
        if not self._failing:
            self._failing = True
            audit.record("audit.anchor", actor=audit.Actor.system("anchor timer"),
                         target="audit-chain", outcome=Outcome.FAILED,
                         details={"reason": reason[:500]})


_timer: AnchorTimer | None = None


def start_timer() -> AnchorTimer | None:
    """Start this process's anchor timer (once), unless the interval is 0."""
    global _timer
    interval = settings.AUDIT_ANCHOR_INTERVAL_SECONDS
    if interval <= 0 or _timer is not None:
        return _timer
    _timer = AnchorTimer(interval).start()
    return _timer
