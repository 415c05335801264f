"""Creating accounts and issuing tokens: plain functions the commands and tests call."""
import secrets
import uuid
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.db import transaction

from portal import audit, roles
from portal.models import APIToken, Outcome
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


@transaction.atomic
def issue_token(user, scopes, *, days=None, name="", actor=None, images=(), request=None):
    """Issue a token; the clear token is returned once and never stored (knox keeps a digest).

    ``images`` restricts the token to those vault images (UUIDs; each must exist).
    The audit record names ``request``'s actor when given, else ``actor``.
    """
    bad = invalid_scopes(scopes)
    if bad:
        raise AccountError(f"unknown scope(s): {', '.join(bad)}")
    if not scopes:
        raise AccountError("a token needs at least one scope")
    image_ids = existing_image_ids(images)
    kwargs = {"expiry": timedelta(days=days)} if days else {}
    instance, token = APIToken.objects.create(user=user, name=name, scopes=sorted(set(scopes)),
                                              image_ids=image_ids, **kwargs)
    details = {"user": user.get_username(), "name": name, "scopes": instance.scopes,
               "images": image_ids,
               "expiry": instance.expiry.isoformat() if instance.expiry else None}
    _record("token.issue", f"token:{instance.token_key}", details, actor=actor, request=request)
    return instance, token


def existing_image_ids(images):
    """``images`` as canonical UUID strings, sorted; AccountError names any that is
    malformed or not in the vault."""
    from vault.models import SavedImage  # the vault imports portal, not the reverse

    ids = set()
    for value in images:
        try:
            ids.add(str(uuid.UUID(str(value))))
        except ValueError:
            raise AccountError(f"not an image id: {str(value)[:60]!r}") from None
    found = {str(pk) for pk in SavedImage.objects.filter(id__in=ids).values_list("id", flat=True)}
    missing = sorted(ids - found)
    if missing:
        raise AccountError(f"no such image: {', '.join(missing)}")
    return sorted(ids)


def _record(action, target, details, *, actor=None, request=None, outcome=Outcome.ALLOWED):
    if request is not None:
        return audit.record_request(request, action, target=target, outcome=outcome,
                                    details=details)
    return audit.record(action, actor=actor or audit.Actor.system(), target=target,
                        outcome=outcome, details=details)


@transaction.atomic
def revoke_token(prefix, *, actor=None, user=None, request=None):
    """Delete the tokens named by ``prefix`` (only ``user``'s, when given); audited."""
    tokens = APIToken.objects.filter(token_key=prefix)
    if user is not None:
        tokens = tokens.filter(user=user)
    owners = sorted(set(tokens.values_list("user__username", flat=True)))
    if not owners:
        raise AccountError(f"no token with prefix {prefix!r}")
    count = tokens.count()
    tokens.delete()
    _record("token.revoke", f"token:{prefix}", {"user": ", ".join(owners)},
            actor=actor, request=request)
    return count
