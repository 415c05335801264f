"""manage.py demo: set up the demo accounts and serve the portal until Ctrl-C."""
import uvicorn
from django.core.management.base import BaseCommand

from portal.demo import credentials_path, ensure_demo_accounts


class Command(BaseCommand):
    help = "Create the demo accounts (once) and serve Berth on http://127.0.0.1:8000."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--setup-only", action="store_true",
                            help="create what is missing, print credentials, do not serve")

    def handle(self, *args, host, port, setup_only, **options):
        credentials = ensure_demo_accounts()
        self.stdout.write(f"Demo accounts (stored in {credentials_path()}, mode 0600):")
        for username, password in credentials.items():
            self.stdout.write(f"  {username:8} {password}")
        if setup_only:
            return
        self.stdout.write(f"Serving Berth at http://{host}:{port}/ — Ctrl-C to stop.")
        uvicorn.run("portal.asgi:application", host=host, port=port, lifespan="off",
                    log_level="info")
