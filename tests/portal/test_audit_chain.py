import os
import subprocess
import sys
import threading
import time

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from portal import audit
from portal.models import AuditRecord
from tests.support.server import ROOT, database_url_named

pytestmark = pytest.mark.django_db(transaction=True)


def write_records(n):
    for i in range(n):
        audit.record("test.event", actor=audit.Actor.system(), target=f"thing:{i}",
                     details={"i": i})


def assert_broken_at(seq):
    result = audit.verify_chain()
    assert not result.ok
    assert result.broken_seq == seq, result
    with pytest.raises(CommandError, match=f"broken at record {seq}"):
        call_command("audit", "verify")


def test_untouched_chain_verifies(capsys):
    write_records(5)
    assert audit.verify_chain().ok
    call_command("audit", "verify")
    assert "intact: 5 records" in capsys.readouterr().out


def test_records_appended_in_bulk_continue_the_same_chain():
    write_records(2)
    added = audit.record_many({"action": "bulk.event", "actor": audit.Actor.system(),
                               "target": f"thing:{i}", "details": {"i": i}} for i in range(3))
    write_records(1)
    result = audit.verify_chain()
    assert added == 3 and result.ok and result.count == 6
    assert list(AuditRecord.objects.values_list("action", flat=True)) == [
        "test.event", "test.event", "bulk.event", "bulk.event", "bulk.event", "test.event"]


def test_a_bulk_record_edited_afterwards_breaks_the_chain():
    audit.record_many({"action": "bulk.event", "actor": audit.Actor.system()} for _ in range(3))
    AuditRecord.objects.filter(seq=2).update(target="forged")
    assert_broken_at(2)


def test_empty_chain_verifies():
    result = audit.verify_chain()
    assert result.ok and result.count == 0


def test_edited_field_is_detected():
    write_records(5)
    AuditRecord.objects.filter(seq=3).update(outcome="denied")
    assert_broken_at(3)


def test_edited_details_are_detected():
    write_records(5)
    AuditRecord.objects.filter(seq=2).update(details={"i": 99})
    assert_broken_at(2)


def test_deleted_row_is_detected():
    write_records(5)
    AuditRecord.objects.filter(seq=3).delete()
    assert_broken_at(3)


def test_deleted_last_row_is_detected():
    write_records(5)
    AuditRecord.objects.filter(seq=5).delete()
    assert_broken_at(5)


def test_inserted_row_is_detected():
    write_records(5)
    # Make room in the middle, as an attacker would, and insert a forged record.
    for seq in range(5, 2, -1):
        AuditRecord.objects.filter(seq=seq).update(seq=seq + 1)
    forged = AuditRecord.objects.get(seq=2)
    forged.pk, forged.seq, forged.action = None, 3, "forged.event"
    forged.save()
    assert_broken_at(3)


def test_appended_row_is_detected():
    write_records(3)
    forged = AuditRecord.objects.get(seq=3)
    forged.pk, forged.seq = None, 4
    forged.save()
    assert_broken_at(4)


def test_a_row_numbered_before_the_first_is_detected():
    write_records(3)
    forged = AuditRecord.objects.get(seq=1)
    forged.pk, forged.seq = None, 0
    forged.save()
    assert_broken_at(1)


def test_swapped_rows_are_detected():
    write_records(5)
    a, b = AuditRecord.objects.get(seq=2), AuditRecord.objects.get(seq=4)
    with connection.cursor() as cursor:
        table = AuditRecord._meta.db_table
        cursor.execute(f"UPDATE {table} SET seq = -1 WHERE id = %s", [a.id])
        cursor.execute(f"UPDATE {table} SET seq = 2 WHERE id = %s", [b.id])
        cursor.execute(f"UPDATE {table} SET seq = 4 WHERE id = %s", [a.id])
    assert_broken_at(2)


def test_eight_concurrent_writers_leave_a_valid_chain():
    errors = []

    def writer():
        try:
            write_records(25)
        except Exception as exc:  # surfaced below: a thread's failure must fail the test
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = audit.verify_chain()
    assert result.ok and result.count == 200
    assert sorted(AuditRecord.objects.values_list("seq", flat=True)) == list(range(1, 201))


WRITER = """
import os, sys, time
import django
django.setup()
from portal import audit
ready, go, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
for i in range(count):
    audit.record("test.process", actor=audit.Actor.system(f"writer-{os.getpid()}"),
                 target=f"thing:{i}")
"""


@pytest.mark.skipif(connection.vendor != "postgresql",
                    reason="several writer processes share a database only on PostgreSQL "
                           "(SQLite is the one-process set-up; the thread test covers it)")
def test_concurrent_writer_processes_on_postgresql_leave_a_valid_chain(tmp_path, settings):
    """Like several portal processes: separate interpreters, connections and transactions."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings",
           "DATABASE_URL": database_url_named(connection.settings_dict["NAME"]),
           "BERTH_AUDIT_KEY": settings.AUDIT_KEY.decode(), "BERTH_DATA_DIR": str(tmp_path)}
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"ready-{i}"),
                                 str(go), "40"], cwd=ROOT, env=env) for i in range(5)]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{i}").exists() for i in range(5)):
            assert time.monotonic() < deadline, "writers did not start"
            assert all(w.poll() is None for w in writers), "a writer died before writing"
            time.sleep(0.02)
        go.touch()  # all at once, onto an empty chain: the head row itself is contended
        assert [w.wait(timeout=120) for w in writers] == [0] * 5
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    result = audit.verify_chain()
    assert result.ok and result.count == 200, result
    assert sorted(AuditRecord.objects.values_list("seq", flat=True)) == list(range(1, 201))
    assert len(set(AuditRecord.objects.values_list("actor", flat=True))) == 5
