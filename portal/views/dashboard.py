"""The landing page after sign-in."""
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from migrator.views import dashboard_context
from portal import roles
from portal.models import AuditRecord


@login_required
def dashboard(request):
    context = {"role": roles.role_of(request.user)}
    if roles.can_read_audit(request.user):
        context["recent"] = AuditRecord.objects.order_by("-seq")[:10]
        context.update(dashboard_context(request))
    return render(request, "portal/dashboard.html", context)
