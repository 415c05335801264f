"""Anchors of the audit chain's head, outside the database (portal/audit_anchor.py)."""
import json
import os
import socket
import sqlite3
import stat

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from portal import audit, audit_anchor
from portal.audit_verifier import anchor_is_signed, parse_public_key
from portal.models import AuditHead, AuditRecord
from tests.support.server import manage
from tests.vault.conftest import s3_bucket, s3_endpoint  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


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
                     details={"i": i})


def cut_tail(keep):
    """What someone with database write access and no key can do: delete the last
    records and roll the head back to the new last one."""
    AuditRecord.objects.filter(seq__gt=keep).delete()
    last = AuditRecord.objects.get(seq=keep)
    AuditHead.objects.filter(id=1).update(seq=last.seq, mac=last.mac)


def anchors_in(path):
    return [json.loads(line) for line in open(path)]


# -- the hole: a cut tail ---------------------------------------------------------
def test_cut_tail_passes_plain_verify_but_fails_against_the_anchors(anchor_files):
    write_records(10)
    call_command("audit", "anchor")
    cut_tail(7)
    assert audit.verify_chain().ok  # the MAC chain alone cannot show the cut
    with pytest.raises(CommandError, match=r"records 8\.\.10 are missing"):
        call_command("audit", "verify", "--anchors", str(anchor_files / "anchors.jsonl"))


def test_cut_tail_in_a_real_database_file_is_caught_by_commands_in_their_own_processes(
        tmp_path):
    """The whole attack with separate processes: a portal data directory, records
    written, `audit anchor`, three records deleted and the head rolled back with
    sqlite3 on the database file, then `audit verify` with and without anchors."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE") and not k.startswith("BERTH_")}
    env["BERTH_DATA_DIR"] = str(tmp_path / "var")
    manage("migrate", "--noinput", env=env)
    manage("shell", "-c", "from portal import audit\nfor i in range(10): audit.record("
           "'test.event', actor=audit.Actor.system(), target=f'thing:{i}')", env=env)
    anchored = manage("audit", "anchor", env=env)
    assert "audit head 10 anchored to file" in anchored.stdout
    anchor_file = tmp_path / "var" / "audit-anchors.jsonl"
    assert stat.S_IMODE((tmp_path / "var" / "keys" / "audit-anchor.key").stat().st_mode) == 0o600

    with sqlite3.connect(tmp_path / "var" / "berth.sqlite3") as db:
        db.execute("DELETE FROM portal_auditrecord WHERE seq > 7")
        db.execute("UPDATE portal_audithead SET seq = 7, mac = "
                   "(SELECT mac FROM portal_auditrecord WHERE seq = 7)")

    assert "intact: 7 records" in manage("audit", "verify", env=env).stdout
    refused = manage("audit", "verify", "--anchors", str(anchor_file), env=env, check=False)
    assert refused.returncode != 0
    assert "records 8..10 are missing" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_an_intact_chain_agrees_with_its_anchors(anchor_files, capsys):
    write_records(3)
    call_command("audit", "anchor")
    write_records(4, start=3)
    call_command("audit", "anchor")
    write_records(2, start=7)  # records after the last anchor are fine
    call_command("audit", "verify", "--anchors", str(anchor_files / "anchors.jsonl"))
    assert "intact: 9 records" in capsys.readouterr().out


def test_a_record_rewritten_under_an_anchor_is_named(anchor_files):
    """Cut and re-append with the same sequence numbers: the new records' MACs
    cannot be right without the key, but even a chain re-MACed with the key
    (an attacker who has it) no longer matches the anchor's MAC at record 5."""
    write_records(5)
    call_command("audit", "anchor")
    AuditRecord.objects.filter(seq=5).delete()
    AuditHead.objects.filter(id=1).update(seq=4, mac=AuditRecord.objects.get(seq=4).mac)
    write_records(1, start=99)  # a new record 5, properly MACed by the portal
    assert audit.verify_chain().ok
    with pytest.raises(CommandError, match="record 5 does not match the anchor"):
        call_command("audit", "verify", "--anchors", str(anchor_files / "anchors.jsonl"))


