"""manage.py sweep: give up on the jobs whose agent went away (their outcome is
unknown until it reports), and fail those whose command was lost, on a clock.

Each portal process already does this lazily (on job pages, the jobs API and agent
heartbeats); with several portal processes and quiet hours a timer makes it prompt.
It also writes the aggregates of refusal intervals that have closed
(portal.audit.flush_refusals), which the portal otherwise does lazily too.
"""
from django.core.management.base import BaseCommand

from migrator.inventory import expire_stale_jobs
from portal.audit import flush_refusals


class Command(BaseCommand):
    help = ("Mark queued or running jobs whose agent has been gone longer than "
            "BERTH_JOB_AGENT_TIMEOUT_SECONDS unknown, fail those never started, and write "
            "the aggregates of closed refusal intervals (run it from a timer).")

    def handle(self, *args, **options):
        expired = expire_stale_jobs()
        aggregates = flush_refusals()
        self.stdout.write(f"{expired} stale job(s) given up on (failed, or unknown while "
                          f"their agent is away), {aggregates} refusal aggregate(s) written")
