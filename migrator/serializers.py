"""JSON shapes of hosts, guests and jobs."""
from rest_framework import serializers

from migrator.models import Guest, Host


class HostSerializer(serializers.ModelSerializer):
    free_mib = serializers.IntegerField(read_only=True)

    class Meta:
        model = Host
        fields = ["name", "address", "relocation_port", "driver", "arch", "virt_extensions",
                  "memory_mib", "used_mib", "reserved_mib", "free_mib", "disk_gib", "subnet",
                  "storage", "online", "last_seen", "revoked_at"]


class GuestSerializer(serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    domain_ids = serializers.SerializerMethodField()

    class Meta:
        model = Guest
        fields = ["uuid", "name", "host", "domain_id", "memory_mib", "vcpus", "state",
                  "active", "config", "domain_ids"]

    def get_domain_ids(self, guest):
        return [{"host": r.host_name, "domain_id": r.domain_id, "seen_at": r.seen_at}
                for r in guest.domain_ids.all()[:20]]


class RestoreRequestSerializer(serializers.Serializer):
    host = serializers.CharField(max_length=63)
