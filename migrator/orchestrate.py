"""Starting jobs: the checks before anything changes, then a command to an agent.

Plain functions; views, API and tests call them. Each raises OperationError
(with the HTTP status it maps to and a reason) when a request cannot be honoured.
"""
import functools

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from migrator import access, credentials, progress
from migrator.models import (
    SETTLED_STATES,
    ClaimConflict,
    Guest,
    Host,
    Job,
    JobCredential,
    JobKind,
    JobState,
)
from portal import audit
from portal.models import Outcome
from vault import access as vault_access

IN_FLIGHT = (JobState.QUEUED, JobState.RUNNING, JobState.IN_DOUBT)


class OperationError(Exception):
    def __init__(self, status, code, detail, refusal=None):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.refusal = refusal  # (request, action, target) to audit, once

    def audit(self):
        """Record the refusal, once. Callers do it after their transaction is over."""
        if self.refusal is None:
            return
        (request, action, target), self.refusal = self.refusal, None
        outcome = Outcome.DENIED if self.status in (401, 403) else Outcome.FAILED
        audit.record_request(request, action, target=target, outcome=outcome,
                             details={"reason": self.detail})


def _refuse(request, action, target, status, code, detail):
    raise OperationError(status, code, detail, refusal=(request, action, target))


def audits_refusals(function):
    """Audit the refusal ``function`` ends in after its transaction has rolled back:
    a record written inside the transaction would roll back with it."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except OperationError as exc:
            exc.audit()
            raise
    return run


def _online_host(request, action, target, host):
    if host is None:
        _refuse(request, action, target, 404, "not_found", "No such host.")
    if host.revoked:
        _refuse(request, action, target, 409, "host_revoked", f"Host {host.name} is revoked.")
    if not host.online:
        _refuse(request, action, target, 409, "host_offline",
                f"Host {host.name} is offline: its agent is not connected.")
    if host.unresponsive:
        # Its socket is open but the agent is frozen or cut off: a command sent now
        # would only wait for the start timeout to fail it.
        _refuse(request, action, target, 409, "host_unresponsive",
                f"Host {host.name} is unresponsive: its agent has sent nothing for "
                f"over {settings.HOST_UNRESPONSIVE_SECONDS} s.")
    return host


def _not_busy(request, action, target, guest_uuid):
    _not_in_conflict(request, action, target, guest_uuid)
    busy = Job.objects.filter(guest_uuid=guest_uuid, state__in=IN_FLIGHT).first()
    if busy:
        _refuse(request, action, target, 409, "guest_busy",
                f"The guest is busy with a {busy.kind} job ({busy.id}).")


def _not_in_conflict(request, action, target, guest_uuid):
    """A host claims this guest against the portal's record (migrator.claims): until an
    admin resolves it, no job may act on what could be the wrong copy."""
    conflict = ClaimConflict.objects.filter(guest_id=guest_uuid, state=ClaimConflict.OPEN
                                            ).select_related("claimant").first()
    if conflict is not None:
        _refuse(request, action, target, 409, "guest_in_conflict",
                f"Host {conflict.claimant.name} claims this guest against the portal's "
                "record; an admin must resolve the conflict before any new job.")


def running_guest(request, action, guest_uuid):
    """The guest, locked for this transaction; 404 if unknown, 409 if on no host."""
    # of=self: PostgreSQL cannot lock the nullable side of the join to the host.
    guest = Guest.objects.select_for_update(of=("self",)).select_related("host").filter(
        uuid=guest_uuid).first()
    if guest is None:
        raise OperationError(404, "not_found", "No such guest.")
    if guest.host is None:
        _refuse(request, action, f"guest:{guest_uuid}", 409, "not_running",
                "The guest is not running on any host.")
    return guest


@audits_refusals
def request_save(request, guest_uuid) -> Job:
    target = f"guest:{guest_uuid}"
    if not access.can_operate(request, "save"):
        _refuse(request, "guest.save", target, 403, "permission_denied",
                "Saving guests needs the admin role (and guests:save for tokens).")
    with transaction.atomic():
        guest = running_guest(request, "guest.save", guest_uuid)
        host = _online_host(request, "guest.save", target, guest.host)
        _not_busy(request, "guest.save", target, guest.uuid)
        name = f"{guest.name} {timezone.now():%Y-%m-%d %H:%M:%S}"
        # The image's metadata comes from here, not from the agent's upload headers.
        image = {"name": name, "memory_mib": guest.memory_mib or None,
                 "vcpus": guest.vcpus or None, "architecture": host.arch,
                 "virt_extensions": ",".join(host.virt_extensions)}
        job = Job.objects.create(kind=JobKind.SAVE, requester=request.user,
                                 guest_uuid=guest.uuid, guest_name=guest.name, source_host=host,
                                 total_bytes=guest.memory_mib * 1024 * 1024,
                                 parameters={"image": image})
        secret = credentials.issue_job_credential(job, JobCredential.UPLOAD)
    audit.record_request(request, "guest.save", target=target,
                         details={"job": str(job.id), "host": host.name})
    progress.send_to_host(host.name, {
        "type": "command", "job": str(job.id), "action": "save", "guest": str(guest.uuid),
        # A path: the agent sends image bytes only to the portal it is enrolled with.
        "upload": {"url": "api/v1/images/", "credential": secret,
                   "name": name}})
    progress.publish(job, "state")
    return job


def _earlier_restore(request, target, image, host_name, idempotency_key):
    """The job an earlier request with this Idempotency-Key made, if any: returned as
    is when the request is the same (image and host), 409 when it is not - the key
    names one request, whatever was sent with it later (Stripe's semantics)."""
    earlier = Job.objects.filter(requester=request.user,
                                 idempotency_key=idempotency_key).select_related(
        "destination_host").first()
    if earlier is None:
        return None
    same_host = earlier.destination_host is not None \
        and earlier.destination_host.name == host_name
    if earlier.kind != JobKind.RESTORE or earlier.image_id != image.id or not same_host:
        _refuse(request, "image.restore", target, 409, "idempotency_key_reused",
                "This Idempotency-Key was used for another request (another image, host "
                "or operation); use a new key for a new request.")
    return earlier


@audits_refusals
def request_restore(request, image, host_name, idempotency_key="") -> Job:
    # Permission first: a known key must not reveal an earlier job to a caller
    # (say, a token of the same user) that may not restore this image.
    if not vault_access.can(request, "restore", image):
        vault_access.require(request, "restore", image)  # audits the refusal and raises
    target = image.target
    if idempotency_key:
        earlier = _earlier_restore(request, target, image, host_name, idempotency_key)
        if earlier:
            return earlier
    host = _online_host(request, "image.restore", target,
                        Host.objects.filter(name=host_name).first())
    _check_fits(request, target, image, host)
    try:
        with transaction.atomic():
            _not_running_anywhere(request, target, image)
            if idempotency_key:
                # A concurrent request with this key may have made the job while this
                # one waited for the guest's lock: it is this request's job too.
                earlier = _earlier_restore(request, target, image, host_name,
                                           idempotency_key)
                if earlier:
                    return earlier
            _no_unknown_restore(request, target, image)
            _not_busy(request, "image.restore", target, image.guest_uuid)
            job = Job.objects.create(kind=JobKind.RESTORE, requester=request.user,
                                     guest_uuid=image.guest_uuid,
                                     guest_name=image.guest_name, destination_host=host,
                                     image=image, total_bytes=image.plaintext_size,
                                     idempotency_key=idempotency_key)
            secret = credentials.issue_job_credential(job, JobCredential.DOWNLOAD, image.id)
    except (IntegrityError, OperationError):
        # A concurrent request with this key committed its job after this one looked:
        # its INSERT hit the key's unique constraint, or a check saw that job (the
        # guest busy). That job is this request's answer; otherwise the error stands.
        earlier = idempotency_key and _earlier_restore(request, target, image, host_name,
                                                       idempotency_key)
        if not earlier:
            raise
        return earlier
    audit.record_request(request, "image.restore", target=target,
                         details={"job": str(job.id), "host": host.name})
    progress.send_to_host(host.name, {
        "type": "command", "job": str(job.id), "action": "restore",
        "image": {"id": str(image.id), "sha256": image.sha256,
                  "plaintext_size": image.plaintext_size, "guest_uuid": str(image.guest_uuid),
                  "memory_mib": image.memory_mib},
        "download": {"url": f"api/v1/images/{image.id}/content",
                     "credential": secret}})
    progress.publish(job, "state")
    return job


def _check_fits(request, target, image, host):
    if image.guest_uuid is None:
        _refuse(request, "image.restore", target, 409, "not_a_guest_image",
                "This image was not saved from a guest, so there is nothing to restore.")
    if (image.memory_mib or 0) > host.free_mib:
        _refuse(request, "image.restore", target, 409, "insufficient_memory",
                f"The guest needs {image.memory_mib} MiB; "
                f"{host.name} has {host.free_mib} MiB free.")
    if image.architecture and image.architecture != host.arch:
        _refuse(request, "image.restore", target, 409, "incompatible_host",
                f"The image is {image.architecture}; {host.name} is {host.arch}.")
    wanted = {v for v in image.virt_extensions.split(",") if v}
    if wanted and wanted != set(host.virt_extensions):
        _refuse(request, "image.restore", target, 409, "incompatible_host",
                f"The image needs virtualisation extensions {sorted(wanted)}; "
                f"{host.name} has {sorted(host.virt_extensions)}.")


def _not_running_anywhere(request, target, image):
    # Lock the guest's row even when it runs nowhere: two restores of one guest, from
    # any portal process, then queue here and the second sees the first's job.
    running = Guest.objects.select_for_update(of=("self",)).select_related("host").filter(
        uuid=image.guest_uuid).first()
    if running and running.host is not None:
        _refuse(request, "image.restore", target, 409, "guest_running",
                f"Guest {running.name} is already running on {running.host.name}.")


def _no_unknown_restore(request, target, image):
    """A restore the portal gave up on while its agent was away (state unknown) may
    have booted the guest all the same. Until that host reports again - its hello lists
    its guests and late results, which settle the job - or an admin settles it, a
    restore elsewhere could start a second copy."""
    job = Job.objects.filter(
        kind=JobKind.RESTORE, guest_uuid=image.guest_uuid, state=JobState.UNKNOWN,
        destination_host__isnull=False, destination_host__revoked_at__isnull=True,
    ).select_related("destination_host").first()
    if job is not None:
        host = job.destination_host
        _refuse(request, "image.restore", target, 409, "outcome_unknown",
                f"The last restore of guest {job.guest_name} on {host.name} ended while its "
                f"agent was away, so the guest may be running there. Wait for {host.name} "
                "to report back, settle the job if you know its outcome, or revoke the host "
                "if it is gone for good.")


@audits_refusals
def request_abort(request, job) -> Job:
    target = f"job:{job.id}"
    if not access.can_operate(request, "abort"):
        _refuse(request, "job.abort", target, 403, "permission_denied",
                "Aborting jobs needs the admin role.")
    if job.is_final:
        raise OperationError(409, "job_over", f"The job has already {job.state}.")
    if job.state == JobState.IN_DOUBT:
        raise OperationError(409, "in_doubt", "The migration is past its commit point and in "
                             "doubt: resolve it instead of aborting.")
    if job.state == JobState.UNKNOWN:
        raise OperationError(409, "outcome_unknown", "The portal does not know this job's "
                             "outcome (its agent was away): wait for the host to report, "
                             "or settle it.")
    audit.record_request(request, "job.abort", target=target)
    host = job.host
    if host is not None and host.online:
        progress.send_to_host(host.name, {"type": "command", "job": str(job.id),
                                          "action": "abort", "reason": _aborted_by(request)})
    elif job.give_up("aborted while its host was offline", aborted=True):
        job.save()
        progress.publish(job, "final")
    return job


@audits_refusals
def request_settle(request, job, state, reason="") -> Job:
    """An admin settles a job whose outcome is unknown (its agent was away and has not
    reported): succeeded or failed, as the admin found it on the host."""
    target = f"job:{job.id}"
    if not access.can_operate(request, "settle"):
        _refuse(request, "job.settle", target, 403, "permission_denied",
                "Settling a job needs the admin role and a verified second factor.")
    if state not in SETTLED_STATES:
        raise OperationError(400, "invalid", "state must be 'succeeded' or 'failed'.")
    reason = str(reason or "").strip()[:500] or f"settled {state} by an admin"
    with transaction.atomic():
        job = Job.objects.select_for_update(of=("self",)).get(id=job.id)
        if job.state != JobState.UNKNOWN:
            _refuse(request, "job.settle", target, 409, "not_unknown",
                    f"The job is {job.state}: only a job whose outcome is unknown is settled.")
        if state == JobState.SUCCEEDED and job.kind == JobKind.SAVE and not job.image_id:
            _refuse(request, "job.settle", target, 409, "no_image",
                    "No image was stored for this save, so it did not succeed.")
        job.settle(state, reason, f"admin:{request.user.get_username()}")
        job.save()
    audit.record_request(request, "job.settle", target=target,
                         details={"state": state, "reason": reason,
                                  "guest": str(job.guest_uuid)})
    progress.publish(job, "final")
    return job


def _aborted_by(request):
    """The reason an agent reports for an abort: who asked."""
    return f"aborted by {audit.actor_of(request).name}"
