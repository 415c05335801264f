from django.contrib.auth.decorators import login_required
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.permissions import IsAuthenticated

from portal.views import audit, auth, dashboard, people, tokens, twofactor

urlpatterns = [
    path("", dashboard.dashboard, name="dashboard"),
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth.LogoutView.as_view(), name="logout"),
    path("login/verify/", twofactor.verify, name="2fa-verify"),
    path("account/2fa/", twofactor.setup, name="2fa-setup"),
    path("audit/", audit.audit_list, name="audit"),
    path("audit/verify", audit.audit_verify, name="audit-verify"),
    re_path(r"^audit/export\.(?P<fmt>jsonl|csv|chain\.jsonl)$", audit.audit_export,
            name="audit-export"),
    path("people/", people.people, name="people"),
    path("tokens/", tokens.token_list, name="tokens"),
    path("tokens/<str:prefix>/revoke", tokens.token_revoke, name="token-revoke"),
    path("vault/", include("vault.urls")),
    path("jobs/", include("migrator.urls")),
    path("api/v1/", include("portal.api.urls")),
    # The schema and its Swagger UI (served from the sidecar, no CDN; the split
    # view keeps the script out of the page, as the CSP requires).
    path("api/schema/", SpectacularAPIView.as_view(permission_classes=[IsAuthenticated]),
         name="schema"),
    path("api/docs/", login_required(SpectacularSwaggerSplitView.as_view(url_name="schema")),
         name="api-docs"),
]

handler403 = "portal.views.errors.forbidden"
handler404 = "portal.views.errors.not_found"
handler500 = "portal.views.errors.server_error"
