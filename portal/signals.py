"""Audit sign-ins, failed sign-ins, lockouts and sign-outs, wherever they happen."""
from django.conf import settings
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from portal import audit
from portal.models import ActorKind, Outcome


@receiver(user_logged_in)
def on_login(sender, request, user, **kwargs):
    audit.record("auth.login", actor=audit.Actor(ActorKind.USER, user.get_username()),
                 target=f"user:{user.get_username()}", source_ip=audit.client_ip(request))


@receiver(user_logged_out)
def on_logout(sender, request, user, **kwargs):
    if user is None:
        return
    audit.record("auth.logout", actor=audit.Actor(ActorKind.USER, user.get_username()),
                 target=f"user:{user.get_username()}", source_ip=audit.client_ip(request))


@receiver(user_login_failed)
def on_login_failed(sender, credentials, request=None, **kwargs):
    # Django has already masked the password in ``credentials``; only the
    # attempted name is kept.
    username = str(credentials.get("username", ""))[:150]
    # django-axes marks a sign-in it refused, unchecked, during a lockout.
    locked = getattr(request, "axes_locked_out", False)
    actor = audit.Actor(ActorKind.ANONYMOUS, username or "anonymous")
    address = audit.client_ip(request)
    if locked:  # repeatable at will during the lockout: aggregated per address
        audit.record_refusal("auth.login", actor=actor, source=address or "unknown address",
                             target=f"user:{username}", outcome=Outcome.FAILED,
                             source_ip=address, details={"reason": "locked out"})
        return
    audit.record("auth.login", actor=actor, target=f"user:{username}", outcome=Outcome.FAILED,
                 source_ip=address, details={"reason": "bad credentials"})


def on_lockout(sender, request, username, ip_address, **kwargs):
    """django-axes locked a username and address out, or refused a sign-in while locked."""
    failures = getattr(request, "axes_failures_since_start", None)
    cool_off = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    username = str(username or "")[:150]
    actor = audit.Actor(ActorKind.ANONYMOUS, username or "anonymous")
    if failures is None:  # an attempt during the lockout, as often as anyone likes
        audit.record_refusal("auth.lockout", actor=actor, source=ip_address or "unknown address",
                             target=f"user:{username}", source_ip=ip_address,
                             details={"reason": "sign-in attempted while locked out",
                                      "cool_off_minutes": cool_off})
        return
    audit.record("auth.lockout", actor=actor, target=f"user:{username}", outcome=Outcome.DENIED,
                 source_ip=ip_address, details={"reason": "too many failed sign-ins",
                                                "failures": failures,
                                                "cool_off_minutes": cool_off})


def connect_lockout_audit():
    """Called from PortalConfig.ready, after the receivers above are connected, so that
    ours run before django-axes' own (importing axes.signals connects those)."""
    from axes.signals import user_locked_out

    user_locked_out.connect(on_lockout, dispatch_uid="berth-audit-lockout")
