import csv
import io
import json

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from portal import audit
from portal.models import AuditRecord, Outcome


@pytest.fixture
def records(db):
    for i in range(120):
        audit.record("image.download" if i % 2 else "image.view",
                     actor=audit.Actor("user", "alice" if i % 3 else "bob"),
                     target=f"image:{i}", outcome=Outcome.DENIED if i % 10 == 0 else "allowed")


def _streamed(response):
    async def collect():
        return b"".join([chunk async for chunk in response.streaming_content])

    # async_to_sync keeps the generator's database calls on this thread's connection.
    return async_to_sync(collect)().decode()


def test_audit_page_paginates(auditor_client, records):
    page = auditor_client.get("/audit/")
    assert b"Page 1 of 3" in page.content
    assert auditor_client.get("/audit/?page=3").status_code == 200


def test_audit_page_filters_by_outcome_and_actor(auditor_client, records):
    page = auditor_client.get("/audit/?outcome=denied&actor=bob")
    expected = AuditRecord.objects.filter(outcome="denied", actor="bob").count()
    assert page.context["page"].paginator.count == expected > 0


def test_invalid_filter_shows_a_message(auditor_client, records):
    page = auditor_client.get("/audit/?since=yesterday-ish")
    assert page.status_code == 200
    assert b"Enter a valid date/time" in page.content


def test_verify_chain_button_reports_intact_chain(auditor_client, records):
    page = auditor_client.post("/audit/verify")
    assert b"Chain intact" in page.content


def test_verify_chain_button_reports_tampering(auditor_client, records):
    AuditRecord.objects.filter(seq=7).update(target="image:elsewhere")
    page = auditor_client.post("/audit/verify")
    assert b"Chain broken at record 7" in page.content


def test_export_json_lines_follows_filters(auditor_client, records):
    response = auditor_client.get("/audit/export.jsonl?action=image.view")
    assert response["Content-Type"] == "application/x-ndjson"
    rows = [json.loads(line) for line in _streamed(response).splitlines()]
    assert len(rows) == 60
    assert all(row["action"] == "image.view" for row in rows)
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)


def test_export_csv_has_every_record(auditor_client, records):
    response = auditor_client.get("/audit/export.csv")
    rows = list(csv.DictReader(io.StringIO(_streamed(response))))
    assert len(rows) == AuditRecord.objects.count() > 120
    assert set(rows[0]) >= {"seq", "time", "actor", "action", "target", "outcome", "mac"}


def test_export_is_itself_audited(auditor_client, records):
    _streamed(auditor_client.get("/audit/export.csv"))
    entry = AuditRecord.objects.filter(action="audit.export").get()
    assert entry.actor == "oscar"


def test_unknown_export_format_is_404(auditor_client, records):
    assert auditor_client.get("/audit/export.xml").status_code == 404


def test_api_lists_filters_and_paginates(auditor_client, records):
    body = auditor_client.get("/api/v1/audit/?action=image.download&page=2").json()
    assert body["count"] == 60
    assert len(body["results"]) == 10
    assert body["results"][0]["action"] == "image.download"


def test_api_rejects_bad_filters_with_a_reason(auditor_client, records):
    response = auditor_client.get("/api/v1/audit/?outcome=maybe")
    assert response.status_code == 400
    assert "outcome" in response.json()["detail"]


def test_api_is_read_only(auditor_client, admin_client, records):
    assert auditor_client.post("/api/v1/audit/", {}).status_code == 405
    assert admin_client.delete("/api/v1/audit/").status_code == 405


def test_auditor_page_is_refused_to_anonymous(records):
    assert Client().get("/audit/export.csv").status_code == 302
