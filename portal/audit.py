"""The tamper-evident audit trail: writing records and verifying the chain.

Each record's MAC is HMAC-SHA256(audit key, previous MAC || canonical record),
so a record cannot be edited, removed, reordered or inserted without the key.
The first record chains from the empty string. Which key version MACs a record
follows from its sequence number (portal/audit_keys.py); `rotate_key` starts a
new version, and the chain runs on through it.
"""
import datetime as dt
import hashlib
import hmac
import time
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from portal.audit_keys import AuditKeyError, AuditKeyring, KeyVersion, covering
from portal.audit_verifier import FIELDS, canonical_record, next_digest
from portal.models import ActorKind, AuditHead, AuditRecord, Outcome, RefusalWindow


def canonical_values(record: AuditRecord) -> dict:
    """The record's fields as the chains cover them (time in UTC, microseconds)."""
    values = {name: getattr(record, name) for name in FIELDS}
    values["time"] = record.time.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return values


def canonical(record: AuditRecord) -> bytes:
    """The exact bytes the MAC covers: fixed fields, sorted keys, UTC time."""
    return canonical_record(canonical_values(record))


def compute_mac(previous_mac: str, record: AuditRecord, key: bytes | None = None) -> str:
    """``key``: the record's key if the caller has it (``verify_chain``, which reads the
    keyring once instead of once per record)."""
    key = key if key is not None else keyring().key_for(record.seq).key
    return hmac.new(key, previous_mac.encode() + canonical(record), hashlib.sha256).hexdigest()


_keyrings: dict[tuple, AuditKeyring] = {}


def keyring() -> AuditKeyring:
    """The keyring the settings name (one per path and legacy key, for tests' overrides)."""
    where = (str(settings.AUDIT_KEYRING), settings.AUDIT_KEY)
    if where not in _keyrings:
        _keyrings[where] = AuditKeyring(settings.AUDIT_KEYRING, settings.AUDIT_KEY)
    return _keyrings[where]


@dataclass(frozen=True)
class Actor:
    kind: str
    name: str

    @classmethod
    def system(cls, name="berth"):
        return cls(ActorKind.SYSTEM, name)


def actor_of(request) -> Actor:
    """Who is asking: a token (named by its prefix), a user, or nobody."""
    auth = getattr(request, "auth", None)
    user = getattr(request, "user", None)
    if auth is not None and hasattr(auth, "token_key"):
        return Actor(ActorKind.TOKEN, f"{user.get_username()}:token:{auth.token_key}")
    if user is not None and user.is_authenticated:
        return Actor(ActorKind.USER, user.get_username())
    return Actor(ActorKind.ANONYMOUS, "anonymous")


def client_ip(request):
    if request is None:
        return None
    return request.META.get("REMOTE_ADDR") or None


def record(action, *, actor: Actor, target="", outcome=Outcome.ALLOWED, source_ip=None,
           details=None) -> AuditRecord:
    """Append one record to the chain, atomically with respect to other writers."""
    with transaction.atomic():
        head, _ = AuditHead.objects.select_for_update().get_or_create(id=1)
        return _append(head, action, actor=actor, target=target, outcome=outcome,
                       source_ip=source_ip, details=details)


def _append(head, action, **fields) -> AuditRecord:  # the caller holds the head's lock
    entry = _chained(head.seq + 1, head.mac, action, **fields)
    entry.save()
    head.seq, head.mac = entry.seq, entry.mac
    head.save(update_fields=["seq", "mac"])
    return entry


def rotate_key(actor: Actor) -> KeyVersion:
    """Start a new key version with the next record, and write that record.

    Under the head's lock, so no writer slips a record between the keyring's new
    range and the rotation record. Interrupted after the keyring was written, the
    next record simply begins the new version; run again, it starts another.
    """
    with transaction.atomic():
        head, _ = AuditHead.objects.select_for_update().get_or_create(id=1)
        version = keyring().rotate(head.seq + 1)
        _append(head, "audit.key_rotated", actor=actor, target="audit",
                details={"version": version.version, "first_seq": version.first_seq})
    return version


def _chained(seq, previous_mac, action, *, actor: Actor, target="", outcome=Outcome.ALLOWED,
             source_ip=None, details=None, time=None) -> AuditRecord:
    entry = AuditRecord(
        seq=seq,
        time=time or timezone.now(),
        actor_kind=actor.kind, actor=actor.name[:200], action=action,
        target=str(target)[:300], outcome=outcome, source_ip=source_ip,
        details=details or {},
    )
    entry.mac = compute_mac(previous_mac, entry)
    return entry


