"""Settling a live migration left in doubt (docs/relocation-protocol.md, section 6).

A link lost around the commit point can leave both copies of a guest paused:
the source sent ACTIVATE and heard nothing, or the destination answered
COMMITTED and never saw ACTIVATE.  Neither may guess; the portal, which hears
both agents, settles it:

1. an agent reports a migration in doubt (its job result, a destination
   event, or the records in its ``hello`` after a restart);
2. the portal asks both agents what they hold (``migrate.query``; each answers
   with a ``holding`` event: running / paused / none, in doubt or not, the job
   still running or not);
3. `decide` applies the rule that leaves exactly one running guest - after the
   commitment the destination owns it - and ``migrate.resolve`` tells both
   agents which side keeps it; each answers ``resolved``;
4. what the rule cannot decide (an agent that never comes back, answers that
   contradict each other) waits for an admin: `request_resolve`
   (``POST /api/v1/jobs/{id}/resolve``, admin + verified second factor,
   audited), which still refuses a choice that would leave two running guests.

Job rows are locked by the callers (``select_for_update`` inside a transaction).
"""
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrator import access, progress
from migrator.models import Job, JobKind
from migrator.orchestrate import OperationError, _refuse, audits_refusals
from portal import audit
from portal.models import ActorKind, Outcome

SIDES = ("source", "destination")
OPEN = ("asking", "undecided", "resolving")
SYSTEM = audit.Actor(ActorKind.SYSTEM, "portal")


def open_jobs(guest_uuid):
    """Migrations of this guest waiting to be resolved (the guest page's warning)."""
    return list(Job.objects.filter(guest_uuid=guest_uuid, kind=JobKind.MIGRATE,
                                   resolution__state__in=OPEN))


def side_of(job, host):
    if host.id == job.source_host_id:
        return "source"
    if host.id == job.destination_host_id:
        return "destination"
    return None


def is_open(job):
    return (job.resolution or {}).get("state") in OPEN


def decide(source, destination):
    """Which side keeps the guest, from both agents' answers: ``(keep, why)``,
    keep None when the rule cannot tell (then an admin decides)."""
    if source is None or destination is None:
        return None, f"waiting for the {'source' if source is None else 'destination'}'s answer"
    if source.get("job_running") or destination.get("job_running"):
        return None, "the migration is still running on one side"
    if destination.get("holds") == "running":
        return "destination", "the destination runs the guest"
    if source.get("holds") == "running":
        return "source", "the source runs the guest again (it never committed)"
    if destination.get("holds") == "paused" and destination.get("in_doubt"):
        if source.get("in_doubt") or source.get("holds") == "none":
            return "destination", ("the source committed (it sent ACTIVATE) and the "
                                   "destination holds the complete image: it owns the guest")
        return "source", "the source never committed and took the guest back"
    if source.get("holds") == "paused" and source.get("in_doubt") and \
            destination.get("holds") == "none":
        return "source", "the destination holds nothing: it never activated the guest"
    return None, (f"cannot tell: the source holds {source.get('holds')}, the destination "
                  f"{destination.get('holds')}")


# -- reports from agents ----------------------------------------------------------
def note_in_doubt(job, side, reason):
    """An agent reports this migration in doubt on its side: ask both what they hold."""
    res = dict(job.resolution or {})
    flags = dict(res.get("in_doubt") or {})
    if flags.get(side) and res.get("state") in OPEN:
        return  # already being settled (a hello repeats it)
    flags[side] = True
    res.update(in_doubt=flags, since=res.get("since") or timezone.now().isoformat(),
               reasons={**(res.get("reasons") or {}), side: str(reason)[:500]})
    if res.get("state") != "resolving":
        res["state"] = "asking"
    job.resolution = res
    job.save(update_fields=["resolution"])
    transaction.on_commit(lambda: ask(job.id))


def ask(job_id):
    """Send ``migrate.query`` to both (online) agents; forget older answers.
    A decision already taken is sent again instead (an agent was away)."""
    with transaction.atomic():
        job = _locked(job_id)
        if job is None or not is_open(job):
            return
        res = dict(job.resolution)
        if res["state"] == "resolving":
            pending = list(res.get("pending") or ())
            transaction.on_commit(lambda: _send_resolve(job, res["keep"], pending))
            return
        res.update(state="asking", answers={})
        job.resolution = res
        job.save(update_fields=["resolution"])
        transaction.on_commit(lambda: _send(job, "migrate.query", SIDES))
    progress.publish(job, "resolution")


