"""Filtering and exporting the audit trail, shared by the page and the API."""
import csv
import io
import json

from asgiref.sync import sync_to_async
from django import forms

from portal.audit import flush_refusals
from portal.models import AuditRecord, Outcome

EXPORT_FIELDS = ("seq", "time", "actor_kind", "actor", "action", "target", "outcome",
                 "source_ip", "details", "mac")


class AuditFilter(forms.Form):
    actor = forms.CharField(required=False, max_length=200)
    action = forms.CharField(required=False, max_length=64)
    target = forms.CharField(required=False, max_length=300)
    outcome = forms.ChoiceField(required=False, choices=[("", "any")] + Outcome.choices)
    since = forms.DateTimeField(required=False, help_text="e.g. 2026-11-25 09:00")
    until = forms.DateTimeField(required=False)

    def clean(self):
        data = super().clean()
        if data.get("since") and data.get("until") and data["since"] > data["until"]:
            raise forms.ValidationError("'since' must be before 'until'.")
        return data

    def apply(self, queryset):
        """Narrow ``queryset`` by the cleaned filters (call after is_valid())."""
        data = self.cleaned_data
        lookups = {
            "actor__icontains": data.get("actor"),
            "action__startswith": data.get("action"),
            "target__icontains": data.get("target"),
            "outcome": data.get("outcome"),
            "time__gte": data.get("since"),
            "time__lte": data.get("until"),
        }
        return queryset.filter(**{k: v for k, v in lookups.items() if v})


def filtered_records(params):
    """(form, queryset): the queryset is empty when the form is invalid.

    Closed refusal intervals are written first, so a reader never misses an aggregate
    only because no refusal or sweep has come since (portal.audit.flush_refusals).
    """
    flush_refusals()
    form = AuditFilter(params)
    if not form.is_valid():
        return form, AuditRecord.objects.none()
    return form, form.apply(AuditRecord.objects.all()).order_by("-seq")


def as_dict(entry: AuditRecord) -> dict:
    row = {name: getattr(entry, name) for name in EXPORT_FIELDS}
    row["time"] = entry.time.isoformat()
    return row


def _batches(queryset, size=1000):
    """Keyset pagination by seq: stable while new records are appended."""
    last = None
    while True:
        page = queryset.order_by("seq")
        if last is not None:
            page = page.filter(seq__gt=last)
        rows = list(page[:size])
        if not rows:
            return
        yield rows
        last = rows[-1].seq


async def export_jsonl(queryset):
    batches = _batches(queryset)
    while rows := await sync_to_async(next)(batches, None):
        yield "".join(json.dumps(as_dict(r), default=str) + "\n" for r in rows)


async def export_csv(queryset):
    yield _csv_line(EXPORT_FIELDS)
    batches = _batches(queryset)
    while rows := await sync_to_async(next)(batches, None):
        yield "".join(_csv_line([_csv_value(as_dict(r)[f]) for f in EXPORT_FIELDS]) for r in rows)


async def export_chain(queryset=None):
    """The whole chain with its plain SHA-256 digests and signed anchors
    (portal/audit_verifier.py): filters do not apply, an auditor checks it all."""
    from portal.audit_anchor import chain_export  # it imports the vault's storage lazily

    chunks = chain_export()
    while (chunk := await sync_to_async(next)(chunks, None)) is not None:
        yield chunk


def _csv_value(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def _csv_line(values):
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()
