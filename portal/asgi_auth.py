"""Authenticate a raw ASGI HTTP scope the way a DRF view would.

Raw ASGI endpoints (the streaming upload) run ahead of Django, so they cannot
use Django's request cycle. They build a body-less request from the scope and
run the same session and token authentication as the API, CSRF check included,
so there is one definition of who is asking.
"""
import io

from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.handlers.asgi import ASGIRequest
from django_otp.middleware import OTPMiddleware
from rest_framework import exceptions
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.settings import api_settings

from portal.throttling import charge_anonymous


class AuthResult:
    def __init__(self, request=None, status=200, error="", detail="", django_request=None):
        self.request, self.status, self.error, self.detail = request, status, error, detail
        self.django_request = django_request

    @property
    def ok(self):
        return self.request is not None


class _BodyStreamedElsewhere(BaseParser):
    """The raw endpoint streams the body itself; authentication must not parse it.

    (The session CSRF check reads ``request.POST``, which would otherwise refuse an
    octet-stream body with 415; the CSRF token comes from the X-CSRFToken header.)
    """

    media_type = "*/*"

    def parse(self, stream, media_type=None, parser_context=None):
        return {}


def authenticate_scope(scope) -> AuthResult:
    """Return the authenticated DRF request, or the 401 to send back. Sync: call via a thread."""
    django_request = ASGIRequest(scope, io.BytesIO())
    SessionMiddleware(lambda r: None).process_request(django_request)
    AuthenticationMiddleware(lambda r: None).process_request(django_request)
    OTPMiddleware(lambda r: None)(django_request)  # is_verified(): admin actions need it
    return authenticate_request(django_request, parsers=[_BodyStreamedElsewhere()])


def authenticate_request(django_request, parsers=None) -> AuthResult:
    """Run the API authenticators on a request that went through Django's middleware.

    For async views outside DRF (the streaming download). Sync: call via a thread.
    """
    authenticators = [cls() for cls in api_settings.DEFAULT_AUTHENTICATION_CLASSES]
    request = Request(django_request, parsers=parsers, authenticators=authenticators)
    try:
        user = request.user
    except exceptions.APIException as exc:
        return _refused(request, django_request, exc)
    if not user.is_authenticated:
        return _refused(request, django_request, exceptions.NotAuthenticated())
    return AuthResult(request)


def _refused(request, django_request, exc) -> AuthResult:
    # As in the API's error handler: refusals count against the anonymous rate (429).
    wait = charge_anonymous(request)
    if wait is not None:
        exc = exceptions.Throttled(wait)
    return AuthResult(status=exc.status_code, error=exc.default_code, detail=str(exc.detail),
                      django_request=django_request)