def test_a_forged_anchor_line_is_refused(anchor_files):
    write_records(3)
    call_command("audit", "anchor")
    path = anchor_files / "anchors.jsonl"
    anchor = anchors_in(path)[0]
    anchor["seq"] = 2  # point the anchor at an earlier record without the key
    path.write_text(json.dumps(anchor) + "\n")
    with pytest.raises(CommandError, match="not signed by this portal's anchor key"):
        call_command("audit", "verify", "--anchors", str(path))


def test_missing_anchor_source_fails_with_one_line(anchor_files):
    write_records(1)
    with pytest.raises(CommandError, match="cannot read anchors from"):
        call_command("audit", "verify", "--anchors", str(anchor_files / "nowhere.jsonl"))


# -- the anchor and its key -------------------------------------------------------
def test_anchor_is_signed_macced_and_the_key_file_is_private(anchor_files, capsys):
    write_records(4)
    call_command("audit", "anchor")
    (anchor,) = anchors_in(anchor_files / "anchors.jsonl")
    head = AuditHead.objects.get()
    assert (anchor["seq"], anchor["mac"]) == (head.seq, head.mac)
    assert anchor["sha256"] == audit.verify_chain().sha256
    assert audit_anchor.anchor_is_ours(anchor)
    call_command("audit", "public-key")
    public = parse_public_key(capsys.readouterr().out.splitlines()[-1])
    assert anchor_is_signed(anchor, public)
    key_file = anchor_files / "keys" / "audit-anchor.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(anchor_files.joinpath("anchors.jsonl").stat().st_mode) == 0o600
    seed = key_file.read_text().strip()
    assert seed not in (anchor_files / "anchors.jsonl").read_text()


def test_an_anchor_key_open_to_others_is_refused(anchor_files):
    write_records(1)
    call_command("audit", "public-key")
    (anchor_files / "keys" / "audit-anchor.key").chmod(0o644)
    with pytest.raises(CommandError, match="open to other users"):
        call_command("audit", "anchor")


def test_the_portal_never_anchors_a_broken_chain(anchor_files):
    write_records(5)
    AuditRecord.objects.filter(seq=3).update(target="thing:edited")
    with pytest.raises(CommandError, match="broken at record 3.*nothing anchored"):
        call_command("audit", "anchor")
    assert not (anchor_files / "anchors.jsonl").exists()


def test_a_cut_chain_is_not_anchored_either(anchor_files):
    write_records(5)
    AuditRecord.objects.filter(seq=5).delete()  # head still says 5
    with pytest.raises(CommandError, match="nothing anchored"):
        call_command("audit", "anchor")


@pytest.mark.parametrize("new_process", [False, True])
def test_a_rolled_back_head_is_never_anchored_and_the_timer_records_the_cut(anchor_files,
                                                                            new_process):
    timer = audit_anchor.AnchorTimer(interval=3600)
    write_records(10)
    assert timer.tick()["seq"] == 10
    cut_tail(7)
    if new_process:
        audit_anchor.forget_verified()  # it learns the anchored head from the anchor file
    for _ in range(5):  # its own failure record moves the head: still nothing signed
        assert timer.tick() is None
    failure = AuditRecord.objects.get(action="audit.anchor", outcome="failed")
    assert failure.details["reason"].startswith("records 8..10 are missing")
    assert [a["seq"] for a in anchors_in(anchor_files / "anchors.jsonl")] == [10]


