"""GET /api/v1/images/{id}/content: stream verified plaintext, with Range support.

An async view over an async generator: under ASGI a sync iterator would be
collected whole. Before the answer starts, the stored object is proven to be
this record's (``service.open_reader``); if not, the answer is 409
``integrity_error`` and the download is audited as failed. Each chunk is
authenticated before any of its bytes are sent; a chunk that fails ends the
response early (the client sees a short body) and is audited, so no unverified
byte ever leaves the portal.
"""
import asyncio
import logging
import re

from asgiref.sync import sync_to_async
from django.http import Http404, JsonResponse, StreamingHttpResponse

from portal import audit
from portal.asgi_auth import authenticate_request
from portal.models import Outcome
from vault import access, service, signals
from vault import format as vformat
from vault.models import SavedImage

log = logging.getLogger(__name__)
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
MAX_DIGITS = 19  # 10**19 bytes is past any image (and PostgreSQL's bigint)


def _error(status, code, detail):
    return JsonResponse({"error": code, "detail": detail}, status=status)


def parse_range(header, size):
    """(start, end_exclusive) for a single satisfiable range, None for the whole
    image, or "unsatisfiable"."""
    if not header:
        return None
    match = RANGE.match(header.strip())
    if not match or "," in header:
        return None  # unsupported forms: RFC 9110 lets us send the whole representation
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
        # No image is 10**19 bytes; int() of thousands of digits is slow, and past
        # Python's limit (4300) an error: a position that long is no real client's.
        return "unsatisfiable"
    if first == "":
        length = int(last)
        if length == 0:
            return "unsatisfiable"
        return max(size - length, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        return "unsatisfiable"
    return start, end


def _authorise(request, pk):
    result = authenticate_request(request)
    if not result.ok:
        access.refuse_anonymous(request, "download", pk)
        return None, _error(result.status, result.error, result.detail)
    drf_request = result.request
    image = SavedImage.objects.filter(pk=pk).first()
    if image is None:
        raise Http404
    # Refusals are audited here; the allowed download is audited with its range below.
    access.require(drf_request, "download", image, audit_allowed=False)
    return (drf_request, image), None


async def image_content(request, pk):
    try:
        allowed, error = await sync_to_async(_authorise)(request, pk)
    except access.ImageAccessDenied as exc:
        return _error(403, "permission_denied", str(exc))
    if error:
        return error
    drf_request, image = allowed
    span = parse_range(request.headers.get("Range"), image.plaintext_size)
    if span == "unsatisfiable":
        response = _error(416, "range_not_satisfiable", "The range is outside the image.")
        response["Content-Range"] = f"bytes */{image.plaintext_size}"
        return response
    start, end = span or (0, image.plaintext_size)
    details = {"range": [start, end] if span else None}
    try:
        # Proves the stored object is this record's before the answer starts.
        reader = await asyncio.to_thread(service.open_reader, image)
    except service.ImageIntegrityError as exc:
        await sync_to_async(audit.record_request)(
            drf_request, "image.download", target=image.target, outcome=Outcome.FAILED,
            details={**details, "reason": f"integrity check failed: {exc.reason}"})
        log.error("download of %s refused: integrity check failed: %s", image.id, exc.reason)
        return _error(409, "integrity_error", str(exc))
    try:
        await sync_to_async(audit.record_request)(drf_request, "image.download",
                                                  target=image.target, details=details)
        await sync_to_async(signals.image_download_started.send)(
            SavedImage, image=image, request=drf_request)
    except BaseException:
        await asyncio.to_thread(reader.close)
        raise
    response = StreamingHttpResponse(_stream(reader, image, drf_request, start, end),
                                     content_type="application/octet-stream",
                                     status=206 if span else 200)
    response["Content-Length"] = str(end - start)
    response["Accept-Ranges"] = "bytes"
    response["Content-Disposition"] = f'attachment; filename="{image.id}.img"'
    if span:
        response["Content-Range"] = f"bytes {start}-{end - 1}/{image.plaintext_size}"
    return response


# Decrypt this much per trip to a worker thread: fewer thread hops.
BATCH_BYTES = 4 * 1024 * 1024


def _batches(pieces):
    """Lists of verified pieces, ~BATCH_BYTES each: sent one by one, never joined."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


async def _stream(reader, image, request, start, end):
    """Yield verified plaintext; the next batch is decrypted while this one is sent."""
    batches = _batches(reader.iter_range(start, end))
    upcoming = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
    try:
        while True:
            try:
                batch = await upcoming
            except vformat.FormatError as exc:
                await sync_to_async(audit.record_request)(
                    request, "image.download", target=image.target, outcome=Outcome.FAILED,
                    details={"reason": f"integrity check failed: {exc}"})
                log.error("download of %s stopped: %s", image.id, exc)
                raise
            if batch is None:
                return
            upcoming = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
            for piece in batch:
                yield piece
    finally:
        if not upcoming.done():
            await asyncio.wait([upcoming])
        await asyncio.to_thread(reader.close)
