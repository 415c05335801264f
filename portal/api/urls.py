"""Everything under /api/v1/. Apps add their own routes here."""
from django.urls import path

from portal.api.audit import AuditList

urlpatterns = [
    path("audit/", AuditList.as_view(), name="api-audit"),
]
