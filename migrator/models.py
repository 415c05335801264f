"""Hosts, guests and jobs as the portal knows them.

The agents own the truth about guests; these rows are the portal's view,
refreshed from every agent's inventory.
"""
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class Host(models.Model):
    name = models.CharField(max_length=63, unique=True)
    address = models.CharField(max_length=255)
    relocation_port = models.PositiveIntegerField(default=8002)
    driver = models.CharField(max_length=32, default="sim")
    arch = models.CharField(max_length=32, default="x86_64")
    virt_extensions = models.JSONField(default=list, blank=True)
    memory_mib = models.PositiveIntegerField(default=0)
    used_mib = models.PositiveIntegerField(default=0)
    reserved_mib = models.PositiveIntegerField(default=0)
    disk_gib = models.PositiveIntegerField(default=0)
    subnet = models.CharField(max_length=64, blank=True)
    storage = models.JSONField(default=list, blank=True)
    credential_digest = models.CharField(max_length=64, unique=True)
    cert_serial = models.CharField(max_length=64, blank=True)
    cert_fingerprint = models.CharField(max_length=64, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    online = models.BooleanField(default=False)
    channel_name = models.CharField(max_length=200, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def free_mib(self):
        return max(self.memory_mib - self.used_mib - self.reserved_mib, 0)

    @property
    def revoked(self):
        return self.revoked_at is not None

    @property
    def unresponsive(self):
        """Connected, but no word from the agent for ``HOST_UNRESPONSIVE_SECONDS``."""
        limit = timedelta(seconds=settings.HOST_UNRESPONSIVE_SECONDS)
        return self.online and (self.last_seen is None or timezone.now() - self.last_seen > limit)


class GuestState(models.TextChoices):
    RUNNING = "running"
    PAUSED = "paused"
    SAVING = "saving"
    SAVED = "saved"
    MIGRATING = "migrating"
    INCOMING = "incoming"


class Guest(models.Model):
    """A guest identity (its UUID) and where it runs now, if anywhere."""

    uuid = models.UUIDField(primary_key=True)
    name = models.CharField(max_length=200)
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="guests")
    domain_id = models.PositiveIntegerField(null=True, blank=True)
    memory_mib = models.PositiveIntegerField(default=0)
    vcpus = models.PositiveSmallIntegerField(default=1)
    state = models.CharField(max_length=16, choices=GuestState.choices, blank=True)
    active = models.BooleanField(default=False)
    config = models.JSONField(default=dict, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.uuid})"

    @property
    def workload(self):
        return (self.config or {}).get("workload", {}).get("profile", "")

    @property
    def ip(self):
        return (self.config or {}).get("ip", "")


class DomainIdRecord(models.Model):
    """Every domain ID a guest has had: restores and migrations give new ones."""

    guest = models.ForeignKey(Guest, on_delete=models.CASCADE, related_name="domain_ids")
    host_name = models.CharField(max_length=63)
    domain_id = models.PositiveIntegerField()
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-seen_at"]

    def __str__(self):
        return f"{self.guest_id} was domain {self.domain_id} on {self.host_name}"


class JobKind(models.TextChoices):
    SAVE = "save"
    RESTORE = "restore"
    MIGRATE = "migrate"


