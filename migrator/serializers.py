"""JSON shapes of hosts, guests and jobs."""
from django.core.validators import RegexValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from migrator import claims
from migrator.migration import BANDWIDTH_HINT, MAX_BANDWIDTH_MBPS
from migrator.models import Guest, Host
from migrator.pki import HOST_NAME_RE
from migrator.relocation.verify import VERIFY_MODES


class HostSerializer(serializers.ModelSerializer):
    free_mib = serializers.IntegerField(read_only=True)
    unresponsive = serializers.BooleanField(
        read_only=True, help_text="connected, but silent for BERTH_HOST_UNRESPONSIVE_SECONDS")

    class Meta:
        model = Host
        fields = ["name", "address", "relocation_port", "driver", "arch", "virt_extensions",
                  "memory_mib", "used_mib", "reserved_mib", "free_mib", "disk_gib", "subnet",
                  "storage", "online", "unresponsive", "last_seen", "revoked_at"]


class ClaimSerializer(serializers.Serializer):
    host = serializers.CharField(help_text="the host that reports the guest as its own")
    reason = serializers.CharField()
    first_seen = serializers.DateTimeField()
    last_seen = serializers.DateTimeField()
    reports = serializers.IntegerField(help_text="how many of its reports claimed it")


class ConflictSerializer(serializers.Serializer):
    recorded_host = serializers.CharField(allow_null=True,
                                          help_text="where the portal places the guest")
    claims = ClaimSerializer(many=True)


class GuestSerializer(serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    domain_ids = serializers.SerializerMethodField()
    conflict = serializers.SerializerMethodField()

    class Meta:
        model = Guest
        fields = ["uuid", "name", "host", "domain_id", "memory_mib", "vcpus", "state",
                  "active", "config", "domain_ids", "conflict"]

    @extend_schema_field(ConflictSerializer(allow_null=True))
    def get_conflict(self, guest):
        """Open claim conflicts (another host reports this guest): no new job until an
        admin resolves them (POST …/resolve-conflict)."""
        conflicts = getattr(guest, "open_conflicts", None)
        if conflicts is None:
            conflicts = list(claims.open_conflicts(guest.uuid))
        return claims.conflict_json(conflicts)

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_domain_ids(self, guest):
        return [{"host": r.host_name, "domain_id": r.domain_id, "seen_at": r.seen_at}
                for r in guest.domain_ids.all()[:20]]


def host_name_field():
    """A host's name as enrolment allows it (pki.HOST_NAME_RE): the schema says so too,
    so a blank or malformed name is refused as invalid input by both."""
    return serializers.CharField(max_length=63, validators=[RegexValidator(
        f"^{HOST_NAME_RE.pattern}$", "not a host name")])


class RestoreRequestSerializer(serializers.Serializer):
    host = host_name_field()


class MigrateRequestSerializer(serializers.Serializer):
    destination = host_name_field()
    live = serializers.BooleanField(default=True)
    downtime_ms = serializers.IntegerField(min_value=1, max_value=60000, required=False)
    max_rounds = serializers.IntegerField(min_value=1, max_value=1000, required=False)
    max_data_factor = serializers.FloatField(min_value=1.0, max_value=100.0, required=False)
    max_seconds = serializers.IntegerField(
        min_value=1, max_value=86400, required=False,
        help_text="stop and copy once pre-copy has run this long (checked between rounds)")
    auto_converge = serializers.BooleanField(required=False)
    verify = serializers.ChoiceField(
        choices=list(VERIFY_MODES), required=False,
        help_text="the commit check: sampled (default; pages of actual memory), "
                  "incremental (every page sent, during pre-copy) or full (SHA-256 of "
                  "all memory, inside the downtime)")
    max_bandwidth_mbps = serializers.IntegerField(
        min_value=1, max_value=MAX_BANDWIDTH_MBPS, required=False,
        error_messages={key: BANDWIDTH_HINT for key in ("invalid", "null", "min_value",
                                                         "max_value", "max_string_length")},
        help_text="the bandwidth cap in MB/s (10**6 bytes/s) on the wire, for QEMU's stream "
                  "and the relocation channel alike; absent: "
                  "BERTH_MIGRATION_MAX_BANDWIDTH_MBPS (0 there: no cap)")


class ResolveRequestSerializer(serializers.Serializer):
    keep = serializers.ChoiceField(choices=["source", "destination"])


class SettleRequestSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=["succeeded", "failed"])
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500,
                                   help_text="what the admin found on the host")


class ResolveConflictRequestSerializer(serializers.Serializer):
    decision = serializers.ChoiceField(
        choices=list(claims.DECISIONS),
        help_text="refuse: the portal's record stands; accept: the guest runs on `host`")
    host = serializers.CharField(max_length=63, required=False, default="",
                                 help_text="with accept: the claimant the guest runs on")


class GuestRefSerializer(serializers.Serializer):
    uuid = serializers.UUIDField()
    name = serializers.CharField()


class JobSerializer(serializers.Serializer):
    """A job as progress.snapshot() renders it (also the WebSocket payload)."""

    id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=["save", "restore", "migrate"])
    state = serializers.ChoiceField(
        choices=["queued", "running", "succeeded", "failed", "aborted", "in_doubt", "unknown"],
        help_text="unknown: the portal gave up while the agent was away; the agent's report "
                  "or an admin's settlement makes it succeeded or failed (not final: wait on)")
    stage = serializers.CharField()
    done_bytes = serializers.IntegerField()
    total_bytes = serializers.IntegerField()
    percent = serializers.IntegerField()
    guest = GuestRefSerializer()
    source_host = serializers.CharField(allow_null=True)
    destination_host = serializers.CharField(allow_null=True)
    image = serializers.UUIDField(allow_null=True)
    requester = serializers.CharField(allow_null=True)
    timeline = serializers.ListField(child=serializers.DictField())
    rounds = serializers.ListField(child=serializers.DictField())
    parameters = serializers.DictField()
    result = serializers.DictField()
    resolution = serializers.DictField(help_text="settling a migration left in doubt: state, "
                                       "what each side holds, which keeps the guest, by whom")
    error = serializers.CharField()
    event_seq = serializers.IntegerField(help_text="sequence number of the job's last "
                                         "published event (WebSocket events carry `seq`)")
    created_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)

    def to_representation(self, job):
        from migrator.progress import snapshot

        return snapshot(job)
