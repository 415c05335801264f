"""One JSON shape for every API error: {"error": code, "detail": reason}."""
from rest_framework import exceptions
from rest_framework.views import exception_handler as drf_exception_handler

from portal.throttling import charge_anonymous


def exception_handler(exc, context):
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        # Refused before any throttle ran: charge it to the caller's anonymous budget.
        request = context.get("request")
        wait = charge_anonymous(request, context.get("view")) if request is not None else None
        if wait is not None:
            exc = exceptions.Throttled(wait)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    detail = response.data
    # Django's Http404 (get_object_or_404) reaches DRF as a plain 404 without a code.
    code = "not_found" if response.status_code == 404 else getattr(exc, "default_code", "error")
    if isinstance(detail, dict) and set(detail) == {"detail"}:
        detail = detail["detail"]
    response.data = {"error": code, "detail": detail}
    return response
