import threading

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from portal import audit
from portal.models import AuditRecord

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
