"""Roles and the portal's access-control helper.

Roles are Django groups. Pages, API views and consumers all ask here, so one
place decides who may do what.
"""
from functools import wraps

from django.conf import settings
from django.contrib.auth.models import Group
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission

from portal.models import APIToken

ADMIN = "admin"
AUDITOR = "auditor"
ROLE_GROUPS = {ADMIN: settings.ROLE_ADMINS, AUDITOR: settings.ROLE_AUDITORS}


def ensure_groups():
    for name in ROLE_GROUPS.values():
        Group.objects.get_or_create(name=name)


def role_of(user) -> str | None:
    """The user's role, admin taking precedence; None for outsiders."""
    if not getattr(user, "is_authenticated", False):
        return None
    names = _group_names(user)
    for role, group in ROLE_GROUPS.items():
        if group in names:
            return role
    return None


def _group_names(user):
    # Cached per user object: a request asks several times.
    if not hasattr(user, "_berth_groups"):
        user._berth_groups = set(user.groups.values_list("name", flat=True))
    return user._berth_groups


def is_admin(user) -> bool:
    return role_of(user) == ADMIN


def is_auditor(user) -> bool:
    return role_of(user) == AUDITOR


def acts_as_admin(request) -> bool:
    """An admin *action*: the admin role plus, for browser sessions, a verified
    second factor (tokens are issued only from verified sessions)."""
    if not is_admin(request.user):
        return False
    token = getattr(request, "auth", None)
    if token is not None or not settings.REQUIRE_2FA:
        return True
    return bool(getattr(request.user, "is_verified", lambda: False)())


def can_read_audit(user) -> bool:
    return role_of(user) in {ADMIN, AUDITOR}


def set_role(user, role):
    ensure_groups()
    user.groups.remove(*Group.objects.filter(name__in=ROLE_GROUPS.values()))
    if role:
        user.groups.add(Group.objects.get(name=ROLE_GROUPS[role]))
    if hasattr(user, "_berth_groups"):
        del user._berth_groups


def role_required(check):
    """Page decorator: anonymous users go to login, others need ``check(user)``."""
    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not check(request.user):
                raise PermissionDenied("Your role does not allow this page.")
            return view(request, *args, **kwargs)
        return wrapped
    return decorator


admin_required = role_required(is_admin)


def admin_action_required(view):
    """Page decorator for admin actions: role and verified second factor."""
    @wraps(view)
    def wrapped(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not acts_as_admin(request):
            raise PermissionDenied("This needs the admin role and a verified second factor.")
        return view(request, *args, **kwargs)
    return wrapped
reader_required = role_required(can_read_audit)


class IsBerthAdmin(BasePermission):
    message = "This action needs the admin role."

    def has_permission(self, request, view):
        return is_admin(request.user)


class CanReadAudit(BasePermission):
    message = "The audit trail is open to admins and auditors only."

    def has_permission(self, request, view):
        return can_read_audit(request.user) and token_allows(request, "audit:read")


class UserCredential(BasePermission):
    """A signed-in session or one of the user's API tokens, never a host's job credential
    (which acts for its job's requester in one image transfer and nothing else)."""

    message = "A job credential is good for its image transfer only."

    def has_permission(self, request, view):
        auth = getattr(request, "auth", None)
        return bool(request.user and request.user.is_authenticated) and (
            auth is None or isinstance(auth, APIToken))


def token_allows(request, scope) -> bool:
    """Session requests carry the user's full role; a token only its scopes."""
    token = getattr(request, "auth", None)
    if token is None or not hasattr(token, "scopes"):
        return True
    return token.has_scope(scope)


def role_context(request):
    """Template context: the role for navigation, and whether an admin must
    still verify a second factor before acting."""
    user = getattr(request, "user", None)
    role = role_of(user) if user is not None else None
    needs_2fa = (role == ADMIN and settings.REQUIRE_2FA
                 and not getattr(user, "is_verified", lambda: False)())
    return {"berth_role": role, "berth_needs_2fa": needs_2fa}
