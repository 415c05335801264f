"""Who may issue and revoke which API tokens, for the Tokens page and the API alike.

- Tokens are issued only from a signed-in browser session: a token (or a host's
  job credential) never mints another token.
- For an admin, issuing is an admin action: it needs a verified second factor
  (``roles.acts_as_admin``).
- The scopes stay within what the user's role allows (``scopes.ROLE_SCOPES``);
  whatever the scopes, the role checks still apply when the token is used.
- An image restriction may name only images that exist and that the user may view.
- Everyone lists and revokes their own tokens; an admin may revoke anyone's, from a
  signed-in session with a verified second factor.

Refusals of a session, a scope or an image are audited (``token.issue`` /
``token.revoke``, outcome denied); a malformed field is just a 400.
"""
import uuid

from django.conf import settings

from portal import accounts, audit, roles
from portal.models import APIToken, Outcome
from portal.scopes import invalid_scopes, scopes_for_role

MIN_DAYS, MAX_DAYS = 1, 365
MAX_IMAGES = 100


class TokenRefused(Exception):
    """A token request that cannot be honoured: HTTP status, error code, the field
    at fault (None for the request as a whole) and the reason."""

    def __init__(self, status, code, detail, field=None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field


def default_days() -> int:
    return max(MIN_DAYS, min(MAX_DAYS, settings.REST_KNOX["TOKEN_TTL"].days))


def allowed_scopes(user) -> frozenset:
    return scopes_for_role(roles.role_of(user))


def own_tokens(user):
    return APIToken.objects.filter(user=user).order_by("-created")


def _deny(request, action, target, reason, status=403, code="permission_denied", field=None,
          detail=None):
    audit.record_request(request, action, target=target, outcome=Outcome.DENIED,
                         details={"reason": reason})
    raise TokenRefused(status, code, detail or reason, field)


def issue_refusal(request) -> str | None:
    """Why this request may not issue tokens at all, or None if it may."""
    if getattr(request, "auth", None) is not None:
        return "Tokens are issued from a signed-in browser session, not with a token."
    if roles.is_admin(request.user) and not roles.acts_as_admin(request):
        return "Verify your second factor before issuing a token."
    return None


def require_may_issue(request):
    """Raise TokenRefused (403, audited) unless this request may issue tokens at all."""
    refusal = issue_refusal(request)
    if refusal:
        _deny(request, "token.issue", f"user:{request.user.get_username()}", refusal)


def issue(request, *, name, scopes, days, images=()):
    """Issue a token for ``request.user`` under the rules above; (instance, clear token)."""
    target = f"user:{request.user.get_username()}"
    require_may_issue(request)
    scopes = list(dict.fromkeys(scopes))
    unknown = invalid_scopes(scopes)
    if unknown:
        raise TokenRefused(400, "invalid", f"unknown scope(s): {', '.join(unknown)}", "scopes")
    if not scopes:
        raise TokenRefused(400, "invalid", "choose at least one scope", "scopes")
    beyond = sorted(set(scopes) - allowed_scopes(request.user))
    if beyond:
        _deny(request, "token.issue", target, f"scopes beyond the role: {', '.join(beyond)}",
              status=400, code="invalid", field="scopes",
              detail=f"not allowed for your role: {', '.join(beyond)}")
    if not isinstance(days, int) or isinstance(days, bool) or not MIN_DAYS <= days <= MAX_DAYS:
        raise TokenRefused(400, "invalid", f"expiry must be {MIN_DAYS} to {MAX_DAYS} days", "days")
    image_ids = _visible_image_ids(request, target, images)
    try:
        return accounts.issue_token(request.user, scopes, days=days, name=name,
                                    images=image_ids, request=request)
    except accounts.AccountError as exc:  # e.g. an image deleted meanwhile
        raise TokenRefused(400, "invalid", str(exc), "images") from None


def _visible_image_ids(request, target, images):
    from vault import access  # the vault imports portal, not the reverse

    if len(images) > MAX_IMAGES:
        raise TokenRefused(400, "invalid", f"at most {MAX_IMAGES} images", "images")
    ids = set()
    for value in images:
        try:
            ids.add(str(uuid.UUID(str(value))))
        except ValueError:
            raise TokenRefused(400, "invalid", f"not an image id: {str(value)[:60]!r}",
                               "images") from None
    visible = {str(pk) for pk in access.visible_images(request).filter(id__in=ids)
               .values_list("id", flat=True)}
    missing = sorted(ids - visible)
    if missing:
        # Absent and not-visible read the same, so the answer reveals nothing.
        _deny(request, "token.issue", target, f"images not visible: {', '.join(missing)}",
              status=400, code="invalid", field="images",
              detail=f"no such image: {', '.join(missing)}")
    return sorted(ids)


def revoke(request, prefix) -> int:
    """Revoke the caller's own token ``prefix``, or, for an admin acting from a
    verified session, anyone's. Unknown (or someone else's, for non-admins): 404."""
    own = APIToken.objects.filter(token_key=prefix, user=request.user).exists()
    used = getattr(request, "auth", None)
    if own and used is not None and getattr(used, "token_key", None) != prefix:
        # A stolen token must not be able to switch off its owner's other tokens.
        _deny(request, "token.revoke", f"token:{prefix}",
              "With a token you may revoke only that token; revoke others from a "
              "signed-in session.")
    if own:
        return accounts.revoke_token(prefix, user=request.user, request=request)
    if not roles.is_admin(request.user) or not APIToken.objects.filter(token_key=prefix).exists():
        raise TokenRefused(404, "not_found", "No such token.")
    if getattr(request, "auth", None) is not None or not roles.acts_as_admin(request):
        _deny(request, "token.revoke", f"token:{prefix}",
              "Revoking another user's token needs an admin's signed-in session "
              "with a verified second factor.")
    return accounts.revoke_token(prefix, request=request)
