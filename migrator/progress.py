"""Publishing job progress: store it on the Job row, then fan it out.

Every change goes to the row first, so a page that connects late (or to
another portal process) reads the current state at once; then a typed event
goes to the channel layer groups ``jobs`` and ``job.<id>``.

Each event carries ``seq`` (1, 2, 3 … per job, gap-free, kept on the row as
``event_seq``, so it holds across portal processes) and ``published_at`` (Unix
time): a watcher whose snapshot said ``event_seq = n`` knows it must receive
n+1 … up to the final job's ``event_seq``, and can measure delivery latency.
"""
import json
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction
from django.db.models import F

from migrator.models import Job

ALL_JOBS = "jobs"


def job_group(job_id) -> str:
    return f"job.{job_id}"


def snapshot(job) -> dict:
    """The job as browsers and API clients see it."""
    return {
        "id": str(job.id), "kind": job.kind, "state": job.state, "stage": job.stage,
        "done_bytes": job.done_bytes, "total_bytes": job.total_bytes, "percent": job.percent,
        "guest": {"uuid": str(job.guest_uuid), "name": job.guest_name},
        "source_host": job.source_host.name if job.source_host else None,
        "destination_host": job.destination_host.name if job.destination_host else None,
        "image": str(job.image_id) if job.image_id else None,
        "requester": job.requester.get_username() if job.requester else None,
        "timeline": job.timeline, "rounds": job.rounds, "parameters": job.parameters,
        "result": job.result, "resolution": job.resolution, "error": job.error,
        "event_seq": job.event_seq,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def publish(job, event_type, extra=None):
    """Send ``{"type": event_type, "job": snapshot, ...extra}`` to every watcher."""
    layer = get_channel_layer()
    if layer is None:
        return
    job.event_seq = next_seq(job.pk)
    event = {"type": event_type, "seq": job.event_seq, "job": snapshot(job), **(extra or {}),
             "published_at": time.time()}
    # Encoded once here, not once per watcher: the layer copies each message for every
    # member of the group, and a string copies cheaply where nested dicts do not.
    message = {"type": "job.event", "requester_id": job.requester_id, "text": json.dumps(event)}
    async_to_sync(_send)(layer, job.id, message)


def next_seq(job_id) -> int:
    """Advance the job's event counter in the database and return the new value."""
    with transaction.atomic():
        Job.objects.filter(pk=job_id).update(event_seq=F("event_seq") + 1)
        return Job.objects.filter(pk=job_id).values_list("event_seq", flat=True).get()


async def _send(layer, job_id, message):
    await layer.group_send(ALL_JOBS, message)
    await layer.group_send(job_group(job_id), message)


def send_to_host(host_name, payload):
    """Deliver a command to a host's agent, whichever portal process holds its socket."""
    layer = get_channel_layer()
    async_to_sync(layer.group_send)(host_group(host_name),
                                    {"type": "agent.command", "payload": payload})


def host_group(host_name) -> str:
    return f"host.{host_name}"


def send_to_channel(channel_name, message):
    async_to_sync(get_channel_layer().send)(channel_name, message)

