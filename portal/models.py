"""The portal's own records: the audit trail and API tokens."""
from django.db import models
from knox.models import AbstractAuthToken


class Outcome(models.TextChoices):
    ALLOWED = "allowed"
    DENIED = "denied"
    FAILED = "failed"


class ActorKind(models.TextChoices):
    USER = "user"
    TOKEN = "token"
    HOST = "host"
    SYSTEM = "system"
    ANONYMOUS = "anonymous"


class AuditRecord(models.Model):
    """One entry of the append-only audit trail.

    ``mac`` chains each record to its predecessor (see portal/audit.py), so
    editing, deleting, reordering or inserting records is detectable. Actors
    and targets are stored as text so records outlive the objects they name.
    """

    seq = models.BigIntegerField(unique=True)
    time = models.DateTimeField(db_index=True)
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices)
    actor = models.CharField(max_length=200, db_index=True)
    action = models.CharField(max_length=64, db_index=True)
    target = models.CharField(max_length=300, blank=True, db_index=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, db_index=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)
    mac = models.CharField(max_length=64)

    class Meta:
        ordering = ["seq"]

    def __str__(self):
        return f"#{self.seq} {self.actor} {self.action} {self.target} {self.outcome}"


class AuditHead(models.Model):
    """The chain's tip: a single row, locked by every writer.

    Serialising writers on this row keeps the chain linear under concurrency,
    and comparing it with the last record detects a deleted tail.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    seq = models.BigIntegerField(default=0)
    mac = models.CharField(max_length=64, default="")

    def __str__(self):
        return f"audit head at #{self.seq}"


class APIToken(AbstractAuthToken):
    """A knox token that carries scopes; only its digest is stored.

    Knox keeps the first characters (``token_key``) in clear so a token can be
    named in lists and audit records without revealing it.
    """

    name = models.CharField(max_length=100, blank=True)
    scopes = models.JSONField(default=list, blank=True)
    last_used = models.DateTimeField(null=True, blank=True)
    # Optional restriction to listed vault images (UUID strings); empty = any
    # image the user may access.
    image_ids = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name = "API token"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def prefix(self) -> str:
        return self.token_key


class RefusalWindow(models.Model):
    """Refusals of one kind from one source, aggregated over one interval.

    The first refusal of an interval is an audit record at once; later ones only
    count here, and the interval's aggregate becomes one record when it closes
    (portal/audit.py, ``record_refusal``). A row in the database, not a cache key,
    so every portal process counts into the same window and the count survives a
    restart: a flood cannot grow the audit trail, and nothing it did is lost.
    """

    action = models.CharField(max_length=64)
    source = models.CharField(max_length=200)
    opened_at = models.DateTimeField()
    closes_at = models.DateTimeField(db_index=True)
    count = models.PositiveIntegerField(default=1)  # in this interval, the first included
    first_counted_at = models.DateTimeField(null=True)  # the first one not yet written
    last_at = models.DateTimeField()
    # The written record's actor, target and address, repeated by the aggregate.
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices)
    actor = models.CharField(max_length=200)
    target = models.CharField(max_length=300, blank=True)
    source_ip = models.GenericIPAddressField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.DENIED)
    reasons = models.JSONField(default=list, blank=True)  # a few distinct ones

    class Meta:
        constraints = [models.UniqueConstraint(fields=["action", "source"],
                                               name="one_refusal_window_per_source")]

    def __str__(self):
        return f"{self.action} from {self.source}: {self.count} until {self.closes_at}"
