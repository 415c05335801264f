"""Who may place a guest on a host: the portal, not the host's word.

An agent speaks for its own host. When it reports a guest the portal places on
another host, or a guest in flight under a job that does not involve it, the
report moves nothing: it is a claim, refused and kept as a `ClaimConflict`
(audited once per conflict as ``host.claim_refused``, not once per heartbeat).
While a conflict is open the guest gets no new job (orchestrate answers 409
``guest_in_conflict``); an admin resolves it (`request_resolve`): *refuse* keeps
the portal's record, *accept* places the guest on the claimant.

A guest appears on a host only when (see `refusal`):
- the portal already places it there;
- a job the portal issued brings it there (a restore onto that host, an incoming
  migration) - in flight, or ended by the agent's success or without its word;
- it is new: no row, so no other host holds it;
- it is on no host and that host was the last to hold it (a save whose guest was
  put back, or not destroyed).
Plain synchronous functions; callers hold the guest's row lock.
"""
import logging
import uuid as uuidlib

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from migrator import access
from migrator.models import ClaimConflict, DomainIdRecord, Guest, Host, Job, JobKind, JobState
from migrator.orchestrate import IN_FLIGHT, OperationError, audits_refusals
from portal import audit
from portal.models import ActorKind, Outcome

log = logging.getLogger(__name__)
DECISIONS = ("refuse", "accept")


def guest_fields(info):
    """A reported guest as the row keeps it; raises KeyError, TypeError or ValueError
    when the report is malformed."""
    return {"uuid": str(uuidlib.UUID(str(info["uuid"]))), "name": str(info["name"])[:200],
            "domain_id": int(info["domain_id"]), "memory_mib": int(info["memory_mib"]),
            "vcpus": int(info.get("vcpus", 1)), "state": str(info.get("state", ""))[:16],
            "active": bool(info.get("active")), "config": info.get("config") or {}}


def place_guest(host, info):
    """Put the guest on ``host`` as reported (after `refusal` said yes, or for a job's
    own result)."""
    fields = guest_fields(info)
    guest, _ = Guest.objects.select_for_update().get_or_create(
        uuid=fields["uuid"], defaults={"name": fields["name"]})
    if guest.host_id != host.id or guest.domain_id != fields["domain_id"]:
        DomainIdRecord.objects.create(guest=guest, host_name=host.name,
                                      domain_id=fields["domain_id"])
    guest.host, guest.domain_id, guest.name = host, fields["domain_id"], fields["name"]
    guest.memory_mib, guest.vcpus = fields["memory_mib"], fields["vcpus"]
    guest.state, guest.active, guest.config = fields["state"], fields["active"], fields["config"]
    guest.save()
    return guest


def refusal(host, guest):
    """Why ``host`` may not place ``guest`` (a locked row) on itself, or "" if it may."""
    if guest.host_id == host.id:
        return ""
    in_flight = Job.objects.filter(guest_uuid=guest.uuid, state__in=IN_FLIGHT).first()
    if in_flight is not None:
        if host.id in (in_flight.source_host_id, in_flight.destination_host_id):
            return ""
        return (f"the guest is in flight under a {in_flight.kind} job ({in_flight.id}) "
                f"that does not involve {host.name}")
    if _brought_by_a_job(host, guest):
        return ""
    if guest.host_id is None:
        last = DomainIdRecord.objects.filter(guest=guest).values_list(
            "host_name", flat=True).first()
        if last == host.name:
            return ""
        return (f"the portal places the guest on no host, and no job it issued brought it "
                f"to {host.name}")
    return f"the portal places the guest on {guest.host.name}"


def _brought_by_a_job(host, guest):
    """The guest's last job brought it to ``host``: done, or its outcome unknown (the
    portal gave up while the agent was away; its hello then lists the guest)."""
    last = Job.objects.filter(guest_uuid=guest.uuid).order_by("-created_at").first()
    if last is None or last.kind == JobKind.SAVE or last.destination_host_id != host.id:
        return False
    late = (last.result or {}).get("late_report") or {}
    return (last.state in (JobState.SUCCEEDED, JobState.UNKNOWN)
            or late.get("state") == JobState.SUCCEEDED)


def leftover(host, guest, fields):
    """A copy that is not running, on the destination of the guest's last migration,
    which did not succeed: what the engine leaves until it is cleaned up (or an
    in-doubt resolution settles it), not a claim."""
    if fields["state"] == "running":
        return False
    last = Job.objects.filter(guest_uuid=guest.uuid).order_by("-created_at").first()
    return (last is not None and last.kind == JobKind.MIGRATE
            and last.destination_host_id == host.id and last.state != JobState.SUCCEEDED)


