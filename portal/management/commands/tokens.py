"""manage.py tokens issue|list|revoke"""
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from portal.accounts import AccountError, issue_token, revoke_token
from portal.models import APIToken
from portal.scopes import SCOPES


class Command(BaseCommand):
    help = "Issue, list and revoke scoped API tokens."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        issue = sub.add_parser("issue", help="issue a token; it is printed once")
        issue.add_argument("username")
        issue.add_argument("--scope", action="append", default=[], dest="scopes",
                           help=f"repeatable; one of: {', '.join(SCOPES)}")
        issue.add_argument("--days", type=int, default=30, help="expiry in days (default 30)")
        issue.add_argument("--name", default="")
        listing = sub.add_parser("list", help="list live tokens (never the secret)")
        listing.add_argument("--user")
        revoke = sub.add_parser("revoke", help="revoke a token by its prefix")
        revoke.add_argument("prefix")

    def handle(self, *args, action, **options):
        try:
            getattr(self, f"do_{action}")(**options)
        except AccountError as exc:
            raise CommandError(str(exc)) from None

    def do_issue(self, username, scopes, days, name, **_):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        if days < 1:
            raise CommandError("--days must be at least 1")
        instance, token = issue_token(user, scopes, days=days, name=name)
        self.stdout.write(f"token: {token}")
        self.stdout.write(f"prefix {instance.token_key}, scopes {' '.join(instance.scopes)}, "
                          f"expires {instance.expiry:%Y-%m-%d %H:%M} UTC")

    def do_list(self, user=None, **_):
        tokens = APIToken.objects.select_related("user").order_by("created")
        if user:
            tokens = tokens.filter(user__username=user)
        for t in tokens:
            self.stdout.write(f"{t.token_key}\t{t.user.username}\t{' '.join(t.scopes)}\t"
                              f"expires {t.expiry:%Y-%m-%d}\tlast used {t.last_used or 'never'}")

    def do_revoke(self, prefix, **_):
        revoke_token(prefix)
        self.stdout.write(f"revoked {prefix}")
