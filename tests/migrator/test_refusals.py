"""Agents' relocation refusals reach the audit trail (relocation.refused), aggregated."""
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from portal import audit
from portal.models import AuditRecord
from tests.migrator.conftest import connect_agent, hello

pytestmark = pytest.mark.django_db(transaction=True)


def report(**fields):
    return {"type": "relocation.refused", "stage": "authorize", "peer": "hostd",
            "address": "10.0.0.5", "guest": None, "count": 1,
            "reason": "peer 'hostd' at 10.0.0.5 is not on the relocation allow-list",
            **fields}


async def refused_records():
    return [r async for r in AuditRecord.objects.filter(
        action="relocation.refused").order_by("seq")]


async def fence(agent):
    """The consumer handles an agent's messages in order: once a hello is answered,
    everything sent before it has been recorded."""
    await agent.send_json_to(hello("hostc"))
    assert (await agent.receive_json_from(timeout=5))["type"] == "welcome"


async def test_a_reported_refusal_is_audited_with_stage_peer_address_and_reason(enrolled):
    agent = await connect_agent(enrolled["hostc"], "hostc")
    await agent.send_json_to(report())
    await fence(agent)
    [entry] = await refused_records()
    assert (entry.actor_kind, entry.actor, entry.target) == ("host", "host:hostc", "host:hostc")
    assert (entry.outcome, entry.source_ip) == ("denied", "10.0.0.5")
    assert entry.details["stage"] == "authorize" and entry.details["peer"] == "hostd"
    assert "allow-list" in entry.details["reason"] and entry.details["refusals"] == 1
    await agent.disconnect()


async def test_a_flood_of_reports_is_one_record_and_one_aggregate(enrolled):
    agent = await connect_agent(enrolled["hostc"], "hostc")
    for _ in range(100):
        await agent.send_json_to(report(stage="ticket", peer="hostb",
                                        reason="unknown, used or expired ticket"))
    await agent.send_json_to(report(stage="tls", peer=None, address="10.0.0.66", count=400,
                                    reason="TLS handshake failed: NO_CERTIFICATE"))
    await fence(agent)
    await agent.disconnect()
    assert len(await refused_records()) == 2  # one per source so far
    await sync_to_async(audit.flush_refusals)(timezone.now() + timedelta(minutes=2))
    records = await refused_records()
    assert len(records) == 4
    by_source = {}
    for entry in records:
        by_source.setdefault(entry.details["source"], []).append(entry.details["refusals"])
    assert by_source == {"hostc:hostb": [1, 99], "hostc:10.0.0.66": [1, 399]}


async def test_what_an_agent_reports_is_held_to_shape(enrolled):
    agent = await connect_agent(enrolled["hostc"], "hostc")
    await agent.send_json_to(report(stage="<script>", peer="x" * 5000, address="not an ip",
                                    count="many", reason=None))
    await fence(agent)
    [entry] = await refused_records()
    assert entry.details["stage"] == "unknown" and len(entry.details["peer"]) == 200
    assert entry.source_ip is None and entry.details["reason"] == "no reason given"
    await agent.disconnect()
