"""Creating accounts and issuing tokens: plain functions the commands and tests call."""
import secrets
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import transaction

from portal import audit, roles
from portal.models import APIToken
from portal.scopes import invalid_scopes


class AccountError(Exception):
    """A request about accounts or tokens that cannot be honoured, with the reason."""


def generate_password() -> str:
    return secrets.token_urlsafe(18)


@transaction.atomic
def create_user(username, role, password=None, *, actor=None):
    """Create ``username`` with ``role`` ("admin", "auditor" or None); return (user, password)."""
    if role not in (None, *roles.ROLE_GROUPS):
        raise AccountError(f"unknown role {role!r}; choose admin, auditor or none")
    User = get_user_model()
    if User.objects.filter(username=username).exists():
        raise AccountError(f"user {username!r} already exists")
    password = password or generate_password()
    user = User.objects.create_user(username, password=password)
    roles.set_role(user, role)
    audit.record("user.create", actor=actor or audit.Actor.system(), target=f"user:{username}",
                 details={"role": role})
    return user, password


def issue_token(user, scopes, *, days=None, name="", actor=None):
    """Issue a token; the clear token is returned once and never stored."""
    bad = invalid_scopes(scopes)
    if bad:
        raise AccountError(f"unknown scope(s): {', '.join(bad)}")
    if not scopes:
        raise AccountError("a token needs at least one scope")
    kwargs = {"expiry": timedelta(days=days)} if days else {}
    instance, token = APIToken.objects.create(user=user, name=name, scopes=sorted(set(scopes)),
                                              **kwargs)
    audit.record("token.issue", actor=actor or audit.Actor.system(),
                 target=f"token:{instance.token_key}",
                 details={"user": user.get_username(), "scopes": instance.scopes,
                          "expiry": instance.expiry.isoformat() if instance.expiry else None})
    return instance, token


def revoke_token(prefix, *, actor=None):
    tokens = APIToken.objects.filter(token_key=prefix)
    if not tokens.exists():
        raise AccountError(f"no token with prefix {prefix!r}")
    count = tokens.count()
    tokens.delete()
    audit.record("token.revoke", actor=actor or audit.Actor.system(), target=f"token:{prefix}")
    return count
