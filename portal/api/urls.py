"""Everything under /api/v1/. Apps add their own routes here."""
from django.urls import include, path

from portal.api.audit import AuditList

urlpatterns = [
    path("audit/", AuditList.as_view(), name="api-audit"),
    path("", include("vault.api_urls")),
    path("", include("migrator.api_urls")),
]
