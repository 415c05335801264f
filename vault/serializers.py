"""JSON shapes of vault objects."""
from rest_framework import serializers

from vault.models import SavedImage


class SavedImageSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = SavedImage
        fields = ["id", "name", "guest_uuid", "guest_name", "source_host", "plaintext_size",
                  "stored_size", "sha256", "key_version", "format_version", "algorithm",
                  "chunk_size", "memory_mib", "vcpus", "architecture", "virt_extensions",
                  "created_by", "created_at", "last_verified_at", "last_verify_ok"]
        read_only_fields = fields


class GrantSerializer(serializers.Serializer):
    """A permission held on an image by a user or a group."""

    user = serializers.CharField(required=False, allow_blank=False)
    group = serializers.CharField(required=False, allow_blank=False)
    permission = serializers.ChoiceField(choices=["view", "download", "restore", "delete"])

    def validate(self, attrs):
        if bool(attrs.get("user")) == bool(attrs.get("group")):
            raise serializers.ValidationError("Name exactly one of 'user' or 'group'.")
        return attrs


class VerifyResultSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    ok = serializers.BooleanField()
    reason = serializers.CharField(allow_blank=True)