def refuse_claim(host, guest, info, reason):
    """Keep the refused claim: a new conflict is audited once; a repeat (every
    heartbeat) only counts. A claim an admin already refused, against the same
    record, stays refused without blocking the guest again."""
    now, recorded = timezone.now(), guest.host.name if guest.host_id else ""
    report = guest_fields(info)
    known = (ClaimConflict.objects.select_for_update().filter(guest=guest, claimant=host)
             .filter(Q(state=ClaimConflict.OPEN)
                     | Q(state=ClaimConflict.REFUSED, recorded_host=recorded))
             .order_by("-first_seen").first())
    if known is not None:
        ClaimConflict.objects.filter(pk=known.pk).update(
            last_seen=now, reports=known.reports + 1, report=report)
        return known
    conflict = ClaimConflict.objects.create(guest=guest, claimant=host, recorded_host=recorded,
                                            reason=reason[:500], report=report)
    log.warning("%s claims guest %s: refused, %s", host.name, guest.uuid, reason)
    audit.record("host.claim_refused", actor=audit.Actor(ActorKind.HOST, f"host:{host.name}"),
                 target=f"guest:{guest.uuid}", outcome=Outcome.DENIED,
                 details={"host": host.name, "recorded_host": recorded or None,
                          "reason": reason, "conflict": conflict.pk})
    return conflict


def open_conflicts(guest_uuid=None):
    conflicts = ClaimConflict.objects.filter(state=ClaimConflict.OPEN).select_related(
        "claimant", "guest", "guest__host")
    return conflicts.filter(guest_id=guest_uuid) if guest_uuid else conflicts


def conflict_json(conflicts):
    """The guest's open conflicts as the API and pages show them (None: no conflict)."""
    if not conflicts:
        return None
    return {"recorded_host": conflicts[0].recorded_host or None,
            "claims": [{"host": c.claimant.name, "reason": c.reason,
                        "first_seen": c.first_seen, "last_seen": c.last_seen,
                        "reports": c.reports} for c in conflicts]}


@audits_refusals
def request_resolve(request, guest_uuid, decision, host_name=""):
    """An admin settles a guest's claim conflict: ``refuse`` keeps the portal's record;
    ``accept`` places the guest on ``host_name``, one of the claimants, as it reported."""
    target = f"guest:{guest_uuid}"
    if not access.can_operate(request, "resolve_claim"):
        raise OperationError(403, "permission_denied", "Resolving a claim conflict needs the "
                             "admin role and a verified second factor (guests:migrate for "
                             "tokens).", refusal=(request, "guest.claim_resolve", target))
    if decision not in DECISIONS:
        raise OperationError(400, "invalid", "decision must be 'refuse' or 'accept'.")
    with transaction.atomic():
        guest = Guest.objects.select_for_update(of=("self",)).filter(uuid=guest_uuid).first()
        if guest is None:
            raise OperationError(404, "not_found", "No such guest.")
        conflicts = list(ClaimConflict.objects.select_for_update(of=("self",)).select_related(
            "claimant").filter(guest=guest, state=ClaimConflict.OPEN))
        if not conflicts:
            raise OperationError(409, "no_conflict", "This guest has no open claim conflict.",
                                 refusal=(request, "guest.claim_resolve", target))
        chosen = _chosen(request, target, conflicts, decision, host_name)
        if chosen is not None:
            place_guest(chosen.claimant, chosen.report)
        who = audit.actor_of(request).name
        standing = guest.host.name if guest.host_id else ""
        for conflict in conflicts:
            conflict.state = ClaimConflict.ACCEPTED if conflict is chosen else \
                ClaimConflict.REFUSED
            conflict.resolved_at, conflict.resolved_by = timezone.now(), who
            # Refused against the record as it now stands: the claimant's next reports
            # of this guest stay refused and need no new decision.
            conflict.recorded_host = chosen.claimant.name if chosen else standing
            conflict.save(update_fields=["state", "resolved_at", "resolved_by",
                                         "recorded_host"])
        audit.record_request(request, "guest.claim_resolve", target=target, details={
            "decision": decision, "host": chosen.claimant.name if chosen else None,
            "claimants": [c.claimant.name for c in conflicts],
            "recorded_host": standing or None})
    return Guest.objects.select_related("host").get(uuid=guest.uuid)


def _chosen(request, target, conflicts, decision, host_name):
    if decision == "refuse":
        return None
    chosen = next((c for c in conflicts if c.claimant.name == host_name), None)
    if chosen is None:
        raise OperationError(409, "not_a_claimant", f"{host_name or 'No host'} does not claim "
                             "this guest: accept one of the claimants.",
                             refusal=(request, "guest.claim_resolve", target))
    claimant = Host.objects.get(pk=chosen.claimant_id)
    if claimant.revoked:
        raise OperationError(409, "host_revoked", f"Host {claimant.name} is revoked.",
                             refusal=(request, "guest.claim_resolve", target))
    return chosen
