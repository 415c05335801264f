"""Checking the audit trail with only a public key: anchors and chain exports.

Django-free on purpose (an import-contract test holds it to that): an auditor
who does not trust the portal runs it on their own machine, as
``python -m portal.audit_verifier EXPORT --public-key KEY`` or through
``manage.py audit verify-export``. It needs ``cryptography`` and nothing else.

Two chains run over the same records (``canonical_record`` gives the bytes):

* the MAC chain, ``mac[n] = HMAC(audit key, mac[n-1] || record n)``, which only
  the holder of the audit key can check (``portal/audit.py``);
* the plain chain, ``sha256[n] = SHA-256(sha256[n-1] || record n)``,
  ``sha256[0] = ""``, which anyone can recompute.

An *anchor* pins the chain's head at a moment: sequence number, MAC and plain
digest of the last record, and the time, MACed with the audit key and signed
with the portal's Ed25519 anchor key (kept apart from the database). Anchors
are written outside the database (``portal/audit_anchor.py``), so cutting the
tail of the trail leaves an anchor pointing past the new end.

An *export* (``berth-audit-chain`` JSON Lines) is: one header line, every
record from 1 to its last in order (fields, ``mac``, ``sha256``), the anchors
it spans, and last an anchor of its own last record signed when it was taken.
``verify_export`` recomputes the plain chain and checks it against every
anchor: an edited, removed, inserted or reordered record changes every digest
from there on, and a cut export either ends before an anchor it carries or
lacks the closing anchor of its last record.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

FIELDS = ("seq", "time", "actor_kind", "actor", "action", "target", "outcome",
          "source_ip", "details")
ANCHOR_FIELDS = ("anchor", "seq", "mac", "sha256", "time", "key_id")
ANCHOR_FORMAT = 1
EXPORT_NAME = "berth-audit-chain"
EXPORT_FORMAT = 1
KEY_PREFIX = "ed25519:"


class VerifierError(Exception):
    """An export, anchor or key that cannot be read at all."""


def canonical_record(values: dict) -> bytes:
    """The exact bytes both chains cover: the fixed fields, sorted keys, compact.

    ``values["time"]`` must already be the UTC ISO form with microseconds.
    """
    record = {name: values.get(name) for name in FIELDS}
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def next_digest(previous: str, canonical: bytes) -> str:
    """One step of the plain chain (hex digests, like the MACs)."""
    return hashlib.sha256(previous.encode() + canonical).hexdigest()


def missing_range(first: int, last: int) -> str:
    """'record 7 is missing' / 'records 7..9 are missing'."""
    if first == last:
        return f"record {first} is missing"
    return f"records {first}..{last} are missing"


# -- keys -------------------------------------------------------------------------
def format_public_key(raw: bytes) -> str:
    return KEY_PREFIX + base64.b64encode(raw).decode()


def key_id(raw: bytes) -> str:
    """A short name for a public key, carried in every anchor it signs."""
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public_key(text: str) -> Ed25519PublicKey:
    """``ed25519:<base64 of the 32-byte key>``, as the audit page and
    ``manage.py audit public-key`` print it."""
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise VerifierError(f"a public key looks like {KEY_PREFIX}<base64>, "
                            f"as `manage.py audit public-key` prints it")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise VerifierError("the public key is not a valid Ed25519 key") from None


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- anchors ----------------------------------------------------------------------
def anchor_body(anchor: dict) -> bytes:
    """What the audit key MACs: the anchor's own fields."""
    return json.dumps({name: anchor.get(name) for name in ANCHOR_FIELDS},
                      sort_keys=True, separators=(",", ":")).encode()


