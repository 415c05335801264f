"""Checking a chain export offline with only the anchor public key
(portal/audit_verifier.py; the export itself comes from portal/audit_anchor.py)."""
import json
import subprocess
import sys

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from portal import audit, audit_anchor
from portal.audit_verifier import (
    canonical_record,
    next_digest,
    parse_public_key,
    verify_export,
)
from portal.models import AuditHead, AuditRecord
from tests.support.server import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

OTHER_KEY = "ed25519:" + "A" * 43 + "="  # a well-formed key that signed nothing here


@pytest.fixture(autouse=True)
def anchor_files(settings, tmp_path):
    settings.AUDIT_ANCHOR_KEY = tmp_path / "keys" / "audit-anchor.key"
    settings.AUDIT_ANCHOR_FILE = str(tmp_path / "anchors.jsonl")
    settings.AUDIT_ANCHOR_SYSLOG = ""
    audit_anchor.forget_verified()
    yield tmp_path
    audit_anchor.forget_verified()


def write_records(n, start=0):
    for i in range(start, start + n):
        audit.record("test.event", actor=audit.Actor.system(), target=f"thing:{i}",
                     source_ip="192.0.2.7" if i % 2 else None, details={"i": i, "note": "é"})


@pytest.fixture
def export(tmp_path):
    """Ten records, an anchor at record 6, then an export (its own record is the 11th)."""
    write_records(6)
    call_command("audit", "anchor")
    write_records(4, start=6)
    path = tmp_path / "export.jsonl"
    call_command("audit", "export", str(path))
    return path


@pytest.fixture
def public_key():
    return audit_anchor.public_key_text()


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def rechain(items):
    """What a forger without the signing key can still do: renumber the records
    and recompute every plain digest so the file is consistent in itself."""
    digest, seq = "", 0
    for item in items:
        if item["type"] == "record":
            seq += 1
            item["seq"] = seq
            digest = next_digest(digest, canonical_record(item))
            item["sha256"] = digest
    return items


def streamed(response):
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    # async_to_sync keeps the generator's database calls on this thread's connection.
    return async_to_sync(collect)().decode()


def refused(path, public_key, match):
    with pytest.raises(CommandError, match=match):
        call_command("audit", "verify-export", str(path), "--public-key", public_key)


def test_an_untouched_export_verifies(export, public_key, capsys):
    items = lines_of(export)
    assert items[0]["type"] == "header" and items[0]["public_key"] == public_key
    records = [i for i in items if i["type"] == "record"]
    assert [r["seq"] for r in records] == list(range(1, 12))
    assert records[-1]["action"] == "audit.export"  # the export records itself, then covers it
    assert [i["seq"] for i in items if i["type"] == "anchor"] == [6, 11]
    call_command("audit", "verify-export", str(export), "--public-key", public_key)
    assert "verified: 11 records, 2 anchors" in capsys.readouterr().out


def test_the_export_carries_the_same_chain_the_portal_verifies(export):
    records = [i for i in lines_of(export) if i["type"] == "record"]
    result = audit.verify_chain()
    assert (records[-1]["mac"], records[-1]["sha256"]) == (result.mac, result.sha256)


def test_an_edited_record_is_caught(export, public_key, tmp_path):
    items = lines_of(export)
    items[3]["target"] = "thing:innocent"
    write_lines(export, items)
    refused(export, public_key, "record 3 .* does not follow from the records before it")
    write_lines(export, rechain(items))  # consistent digests do not help without the key
    refused(export, public_key, r"records 1\.\.6 do not match the anchor.*edited, removed or "
                                "inserted")


def test_an_edited_record_after_the_last_stored_anchor_is_caught_by_the_closing_one(
        export, public_key):
    items = lines_of(export)
    items[9]["details"] = {"i": 8, "note": "nothing to see"}
    write_lines(export, rechain(items))
    refused(export, public_key, r"records 7\.\.11 do not match the anchor")


def test_a_removed_record_is_caught(export, public_key):
    items = lines_of(export)
    del items[4]  # record 4
    write_lines(export, items)
    refused(export, public_key, "record 4 is missing or out of place")
    write_lines(export, rechain(items))
    refused(export, public_key, r"records 1\.\.6 do not match the anchor")


def test_an_inserted_record_is_caught(export, public_key):
    items = lines_of(export)
    forged = dict(items[8], target="thing:planted", details={"planted": True})
    items.insert(9, forged)
    write_lines(export, items)
    refused(export, public_key, "record 9 is missing or out of place")
    write_lines(export, rechain(items))
    refused(export, public_key, r"records 7\.\.11 do not match the anchor")


def test_reordered_records_are_caught(export, public_key):
    items = lines_of(export)
    items[2], items[3] = items[3], items[2]
    write_lines(export, rechain(items))
    refused(export, public_key, r"records 1\.\.6 do not match the anchor")


def test_a_cut_export_is_caught(export, public_key):
    items = lines_of(export)
    records = [i for i in items if i["type"] == "record"]
    anchors = [i for i in items if i["type"] == "anchor"]
    write_lines(export, [items[0], *records[:8], *anchors])
    refused(export, public_key, r"records 9\.\.11 are missing")
    # Cut with the anchors past the cut: the stored anchor at 6 still holds, but the
    # export no longer ends with the anchor of its last record.
    write_lines(export, [items[0], *records[:8], anchors[0]])
    refused(export, public_key, "does not end with an anchor of its last record 8")
    write_lines(export, [items[0], *records[:8]])
    refused(export, public_key, "carries no anchor")


