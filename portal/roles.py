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
reader_required = role_required(can_read_audit)


class IsBerthAdmin(BasePermission):
    message = "This action needs the admin role."

    def has_permission(self, request, view):
        return is_admin(request.user)


class CanReadAudit(BasePermission):
    message = "The audit trail is open to admins and auditors only."

    def has_permission(self, request, view):
        return can_read_audit(request.user) and token_allows(request, "audit:read")


def token_allows(request, scope) -> bool:
    """Session requests carry the user's full role; a token only its scopes."""
    token = getattr(request, "auth", None)
    if token is None or not hasattr(token, "scopes"):
        return True
    return token.has_scope(scope)


def role_context(request):
    """Template context: the signed-in user's role for navigation."""
    user = getattr(request, "user", None)
    return {"berth_role": role_of(user) if user is not None else None}
