"""What agents tell the portal: host facts, guests, job progress and results.

Plain synchronous functions; the agent consumer calls them through
``database_sync_to_async``. Agents are trusted only about their own host and
the jobs the portal gave them.
"""
import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrator import claims, indoubt, progress
from migrator.models import Guest, Job, JobKind, JobState
from portal import audit
from portal.models import ActorKind, Outcome
from vault import service as vault_service
from vault.models import SavedImage

log = logging.getLogger(__name__)
HOST_FACTS = ("arch", "driver", "subnet")


def host_actor(host):
    return audit.Actor(ActorKind.HOST, f"host:{host.name}")


def connected(host, channel_name, hello):
    """Record a (re)connected agent and its facts; returns the job ids to ack."""
    capacity = hello.get("capacity", {})
    host.online, host.channel_name, host.last_seen = True, channel_name, timezone.now()
    for field in HOST_FACTS:
        if hello.get(field):
            setattr(host, field, str(hello[field])[:64])
    host.virt_extensions = list(hello.get("virt_extensions", host.virt_extensions))
    host.storage = list(hello.get("storage", host.storage))
    _apply_capacity(host, capacity)
    _seen_with_guests(host, hello.get("guests", []))
    acks = [record_result(host, result) for result in hello.get("results", [])]
    # A migration the agent holds in doubt is alive too: the resolution ends it.
    held = {r.get("job") for r in hello.get("in_doubt") or [] if isinstance(r, dict)}
    _fail_lost_jobs(host, {j.get("job") for j in hello.get("jobs", [])} | held, set(acks))
    _in_doubt_reports(host, hello.get("in_doubt") or [])
    return [a for a in acks if a]


@transaction.atomic
def _in_doubt_reports(host, records):
    """Migrations the agent holds in doubt (kept across its restarts), and
    resolutions that waited for this host to come back."""
    noted = set()
    for record in records:
        job = _job_of(host, record.get("job")) if isinstance(record, dict) else None
        if job is not None and job.kind == JobKind.MIGRATE:
            indoubt.note_in_doubt(job, indoubt.side_of(job, host), record.get("reason", ""))
            noted.add(job.id)
    indoubt.reconnected(host, exclude=noted)


def _apply_capacity(host, capacity):
    for field, key in (("memory_mib", "memory_mib"), ("used_mib", "used_mib"),
                       ("reserved_mib", "reserved_mib"), ("disk_gib", "disk_gib")):
        if isinstance(capacity.get(key), int) and capacity[key] >= 0:
            setattr(host, field, capacity[key])


def heartbeat(host, message):
    host.last_seen = timezone.now()
    _apply_capacity(host, message.get("capacity", {}))
    _seen_with_guests(host, message.get("guests", []), update_fields=[
        "last_seen", "memory_mib", "used_mib", "reserved_mib", "disk_gib"])


@transaction.atomic
def _seen_with_guests(host, guests, update_fields=None):
    """The host's new last_seen and its guest list, together: a restore checks that a
    host was seen after a job it gave up on (orchestrate), and must then find the
    guests it reported."""
    host.save(update_fields=update_fields)
    sync_guests(host, guests)


@transaction.atomic
def sync_guests(host, reported):
    """Make the portal's guest rows for ``host`` match the agent's list, as far as the
    host speaks for itself (migrator.claims): a guest the portal places on another host,
    or in flight under a job without this host, is a refused claim and moves nothing.

    A guest arriving by live migration is listed by its destination (as incoming)
    before it runs there; until then the source's word stands. Otherwise the row would
    follow the incoming copy, and a failed migration would leave it on no host: free
    to be restored while its source still runs it. Once it runs on the destination,
    that is believed at once, even if the job's result is late (a portal restart).
    """
    arriving = _arriving_guests(host)
    seen = set()
    for info in reported:
        try:
            fields = claims.guest_fields(info)
            if fields["uuid"] in arriving and fields["state"] != "running":
                continue
            known = Guest.objects.select_for_update(of=("self",)).select_related(
                "host").filter(uuid=fields["uuid"]).first()
            reason = claims.refusal(host, known) if known is not None else ""
            if reason and claims.leftover(host, known, fields):
                continue
            if reason:
                claims.refuse_claim(host, known, info, reason)
                continue
            guest = claims.place_guest(host, info)
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed guest report from %s", host.name)
            continue
        seen.add(guest.uuid)
    Guest.objects.filter(host=host).exclude(uuid__in=seen).update(
        host=None, domain_id=None, state="", active=False)