def test_a_cut_reaching_below_a_stored_anchor_names_the_range(export, public_key):
    items = lines_of(export)
    records = [i for i in items if i["type"] == "record"]
    anchors = [i for i in items if i["type"] == "anchor"]
    write_lines(export, [items[0], *records[:4], anchors[0]])
    refused(export, public_key, r"records 5\.\.6 are missing")


def test_a_forged_anchor_is_caught(export, public_key):
    items = lines_of(export)
    records = [i for i in items if i["type"] == "record"][:8]
    closing = dict(items[-1], seq=8, sha256=records[-1]["sha256"], mac=records[-1]["mac"])
    write_lines(export, [items[0], *records, closing])
    refused(export, public_key, "not signed by this public key")


def test_another_public_key_is_refused(export):
    refused(export, OTHER_KEY, "not signed by this public key")


def test_a_chain_broken_in_the_database_gives_an_export_that_fails(tmp_path, public_key):
    write_records(5)
    AuditRecord.objects.filter(seq=2).update(target="edited")
    path = tmp_path / "broken.jsonl"
    with pytest.raises(CommandError, match="broken"):
        call_command("audit", "export", str(path))
    refused(path, public_key, "the portal says: audit chain broken")


def test_an_export_of_a_cut_chain_fails_and_names_the_missing_records(tmp_path, public_key):
    """The portal takes an export after someone cut its tail and rolled the head back:
    it must not sign the shorter chain as complete."""
    write_records(10)
    call_command("audit", "anchor")
    AuditRecord.objects.filter(seq__gt=7).delete()
    AuditHead.objects.filter(id=1).update(seq=7, mac=AuditRecord.objects.get(seq=7).mac)
    path = tmp_path / "cut.jsonl"
    # Record 8 is now the export's own record: 9 and 10 are what is missing.
    with pytest.raises(CommandError, match=r"records 9\.\.10 are missing"):
        call_command("audit", "export", str(path))
    refused(path, public_key, r"the portal says: records 9\.\.10 are missing")
    # Without the portal's error line, the anchor it carries still shows the cut.
    items = [i for i in lines_of(path) if i["type"] != "error"]
    write_lines(path, items)
    refused(path, public_key, r"records 9\.\.10 are missing: an anchor signed")


def test_bad_input_fails_with_one_line(tmp_path, public_key):
    (tmp_path / "junk").write_text("not json\n")
    refused(tmp_path / "junk", public_key, "line 1 is not JSON")
    (tmp_path / "junk").write_text('{"type": "header", "export": "something else"}\n')
    refused(tmp_path / "junk", public_key, "not a berth-audit-chain export")
    refused(tmp_path / "nowhere", public_key, "cannot read")
    refused(tmp_path / "junk", "not-a-key", "neither a key")
    (tmp_path / "key.pub").write_text("ed25519:!!!\n")
    refused(tmp_path / "junk", str(tmp_path / "key.pub"), "not a valid Ed25519 key")


def test_the_page_export_verifies_offline(auditor_user, client, public_key):
    write_records(3)
    call_command("audit", "anchor")
    client.force_login(auditor_user)
    response = client.get("/audit/export.chain.jsonl")
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="berth-audit.chain.jsonl"'
    text = streamed(response)
    result = verify_export(text.splitlines(), parse_public_key(public_key))
    # Every record, the export's own last among them.
    assert result.ok and result.records == AuditRecord.objects.count(), result
    assert AuditRecord.objects.order_by("seq").last().action == "audit.export"


def test_the_chain_export_is_refused_to_users_without_a_reader_role(outsider_user, client):
    write_records(2)
    assert client.get("/audit/export.chain.jsonl").status_code == 302  # to sign-in
    client.force_login(outsider_user)
    assert client.get("/audit/export.chain.jsonl").status_code == 403
    assert not AuditRecord.objects.filter(action="audit.export").exists()


BLOCKED_DJANGO = """
import sys
sys.modules["django"] = None  # any import of Django now fails
from portal import audit_verifier
assert not any(name == "django" or name.startswith("django.") for name in sys.modules
               if sys.modules[name] is not None)
sys.exit(audit_verifier.main(sys.argv[1:]))
"""


def test_the_verifier_runs_without_django_in_its_own_process(export, public_key, tmp_path):
    key_file = tmp_path / "anchor.pub"
    key_file.write_text(public_key + "\n")
    run = subprocess.run([sys.executable, "-c", BLOCKED_DJANGO, str(export),
                          "--public-key", str(key_file)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert "verified: 11 records" in run.stdout
    items = lines_of(export)
    del items[11]  # the last record (after the header and records 1..10)
    write_lines(export, items)
    run = subprocess.run([sys.executable, "-c", BLOCKED_DJANGO, str(export),
                          "--public-key", public_key],
                         cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 1
    assert "NOT verified: record 11 is missing" in run.stderr


@pytest.mark.skipif(connection.vendor != "postgresql",
                    reason="PostgreSQL-only (DATABASE_URL): the export path on PostgreSQL")
def test_an_export_taken_from_postgresql_verifies_and_catches_tampering(export, public_key):
    """The same export on PostgreSQL: JSON details, addresses and microsecond times
    come back from its column types, and must give the same canonical bytes."""
    call_command("audit", "verify-export", str(export), "--public-key", public_key)
    items = lines_of(export)
    items[5]["source_ip"] = "198.51.100.1"
    write_lines(export, rechain(items))
    refused(export, public_key, r"records 1\.\.6 do not match the anchor")