def record_answer(job, host, event):
    """A ``holding`` or ``resolved`` event from one side."""
    side = side_of(job, host)
    if side is None or not is_open(job):
        return
    answer = {k: event.get(k) for k in ("holds", "in_doubt", "job_running", "guest_state",
                                        "domain_id", "keep", "note", "error")}
    res = dict(job.resolution)
    res["answers"] = {**(res.get("answers") or {}), side: answer}
    job.resolution = res
    if event.get("kind") == "resolved":
        _resolved(job, side, answer)
    elif res["state"] == "asking":
        answers = res["answers"]
        keep, why = decide(answers.get("source"), answers.get("destination"))
        if keep is not None:
            _apply(job, keep, "automatic", why)
        else:
            res["why"] = why
            if len(answers) == 2:
                res["state"] = "undecided"
    job.save(update_fields=["resolution"])
    transaction.on_commit(lambda: progress.publish(job, "resolution"))


def _resolved(job, side, answer):
    res = job.resolution
    if answer.get("error"):
        res["why"] = f"the {side} could not apply it: {answer['error']}"
        return
    res["pending"] = [s for s in res.get("pending") or () if s != side]
    if res["pending"] or res.get("state") != "resolving":
        return
    res.update(state="resolved", resolved_at=timezone.now().isoformat())
    keep, by = res["keep"], res.get("by", "automatic")
    if keep == "destination":
        job.finish({**(job.result or {}), "resolution": keep})
    else:
        job.fail(f"in doubt, resolved ({by}): the guest stays on the source")
    job.save()
    audit.record("guest.migrate.resolved", actor=SYSTEM, target=f"guest:{job.guest_uuid}",
                 outcome=Outcome.ALLOWED,
                 details={"job": str(job.id), "keep": keep, "by": by, "why": res.get("why")})


def reconnected(host, exclude=()):
    """A host came back: jobs it is part of that wait for a resolution go on."""
    jobs = Job.objects.filter(Q(source_host=host) | Q(destination_host=host),
                              kind=JobKind.MIGRATE, resolution__state__in=OPEN).exclude(
                                  id__in=exclude)
    for job_id in jobs.values_list("id", flat=True):
        transaction.on_commit(lambda job_id=job_id: ask(job_id))


# -- decisions --------------------------------------------------------------------
def _apply(job, keep, by, why):
    res = job.resolution
    res.update(state="resolving", keep=keep, by=by, why=why, pending=list(SIDES),
               decided_at=timezone.now().isoformat())
    transaction.on_commit(lambda: _send_resolve(job, keep, SIDES))


def _send_resolve(job, keep, sides):
    _send(job, "migrate.resolve", sides, keep=keep)


def _send(job, action, sides, **fields):
    for side in sides:
        host = job.source_host if side == "source" else job.destination_host
        if host is not None and host.online:
            progress.send_to_host(host.name, {"type": "command", "job": str(job.id),
                                              "action": action, "guest": str(job.guest_uuid),
                                              **fields})


def _locked(job_id):
    # of=self: PostgreSQL cannot lock the nullable side of the joins.
    return Job.objects.select_for_update(of=("self",)).select_related(
        "source_host", "destination_host", "requester").filter(id=job_id).first()


@audits_refusals
def request_resolve(request, job, keep):
    """An admin settles an in-doubt migration the rule could not (or not yet)."""
    target = f"job:{job.id}"
    if not access.can_operate(request, "resolve"):
        _refuse(request, "job.resolve", target, 403, "permission_denied",
                "Resolving a migration needs the admin role and a verified second factor.")
    if keep not in SIDES:
        raise OperationError(400, "invalid", "keep must be 'source' or 'destination'.")
    with transaction.atomic():
        job = _locked(job.id)
        if job.kind != JobKind.MIGRATE or not is_open(job) or \
                job.resolution.get("state") == "resolving":
            _refuse(request, "job.resolve", target, 409, "not_in_doubt",
                    "This job has no migration waiting to be resolved.")
        unsafe = _conflict(job.resolution.get("answers") or {}, keep)
        if unsafe:
            _refuse(request, "job.resolve", target, 409, "unsafe", unsafe)
        _apply(job, keep, f"admin:{request.user.get_username()}", "chosen by an admin")
        job.save(update_fields=["resolution"])
    audit.record_request(request, "job.resolve", target=target,
                         details={"keep": keep, "guest": str(job.guest_uuid)})
    progress.publish(job, "resolution")
    return job


def _conflict(answers, keep):
    """Why keeping ``keep`` would leave two running guests (or none), if it would."""
    other = "source" if keep == "destination" else "destination"
    if answers.get(keep) is None:
        return (f"The {keep} has not said what it holds yet: wait until its agent is "
                "connected.")
    if (answers.get(other) or {}).get("holds") == "running":
        return f"The {other} runs the guest: keeping the {keep} would leave two running copies."
    if (answers.get(keep) or {}).get("holds") == "none":
        return f"The {keep} holds no copy of the guest."
    return ""


__all__ = ["ask", "decide", "note_in_doubt", "reconnected", "record_answer",
           "request_resolve"]
