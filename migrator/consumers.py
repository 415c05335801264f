"""WebSocket consumers: host agents (/ws/agent/) and job watchers (/ws/jobs/…).

Thin: they authorise on connect, then forward. The logic lives in
migrator.inventory (agent messages) and migrator.progress (fan-out).
"""
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.utils import timezone

from migrator import access, credentials, inventory, progress, refusals, revocation
from migrator.models import Job
from portal import audit
from portal.models import ActorKind, Outcome

log = logging.getLogger(__name__)
REPLACED = 4001
REVOKED = 4003


def _header(scope, name):
    for key, value in scope.get("headers", []):
        if key.decode("latin-1").lower() == name:
            return value.decode("latin-1")
    return ""


def _client_ip(scope):
    client = scope.get("client")
    return client[0] if client else None


class AgentConsumer(AsyncJsonWebsocketConsumer):
    """One host agent's connection: facts and events up, commands down."""

    host = None
    revocations_sent = None  # the revoked serials this agent was last given
    cut = False  # revoked: nothing more is read from or sent to this socket

    async def connect(self):
        self.host = await database_sync_to_async(self._authenticate)()
        if self.host is None:
            await self.close()  # before accept: the handshake is refused with 403
            return
        await self.channel_layer.group_add(progress.host_group(self.host.name),
                                           self.channel_name)
        await self.accept()
        revocation.watch(self)  # revoked from any process: closed within a second

    def _authenticate(self):
        # Rate-limited per address and audited there (record_refusal aggregates a flood).
        return credentials.authenticate_agent(_header(self.scope, "authorization"),
                                              _client_ip(self.scope))

    async def disconnect(self, code):
        if self.host is None:
            return
        revocation.unwatch(self)
        await self.channel_layer.group_discard(progress.host_group(self.host.name),
                                               self.channel_name)
        await database_sync_to_async(self._refresh_and_mark_offline)()

    def _refresh_and_mark_offline(self):
        self.host.refresh_from_db()
        inventory.disconnected(self.host, self.channel_name)

    async def receive_json(self, message, **kwargs):
        if self.cut:
            return
        # The database says whether the host is still enrolled, not this process's
        # memory: the revocation may come from a command in another process.
        if not await database_sync_to_async(revocation.still_enrolled)(self.host.pk):
            await self.cut_off("the host was revoked", dropped=str(message.get("type", "")))
            return
        handler = getattr(self, "on_" + str(message.get("type", "")).replace(".", "_"), None)
        if handler is None:
            log.warning("%s sent an unknown message type %r", self.host.name,
                        message.get("type"))
            return
        try:
            await handler(message)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s sent a malformed %s: %s", self.host.name, message.get("type"), exc)

    async def on_hello(self, message):
        acks = await database_sync_to_async(self._hello)(message)
        revoked = await database_sync_to_async(revocation.revoked_serials)()
        # Revoked certificates, so the relocation port refuses them too; on every
        # connection, so an agent that missed a push while away catches up.
        await self.send_json({"type": "welcome", "host": self.host.name,
                              "server_time": timezone.now().isoformat(),
                              "revoked_serials": revoked})
        self.revocations_sent = revoked
        for job_id in acks:
            await self.send_json({"type": "ack", "job": job_id})

    def _hello(self, message):
        self.host.refresh_from_db()
        if self.host.channel_name and self.host.channel_name != self.channel_name:
            # A newer connection replaces the older one, wherever it lives.
            progress.send_to_channel(self.host.channel_name, {"type": "agent.replaced"})
        return inventory.connected(self.host, self.channel_name, message)

    async def on_inventory(self, message):
        await database_sync_to_async(self._inventory)(message)

    def _inventory(self, message):
        inventory.heartbeat(self.host, message)
        inventory.expire_stale_jobs()  # heartbeats double as the sweeper's clock
        audit.flush_refusals()  # and write closed refusal intervals' aggregates

    async def on_relocation_refused(self, message):
        await database_sync_to_async(refusals.record_relocation_refusal)(self.host, message)

    async def on_job_event(self, message):
        await database_sync_to_async(inventory.record_event)(self.host, message)

    async def on_job_result(self, message):
        job_id = await database_sync_to_async(inventory.record_result)(self.host, message)
        if job_id:
            await self.send_json({"type": "ack", "job": job_id})

    async def agent_command(self, event):
        if not self.cut:  # a revoked host gets nothing more, not even a job credential
            await self.send_json(event["payload"])

    async def agent_replaced(self, event):
        await self.close(code=REPLACED)

    async def send_revocations(self, serials):
        """The revocation list changed: the agent's relocation port refuses them now."""
        self.revocations_sent = serials
        await self.send_json({"type": "revocations", "revoked_serials": serials})

    async def cut_off(self, reason, dropped=""):
        """The host was revoked: close its socket; what it sent since is not applied."""
        if self.cut:
            return
        self.cut = True
        revocation.unwatch(self)
        await self.close(code=REVOKED)
        await database_sync_to_async(audit.record)(
            "host.cut_off", actor=audit.Actor(ActorKind.HOST, f"host:{self.host.name}"),
            target=f"host:{self.host.name}", outcome=Outcome.DENIED,
            source_ip=_client_ip(self.scope),
            details={"reason": reason, **({"dropped": dropped} if dropped else {})})


class JobsConsumer(AsyncJsonWebsocketConsumer):
    """Live job events for a browser: all visible jobs, or one job."""

    job_id = None
    sees_all = False

    async def connect(self):
        user = self.scope.get("user")
        self.job_id = self.scope["url_route"]["kwargs"].get("job_id")
        if not await database_sync_to_async(self._authorise)(user):
            await self.close()
            return
        group = progress.job_group(self.job_id) if self.job_id else progress.ALL_JOBS
        # Subscribe before reading the snapshot: an event published in between then
        # arrives (again) after it instead of falling into a gap; `seq` tells repeats.
        await self.channel_layer.group_add(group, self.channel_name)
        snapshots = await database_sync_to_async(self._snapshots)(user)
        await self.accept()
        # The current state at once, so a page reconnecting mid-job is up to date.
        await self.send_json({"type": "snapshot", "jobs": snapshots})

    def _authorise(self, user):
        if user is None or not user.is_authenticated:
            return False
        self.sees_all = access.can_see_all(user)
        if self.job_id is None:
            return True
        job = Job.objects.filter(id=self.job_id).first()
        return job is not None and access.can_view_job(user, job)

    def _snapshots(self, user):
        jobs = Job.objects.select_related("source_host", "destination_host", "requester")
        if self.job_id is not None:
            return [progress.snapshot(j) for j in jobs.filter(id=self.job_id)]
        if not self.sees_all:
            jobs = jobs.filter(requester=user)
        return [progress.snapshot(j) for j in jobs[:50]]

    async def disconnect(self, code):
        group = progress.job_group(self.job_id) if self.job_id else progress.ALL_JOBS
        await self.channel_layer.group_discard(group, self.channel_name)

    async def receive_json(self, message, **kwargs):
        # Read-only: nothing is started or changed over this socket.
        await self.send_json({"type": "error", "detail": "This socket is read-only."})

    async def dispatch(self, message):
        # Channels hops to the one thread all database work shares (to close stale
        # connections) before every handler. A job event touches no database, and one
        # event to N watchers would be N hops queued behind the portal's DB work.
        if message["type"] == "job.event":
            await self.job_event(message)
        else:
            await super().dispatch(message)

    async def job_event(self, message):
        if self.job_id is None and not self.sees_all and \
                message.get("requester_id") != self.scope["user"].id:
            return
        await self.send(text_data=message["text"])
