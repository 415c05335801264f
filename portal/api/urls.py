"""Everything under /api/v1/. Apps add their own routes here."""
from django.urls import include, path

from portal.api.audit import AuditList
from portal.api.tokens import TokenDetail, TokenList

urlpatterns = [
    path("audit/", AuditList.as_view(), name="api-audit"),
    path("tokens/", TokenList.as_view(), name="api-tokens"),
    path("tokens/<str:prefix>", TokenDetail.as_view(), name="api-token"),
    path("", include("vault.api_urls")),
    path("", include("migrator.api_urls")),
]