class JobState(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    # A migration whose source sent ACTIVATE and heard nothing back: both
    # copies are paused until the portal (migrator.indoubt) resolves it.
    IN_DOUBT = "in_doubt"
    # The portal gave up waiting while the job's agent was away: the agent may
    # have done it all the same. Not final: the agent's report when it is back,
    # or an admin's settlement, makes it succeeded or failed (docs/architecture.md).
    UNKNOWN = "unknown"


FINAL_STATES = {JobState.SUCCEEDED, JobState.FAILED, JobState.ABORTED}
# Outcomes an admin may settle an unknown job to.
SETTLED_STATES = (JobState.SUCCEEDED, JobState.FAILED)


class Job(models.Model):
    """One save, restore or migration, with explicit states and transitions."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=JobKind.choices)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.QUEUED,
                             db_index=True)
    requester = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL,
                                  related_name="jobs")
    guest_uuid = models.UUIDField(db_index=True)
    guest_name = models.CharField(max_length=200, blank=True)
    source_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="+")
    destination_host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL,
                                         related_name="+")
    image = models.ForeignKey("vault.SavedImage", null=True, blank=True,
                              on_delete=models.SET_NULL, related_name="jobs")
    stage = models.CharField(max_length=32, blank=True)
    done_bytes = models.BigIntegerField(default=0)
    total_bytes = models.BigIntegerField(default=0)
    timeline = models.JSONField(default=list, blank=True)
    # Live migration: one entry per pre-copy round (the job page's chart), and
    # the parameters it runs with (stop conditions, live or not).
    rounds = models.JSONField(default=list, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    # The single-use relocation ticket, held only until the source is told to
    # start (so whichever portal process hears "expecting" can pass it on).
    pending_ticket = models.CharField(max_length=64, blank=True)
    # Sequence number of the last event published for this job (progress.publish):
    # watchers check they missed none.
    event_seq = models.PositiveBigIntegerField(default=0)
    # Settling a migration left in doubt (migrator.indoubt): what each agent
    # holds, which side keeps the guest, decided by whom.
    resolution = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    idempotency_key = models.CharField(max_length=200, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # One job per key and user, whichever portal process gets there first:
            # concurrent retries of one request meet here (Stripe's semantics).
            models.UniqueConstraint(fields=["requester", "idempotency_key"],
                                    condition=~models.Q(idempotency_key=""),
                                    name="job_idempotency_key_once_per_user"),
        ]

    def __str__(self):
        return f"{self.kind} {self.guest_name or self.guest_uuid} ({self.state})"

    def save(self, *args, **kwargs):
        # event_seq moves only by progress.publish's atomic UPDATE: a full save of an
        # instance loaded earlier must not move it back.
        if not self._state.adding and kwargs.get("update_fields") is None:
            kwargs["update_fields"] = [f.name for f in self._meta.concrete_fields
                                       if not f.primary_key and f.name != "event_seq"]
        super().save(*args, **kwargs)

    @property
    def is_final(self):
        return self.state in FINAL_STATES

    @property
    def transfers_closed(self):
        """No image bytes move for this job any more: it is over, or the portal gave
        up on it (unknown) - a save's late upload must not be stored for it."""
        return self.is_final or self.state == JobState.UNKNOWN

    @property
    def host(self):
        """The host whose agent runs this job."""
        return self.destination_host if self.kind == JobKind.RESTORE else self.source_host

    @property
    def percent(self):
        if self.state == JobState.SUCCEEDED:
            return 100
        if not self.total_bytes:
            return 0
        return min(int(100 * self.done_bytes / self.total_bytes), 100)

    def _move(self, state, **fields):
        if self.is_final:
            return False
        self.state = state
        for name, value in fields.items():
            setattr(self, name, value)
        return True

    def start(self):
        # Back from unknown (its agent is working on it after all): no longer an error.
        error = "" if self.state == JobState.UNKNOWN else self.error
        return self._move(JobState.RUNNING, started_at=self.started_at or timezone.now(),
                          error=error)

    def enter_stage(self, stage):
        if self.is_final or stage == self.stage:
            return
        self.stage = stage
        self.timeline = [*self.timeline, {"stage": stage, "at": timezone.now().isoformat()}]

    def record_progress(self, done, total):
        # The bar never runs backwards, even if events arrive out of order.
        self.done_bytes = max(self.done_bytes, done)
        self.total_bytes = total or self.total_bytes

    def finish(self, result=None):
        return self._move(JobState.SUCCEEDED, result=result or {}, finished_at=timezone.now(),
                          done_bytes=self.total_bytes or self.done_bytes)

    def fail(self, reason):
        return self._move(JobState.FAILED, error=reason, finished_at=timezone.now())

    def give_up(self, reason, *, aborted=False):
        """Stop waiting for the job's agent, which is away: the outcome is unknown
        (it may have done the job all the same) until its host reports again or an
        admin settles it. ``aborted``: an admin asked to abort it meanwhile - if the
        agent turns out not to know the job, it ends aborted."""
        if self.state == JobState.UNKNOWN or not self._move(JobState.UNKNOWN, error=reason):
            return False
        unknown = {"reason": reason, "since": timezone.now().isoformat()}
        if aborted:
            unknown["abort_requested"] = True
        self.result = {**self.result, "unknown": unknown}
        return True

    def settle(self, state, reason, by):
        """An unknown job's outcome, from its agent's word or an admin (``by``)."""
        if self.state != JobState.UNKNOWN or state not in FINAL_STATES:
            return False
        self.result = {**self.result, "settled": {
            "state": state, "by": by, "reason": reason, "at": timezone.now().isoformat()}}
        if state == JobState.SUCCEEDED:
            return self.finish(self.result) and self._clear_error()
        if state == JobState.ABORTED:
            return self.abort(reason)
        return self.fail(reason)

    def _clear_error(self):
        self.error = ""
        return True

    def hold_in_doubt(self, reason):
        return self._move(JobState.IN_DOUBT, error=reason)

    def abort(self, reason="aborted by request"):
        return self._move(JobState.ABORTED, error=reason, finished_at=timezone.now())


class ClaimConflict(models.Model):
    """A host reported a guest the portal places elsewhere (or in flight under a job
    that does not involve that host). The report moved nothing; the conflict blocks
    new jobs on the guest until an admin resolves it (migrator.claims)."""

    OPEN = "open"
    REFUSED = "refused"    # the admin kept the portal's record
    ACCEPTED = "accepted"  # the admin placed the guest on the claimant

    guest = models.ForeignKey(Guest, on_delete=models.CASCADE, related_name="claim_conflicts")
    claimant = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="+")
    # Where the portal placed the guest when the claim came (empty: on no host).
    recorded_host = models.CharField(max_length=63, blank=True)
    reason = models.CharField(max_length=500)
    report = models.JSONField(default=dict, blank=True)  # the claimant's last report of it
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)
    reports = models.PositiveIntegerField(default=1)
    state = models.CharField(max_length=16, default=OPEN, db_index=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-first_seen"]
        constraints = [models.UniqueConstraint(
            fields=["guest", "claimant"], condition=models.Q(state="open"),
            name="one_open_claim_conflict_per_guest_and_host")]

    def __str__(self):
        return f"{self.claimant_id} claims {self.guest_id} ({self.state})"


class JobCredential(models.Model):
    """A single-use secret an agent presents to stream one job's image bytes: bound to
    one job, one host (whose agent must present its host credential with it), one
    direction (``purpose``) and, for a download, one image."""

    UPLOAD = "upload"
    DOWNLOAD = "download"

    digest = models.CharField(max_length=64, primary_key=True)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="credentials")
    purpose = models.CharField(max_length=16)
    # The host whose agent was given it; null only for credentials issued before
    # hosts were bound (they are refused: see credentials.JobCredentialAuthentication).
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="+")
    image_id = models.UUIDField(null=True, blank=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"{self.purpose} credential for job {self.job_id}"

    # The attributes below let the vault's access helper treat this like a token.
    @property
    def scopes(self):
        return ["images:write"] if self.purpose == self.UPLOAD else ["images:download"]

    def has_scope(self, scope):
        return scope in self.scopes

    @property
    def image_ids(self):
        return [str(self.image_id)] if self.image_id else []

    @property
    def token_key(self):
        return f"job:{self.job_id}"

    @property
    def acts_for_restore(self):
        return self.purpose == self.DOWNLOAD