def test_anchors_go_to_syslog_when_configured(anchor_files, settings):
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        settings.AUDIT_ANCHOR_SYSLOG = f"127.0.0.1:{receiver.getsockname()[1]}"
        write_records(2)
        anchor, written, failed = audit_anchor.anchor_now()
        message = receiver.recv(65536).decode()
    finally:
        receiver.close()
    assert written == ["file", "syslog"] and not failed
    assert message.startswith("<38>berth-audit-anchor: {")
    # A syslog file is itself an anchor source: the anchor follows the tag.
    log_file = anchor_files / "syslog.log"
    log_file.write_text(f"Dec  6 22:00:00 portal {message[4:]}\nDec  6 other line\n")
    assert [a for _, a in audit_anchor.read_anchors(str(log_file))] == [anchor]


def test_an_unreachable_sink_is_reported_and_the_others_still_written(anchor_files, settings):
    settings.AUDIT_ANCHOR_SYSLOG = str(anchor_files / "no-such-socket")
    write_records(1)
    with pytest.raises(CommandError, match="anchored to file; failed: syslog"):
        call_command("audit", "anchor")
    assert len(anchors_in(anchor_files / "anchors.jsonl")) == 1


def test_anchors_go_to_the_vault_bucket_when_the_vault_is_on_s3(
        anchor_files, settings, s3_endpoint, s3_bucket):  # noqa: F811
    from vault.service import reset_caches

    settings.VAULT_STORAGE = "s3"
    settings.VAULT_S3_BUCKET = s3_bucket
    settings.VAULT_S3_ENDPOINT = s3_endpoint
    settings.VAULT_S3_REGION = "us-east-1"
    reset_caches()
    try:
        write_records(6)
        call_command("audit", "anchor")
        cut_tail(4)
        with pytest.raises(CommandError, match=r"records 5\.\.6 are missing"):
            call_command("audit", "verify", "--anchors", "s3")
        from vault.service import storage

        assert storage().list_ids() == []  # anchors are never taken for images
    finally:
        reset_caches()


def test_a_new_process_checks_only_the_records_since_its_last_anchor(anchor_files,
                                                                        monkeypatch):
    write_records(5)
    call_command("audit", "anchor")
    first = anchors_in(anchor_files / "anchors.jsonl")[0]
    write_records(3, start=5)
    audit_anchor.forget_verified()  # as a new process, or `audit anchor` from a timer
    starts = []
    walk = audit.walk_chain
    monkeypatch.setattr(audit, "walk_chain",
                        lambda start=audit.ChainPoint(), **kw: starts.append(start) or walk(
                            start, **kw))
    anchor, _, _ = audit_anchor.anchor_now()
    assert starts == [audit.ChainPoint(first["seq"], first["mac"], first["sha256"])]
    assert anchor["sha256"] == audit.verify_chain().sha256  # the same chain as a full walk


def test_a_forged_last_anchor_is_not_taken_as_the_starting_point(anchor_files):
    write_records(5)
    call_command("audit", "anchor")
    path = anchor_files / "anchors.jsonl"
    forged = dict(anchors_in(path)[0], seq=5, sha256="0" * 64)
    with open(path, "a") as f:
        f.write(json.dumps(forged) + "\n")
    write_records(1, start=5)
    audit_anchor.forget_verified()
    assert audit_anchor.anchor_now()[0]["sha256"] == audit.verify_chain().sha256


def test_an_anchor_whose_record_was_replaced_is_not_taken_as_the_starting_point(
        anchor_files):
    """The cut-and-re-append attack cannot make the portal sign on from a point that
    is no longer in the chain: the walk starts over, and finds the break."""
    write_records(5)
    call_command("audit", "anchor")
    AuditRecord.objects.filter(seq=5).update(mac="f" * 64)
    AuditHead.objects.filter(id=1).update(mac="f" * 64)
    audit_anchor.forget_verified()
    with pytest.raises(audit_anchor.AnchorError, match="record 5 no longer carries the MAC"):
        audit_anchor.anchor_now()


