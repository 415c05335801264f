"""Starting a live migration: the pre-check a person sees, then the two commands.

The destination is told first (`migrate.expect`, with a single-use ticket bound
to guest, source and destination); only when its agent reports that it expects
the guest is the source told to start (`migrate`). See docs/relocation-protocol.md.
"""
import ipaddress
import secrets

from django.conf import settings
from django.db import transaction

from migrator import access, progress
from migrator.models import Host, Job, JobKind
from migrator.orchestrate import _not_busy, _online_host, _refuse, audits_refusals, running_guest

TICKET_SECONDS = 300
# The largest bandwidth cap one may ask for, MB/s (800 Gbit/s: more than any link).
MAX_BANDWIDTH_MBPS = 100_000
BANDWIDTH_HINT = (f"the bandwidth cap is a whole number of MB/s from 1 to "
                  f"{MAX_BANDWIDTH_MBPS} (leave it out for the default)")


def bandwidth_cap(text):
    """The cap typed on the Migrate page: None if blank (the default), else
    a whole number of MB/s in 1..MAX_BANDWIDTH_MBPS; ValueError otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(BANDWIDTH_HINT) from None
    if not 1 <= value <= MAX_BANDWIDTH_MBPS:
        raise ValueError(BANDWIDTH_HINT)
    return value


def precheck(guest, destination):
    """[(check, ok, detail)]: what the destination's reservation will check, from
    what the portal knows; the destination checks again for real."""
    checks = [
        ("other host", guest.host_id != destination.id,
         "the guest already runs there" if guest.host_id == destination.id else ""),
        ("destination online",
         destination.online and not destination.revoked and not destination.unresponsive,
         "its agent is not connected" if not destination.online
         else "its agent has gone silent" if destination.unresponsive else ""),
        ("memory", destination.free_mib >= guest.memory_mib,
         f"needs {guest.memory_mib} MiB, {destination.free_mib} MiB free"),
    ]
    if guest.host is not None:
        checks += [
            ("architecture", guest.host.arch == destination.arch,
             f"{guest.host.arch} → {destination.arch}"),
            ("virtualisation extensions",
             set(guest.host.virt_extensions) == set(destination.virt_extensions),
             f"{sorted(guest.host.virt_extensions)} → {sorted(destination.virt_extensions)}"),
            # A QEMU guest moves with QEMU's stream, a sim guest with pages:
            # the destination refuses the other kind (docs/qemu.md).
            ("hypervisor", guest.host.driver == destination.driver,
             f"{guest.host.driver} → {destination.driver}"),
        ]
    checks.append(_subnet_check(guest, destination))
    missing = sorted(set((guest.config or {}).get("storage", [])) - set(destination.storage))
    checks.append(("shared storage", not missing,
                   f"not mounted: {', '.join(missing)}" if missing else "mounted"))
    return checks


def _subnet_check(guest, destination):
    ip = guest.ip
    if not ip:
        return ("subnet", True, "the guest has no IP address")
    try:
        inside = ipaddress.ip_address(ip) in ipaddress.ip_network(destination.subnet,
                                                                   strict=False)
    except ValueError:
        return ("subnet", False, f"cannot compare {ip} with {destination.subnet!r}")
    return ("subnet", inside, f"{ip} {'in' if inside else 'outside'} {destination.subnet}")


def parameters(live=True, downtime_ms=None, max_rounds=None, max_data_factor=None,
               auto_converge=None, max_seconds=None, verify=None, max_bandwidth_mbps=None):
    return {
        "live": bool(live),
        "downtime_ms": downtime_ms or settings.MIGRATION_DOWNTIME_MS,
        "max_rounds": max_rounds or settings.MIGRATION_MAX_ROUNDS,
        "max_data_factor": max_data_factor or settings.MIGRATION_MAX_DATA_FACTOR,
        "max_seconds": max_seconds or settings.MIGRATION_MAX_SECONDS,
        "auto_converge": settings.MIGRATION_AUTO_CONVERGE if auto_converge is None
        else bool(auto_converge),
        "verify": verify or settings.MIGRATION_VERIFY,
        # 0: no cap (both engines send as fast as the link and the guest allow).
        "max_bandwidth_mbps": max_bandwidth_mbps or settings.MIGRATION_MAX_BANDWIDTH_MBPS,
    }


@audits_refusals
def request_migrate(request, guest_uuid, destination_name, **overrides) -> Job:
    target = f"guest:{guest_uuid}"
    if not access.can_operate(request, "migrate"):
        _refuse(request, "guest.migrate", target, 403, "permission_denied",
                "Migrating guests needs the admin role and a verified second factor "
                "(guests:migrate for tokens).")
    with transaction.atomic():
        guest = running_guest(request, "guest.migrate", guest_uuid)
        destination = Host.objects.filter(name=destination_name).first()
        if destination is not None and destination.id == guest.host_id:
            _refuse(request, "guest.migrate", target, 409, "same_host",
                    f"The guest already runs on {destination.name}.")
        destination = _online_host(request, "guest.migrate", target, destination)
        source = _online_host(request, "guest.migrate", target, guest.host)
        _not_busy(request, "guest.migrate", target, guest.uuid)
        ticket = secrets.token_urlsafe(32)
        job = Job.objects.create(
            kind=JobKind.MIGRATE, requester=request.user, guest_uuid=guest.uuid,
            guest_name=guest.name, source_host=source, destination_host=destination,
            total_bytes=guest.memory_mib * 1024 * 1024, parameters=parameters(**overrides),
            pending_ticket=ticket)
    _audit_request(request, target, job)
    progress.send_to_host(destination.name, {
        "type": "command", "job": str(job.id), "action": "migrate.expect",
        "guest": str(guest.uuid), "source": source.name, "ticket": ticket,
        "memory_mib": guest.memory_mib, "expires_in": TICKET_SECONDS})
    progress.publish(job, "state")
    return job


def _audit_request(request, target, job):
    from portal import audit

    audit.record_request(request, "guest.migrate", target=target,
                         details={"job": str(job.id), "from": job.source_host.name,
                                  "to": job.destination_host.name, **job.parameters})


def destination_ready(job):
    """The destination expects the guest: tell the source to start (once)."""
    ticket = job.pending_ticket
    if not ticket:
        return False
    job.pending_ticket = ""
    job.save(update_fields=["pending_ticket"])
    destination = job.destination_host
    progress.send_to_host(job.source_host.name, {
        "type": "command", "job": str(job.id), "action": "migrate",
        "guest": str(job.guest_uuid), "ticket": ticket,
        "destination": {"host": destination.name, "address": destination.address,
                        "port": destination.relocation_port},
        "parameters": job.parameters})
    return True
