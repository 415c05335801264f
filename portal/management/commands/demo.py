"""manage.py demo: accounts, CA, two simulated hosts with the article's guests, and the portal.

Everything it starts (the portal and both agents) stops on Ctrl-C.
"""
import subprocess
import sys

import uvicorn
from django.conf import settings
from django.core.management.base import BaseCommand

from portal.demo import credentials_path, ensure_demo_accounts, ensure_demo_hosts


class Command(BaseCommand):
    help = ("Set up the demo (once) and serve Berth on http://HOST:PORT (127.0.0.1:8000) "
            "with two sim hosts whose agents talk to that address.")

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--setup-only", action="store_true",
                            help="create what is missing, print credentials, do not serve")
        parser.add_argument("--no-agents", action="store_true",
                            help="serve the portal without starting the demo hosts' agents")

    def handle(self, *args, host, port, setup_only, no_agents, **options):
        credentials = ensure_demo_accounts()
        self.stdout.write(f"Demo accounts (stored in {credentials_path()}, mode 0600):")
        for username, password in credentials.items():
            self.stdout.write(f"  {username:8} {password}")
        # The agents' bundles get this URL: they send image bytes only there.
        portal_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        configs = ensure_demo_hosts(portal_url) if not no_agents else []
        if setup_only:
            return
        agents = [self._start_agent(config) for config in configs]
        self.stdout.write(f"Serving Berth at {portal_url}/ — Ctrl-C stops the portal and agents.")
        try:
            # The body reader: image uploads land in the vault's buffers without copies.
            uvicorn.run("portal.asgi:application", host=host, port=port, lifespan="off",
                        log_level="info", http="portal.body_reader:HttpProtocol")
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                try:
                    agent.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    agent.kill()

    def _start_agent(self, config):
        log = open(settings.DATA_DIR / f"agent-{config.parent.name}.log", "ab")  # noqa: SIM115
        self.stdout.write(f"Starting agent {config.parent.name} (log: {log.name})")
        return subprocess.Popen([sys.executable, "manage.py", "relocationd", "--config",
                                 str(config)], cwd=settings.BASE_DIR, stdout=log,
                                stderr=subprocess.STDOUT)