def record_many(entries, batch_size=2000) -> int:
    """Append many records in one transaction, for imports and fixtures.

    ``entries`` are dicts of record()'s keyword arguments plus ``action`` (and
    optionally ``time``). The chain is the same one record() builds, computed
    here and written with bulk_create under the same head lock.
    """
    with transaction.atomic():
        head, _ = AuditHead.objects.select_for_update().get_or_create(id=1)
        seq, mac, rows = head.seq, head.mac, []
        for fields in entries:
            seq += 1
            rows.append(_chained(seq, mac, **fields))
            mac = rows[-1].mac
        AuditRecord.objects.bulk_create(rows, batch_size=batch_size)
        head.seq, head.mac = seq, mac
        head.save(update_fields=["seq", "mac"])
    return len(rows)


def record_request(request, action, *, target="", outcome=Outcome.ALLOWED, details=None):
    """Shorthand for views: actor and source address come from the request."""
    return record(action, actor=actor_of(request), target=target, outcome=outcome,
                  source_ip=client_ip(request), details=details)


# -- refusals: aggregated per source, so a flood cannot grow the trail ----------------

OTHER_SOURCES = "(other sources)"
SAMPLE_REASONS = 5


def record_refusal(action, *, actor: Actor, source, target="", source_ip=None, details=None,
                   count=1, outcome=Outcome.DENIED, now=None) -> int:
    """Audit a refusal that an outsider can repeat at will; returns how many refusals
    from ``source`` the current interval holds (this one included).

    ``source`` is a stable key for who is knocking (a peer address, a host name).
    The first refusal from a source in an interval (``AUDIT_REFUSAL_INTERVAL_SECONDS``)
    is a record at once; the next ones only count, in a `RefusalWindow` row, and
    become one aggregate record (their number, first and last time, a few distinct
    reasons) when the interval closes: at the source's next refusal after it, or by
    `flush_refusals`, which runs lazily. So N refusals from one source in one
    interval write two records, and a source beyond ``AUDIT_REFUSAL_MAX_SOURCES``
    open windows of this action counts into a shared one. Every record says how many
    refusals it stands for (``details["refusals"]``), so the trail still adds up.
    ``count``: refusals this call reports at once (an agent's own aggregate).
    ``outcome``: of the first record; the aggregate has the same (denied by default).
    """
    now = now or timezone.now()
    details = dict(details or {})
    source = str(source or "-")[:200]
    details.setdefault("source", source)
    count = max(1, int(count))
    with transaction.atomic():
        window = _locked_window(action, source)
        if window is None and source != OTHER_SOURCES and RefusalWindow.objects.filter(
                action=action).count() >= settings.AUDIT_REFUSAL_MAX_SOURCES:
            source = OTHER_SOURCES
            window = _locked_window(action, source)
        if window is not None and window.closes_at <= now:
            _close(window)
            window = None
        created = window is None
        if created:
            window, created = _open_window(action, source, actor, target, source_ip,
                                           outcome, now)
        if created:  # the first of the interval is written now
            record(action, actor=actor, target=target, outcome=outcome,
                   source_ip=source_ip, details={**details, "refusals": 1})
            total = _count(window, details, now, count - 1) if count > 1 else 1
        else:
            total = _count(window, details, now, count)
    _flush_now_and_then(now)
    return total


def refusals_from(action, source, now=None) -> int:
    """How many refusals of ``action`` from ``source`` the open interval holds: a
    rate limit shared by every portal process (the window is a database row)."""
    now = now or timezone.now()
    count = RefusalWindow.objects.filter(action=action, source=str(source or "-")[:200],
                                         closes_at__gt=now).values_list("count", flat=True)
    return next(iter(count), 0)


def _locked_window(action, source):
    return RefusalWindow.objects.select_for_update().filter(action=action,
                                                            source=source).first()


def _open_window(action, source, actor, target, source_ip, outcome, now):
    """(window, True) for a new one; (window, False) if another process opened it at
    the same moment (then locked, to count into)."""
    interval = dt.timedelta(seconds=settings.AUDIT_REFUSAL_INTERVAL_SECONDS)
    try:
        with transaction.atomic():
            return RefusalWindow.objects.create(
                action=action, source=source, opened_at=now, closes_at=now + interval,
                last_at=now, actor_kind=actor.kind, actor=actor.name[:200],
                target=str(target)[:300], source_ip=source_ip, outcome=outcome), True
    except IntegrityError:
        return _locked_window(action, source), False


def _count(window, details, now, count=1) -> int:
    window.count += count
    window.last_at = now
    window.first_counted_at = window.first_counted_at or now
    summary = _summary(details)
    if summary not in window.reasons and len(window.reasons) < SAMPLE_REASONS:
        window.reasons = [*window.reasons, summary]
    window.save(update_fields=["count", "last_at", "first_counted_at", "reasons"])
    return window.count