def _arriving_guests(host):
    in_flight = (JobState.QUEUED, JobState.RUNNING, JobState.IN_DOUBT)
    return {str(uuid) for uuid in Job.objects.filter(
        kind=JobKind.MIGRATE, destination_host=host, state__in=in_flight,
    ).values_list("guest_uuid", flat=True)}


def _job_of(host, job_id):
    job = Job.objects.select_for_update().filter(id=job_id).first()
    if job is None or host.id not in (job.source_host_id, job.destination_host_id):
        log.warning("%s reported on job %s, which is not its own", host.name, job_id)
        return None
    return job


# How far a migration is, by stage: the bar moves on stages and rounds, never back.
MIGRATION_PROGRESS = {"pre-migration": 0.02, "reservation": 0.05, "pre-copy": 0.10,
                      "stop-and-copy": 0.85, "commitment": 0.95, "activation": 0.98}
ROUND_FIELDS = ("round", "pages_sent", "dirty_pages", "dirty_rate", "bandwidth_mbps",
                "expected_downtime_ms", "duration_s", "round_bytes", "bytes_sent", "throttle")


@transaction.atomic
def record_event(host, message):
    job = _job_of(host, message.get("job"))
    event = message.get("event") or {}
    kind = str(event.get("kind", "progress"))
    if job is not None and job.kind == JobKind.MIGRATE and kind in ("holding", "resolved",
                                                                    "in_doubt"):
        _in_doubt_event(host, job, kind, event)  # also for a job already failed
        if kind != "in_doubt" or job.is_final:
            return
    if job is None or job.is_final:
        return
    if job.kind == JobKind.MIGRATE and host.id == job.destination_host_id:
        _destination_event(job, kind, event)
    else:
        _apply_event(job, kind, event)
    job.save()
    transaction.on_commit(lambda: progress.publish(job, kind, {"event": _public(event)}))


def _in_doubt_event(host, job, kind, event):
    if kind == "in_doubt":
        indoubt.note_in_doubt(job, indoubt.side_of(job, host), event.get("reason", ""))
    else:
        indoubt.record_answer(job, host, event)


def _public(event):
    return {k: v for k, v in event.items() if k != "ticket"}


def _apply_event(job, kind, event):
    job.start()
    if event.get("stage"):
        job.enter_stage(str(event["stage"])[:32])
    if job.kind == JobKind.MIGRATE:
        _migration_progress(job, kind, event)
    elif "done_bytes" in event:
        job.record_progress(int(event["done_bytes"]), int(event.get("total_bytes") or 0))


def _migration_progress(job, kind, event):
    fraction = MIGRATION_PROGRESS.get(job.stage, 0)
    if kind == "round":
        entry = {k: event[k] for k in ROUND_FIELDS if k in event}
        job.rounds = [*job.rounds, entry]
        fraction = 0.10 + 0.70 * (1 - 0.5 ** int(event.get("round", 1)))
    job.record_progress(int(fraction * job.total_bytes), job.total_bytes)


def _destination_event(job, kind, event):
    """The destination speaks about its side: ready for the guest, or what happened."""
    from migrator.migration import destination_ready

    if kind == "expecting":
        job.start()
        transaction.on_commit(lambda: destination_ready(Job.objects.select_related(
            "source_host", "destination_host").get(id=job.id)))
    elif event.get("stage"):
        job.timeline = [*job.timeline, {"stage": f"destination: {event['stage']}"[:60],
                                        "at": timezone.now().isoformat()}]


