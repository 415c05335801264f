"""manage.py audit verify | rotate-key"""
from django.core.management.base import BaseCommand, CommandError

from portal.audit import Actor, keyring, rotate_key, verify_chain
from portal.audit_keys import AuditKeyError


class Command(BaseCommand):
    help = "Check the audit trail's HMAC chain, or start a new audit key version."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("verify", help="verify the chain; non-zero exit names the first break")
        sub.add_parser("rotate-key", help="MAC records from the next one on with a new key "
                                          "(old versions stay: they verify older records)")

    def handle(self, *args, action, **options):
        try:
            if action == "rotate-key":
                return self._rotate()
            result = verify_chain()
        except AuditKeyError as exc:
            raise CommandError(str(exc)) from None
        if not result.ok:
            raise CommandError(f"audit chain broken at record {result.broken_seq}: {result.reason}")
        versions = len(keyring().versions())
        self.stdout.write(f"audit chain intact: {result.count} records, "
                          f"{versions} key version{'s' if versions != 1 else ''}")

    def _rotate(self):
        version = rotate_key(Actor.system("manage.py audit rotate-key"))
        self.stdout.write(f"audit key version {version.version} MACs records from "
                          f"{version.first_seq} on; keyring {keyring().path} (back it up "
                          "apart from the database)")
