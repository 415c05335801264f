"""The vault's one access-control helper, for pages, API and consumers alike.

Who may do what with an image:
- its creator holds view, download, restore and delete (granted at creation);
- members of ``admins`` hold all four on every image (``BERTH_VAULT_ADMINS_ALL``);
- members of ``auditors`` may view every image's metadata and history, nothing more;
- anyone else needs a grant (django-guardian, to a user or a group);
- a token request is further limited to the token's scopes and image list.
- a restore job's download credential (held by a host's agent) downloads its one
  image for the job's requester, and is good for nothing else.

Every refusal is written to the audit trail before it is returned.
"""
from functools import wraps

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from guardian.shortcuts import get_objects_for_user
from rest_framework import exceptions
from rest_framework.permissions import BasePermission

from portal import audit, roles
from portal.models import Outcome
from vault.models import SavedImage

ACTIONS = ("view", "download", "restore", "delete")
PERMISSIONS = {action: f"vault.{action}_savedimage" for action in ACTIONS}
SCOPES = {"view": "images:read", "download": "images:download",
          "restore": "images:restore", "delete": "images:delete"}


class ImageAccessDenied(PermissionDenied):
    """Raised after the refusal has been audited."""


# Admin actions need a verified second factor from admins, however they hold them;
# so does reading plaintext, since an admin may read every image.
SECOND_FACTOR_ACTIONS = {"download", "restore", "delete"}


def _role_allows(user, action) -> bool:
    role = roles.role_of(user)
    if role == roles.ADMIN and settings.VAULT_ADMINS_HOLD_ALL:
        return True
    return role == roles.AUDITOR and action == "view"


def _token_allows(request, action, image) -> bool:
    token = getattr(request, "auth", None)
    if token is None or not hasattr(token, "scopes"):
        return True
    if not token.has_scope(SCOPES[action]):
        return False
    allowed = getattr(token, "image_ids", None)
    return not allowed or str(image.id) in allowed


def can(request, action, image) -> bool:
    user = request.user
    if not user.is_authenticated or not user.is_active:
        return False
    if not _token_allows(request, action, image):
        return False
    if getattr(getattr(request, "auth", None), "acts_for_restore", False):
        # A restore job's agent downloads on behalf of someone who may restore, and
        # does nothing else with the credential (not even start another restore).
        if action != "download":
            return False
        action = "restore"
    if action in SECOND_FACTOR_ACTIONS and roles.is_admin(user) and \
            not roles.acts_as_admin(request):
        return False
    return _role_allows(user, action) or user.has_perm(PERMISSIONS[action], image)


def require(request, action, image, *, audit_allowed=True):
    """Allow ``action`` on ``image`` or audit the refusal and raise."""
    if not can(request, action, image):
        audit.record_request(request, f"image.{action}", target=image.target,
                             outcome=Outcome.DENIED,
                             details={"reason": f"no {action} permission"})
        raise ImageAccessDenied(f"You may not {action} this image.")
    if audit_allowed:
        audit.record_request(request, f"image.{action}", target=image.target)


def visible_images(request):
    """The images the caller may view: the queryset behind every listing."""
    user = request.user
    if not user.is_authenticated or not roles.token_allows(request, SCOPES["view"]):
        return SavedImage.objects.none()
    if _role_allows(user, "view"):
        images = SavedImage.objects.all()
    else:
        images = get_objects_for_user(user, PERMISSIONS["view"], klass=SavedImage,
                                      accept_global_perms=False)
    token_images = getattr(getattr(request, "auth", None), "image_ids", None)
    if token_images:
        images = images.filter(id__in=token_images)
    return images


def can_upload(request) -> bool:
    """Saving images into the vault is an admin action (scope ``images:write`` for tokens)."""
    if not roles.acts_as_admin(request):
        return False
    return roles.token_allows(request, "images:write")


def can_grant(request) -> bool:
    return roles.acts_as_admin(request) and getattr(request, "auth", None) is None


def refuse_anonymous(request, action, image_id=None):
    """Audit an unauthenticated attempt on an image (or the vault) before the 401/redirect.

    Anyone can repeat these at will (pages are not rate-limited): aggregated per
    address (`audit.record_refusal`), so a flood is two records per interval, counted.
    """
    address = audit.client_ip(request)
    audit.record_refusal(f"image.{action}", actor=audit.actor_of(request),
                         source=address or "unknown address",
                         target=f"image:{image_id}" if image_id else "vault",
                         source_ip=address, details={"reason": "not authenticated"})


def image_login_required(action):
    """Page decorator: anonymous visitors are audited, then sent to sign in."""
    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not request.user.is_authenticated:
                refuse_anonymous(request, action, kwargs.get("pk"))
                return redirect_to_login(request.get_full_path())
            return view(request, *args, **kwargs)
        return wrapped
    return decorator


def _refuse_unauthenticated(request, view):
    action = getattr(view, "audit_action", {}).get(request.method, "view")
    refuse_anonymous(request, action, view.kwargs.get("pk"))


class AuditedImagePermission(BasePermission):
    """DRF permission for image routes: audits unauthenticated attempts (then 401)."""

    def has_permission(self, request, view):
        if request.user and request.user.is_authenticated:
            return True
        _refuse_unauthenticated(request, view)
        return False


class AuditedImageView:
    """Mixin for image API views (before APIView): every refusal is audited, including
    a bad, expired or revoked token, which fails before any permission is asked."""

    permission_classes = [AuditedImagePermission]
    audit_action = {}  # HTTP method → the image action named in the audit trail

    def perform_authentication(self, request):
        try:
            super().perform_authentication(request)
        except exceptions.AuthenticationFailed:
            _refuse_unauthenticated(request, self)
            raise