@transaction.atomic
def record_result(host, message):
    """Apply a job's outcome once; return the job id to acknowledge."""
    job_id = message.get("job")
    job = _job_of(host, job_id)
    if job is None:
        return job_id  # unknown to us: ack so the agent stops resending it
    if job.kind == JobKind.SAVE and job.image_id and message.get("state") != JobState.SUCCEEDED:
        _discard_image_of_failed_save(host, job, message)
    if job.is_final:
        _late_report(host, job, message)
        return job_id
    state, error = message.get("state"), str(message.get("error", ""))[:2000]
    result = message.get("result") or {}
    if job.state == JobState.UNKNOWN:
        # The agent's word settles what the portal could not know (it was away).
        job.result = {**job.result, **result, "settled": {
            "state": state, "by": f"host:{host.name}", "at": timezone.now().isoformat()}}
        result = job.result
    if state == JobState.SUCCEEDED:
        job.finish(result)
        job.error = ""  # an unknown job's reason is no error once it succeeded
        _apply_outcome(host, job, result)
    elif state == JobState.ABORTED:
        job.abort(error or "aborted")
    elif state == JobState.IN_DOUBT and job.kind == JobKind.MIGRATE:
        job.hold_in_doubt(error or "no answer after ACTIVATE")
        job.result = result
        indoubt.note_in_doubt(job, "source", job.error)
    else:
        job.fail(error or "the agent reported a failure without a reason")
    job.save()
    if indoubt.is_open(job) and state != JobState.IN_DOUBT:
        transaction.on_commit(lambda: indoubt.ask(job.id))  # the source's answer changed
    _audit_outcome(host, job)
    transaction.on_commit(lambda: progress.publish(job, "final"))
    return job_id


def _discard_image_of_failed_save(host, job, message):
    """The agent says the save failed, yet its upload was stored: the portal's answer
    never reached the agent, so it put the guest back, and the guest runs on. The image
    is a copy its requester was never given, so it goes: a failed save leaves nothing."""
    image_id, error = job.image_id, str(message.get("error", ""))[:500]
    job.result = {**job.result, "discarded_image": str(image_id)}
    job.save(update_fields=["result"])
    reason = f"its save (job {job.id}) failed on {host.name}: {error}"

    def discard():
        image = SavedImage.objects.filter(id=image_id).first()
        if image is not None:
            vault_service.delete(image, reason=reason)
    transaction.on_commit(discard)


def _late_report(host, job, message):
    """A result for a job that had already ended - the portal failed it while its
    agent was connected (a command it never started), or an admin settled it while
    the agent was away. Final stays final, but the job shows what the agent says
    really happened, the audit trail records it, and a real success moves the
    guest's row at once instead of at the next inventory."""
    state = message.get("state")
    if state == job.state or "late_report" in job.result or state not in JobState.values:
        return  # the same outcome, re-sent; or one we already noted
    error = str(message.get("error", ""))[:2000]
    job.result = {**job.result, "late_report": {
        "state": state, "error": error, "host": host.name, "at": timezone.now().isoformat()}}
    job.save(update_fields=["result"])
    if state == JobState.SUCCEEDED:
        _apply_outcome(host, job, message.get("result") or {})
    log.warning("job %s was %s, but %s reports it %s", job.id, job.state, host.name, state)
    audit.record("job.late_result", actor=host_actor(host), target=f"job:{job.id}",
                 outcome=Outcome.ALLOWED if state == JobState.SUCCEEDED else Outcome.FAILED,
                 details={"job_state": job.state, "reported": state, "error": error})
    transaction.on_commit(lambda: progress.publish(job, "final"))


def _apply_outcome(host, job, result):
    """Make the guest rows agree with a finished job at once, not at the next inventory."""
    if job.kind == JobKind.SAVE:
        Guest.objects.filter(uuid=job.guest_uuid, host=host).update(
            host=None, domain_id=None, state="saved", active=False)
    elif job.kind in (JobKind.RESTORE, JobKind.MIGRATE) and isinstance(result.get("guest"),
                                                                        dict):
        owner = job.destination_host if job.kind == JobKind.MIGRATE else host
        try:
            claims.place_guest(owner, result["guest"])
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed guest in %s's result for job %s", host.name, job.id)


def _audit_outcome(host, job):
    action = {JobKind.SAVE: "guest.save", JobKind.RESTORE: "image.restore"}.get(
        job.kind, f"guest.{job.kind}")
    outcome = Outcome.ALLOWED if job.state == JobState.SUCCEEDED else Outcome.FAILED
    audit.record(f"{action}.{job.state}", actor=host_actor(host),
                 target=f"guest:{job.guest_uuid}", outcome=outcome,
                 details={"job": str(job.id), "error": job.error,
                          "image": str(job.image_id) if job.image_id else None})


