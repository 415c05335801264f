"""Job events: gap-free sequence numbers and publish times, as watchers receive them."""
import time

import pytest
from asgiref.sync import sync_to_async

from migrator import orchestrate, progress
from migrator.models import Job
from tests.migrator.conftest import GUEST, connect_agent
from tests.migrator.test_consumers import as_request, jobs_socket

pytestmark = pytest.mark.django_db(transaction=True)


def progress_event(job, done):
    return {"type": "job.event", "job": str(job.id), "event": {
        "kind": "progress", "stage": "saving", "done_bytes": done, "total_bytes": 100}}


async def test_every_event_carries_the_next_seq_and_its_publish_time(enrolled, admin_user):
    agent = await connect_agent(enrolled["hostb"], "hostb")
    watcher = await jobs_socket(admin_user)
    assert (await watcher.connect())[0]
    await watcher.receive_json_from()  # the snapshot
    before = time.time()
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    await agent.receive_json_from(timeout=5)
    for done in (10, 20):
        await agent.send_json_to(progress_event(job, done))
    await agent.send_json_to({"type": "job.result", "job": str(job.id), "state": "failed",
                              "error": "disk on fire"})
    events = [await watcher.receive_json_from(timeout=5) for _ in range(4)]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["type"] for e in events] == ["state", "progress", "progress", "final"]
    assert all(before <= e["published_at"] <= time.time() for e in events)
    assert [e["job"]["event_seq"] for e in events] == [1, 2, 3, 4]
    assert (await Job.objects.aget(id=job.id)).event_seq == 4
    await agent.disconnect()
    await watcher.disconnect()


async def test_a_watcher_joining_mid_job_learns_the_seq_to_continue_from(enrolled, admin_user):
    agent = await connect_agent(enrolled["hostb"], "hostb")
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    await agent.receive_json_from(timeout=5)
    await agent.send_json_to(progress_event(job, 30))
    await agent.receive_nothing(timeout=0.3)
    watcher = await jobs_socket(admin_user, f"/ws/jobs/{job.id}/")
    assert (await watcher.connect())[0]
    snapshot = await watcher.receive_json_from(timeout=5)
    assert snapshot["jobs"][0]["event_seq"] == 2
    await agent.send_json_to(progress_event(job, 60))
    assert (await watcher.receive_json_from(timeout=5))["seq"] == 3
    await agent.disconnect()
    await watcher.disconnect()


def test_a_stale_full_save_does_not_move_the_seq_back(admin_user):
    job = Job.objects.create(kind="save", guest_uuid=GUEST["uuid"], requester=admin_user)
    stale = Job.objects.get(id=job.id)
    progress.publish(Job.objects.get(id=job.id), "state")
    progress.publish(Job.objects.get(id=job.id), "state")
    stale.stage = "saving"
    stale.save()
    fresh = Job.objects.get(id=job.id)
    assert fresh.event_seq == 2 and fresh.stage == "saving"


async def test_delivering_an_event_does_not_queue_on_the_database_thread(enrolled, admin_user,
                                                                         monkeypatch):
    import channels.consumer

    hops = []
    original = channels.consumer.aclose_old_connections
    monkeypatch.setattr(channels.consumer, "aclose_old_connections",
                        lambda: hops.append(1) or original())
    agent = await connect_agent(enrolled["hostb"], "hostb")
    watchers = [await jobs_socket(admin_user) for _ in range(3)]
    for watcher in watchers:
        assert (await watcher.connect())[0]
        await watcher.receive_json_from()
    job = await sync_to_async(orchestrate.request_save)(as_request(admin_user), GUEST["uuid"])
    await agent.receive_json_from(timeout=5)
    for watcher in watchers:
        assert (await watcher.receive_json_from(timeout=5))["seq"] == 1
    hops.clear()
    await agent.send_json_to(progress_event(job, 10))
    for watcher in watchers:
        assert (await watcher.receive_json_from(timeout=5))["seq"] == 2
    assert len(hops) == 1  # the agent's message; none for the three deliveries
    for socket in (agent, *watchers):
        await socket.disconnect()
