"""Revocation bites at once, in every portal process: the database is the truth.

`manage.py hosts revoke` runs in its own process. With the default in-memory
channel layer it shares nothing with the portal but the database, so nothing
here waits for a message from it:

- every message an agent sends is checked against its host's row before it is
  applied (`still_enrolled`): nothing a host sends after its revocation counts;
- each portal process runs one watcher while it holds agent sockets: every
  `CHECK_INTERVAL` seconds one query, whatever the number of agents, closes the
  sockets of hosts revoked since, and sends the list of revoked certificate
  serials to every agent that has not had it yet, so their relocation ports
  refuse those certificates without a restart.

The watched consumers provide ``host`` (their Host row), ``revocations_sent``
(the list last sent, or None) and two coroutines: ``cut_off(reason)`` and
``send_revocations(serials)``.
"""
import asyncio
import logging

from channels.db import database_sync_to_async

from migrator.models import Host

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.5  # seconds: revoke-to-close stays well under the promised 2 s


def still_enrolled(host_id) -> bool:
    """False once the host is revoked (or its row is gone)."""
    return Host.objects.filter(pk=host_id, revoked_at__isnull=True).exists()


def revoked_serials() -> list[int]:
    """Serials of revoked host certificates, sorted: what agents refuse on their
    relocation ports. From the database, so every portal process (and machine)
    tells agents the same thing."""
    serials = Host.objects.filter(revoked_at__isnull=False).exclude(cert_serial="")
    return sorted({int(s) for s in serials.values_list("cert_serial", flat=True)})


def _revoked_state():
    revoked = Host.objects.filter(revoked_at__isnull=False).values_list("pk", "cert_serial")
    return ({pk for pk, _ in revoked},
            sorted({int(serial) for _, serial in revoked if serial}))


class _Watch:
    """The agent sockets of one event loop (one portal process) and their watcher."""

    def __init__(self):
        self.consumers = set()
        self.task = None


_watches: dict[asyncio.AbstractEventLoop, _Watch] = {}


def watch(consumer) -> None:
    """Start watching an accepted agent socket (on the running loop)."""
    loop = asyncio.get_running_loop()
    state = _watches.setdefault(loop, _Watch())
    state.consumers.add(consumer)
    if state.task is None or state.task.done():
        state.task = loop.create_task(_run(state), name="berth-revocation-watch")


def unwatch(consumer) -> None:
    loop = asyncio.get_running_loop()
    state = _watches.get(loop)
    if state is None:
        return
    state.consumers.discard(consumer)
    if not state.consumers:
        if state.task is not None and state.task is not asyncio.current_task():
            state.task.cancel()
        del _watches[loop]


async def _run(state: _Watch) -> None:
    while state.consumers:
        await asyncio.sleep(CHECK_INTERVAL)
        try:
            revoked_hosts, serials = await database_sync_to_async(_revoked_state)()
        except Exception:  # a database hiccup must not end the watch for good
            log.exception("revocation check failed; trying again")
            continue
        for consumer in list(state.consumers):
            try:
                if consumer.host.pk in revoked_hosts:
                    await consumer.cut_off("the host was revoked")
                elif consumer.revocations_sent not in (None, serials):  # None: not welcomed yet
                    await consumer.send_revocations(serials)
            except Exception:  # one broken socket must not spare the others
                log.exception("revocation watch: could not act on %s's socket",
                              consumer.host.name)