def _fail_lost_jobs(host, running_ids, acked_ids):
    """Jobs we think run on this host that the agent no longer knows were lost; an
    unknown job (given up while the agent was away) is settled by what it says now."""
    in_flight = Job.objects.filter(Q(source_host=host) | Q(destination_host=host),
                                   state__in=(JobState.QUEUED, JobState.RUNNING,
                                              JobState.UNKNOWN))
    for job in in_flight:
        if str(job.id) in acked_ids:
            continue  # its result, just recorded, settled it
        if job.state == JobState.UNKNOWN:
            _settle_on_return(host, job, str(job.id) in running_ids)
            continue
        if str(job.id) in running_ids:
            continue
        if job.state == JobState.QUEUED and job.created_at > timezone.now() - timedelta(seconds=5):
            continue  # its command may be on its way to this very connection
        reason = f"the agent on {host.name} restarted and no longer knows this job"
        if job.kind == JobKind.SAVE and job.image_id:  # stored before the restart
            reason += "; the image it had uploaded is whole and kept"
        if job.fail(reason):
            job.save()
            progress.publish(job, "final")


def _settle_on_return(host, job, running):
    """The host of an unknown job is back. Still running it: the job runs again (and
    gets the abort an admin asked for meanwhile). Not knowing it: it did not happen -
    the agent keeps every result until the portal acknowledges it."""
    abort_requested = (job.result.get("unknown") or {}).get("abort_requested")
    if running:
        job.start()
        job.save()
        if abort_requested:
            progress.send_to_host(host.name, {
                "type": "command", "job": str(job.id), "action": "abort",
                "reason": job.result["unknown"]["reason"]})
        progress.publish(job, "state")
        return
    reason = (f"the agent on {host.name} came back and does not know this job: "
              "it did not run there")
    if job.kind == JobKind.SAVE and job.image_id:
        reason += "; the image it had uploaded is whole and kept"
    state = JobState.ABORTED if abort_requested else JobState.FAILED
    if job.settle(state, reason, f"host:{host.name}"):
        job.save()
        audit.record("job.settled", actor=host_actor(host), target=f"job:{job.id}",
                     outcome=Outcome.FAILED, details={"state": state, "reason": reason})
        progress.publish(job, "final")


def disconnected(host, channel_name):
    if host.channel_name == channel_name:
        host.online = False
        host.save(update_fields=["online"])


def expire_stale_jobs(now=None):
    """Give up, with the reason, on jobs whose agent has been gone longer than the
    timeout (their outcome is unknown until it reports again), and fail jobs a
    connected agent never started (their command was lost, e.g. with the portal
    process that held the agent's socket)."""
    now = now or timezone.now()
    expired = 0
    for job in Job.objects.filter(state__in=(JobState.QUEUED, JobState.RUNNING)).select_related(
            "source_host", "destination_host"):
        if _stale_reason(job, now):
            expired += _expire(job.id, now)
    return expired


def _stale_reason(job, now):
    host, timeout = job.host, settings.JOB_AGENT_TIMEOUT_SECONDS
    if host is None:
        return None
    if not host.online and not (host.last_seen and host.last_seen > now - timedelta(
            seconds=timeout)):
        return f"the agent on {host.name} went away and did not come back within {timeout} s"
    start_timeout = settings.JOB_START_TIMEOUT_SECONDS
    if job.state == JobState.QUEUED and job.created_at < now - timedelta(seconds=start_timeout):
        return (f"the agent on {host.name} did not start the job within {start_timeout} s "
                f"(its command was lost)")
    return None


@transaction.atomic
def _expire(job_id, now):
    """Fail or give up on one job, under its row lock: another process may be
    recording its result."""
    job = Job.objects.select_for_update(of=("self",)).select_related(
        "source_host", "destination_host").filter(id=job_id).first()
    reason = _stale_reason(job, now) if job and not job.is_final else None
    if reason is None:
        return 0
    # A connected agent gets the abort below; one that is away may have done the job.
    if not (job.fail(reason) if job.host.online else job.give_up(reason)):
        return 0
    job.save()
    transaction.on_commit(lambda: _announce_expiry(job))
    return 1


def _announce_expiry(job):
    progress.publish(job, "final" if job.is_final else "state")
    for host in {job.source_host, job.destination_host} - {None}:
        if host.online:  # a command that was only late must not run now
            progress.send_to_host(host.name, {
                "type": "command", "job": str(job.id), "action": "abort",
                "reason": f"the portal had already ended the job: {job.error}"})
