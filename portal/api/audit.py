"""GET /api/v1/audit/: the audit trail, read-only, for admins and auditors."""
from rest_framework import generics, serializers
from rest_framework.exceptions import ValidationError

from portal import audit_query
from portal.models import AuditRecord
from portal.roles import CanReadAudit


class AuditRecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditRecord
        fields = audit_query.EXPORT_FIELDS


class AuditList(generics.ListAPIView):
    serializer_class = AuditRecordSerializer
    permission_classes = [CanReadAudit]

    def get_queryset(self):
        form, records = audit_query.filtered_records(self.request.query_params)
        if not form.is_valid():
            raise ValidationError(form.errors)
        return records