def test_an_unreachable_bucket_is_a_failed_sink_not_a_crash(anchor_files, settings,
                                                             monkeypatch):
    from vault.service import reset_caches

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings.VAULT_STORAGE = "s3"
    settings.VAULT_S3_BUCKET = "berth-nowhere"
    settings.VAULT_S3_ENDPOINT = "http://127.0.0.1:9"  # nothing listens on the discard port
    settings.VAULT_S3_REGION = "us-east-1"
    reset_caches()
    try:
        write_records(1)
        _, written, failed = audit_anchor.anchor_now()
    finally:
        reset_caches()
    assert written == ["file"]
    assert len(failed) == 1 and failed[0].startswith("s3: store audit anchor")
    assert "testing" not in failed[0]


def test_the_key_never_reaches_output_or_logs(anchor_files, capsys, caplog, tmp_path):
    write_records(3)
    for args in (("anchor",), ("public-key",), ("export", str(tmp_path / "e.jsonl")),
                 ("verify", "--anchors", str(anchor_files / "anchors.jsonl"))):
        call_command("audit", *args)
    (anchor_files / "keys" / "audit-anchor.key").chmod(0o640)
    with pytest.raises(CommandError) as refused:
        call_command("audit", "anchor")
    seed = (anchor_files / "keys" / "audit-anchor.key").read_text().strip()
    out = capsys.readouterr()
    for text in (out.out, out.err, caplog.text, str(refused.value),
                 (tmp_path / "e.jsonl").read_text(), (anchor_files / "anchors.jsonl").read_text()):
        assert seed not in text and bytes.fromhex(seed).hex().upper() not in text


# -- the timer --------------------------------------------------------------------
def test_the_timer_anchors_when_the_head_moves_and_only_then(anchor_files):
    timer = audit_anchor.AnchorTimer(interval=3600)
    write_records(2)
    assert timer.tick()["seq"] == 2
    assert timer.tick() is None  # nothing new: no second anchor
    write_records(1, start=2)
    assert timer.tick()["seq"] == 3
    assert [a["seq"] for a in anchors_in(anchor_files / "anchors.jsonl")] == [2, 3]


def test_the_timer_thread_anchors_on_its_own(anchor_files):
    import time

    write_records(2)
    timer = audit_anchor.AnchorTimer(interval=0.05).start()
    try:
        deadline = time.monotonic() + 10
        while not (anchor_files / "anchors.jsonl").exists():
            assert time.monotonic() < deadline, "the timer wrote no anchor"
            time.sleep(0.02)
    finally:
        timer.stop()
    assert anchors_in(anchor_files / "anchors.jsonl")[0]["seq"] == 2


def test_the_timer_records_a_broken_chain_once(anchor_files):
    timer = audit_anchor.AnchorTimer(interval=3600)
    write_records(3)
    AuditRecord.objects.filter(seq=2).update(target="edited")
    timer.tick()
    timer.tick()
    failures = AuditRecord.objects.filter(action="audit.anchor", outcome="failed")
    assert failures.count() == 1
    assert "broken at record 2" in failures.get().details["reason"]
    assert not (anchor_files / "anchors.jsonl").exists()


def test_interval_zero_starts_no_timer(settings, monkeypatch):
    settings.AUDIT_ANCHOR_INTERVAL_SECONDS = 0
    monkeypatch.setattr(audit_anchor, "_timer", None)
    assert audit_anchor.start_timer() is None


# -- the audit page ---------------------------------------------------------------
def test_the_audit_page_shows_the_anchor_public_key(auditor_user, client):
    client.force_login(auditor_user)
    page = client.get("/audit/").content.decode()
    assert audit_anchor.public_key_text() in page
    assert "/audit/export.chain.jsonl" in page


def test_the_verify_button_checks_the_anchor_file_and_shows_a_cut_tail(auditor_user, client):
    client.force_login(auditor_user)
    write_records(6)
    call_command("audit", "anchor")
    anchored = AuditHead.objects.get().seq
    assert "Chain intact" in client.post("/audit/verify").content.decode()
    cut_tail(4)
    page = client.post("/audit/verify").content.decode()
    assert f"records 5..{anchored} are missing" in page
    entry = AuditRecord.objects.filter(action="audit.verify").last()
    assert entry.details["ok"] is False
