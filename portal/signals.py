"""Audit sign-ins, failed sign-ins and sign-outs, wherever they happen."""
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
    audit.record("auth.login", actor=audit.Actor(ActorKind.ANONYMOUS, username or "anonymous"),
                 target=f"user:{username}", outcome=Outcome.FAILED,
                 source_ip=audit.client_ip(request), details={"reason": "bad credentials"})
