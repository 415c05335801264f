"""The agent socket and the job sockets, through the real routing."""
import asyncio
import time
from datetime import timedelta

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.test import Client, RequestFactory
from django.utils import timezone

from migrator import orchestrate, revocation
from migrator.enrollment import revoke
from migrator.models import Guest, Host, Job, JobState
from portal import audit
from portal.models import AuditRecord
from portal.routing import websocket_application
from tests.migrator.conftest import GUEST, agent_socket, connect_agent, hello
from tests.support.channels_testing import WebsocketCommunicator

pytestmark = pytest.mark.django_db(transaction=True)


async def jobs_socket(user, path="/ws/jobs/"):
    """A browser's socket through the real routing: origin check and session cookie."""
    headers = [(b"origin", b"http://127.0.0.1")]
    if user.is_authenticated:
        cookie = await sync_to_async(_session_cookie)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(websocket_application, path, headers=headers)


def _session_cookie(user):
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


def as_request(user):
    """An admin's request from a session that has passed its second factor."""
    request = RequestFactory().post("/", REMOTE_ADDR="127.0.0.1")
    request.user = user
    user.is_verified = lambda: True
    return request


async def test_unknown_credential_is_refused_and_audited(enrolled):
    socket = agent_socket("hc_not-a-real-credential")
    connected, _ = await socket.connect()
    assert not connected
    assert await AuditRecord.objects.filter(action="host.connect", outcome="denied").aexists()


async def test_missing_credential_is_refused(enrolled):
    connected, _ = await agent_socket(None).connect()
    assert not connected


async def test_hello_brings_the_host_online_with_its_guests(enrolled):
    socket = await connect_agent(enrolled["hostb"], "hostb")
    guest = await Guest.objects.select_related("host").aget(uuid=GUEST["uuid"])
    assert guest.host.name == "hostb" and guest.domain_id == 1
    assert (await Guest.objects.acount()) == 1
    await socket.disconnect()
    host = await sync_to_async(lambda: Guest.objects.get(uuid=GUEST["uuid"]).host)()
    assert host.online is False


async def test_revoked_host_is_cut_off(enrolled):
    await sync_to_async(revoke)("hostb")
    connected, _ = await agent_socket(enrolled["hostb"]).connect()
    assert not connected


async def revoke_elsewhere(name):
    """What `hosts revoke` in its own process does to this one: its row changes, and no
    message reaches this process's channel layer."""
    await Host.objects.filter(name=name).aupdate(revoked_at=timezone.now())


async def closed_with(socket, timeout):
    output = await socket.receive_output(timeout=timeout)
    assert output["type"] == "websocket.close", output
    return output["code"]


async def test_what_a_host_sends_after_its_revocation_elsewhere_is_not_applied(enrolled,
                                                                              monkeypatch):
    monkeypatch.setattr(revocation, "CHECK_INTERVAL", 60)  # the message check alone
    socket = await connect_agent(enrolled["hostb"], "hostb", guests=())
    await revoke_elsewhere("hostb")
    await socket.send_json_to({"type": "inventory", "capacity": {}, "guests": [GUEST]})
    assert await closed_with(socket, 2) == 4003
    assert not await Guest.objects.filter(uuid=GUEST["uuid"]).aexists()
    cut = await AuditRecord.objects.aget(action="host.cut_off")
    assert cut.outcome == "denied" and cut.actor == "host:hostb"
    assert cut.details == {"reason": "the host was revoked", "dropped": "inventory"}


async def test_a_silent_host_revoked_elsewhere_is_closed_within_a_second(enrolled):
    socket = await connect_agent(enrolled["hostb"], "hostb", guests=())
    await revoke_elsewhere("hostb")
    started = time.monotonic()
    assert await closed_with(socket, 2) == 4003
    assert time.monotonic() - started <= 1.0 + revocation.CHECK_INTERVAL
    assert await AuditRecord.objects.filter(action="host.cut_off",
                                            target="host:hostb").acount() == 1


async def test_other_agents_are_told_a_revocation_made_elsewhere_within_a_second(enrolled):
    hostc = await connect_agent(enrolled["hostc"], "hostc", guests=())
    await revoke_elsewhere("hostb")
    serial = int((await Host.objects.aget(name="hostb")).cert_serial)
    message = await hostc.receive_json_from(timeout=1.0 + revocation.CHECK_INTERVAL)
    assert message == {"type": "revocations", "revoked_serials": [serial]}
    await hostc.receive_nothing(timeout=3 * revocation.CHECK_INTERVAL)  # told once
    await hostc.disconnect()


async def test_welcome_carries_the_revocations_from_the_database(enrolled):
    await revoke_elsewhere("hostb")  # not in this portal's CA directory: another machine's
    serial = int((await Host.objects.aget(name="hostb")).cert_serial)
    socket = agent_socket(enrolled["hostc"])
    assert (await socket.connect())[0]
    await socket.send_json_to(hello("hostc", guests=()))
    welcome = await socket.receive_json_from(timeout=5)
    assert welcome["type"] == "welcome" and welcome["revoked_serials"] == [serial]
    await socket.disconnect()


