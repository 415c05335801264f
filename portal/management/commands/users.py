"""manage.py users create NAME --role admin|auditor|none"""
import os

from django.core.management.base import BaseCommand, CommandError

from portal.accounts import AccountError, create_user


class Command(BaseCommand):
    help = "Manage portal accounts and their roles."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a user with a role")
        create.add_argument("username")
        create.add_argument("--role", choices=["admin", "auditor", "none"], required=True)
        create.add_argument("--password-env", metavar="VAR",
                            help="read the password from this environment variable "
                                 "(default: generate one and print it once)")

    def handle(self, *args, action, username, role, password_env, **options):
        password = None
        if password_env:
            password = os.environ.get(password_env)
            if not password:
                raise CommandError(f"environment variable {password_env} is empty or unset")
        try:
            user, password_used = create_user(username, None if role == "none" else role, password)
        except AccountError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"created {user.username} with role {role}")
        if not password:
            self.stdout.write(f"password: {password_used}")
