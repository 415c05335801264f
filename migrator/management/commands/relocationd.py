"""manage.py relocationd --config FILE: run this host's agent until SIGINT/SIGTERM.

Thin on purpose: the agent (migrator.agent) is Django-free and does the work.
"""
from django.core.management.base import BaseCommand, CommandError

from migrator.agent import Agent, ConfigError, load_config


class Command(BaseCommand):
    help = ("Run the host agent: connect to the portal, report this host and its guests, "
            "and run save and restore jobs (see docs/agent.md).")

    def add_arguments(self, parser):
        parser.add_argument("--config", required=True, metavar="FILE",
                            help="the agent's TOML config (written by `manage.py hosts enroll`)")

    def handle(self, *args, config, **options):
        try:
            agent = Agent(load_config(config))
        except (ConfigError, OSError) as exc:
            # One line, no traceback: the operator has a file to fix.
            raise CommandError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
        agent.run(handle_signals=True)