async def test_save_command_reaches_the_agent_and_events_reach_watchers(enrolled, admin_user):
    agent = await connect_agent(enrolled["hostb"], "hostb")
    watcher = await jobs_socket(admin_user)
    assert (await watcher.connect())[0]
    assert (await watcher.receive_json_from())["type"] == "snapshot"
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    command = await agent.receive_json_from(timeout=5)
    assert command["action"] == "save" and command["job"] == str(job.id)
    assert command["upload"]["credential"].startswith("jc_")
    assert (await watcher.receive_json_from(timeout=5))["job"]["state"] == "queued"
    await agent.send_json_to({"type": "job.event", "job": str(job.id), "event": {
        "kind": "progress", "stage": "saving", "done_bytes": 50, "total_bytes": 100}})
    event = await watcher.receive_json_from(timeout=5)
    assert event["job"]["state"] == "running" and event["job"]["percent"] == 50
    await agent.send_json_to({"type": "job.result", "job": str(job.id), "state": "failed",
                              "error": "disk on fire"})
    assert await agent.receive_json_from(timeout=5) == {"type": "ack", "job": str(job.id)}
    final = await watcher.receive_json_from(timeout=5)
    assert final["type"] == "final" and final["job"]["error"] == "disk on fire"
    await agent.disconnect()
    await watcher.disconnect()


async def test_a_watcher_connecting_mid_job_gets_the_current_state(enrolled, admin_user):
    agent = await connect_agent(enrolled["hostb"], "hostb")
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    await agent.receive_json_from(timeout=5)
    await agent.send_json_to({"type": "job.event", "job": str(job.id), "event": {
        "kind": "progress", "stage": "saving", "done_bytes": 70, "total_bytes": 100}})
    await agent.send_json_to({"type": "inventory", "capacity": {}, "guests": [GUEST]})
    await agent.receive_nothing(timeout=0.3)
    watcher = await jobs_socket(admin_user, f"/ws/jobs/{job.id}/")
    assert (await watcher.connect())[0]
    snapshot = await watcher.receive_json_from(timeout=5)
    assert snapshot["jobs"][0]["percent"] == 70 and snapshot["jobs"][0]["stage"] == "saving"
    await agent.disconnect()
    await watcher.disconnect()


async def test_auditor_sees_job_states_but_the_socket_is_read_only(enrolled, admin_user,
                                                                    auditor_user):
    agent = await connect_agent(enrolled["hostb"], "hostb")
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    watcher = await jobs_socket(auditor_user, f"/ws/jobs/{job.id}/")
    assert (await watcher.connect())[0]
    assert (await watcher.receive_json_from())["jobs"][0]["id"] == str(job.id)
    await watcher.send_json_to({"action": "save", "guest": GUEST["uuid"]})
    assert (await watcher.receive_json_from())["type"] == "error"
    assert await Job.objects.acount() == 1
    await agent.disconnect()
    await watcher.disconnect()


async def test_anonymous_job_sockets_are_refused(enrolled):
    from django.contrib.auth.models import AnonymousUser

    assert not (await (await jobs_socket(AnonymousUser())).connect())[0]


async def test_a_watcher_waits_through_unknown_until_the_agents_late_report_settles_it(
        enrolled, admin_user, settings):
    """The agent vanishes mid-save; the portal gives up: watchers see "unknown" as a
    state event, not "final". The agent comes back with the save's result in its
    hello: the job settles succeeded and watchers get the final event."""
    from migrator import inventory

    agent = await connect_agent(enrolled["hostb"], "hostb")
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    await agent.receive_json_from(timeout=5)
    await agent.disconnect()
    watcher = await jobs_socket(admin_user, f"/ws/jobs/{job.id}/")
    assert (await watcher.connect())[0]
    assert (await watcher.receive_json_from(timeout=5))["jobs"][0]["state"] == "queued"
    settings.JOB_AGENT_TIMEOUT_SECONDS = 0
    assert await sync_to_async(inventory.expire_stale_jobs)() == 1
    event = await watcher.receive_json_from(timeout=5)
    assert (event["type"], event["job"]["state"]) == ("state", "unknown")
    assert "went away" in event["job"]["result"]["unknown"]["reason"]
    back = await connect_agent(enrolled["hostb"], "hostb", guests=(), results=[
        {"type": "job.result", "job": str(job.id), "state": "succeeded", "result": {}}])
    event = await watcher.receive_json_from(timeout=5)
    assert (event["type"], event["job"]["state"]) == ("final", "succeeded")
    assert event["job"]["result"]["settled"]["by"] == "host:hostb"
    await back.disconnect()
    await watcher.disconnect()


