"""manage.py audit verify"""
from django.core.management.base import BaseCommand, CommandError

from portal.audit import verify_chain


class Command(BaseCommand):
    help = "Check the audit trail's HMAC chain."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("verify", help="verify the chain; non-zero exit names the first break")

    def handle(self, *args, action, **options):
        result = verify_chain()
        if not result.ok:
            raise CommandError(f"audit chain broken at record {result.broken_seq}: {result.reason}")
        self.stdout.write(f"audit chain intact: {result.count} records")
