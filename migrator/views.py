"""Pages: hosts and guests on the dashboard, jobs, a guest, save and restore buttons."""
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from migrator import access, claims, indoubt, inventory, migration, orchestrate
from migrator.models import Guest, Host
from migrator.relocation.verify import VERIFY_MODES
from portal.roles import reader_required
from vault import access as vault_access
from vault.models import SavedImage


def dashboard_context(request):
    inventory.expire_stale_jobs()
    hosts = Host.objects.prefetch_related("guests")
    return {"hosts": hosts, "jobs": access.visible_jobs(request)[:10],
            "can_save": access.can_operate(request, "save"),
            "conflicts": list(claims.open_conflicts()[:100]),
            "can_resolve_claims": access.can_operate(request, "resolve_claim")}


@login_required
def job_list(request):
    inventory.expire_stale_jobs()
    return render(request, "migrator/jobs.html", {"jobs": access.visible_jobs(request)[:200]})


@login_required
def job_detail(request, pk):
    inventory.expire_stale_jobs()
    job = get_object_or_404(access.visible_jobs(request), pk=pk)
    return render(request, "migrator/job.html", {
        "job": job, "can_abort": access.can_operate(request, "abort") and not job.is_final
        and job.state not in ("in_doubt", "unknown"),
        "can_settle": access.can_operate(request, "settle") and job.state == "unknown",
        "can_resolve": access.can_operate(request, "resolve") and indoubt.is_open(job)})


@reader_required
def guest_detail(request, uuid):
    guest = get_object_or_404(Guest.objects.select_related("host"), uuid=uuid)
    return render(request, "migrator/guest.html", {
        "guest": guest, "history": guest.domain_ids.all()[:50],
        "in_doubt": indoubt.open_jobs(guest.uuid),
        "conflicts": list(claims.open_conflicts(guest.uuid)),
        "can_resolve_claims": access.can_operate(request, "resolve_claim"),
        "can_save": access.can_operate(request, "save")})


def _run(request, operation, *args, **kwargs):
    try:
        return operation(request, *args, **kwargs)
    except orchestrate.OperationError as exc:
        messages.error(request, exc.detail)
    except vault_access.ImageAccessDenied as exc:
        messages.error(request, str(exc))
    return None


@login_required
@require_POST
def guest_save(request, uuid):
    job = _run(request, orchestrate.request_save, uuid)
    return redirect("job", pk=job.id) if job else redirect("dashboard")


@login_required
@require_POST
def guest_resolve_conflict(request, uuid):
    decision = request.POST.get("decision", "")
    if _run(request, claims.request_resolve, uuid, decision, request.POST.get("host", "")):
        messages.success(request, "Claim accepted: the guest now runs on "
                         f"{request.POST.get('host', '')}." if decision == "accept"
                         else "Claim refused: the portal's record stands.")
    if request.POST.get("next") == "guest":
        return redirect("guest", uuid=uuid)
    return redirect("dashboard")


@reader_required
def guest_migrate(request, uuid):
    """Choose a destination, see the pre-check, confirm."""
    guest = get_object_or_404(Guest.objects.select_related("host"), uuid=uuid)
    if request.method == "POST":
        live = request.POST.get("live", "1") == "1"
        verify = request.POST.get("verify") or None
        if verify not in (None, *VERIFY_MODES):
            messages.error(request, f"Unknown commit check {verify!r}.")
            return redirect("guest-migrate", uuid=uuid)
        try:
            cap = migration.bandwidth_cap(request.POST.get("max_bandwidth_mbps"))
        except ValueError as exc:
            messages.error(request, f"{str(exc)[:1].upper()}{str(exc)[1:]}.")
            return redirect("guest-migrate", uuid=uuid)
        job = _run(request, migration.request_migrate, uuid, request.POST.get("destination", ""),
                   live=live, verify=verify, max_bandwidth_mbps=cap)
        return redirect("job", pk=job.id) if job else redirect("guest-migrate", uuid=uuid)
    destinations = Host.objects.exclude(id=guest.host_id).filter(revoked_at__isnull=True)
    chosen = destinations.filter(name=request.GET.get("destination", "")).first()
    checks = migration.precheck(guest, chosen) if chosen else []
    return render(request, "migrator/migrate.html", {
        "guest": guest, "destinations": destinations, "chosen": chosen, "checks": checks,
        "all_ok": bool(checks) and all(ok for _, ok, _ in checks),
        "can_migrate": access.can_operate(request, "migrate"),
        "verify_default": settings.MIGRATION_VERIFY,
        "bandwidth_default": settings.MIGRATION_MAX_BANDWIDTH_MBPS,
        "bandwidth_max": migration.MAX_BANDWIDTH_MBPS})


@vault_access.image_login_required("restore")
@require_POST
def image_restore(request, pk):
    image = get_object_or_404(SavedImage, pk=pk)
    job = _run(request, orchestrate.request_restore, image, request.POST.get("host", ""))
    return redirect("job", pk=job.id) if job else redirect("vault-image", pk=pk)


@login_required
@require_POST
def job_abort(request, pk):
    job = get_object_or_404(access.visible_jobs(request), pk=pk)
    if _run(request, orchestrate.request_abort, job):
        messages.success(request, "Abort requested.")
    return redirect("job", pk=pk)


@login_required
@require_POST
def job_resolve(request, pk):
    job = get_object_or_404(access.visible_jobs(request), pk=pk)
    if _run(request, indoubt.request_resolve, job, request.POST.get("keep", "")):
        messages.success(request, "Resolution sent to both hosts.")
    return redirect("job", pk=pk)


@login_required
@require_POST
def job_settle(request, pk):
    job = get_object_or_404(access.visible_jobs(request), pk=pk)
    if _run(request, orchestrate.request_settle, job, request.POST.get("state", ""),
            request.POST.get("reason", "")):
        messages.success(request, "Job settled.")
    return redirect("job", pk=pk)
