"""Listing, adding and removing per-image grants (django-guardian)."""
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from guardian.shortcuts import assign_perm, get_groups_with_perms, get_users_with_perms, remove_perm

from portal import audit
from vault.access import ACTIONS, PERMISSIONS


class GrantError(Exception):
    """A grant naming an unknown user or group."""


def list_grants(image):
    rows = []
    users = get_users_with_perms(image, attach_perms=True, with_group_users=False)
    for user, perms in users.items():
        rows += [{"user": user.get_username(), "permission": _action(p)} for p in perms]
    groups = get_groups_with_perms(image, attach_perms=True)
    for group, perms in groups.items():
        rows += [{"group": group.name, "permission": _action(p)} for p in perms]
    return sorted(rows, key=lambda r: (r.get("user", ""), r.get("group", ""), r["permission"]))


def _action(codename):
    return codename.split("_")[0]


def _holder(user=None, group=None):
    if user:
        found = get_user_model().objects.filter(username=user).first()
    else:
        found = Group.objects.filter(name=group).first()
    if found is None:
        raise GrantError(f"No such {'user' if user else 'group'}: {user or group}.")
    return found


def change_grant(request, image, *, permission, user=None, group=None, add=True):
    if permission not in ACTIONS:
        raise GrantError(f"Unknown permission {permission!r}.")
    holder = _holder(user, group)
    (assign_perm if add else remove_perm)(PERMISSIONS[permission], holder, image)
    audit.record_request(request, "image.grant" if add else "image.revoke",
                         target=image.target,
                         details={"user": user, "group": group, "permission": permission})
