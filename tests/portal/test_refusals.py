"""record_refusal: refusals an outsider can repeat are aggregated per source and interval."""
import threading
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from portal import audit
from portal.models import AuditRecord, Outcome, RefusalWindow

ACTION = "test.refused"
STRANGER = audit.Actor("anonymous", "stranger")


def refuse(source="10.0.0.9", reason="bad credential", now=None, **details):
    return audit.record_refusal(ACTION, actor=STRANGER, source=source, target="endpoint",
                                source_ip="10.0.0.9", details={"reason": reason, **details},
                                now=now)


def records():
    return list(AuditRecord.objects.filter(action=ACTION).order_by("seq"))


def refusals_in_trail():
    return sum(r.details["refusals"] for r in records())


@pytest.mark.django_db
def test_first_refusal_is_written_at_once_and_the_rest_of_a_flood_only_counted():
    counts = [refuse() for _ in range(200)]
    assert counts == list(range(1, 201))
    [first] = records()
    assert (first.outcome, first.actor, first.target, first.source_ip) == (
        Outcome.DENIED, "stranger", "endpoint", "10.0.0.9")
    assert first.details == {"reason": "bad credential", "source": "10.0.0.9", "refusals": 1}
    assert RefusalWindow.objects.get().count == 200


@pytest.mark.django_db
def test_closed_interval_becomes_one_aggregate_at_the_next_refusal(settings):
    settings.AUDIT_REFUSAL_INTERVAL_SECONDS = 60
    t0 = timezone.now()
    for i in range(50):
        refuse(now=t0 + timedelta(seconds=i), reason=f"reason {i % 7}", stage="ticket")
    assert refuse(now=t0 + timedelta(seconds=61)) == 1  # a new interval
    first, aggregate, second = records()
    assert aggregate.details["aggregate"] is True
    assert aggregate.details["refusals"] == 49
    assert aggregate.details["source"] == "10.0.0.9"
    assert aggregate.details["first"] == (t0 + timedelta(seconds=1)).isoformat()
    assert aggregate.details["last"] == (t0 + timedelta(seconds=49)).isoformat()
    # a sample of distinct reasons, bounded
    assert aggregate.details["reasons"] == [f"ticket: reason {i}" for i in range(1, 6)]
    assert (aggregate.actor, aggregate.outcome) == ("stranger", Outcome.DENIED)
    assert second.details["refusals"] == 1
    assert refusals_in_trail() == 51
    assert audit.verify_chain().ok


@pytest.mark.django_db
def test_flush_writes_the_aggregate_of_a_source_that_went_quiet(settings):
    t0 = timezone.now()
    for _ in range(10):
        refuse(now=t0)
    assert audit.flush_refusals(t0 + timedelta(seconds=30)) == 0  # still open
    assert audit.flush_refusals(t0 + timedelta(seconds=61)) == 1
    assert [r.details["refusals"] for r in records()] == [1, 9]
    assert not RefusalWindow.objects.exists()
    assert audit.flush_refusals(t0 + timedelta(seconds=200)) == 0


@pytest.mark.django_db
def test_a_lone_refusal_leaves_no_aggregate(settings):
    t0 = timezone.now()
    refuse(now=t0)
    assert audit.flush_refusals(t0 + timedelta(seconds=61)) == 0
    assert len(records()) == 1
    assert not RefusalWindow.objects.exists()


@pytest.mark.django_db
def test_sources_are_counted_apart():
    for _ in range(5):
        refuse("10.0.0.1")
        refuse("10.0.0.2")
    assert [r.details["source"] for r in records()] == ["10.0.0.1", "10.0.0.2"]
    assert sorted(RefusalWindow.objects.values_list("count", flat=True)) == [5, 5]


@pytest.mark.django_db
def test_a_flood_from_many_sources_is_bounded_too(settings):
    settings.AUDIT_REFUSAL_MAX_SOURCES = 3
    t0 = timezone.now()
    for i in range(100):
        refuse(f"10.0.1.{i}", now=t0)
    audit.flush_refusals(t0 + timedelta(seconds=61))
    written = records()
    # three sources of their own, then everyone else in one shared window: 3 + 1 + 1
    assert len(written) == 5
    assert written[3].details["source"] == "10.0.1.3"  # who opened the shared window
    assert written[4].details["source"] == audit.OTHER_SOURCES
    assert refusals_in_trail() == 100


@pytest.mark.django_db
def test_sweep_command_writes_closed_aggregates(settings, capsys):
    settings.AUDIT_REFUSAL_INTERVAL_SECONDS = 1
    t0 = timezone.now() - timedelta(seconds=5)
    for _ in range(3):
        refuse(now=t0)
    call_command("sweep")
    assert "1 refusal aggregate(s) written" in capsys.readouterr().out
    assert refusals_in_trail() == 3


@pytest.mark.django_db
def test_reading_the_audit_trail_writes_closed_aggregates_first(settings, client,
                                                                 auditor_user):
    t0 = timezone.now() - timedelta(seconds=120)
    for _ in range(4):
        refuse(now=t0)
    client.force_login(auditor_user)
    answer = client.get("/api/v1/audit/", {"action": ACTION})
    assert answer.status_code == 200
    assert [r["details"]["refusals"] for r in answer.json()["results"]] == [3, 1]


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_lose_no_refusal_and_write_one_record():
    errors, barrier = [], threading.Barrier(4)

    def flood():
        from django.db import connections
        try:
            barrier.wait()
            for _ in range(50):
                refuse()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(records()) == 1
    assert RefusalWindow.objects.get().count == 200
    audit.flush_refusals(timezone.now() + timedelta(seconds=61))
    assert refusals_in_trail() == 200
    assert audit.verify_chain().ok


@pytest.mark.django_db
def test_a_reported_count_is_added_whole():
    t0 = timezone.now()
    assert audit.record_refusal(ACTION, actor=STRANGER, source="hostc", count=40,
                                details={"reason": "x"}, now=t0) == 40
    assert audit.record_refusal(ACTION, actor=STRANGER, source="hostc", count=2,
                                details={"reason": "x"}, now=t0) == 42
    audit.flush_refusals(t0 + timedelta(seconds=61))
    assert [r.details["refusals"] for r in records()] == [1, 41]