def anchor_signed_bytes(anchor: dict) -> bytes:
    """What the anchor key signs: the fields and their MAC."""
    fields = {name: anchor.get(name) for name in ANCHOR_FIELDS}
    fields["hmac"] = anchor.get("hmac")
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def anchor_is_signed(anchor: dict, public_key: Ed25519PublicKey) -> bool:
    """True if ``anchor`` is well formed and signed by ``public_key``."""
    if not isinstance(anchor, dict) or anchor.get("anchor") != ANCHOR_FORMAT:
        return False
    if not isinstance(anchor.get("seq"), int) or anchor["seq"] < 0:
        return False
    if anchor.get("key_id") != key_id(raw_public_key(public_key)):
        return False
    try:
        signature = base64.b64decode(str(anchor.get("sig", "")), validate=True)
        public_key.verify(signature, anchor_signed_bytes(anchor))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def parse_anchor_line(line: str) -> dict | None:
    """The anchor in one line of an anchor file, or of a syslog file that carries
    them after a prefix (``... berth-audit-anchor: {...}``); None for other lines."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(line[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) and "anchor" in value else None


# -- exports ----------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    ok: bool
    records: int
    anchors: int = 0
    last_time: str = ""  # when the closing anchor was signed
    reason: str = ""


def verify_export(lines, public_key: Ed25519PublicKey) -> ExportResult:
    """Check a ``berth-audit-chain`` export (an iterable of text lines) offline."""
    lines = iter(lines)
    count, digest, expected_seq = 0, "", 1
    digests: dict[int, str] = {}
    anchors: list[tuple[int, dict]] = []
    header_seen = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            return ExportResult(False, count, reason=f"line {number} is not JSON")
        if not isinstance(item, dict):
            return ExportResult(False, count, reason=f"line {number} is not a JSON object")
        kind = item.get("type")
        if not header_seen:
            if (kind != "header" or item.get("export") != EXPORT_NAME
                    or item.get("format") != EXPORT_FORMAT):
                return ExportResult(False, 0, reason=f"not a {EXPORT_NAME} export "
                                                     f"(format {EXPORT_FORMAT})")
            header_seen = True
            continue
        if kind == "record":
            if anchors:
                return ExportResult(False, count, reason=f"line {number}: a record after "
                                                         "the anchors")
            if item.get("seq") != expected_seq:
                return ExportResult(False, count, reason=(
                    f"record {expected_seq} is missing or out of place "
                    f"(line {number} holds record {item.get('seq')!r})"))
            digest = next_digest(digest, canonical_record(item))
            if item.get("sha256") != digest:
                return ExportResult(False, count, reason=(
                    f"record {expected_seq} (line {number}) does not follow from the "
                    "records before it: it, or one before it, was changed"))
            digests[expected_seq] = digest
            count, expected_seq = count + 1, expected_seq + 1
        elif kind == "anchor":
            anchors.append((number, item))
        elif kind == "error":
            return ExportResult(False, count, reason=f"the portal says: {item.get('detail')}")
        else:
            return ExportResult(False, count, reason=f"line {number}: unknown line type "
                                                     f"{kind!r}")
    if not header_seen:
        return ExportResult(False, 0, reason="the export is empty")
    return _check_anchors(anchors, digests, count, public_key)


def _check_anchors(anchors, digests, count, public_key) -> ExportResult:
    if not anchors:
        return ExportResult(False, count, reason="the export carries no anchor: it was cut "
                                                 "or is incomplete")
    good_up_to = 0
    for number, anchor in sorted(anchors, key=lambda a: a[1].get("seq", -1)
                                 if isinstance(a[1].get("seq"), int) else -1):
        if not anchor_is_signed(anchor, public_key):
            return ExportResult(False, count, len(anchors), reason=(
                f"the anchor on line {number} is not signed by this public key"))
        seq = anchor["seq"]
        if seq > count:
            return ExportResult(False, count, len(anchors), reason=(
                f"{missing_range(count + 1, seq)}: an anchor signed at "
                f"{anchor.get('time')} shows the chain reached record {seq}"))
        expected = digests.get(seq, "")
        if anchor.get("sha256") != expected:
            return ExportResult(False, count, len(anchors), reason=(
                f"records {good_up_to + 1}..{seq} do not match the anchor signed at "
                f"{anchor.get('time')}: one of them was edited, removed or inserted"))
        good_up_to = seq
    number, closing = anchors[-1]
    if closing.get("seq") != count:
        return ExportResult(False, count, len(anchors), reason=(
            f"the export does not end with an anchor of its last record {count}: "
            "it was cut or is incomplete"))
    return ExportResult(True, count, len(anchors), last_time=str(closing.get("time")))


def verify_export_file(path: str, public_key_text: str) -> ExportResult:
    key = parse_public_key(_key_text(public_key_text))
    try:
        with open(path, encoding="utf-8") as f:
            return verify_export(f, key)
    except (OSError, UnicodeDecodeError) as exc:
        raise VerifierError(f"cannot read {path}: {exc.__class__.__name__}") from None


def _key_text(value: str) -> str:
    """The key itself, or a file holding it."""
    if value.strip().startswith(KEY_PREFIX):
        return value
    try:
        with open(value, encoding="utf-8") as f:
            return f.read()
    except OSError:
        raise VerifierError(f"--public-key: neither a key ({KEY_PREFIX}...) nor a readable "
                            "file") from None


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m portal.audit_verifier",
        description="Check a Berth audit chain export with the portal's anchor public key.")
    parser.add_argument("export")
    parser.add_argument("--public-key", required=True,
                        help="ed25519:<base64>, or a file holding it")
    args = parser.parse_args(argv)
    try:
        result = verify_export_file(args.export, args.public_key)
    except VerifierError as exc:
        print(f"audit export: {exc}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"audit export NOT verified: {result.reason}", file=sys.stderr)
        return 1
    print(f"audit export verified: {result.records} records, {result.anchors} anchors, "
          f"complete as of {result.last_time}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
