"""API rate limits: anonymous callers per address, signed-in callers per user, and a
stricter budget for issuing tokens. Over the limit: 429 with ``Retry-After``.

Rates are ``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]`` (``BERTH_API_RATE_*``), read on
every request rather than once at import as DRF does, so a changed setting applies
at once. Counts live in Django's cache: per process by default, shared through
Redis when ``BERTH_REDIS_URL`` is set.

DRF checks permissions before throttles, so an anonymous request to an endpoint that
needs a user is refused with 401 before any throttle runs. ``charge_anonymous`` lets
the error handler (and the streaming endpoints) count those refusals against the same
anonymous budget: a flood of requests without valid credentials gets 429, not 401.
"""
from rest_framework import throttling
from rest_framework.settings import api_settings


class _RateFromSettings:
    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)


class AnonThrottle(_RateFromSettings, throttling.AnonRateThrottle):
    """Unauthenticated requests, per client address."""


class UserThrottle(_RateFromSettings, throttling.UserRateThrottle):
    """Authenticated requests (session or token), per user."""


class TokenIssueThrottle(_RateFromSettings, throttling.UserRateThrottle):
    """Issuing tokens, per user, on the page and through the API."""

    scope = "token-issue"


def charge_anonymous(request, view=None):
    """Count an unauthenticated request; return seconds to wait if over the rate, else None."""
    throttle = AnonThrottle()
    if throttle.allow_request(request, view):
        return None
    return throttle.wait() or 1


def charge_token_issue(request, view=None):
    """Count a token issue by ``request.user``; seconds to wait if over the rate, else None."""
    throttle = TokenIssueThrottle()
    if throttle.allow_request(request, view):
        return None
    return throttle.wait() or 1
