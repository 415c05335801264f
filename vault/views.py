"""Vault pages: the list, an image, upload, delete. Access via vault.access."""
from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from portal import audit
from portal.models import AuditRecord
from vault import access, grants, service
from vault.access import image_login_required
from vault.api import filtered_images
from vault.models import SavedImage


def _image_or_refuse(request, pk, action):
    image = get_object_or_404(SavedImage, pk=pk)
    access.require(request, action, image)
    return image


@image_login_required("list")
def image_list(request):
    form, images = filtered_images(request, request.GET)
    page = Paginator(images.select_related("created_by"), 50).get_page(request.GET.get("page"))
    audit.record_request(request, "image.list", target="vault",
                         details={"count": page.paginator.count, "filters": request.GET.dict()})
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "vault/list.html", {
        "form": form, "page": page, "query": query.urlencode(),
        "can_upload": access.can_upload(request)})


@image_login_required("view")
def image_detail(request, pk):
    image = _image_or_refuse(request, pk, "view")
    history = AuditRecord.objects.filter(target=image.target).order_by("-seq")[:200]
    return render(request, "vault/detail.html", {
        "image": image, "grants": grants.list_grants(image), "history": history,
        "can": {action: access.can(request, action, image) for action in access.ACTIONS},
        "can_grant": access.can_grant(request), "actions": access.ACTIONS,
        "restore_hosts": _restore_hosts() if access.can(request, "restore", image) else []})


def _restore_hosts():
    from migrator.models import Host  # the page offers the hosts; the vault does not depend

    return Host.objects.filter(revoked_at__isnull=True).order_by("name")


@image_login_required("grant")
@require_POST
def image_grant(request, pk):
    image = get_object_or_404(SavedImage, pk=pk)
    add = request.POST.get("op") != "remove"
    if not access.can_grant(request):
        audit.record_request(request, "image.grant", target=image.target, outcome="denied",
                             details={"reason": "only admins manage grants"})
        messages.error(request, "Only admins manage grants.")
        return redirect("vault-image", pk=pk)
    holder = request.POST.get("holder", "").strip()
    kind = request.POST.get("kind", "user")
    try:
        grants.change_grant(request, image, permission=request.POST.get("permission", ""),
                            add=add, **{"group" if kind == "group" else "user": holder})
        messages.success(request, "Grant updated.")
    except grants.GrantError as exc:
        messages.error(request, str(exc))
    return redirect("vault-image", pk=pk)


@image_login_required("delete")
def image_delete(request, pk):
    image = _image_or_refuse(request, pk, "delete")
    if request.method == "POST":
        name = image.name
        service.delete(image, request)
        messages.success(request, f"Deleted {name}; its data key was destroyed first.")
        return redirect("vault")
    return render(request, "vault/delete.html", {"image": image})


@image_login_required("verify")
@require_POST
def image_verify(request, pk):
    image = _image_or_refuse(request, pk, "view")
    ok, reason = service.verify(image, request=request)
    if ok:
        messages.success(request, "Every chunk authenticated; the content digest matches.")
    else:
        messages.error(request, f"Verification failed: {reason}")
    return redirect("vault-image", pk=pk)


@image_login_required("upload")
def image_upload(request):
    if not access.can_upload(request):
        audit.record_request(request, "image.upload", target="vault", outcome="denied",
                             details={"reason": "upload needs the admin role"})
        return render(request, "errors/403.html",
                      {"reason": "Only admins upload images."}, status=403)
    return render(request, "vault/upload.html")