async def test_outsider_cannot_watch_someone_elses_job(enrolled, admin_user, outsider_user):
    agent = await connect_agent(enrolled["hostb"], "hostb")
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    assert not (await (await jobs_socket(outsider_user, f"/ws/jobs/{job.id}/")).connect())[0]
    await agent.disconnect()


async def test_agent_that_vanishes_leaves_its_job_unknown_after_the_timeout(enrolled, admin_user,
                                                                   settings):
    from migrator import inventory

    agent = await connect_agent(enrolled["hostb"], "hostb")
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    await agent.disconnect()
    settings.JOB_AGENT_TIMEOUT_SECONDS = 0
    assert await sync_to_async(inventory.expire_stale_jobs)() == 1
    job = await Job.objects.aget(id=job.id)
    assert job.state == JobState.UNKNOWN and "went away" in job.error


def socket_from(address, credential):
    socket = agent_socket(credential)
    socket.scope["client"] = (address, 40000)
    return socket


async def denied_connects():
    return [r async for r in AuditRecord.objects.filter(action="host.connect",
                                                        outcome="denied").order_by("seq")]


async def test_a_burst_of_bad_handshakes_writes_a_bounded_number_of_audit_rows(enrolled):
    for i in range(200):
        connected, _ = await socket_from("10.9.9.9", f"hc_guess-{i}").connect()
        assert not connected
    # One record at once; the other 199 are counted and become one aggregate.
    [first] = await denied_connects()
    assert first.source_ip == "10.9.9.9" and first.details["refusals"] == 1
    await sync_to_async(audit.flush_refusals)(timezone.now() + timedelta(minutes=2))
    first, aggregate = await denied_connects()
    assert aggregate.details["refusals"] == 199 and aggregate.source_ip == "10.9.9.9"
    assert set(aggregate.details["reasons"]) == {
        "missing, unknown or revoked host credential",
        "more than 10 refused attempts from this address in the interval: refused "
        "without checking the credential"}


async def test_beyond_the_limit_an_address_is_refused_without_its_credential_being_checked(
        enrolled, settings):
    settings.AGENT_CONNECT_FAILURE_LIMIT = 3
    settings.AUDIT_REFUSAL_INTERVAL_SECONDS = 1
    for _ in range(3):
        assert not (await socket_from("10.9.9.9", "hc_wrong").connect())[0]
    # Even the right credential, from that address, until the interval ends.
    assert not (await socket_from("10.9.9.9", enrolled["hostb"]).connect())[0]
    # Another address is not affected.
    good = socket_from("10.9.9.10", enrolled["hostb"])
    assert (await good.connect())[0]
    await good.disconnect()
    await asyncio.sleep(1.1)
    again = socket_from("10.9.9.9", enrolled["hostb"])
    assert (await again.connect())[0]
    await again.disconnect()


@pytest.mark.slow
def test_real_portal_a_flood_of_bad_agent_handshakes_writes_two_audit_rows(tmp_path):
    """Issue 14, 5: 200 unauthenticated handshakes in about a second wrote 200 rows."""
    from tests.support.server import PortalServer

    (tmp_path / "data").mkdir()
    interval = 10  # long enough for the burst on a loaded machine: one interval
    portal = PortalServer(tmp_path / "data",
                          {"BERTH_AUDIT_REFUSAL_INTERVAL_SECONDS": str(interval)}).start()
    try:
        token = portal.issue_token("auditor", "audit:read")
        started = time.monotonic()
        refused = asyncio.run(bad_handshakes(portal.port, 200))
        elapsed = time.monotonic() - started
        assert refused == 200 and elapsed < interval
        count, rows = denied_via_api(portal, token)
        assert count == 1 and rows[0]["details"]["refusals"] == 1
        # The interval closes; reading the trail then writes its aggregate.
        time.sleep(max(0.0, started + interval + 0.5 - time.monotonic()))
        count, rows = denied_via_api(portal, token)
        assert [r["details"]["refusals"] for r in rows] == [199, 1]
        print(f"200 bad handshakes in {elapsed:.2f} s -> {len(rows)} audit rows")
    finally:
        portal.stop()


async def bad_handshakes(port, count, concurrency=20):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    refused, gate = 0, asyncio.Semaphore(concurrency)

    async def one(i):
        nonlocal refused
        async with gate:
            try:
                async with connect(f"ws://127.0.0.1:{port}/ws/agent/", additional_headers={
                        "Authorization": f"Host hc_guess-{i}"}, open_timeout=30):
                    pass
            except InvalidStatus as exc:
                refused += exc.response.status_code == 403

    await asyncio.gather(*(one(i) for i in range(count)))
    return refused


def denied_via_api(portal, token):
    answer = httpx.get(f"{portal.url}/api/v1/audit/",
                       params={"action": "host.connect", "outcome": "denied"},
                       headers={"Authorization": f"Token {token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["count"], answer.json()["results"]
