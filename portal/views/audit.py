"""The auditor's pages: browse, verify and export the audit trail."""
from django.core.paginator import Paginator
from django.http import StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from portal import audit, audit_anchor, audit_query
from portal.roles import reader_required

PAGE_SIZE = 50


def _anchor_key():
    """The anchor public key for the page, or why there is none (never key material)."""
    try:
        return {"anchor_public_key": audit_anchor.public_key_text()}
    except audit_anchor.AnchorError as exc:
        return {"anchor_key_error": str(exc)}


@reader_required
def audit_list(request):
    form, records = audit_query.filtered_records(request.GET)
    page = Paginator(records, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "portal/audit_list.html",
                  {"form": form, "page": page, "query": query.urlencode(), **_anchor_key()})


@reader_required
@require_POST
def audit_verify(request):
    result = audit_anchor.verify_with_local_anchors()
    audit.record_request(request, "audit.verify", target="audit-chain",
                         details={"ok": result.ok, "count": result.count,
                                  "broken_seq": result.broken_seq})
    form, records = audit_query.filtered_records({})
    page = Paginator(records, PAGE_SIZE).get_page(1)
    return render(request, "portal/audit_list.html",
                  {"form": form, "page": page, "query": "", "verification": result,
                   **_anchor_key()})


EXPORTS = {
    "jsonl": (audit_query.export_jsonl, "application/x-ndjson"),
    "csv": (audit_query.export_csv, "text/csv"),
    # The whole chain, its digests and signed anchors: checkable with the public key alone.
    "chain.jsonl": (audit_query.export_chain, "application/x-ndjson"),
}


@reader_required
def audit_export(request, fmt):
    form, records = audit_query.filtered_records(request.GET)
    if not form.is_valid():
        return render(request, "portal/audit_list.html",
                      {"form": form, "page": None, "query": ""}, status=400)
    audit.record_request(request, "audit.export", target="audit-chain",
                         details={"format": fmt, "filters": request.GET.dict()})
    generate, content_type = EXPORTS[fmt]
    response = StreamingHttpResponse(generate(records), content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="berth-audit.{fmt}"'
    return response