def _summary(details) -> str:
    reason, stage = str(details.get("reason", "")), details.get("stage")
    return (f"{stage}: {reason}" if stage else reason)[:200]


def _close(window) -> int:
    """Write the closed window's aggregate (if anything beyond its first refusal
    happened) and forget the window; the caller holds its lock."""
    written = 0
    if window.count > 1:
        record(window.action, actor=Actor(window.actor_kind, window.actor),
               target=window.target, outcome=window.outcome, source_ip=window.source_ip,
               details={"aggregate": True, "source": window.source,
                        "refusals": window.count - 1,
                        "first": window.first_counted_at.isoformat(),
                        "last": window.last_at.isoformat(),
                        "interval_s": settings.AUDIT_REFUSAL_INTERVAL_SECONDS,
                        "reasons": window.reasons})
        written = 1
    window.delete()
    return written


def flush_refusals(now=None) -> int:
    """Write the aggregates of every closed window; returns how many were written.

    Run lazily (by refusals, agent heartbeats, whoever reads the audit trail) and by
    ``manage.py sweep``: a quiet source's last interval is not left unwritten.
    """
    now = now or timezone.now()
    written = 0
    for pk in RefusalWindow.objects.filter(closes_at__lte=now).values_list("pk", flat=True):
        with transaction.atomic():
            window = RefusalWindow.objects.select_for_update().filter(
                pk=pk, closes_at__lte=now).first()
            if window is not None:  # another process may have closed it meanwhile
                written += _close(window)
    return written


_next_flush = 0.0  # monotonic time of this process's next look at closed windows


def _flush_now_and_then(now):
    global _next_flush
    if time.monotonic() >= _next_flush:
        _next_flush = time.monotonic() + max(1.0, settings.AUDIT_REFUSAL_INTERVAL_SECONDS / 4)
        flush_refusals(now)


@dataclass(frozen=True)
class Verification:
    ok: bool
    count: int
    broken_seq: int | None = None
    reason: str = ""
    # Where the intact chain ends: its last record's MAC and plain SHA-256 digest.
    mac: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class ChainPoint:
    """A position in the chain: record ``seq`` and both chains' values there."""
    seq: int = 0
    mac: str = ""
    sha256: str = ""


class ChainBroken(Exception):
    def __init__(self, verification: Verification):
        super().__init__(verification.reason)
        self.verification = verification


def walk_chain(start: ChainPoint = ChainPoint(), upto: int | None = None, batch_size=2000):
    """Yield ``(record, ChainPoint)`` in sequence order after ``start``, each record's
    MAC checked; raise ChainBroken at the first record that breaks the chain.

    Pages by sequence number (no cursor held between pages), so a caller may
    interleave the walk with streaming a response.
    """
    point = start
    try:
        versions, unusable = keyring().versions(), None
    except AuditKeyError as exc:  # reported at the first record that needs a key
        versions, unusable = [], exc
    while True:
        page = AuditRecord.objects.order_by("seq")
        if point.seq:  # from the start, rows numbered 0 or below are read too, and fail
            page = page.filter(seq__gt=point.seq)
        if upto is not None:
            page = page.filter(seq__lte=upto)
        rows = list(page[:batch_size])
        if not rows:
            return
        for entry in rows:
            expected = point.seq + 1
            if entry.seq != expected:
                raise ChainBroken(Verification(False, point.seq, expected,
                                               f"record {expected} is missing or out of order"))
            body = canonical(entry)
            try:
                if unusable:
                    raise unusable
                key = covering(versions, entry.seq).key
            except AuditKeyError as exc:
                raise ChainBroken(Verification(False, point.seq, entry.seq, str(exc))) from None
            mac = hmac.new(key, point.mac.encode() + body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(entry.mac, mac):
                raise ChainBroken(Verification(False, point.seq, entry.seq,
                                               f"record {entry.seq} does not match its MAC"))
            point = ChainPoint(entry.seq, entry.mac, next_digest(point.sha256, body))
            yield entry, point


def verify_chain(batch_size=2000) -> Verification:
    """Walk the chain in sequence order; report the first record that breaks it."""
    point = ChainPoint()
    try:
        for _, reached in walk_chain(batch_size=batch_size):
            point = reached
    except ChainBroken as exc:
        return exc.verification
    return _check_head(point)


def _check_head(point: ChainPoint) -> Verification:
    head = AuditHead.objects.filter(id=1).first()
    head_seq, head_mac = (head.seq, head.mac) if head else (0, "")
    count = point.seq
    if head_seq != count or not hmac.compare_digest(head_mac, point.mac):
        return Verification(False, count, count + 1,
                            f"records after {count} were removed (chain head is at {head_seq})")
    return Verification(True, count, mac=point.mac, sha256=point.sha256)
