"""API token authentication: knox tokens that carry scopes."""
from django.utils import timezone
from knox.auth import TokenAuthentication

from portal.models import APIToken

# Writing last_used on every request would serialise API traffic on one row.
LAST_USED_RESOLUTION_SECONDS = 60


class ScopedTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, token):
        user, auth_token = super().authenticate_credentials(token)
        now = timezone.now()
        last = auth_token.last_used
        if last is None or (now - last).total_seconds() > LAST_USED_RESOLUTION_SECONDS:
            APIToken.objects.filter(digest=auth_token.digest).update(last_used=now)
            auth_token.last_used = now
        return user, auth_token
