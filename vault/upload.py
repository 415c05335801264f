"""POST /api/v1/images/: stream an image body straight into the vault writer.

A raw ASGI app routed ahead of Django (portal/asgi.py), because Django's ASGI
handler spools every request body to a temporary file first: for an image that
would put plaintext on disk. Here each piece of the body is encrypted as it
arrives; memory holds at most a few chunks; nothing is visible until the whole
body has arrived, matched its declared length (and digest, when given), and been
committed. Any failure or disconnect aborts the writer: no object, no row.
"""
import asyncio
import collections
import errno
import json
import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings

from portal import audit, body_reader
from portal.asgi_auth import authenticate_scope
from portal.models import Outcome
from vault import access, service, signals

log = logging.getLogger(__name__)
UPLOAD_PATH = "/api/v1/images/"
# Hand the sealing and hashing threads pieces this large (rounded to whole chunks):
# fewer thread hops. Memory holds BUFFERS of them per upload. Measured on the 2-core
# bench machine: 4 MiB x 3 beat 1 MiB x 4, 2 and 6 MiB x 3 and 8 MiB x 2; x 4 was no faster.
FEED_BYTES = 4 * 1024 * 1024
BUFFERS = 3  # one filling, two sealed or hashed: the hash never waits for a buffer


class UploadError(signals.StoreRefused):
    """An upload refused before anything was stored: its JSON answer."""


class ClientGone(Exception):
    """The client disconnected mid-body; there is nobody to answer."""


def route(fallback):
    """Wrap the Django ASGI app so image uploads bypass its body spooling."""
    async def app(scope, receive, send):
        if (scope["type"] == "http" and scope["path"] == UPLOAD_PATH
                and scope["method"] == "POST"):
            return await handle_upload(scope, receive, send)
        return await fallback(scope, receive, send)
    return app


async def handle_upload(scope, receive, send):
    try:
        request = await _authorise(scope)  # each refusal here is audited by the checks
    except signals.StoreRefused as exc:
        return await _respond(send, exc.status, {"error": exc.error, "detail": exc.detail})
    metadata = {}
    try:
        metadata = await sync_to_async(service.upload_metadata)(request, parse_metadata(scope))
        image = await _receive_into_vault(request, metadata, _body_source(scope, receive))
    except UploadError as exc:  # the upload's own checks: length, digest, size, headers
        await _audit_failure(request, metadata, Outcome.DENIED, exc.detail, exc.error)
        return await _respond(send, exc.status, {"error": exc.error, "detail": exc.detail})
    except signals.StoreRefused as exc:  # a receiver's refusal: audited where it was made
        return await _respond(send, exc.status, {"error": exc.error, "detail": exc.detail})
    except (ClientGone, body_reader.BodyDisconnect):
        # Nobody to answer, but an upload that stopped half-way is worth a record.
        await _audit_failure(request, metadata, Outcome.FAILED,
                             "the client disconnected before the whole body arrived; "
                             "nothing was stored", "interrupted")
        return None
    except OSError as exc:  # the vault's storage failed (disk full, I/O error): nothing kept
        log.error("upload failed in the vault's storage: %s", exc)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return await _respond(send, 507 if full else 500, {
            "error": "insufficient_storage" if full else "storage_error",
            "detail": f"The vault could not store the image: {exc.strerror or exc}. "
                      "Nothing was stored."})
    await _respond(send, 201, await sync_to_async(service.image_json)(image))


async def _audit_failure(request, metadata, outcome, reason, code):
    details = {"reason": reason, "error": code}
    if metadata.get("name"):
        details.update(name=metadata["name"], declared_size=metadata.get("declared_size"))
    await sync_to_async(audit.record_request)(request, "image.upload", target="vault",
                                              outcome=outcome, details=details)


async def _authorise(scope):
    result = await sync_to_async(authenticate_scope)(scope)
    if not result.ok:
        await sync_to_async(access.refuse_anonymous)(result.django_request, "upload")
        raise UploadError(result.status, result.error, result.detail)
    request = result.request
    if not await sync_to_async(access.can_upload)(request):
        await sync_to_async(audit.record_request)(
            request, "image.upload", target="vault", outcome=Outcome.DENIED,
            details={"reason": "upload needs the admin role (and images:write for tokens)"})
        raise UploadError(403, "permission_denied", "You may not upload images.")
    return request


def _headers(scope):
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


UUID_FIELDS = ("guest_uuid",)
# Largest value of each number's column: PostgreSQL refuses more (SQLite stores anything).
INT_FIELDS = {"memory_mib": 2**31 - 1, "vcpus": 2**15 - 1}
TEXT_FIELDS = ("name", "guest_name", "source_host", "architecture", "virt_extensions", "sha256")


def parse_metadata(scope) -> dict:
    """Metadata from ``X-Berth-*`` headers (e.g. ``X-Berth-Guest-Name``). A job's upload
    gets its metadata from the job instead (service.upload_metadata), the headers only
    cross-checked."""
    headers = _headers(scope)
    if headers.get("content-type", "").split(";")[0].strip() != "application/octet-stream":
        raise UploadError(415, "unsupported_media_type",
                          "Send the image as application/octet-stream.")
    meta = {}
    for field in (*UUID_FIELDS, *INT_FIELDS, *TEXT_FIELDS):
        value = headers.get("x-berth-" + field.replace("_", "-"))
        if value is not None:
            meta[field] = _convert(field, value.strip())
    meta["declared_size"] = _declared_size(headers)
    return meta


def _convert(field, value):
    try:
        if field in UUID_FIELDS:
            return str(uuid.UUID(value))
        if field in INT_FIELDS:
            number = int(value)
            if not 0 < number <= INT_FIELDS[field]:
                raise ValueError
            return number
    except ValueError:
        raise UploadError(400, "invalid", f"X-Berth-{field} is not valid: {value!r}") from None
    if field == "sha256" and not re.fullmatch(r"[0-9a-f]{64}", value.lower()):
        raise UploadError(400, "invalid", "X-Berth-SHA256 must be 64 hex digits.")
    if len(value) > 200:
        raise UploadError(400, "invalid", f"X-Berth-{field} is longer than 200 characters.")
    return value.lower() if field == "sha256" else value


def _declared_size(headers):
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise UploadError(400, "invalid", "Content-Length is not a number.")
    size = int(raw)
    if size > settings.VAULT_MAX_IMAGE_BYTES:
        raise _too_large()
    return size


def _too_large():
    return UploadError(413, "too_large",
                       f"Images are limited to {settings.VAULT_MAX_IMAGE_BYTES} bytes.")


async def _refuse_empty(request):
    # A 0-byte "image" is no guest's memory: a client bug (or a probe) that would
    # otherwise sit in the vault as a record nobody can restore.
    await sync_to_async(audit.record_request)(
        request, "image.upload", target="vault", outcome=Outcome.FAILED,
        details={"reason": "empty body"})
    raise UploadError(400, "empty_image", "The image is empty: send its bytes. "
                      "Nothing was stored.")


async def _receive_into_vault(request, meta, body):
    if meta["declared_size"] == 0:
        await _refuse_empty(request)  # before the vault opens anything
    sink = await asyncio.to_thread(service.ImageSink)
    try:
        if await _pump(body, sink, meta["declared_size"]) == 0:
            await _refuse_empty(request)  # chunked, and nothing came
        try:
            stats = await asyncio.to_thread(sink.finish, meta.get("sha256"))
        except service.DigestMismatch as exc:
            raise UploadError(422, "digest_mismatch", str(exc)) from None
        return await sync_to_async(service.register_image)(request, sink, stats, meta)
    except BaseException:
        await asyncio.to_thread(sink.abort)
        raise


class _Lanes:
    """Where filled buffers go: one thread seals them, another hashes them.

    Each lane is a single thread, so it sees buffers in stream order; the two
    run at the same time, and the hash (one sequential SHA-256, the slowest
    step) never waits for sealing or receiving while a filled buffer is ready.
    A buffer returns to the pool when both lanes are done with it.
    """

    def __init__(self, sink, size):
        self.sink = sink
        self.free = [bytearray(size) for _ in range(BUFFERS)]
        self.busy = collections.deque()  # (buffer, futures), oldest first
        self.sealer = ThreadPoolExecutor(1, thread_name_prefix="berth-seal")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="berth-sha256")

    async def take(self):
        """A buffer to fill: a free one, else the oldest once both lanes are done with it."""
        if not self.free:
            buffer, futures = self.busy.popleft()
            await asyncio.gather(*futures)
            self.free.append(buffer)
        return self.free.pop()

    def submit(self, data, buffer):
        loop = asyncio.get_running_loop()
        self.busy.append((buffer, (loop.run_in_executor(self.sealer, self.sink.seal, data),
                                   loop.run_in_executor(self.hasher, self.sink.hash, data))))

    async def drain(self, quiet=False):
        """Wait for every buffer in flight; then raise the first failure unless ``quiet``."""
        futures = [f for _, pair in self.busy for f in pair]
        self.busy.clear()
        results = await asyncio.gather(*futures, return_exceptions=True)
        self.sealer.shutdown(wait=False)
        self.hasher.shutdown(wait=False)
        for result in results:
            if isinstance(result, BaseException) and not quiet:
                raise result


def _body_source(scope, receive):
    """Something to ``fill`` buffers from: the event loop reading the socket straight
    into them when the server offers that (portal.body_reader, as the portal is
    served; only with a Content-Length, which ``parse_metadata`` has held to the
    limit), else ASGI messages."""
    reader = scope.get("extensions", {}).get(body_reader.EXTENSION)
    return reader if reader is not None else _MessageBody(receive)


class _MessageBody:
    """The body from ASGI ``http.request`` messages, copied into our buffers."""

    def __init__(self, receive):
        self.receive = receive
        self.pending, self.more, self.received = memoryview(b""), True, 0

    async def fill(self, buffer) -> int:
        view, filled = memoryview(buffer), 0
        while filled < len(view):
            if not self.pending:
                if not self.more:
                    break
                await self._next_message()
            take = min(len(self.pending), len(view) - filled)
            view[filled:filled + take] = self.pending[:take]
            self.pending, filled = self.pending[take:], filled + take
        return filled

    async def _next_message(self):
        message = await self.receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body = message.get("body", b"")
        self.received += len(body)
        # Checked as it arrives: a body without Content-Length has no other limit.
        if self.received > settings.VAULT_MAX_IMAGE_BYTES:
            raise _too_large()
        self.pending, self.more = memoryview(body), message.get("more_body", False)


async def _pump(body, sink, declared):
    """Fill chunk-aligned buffers from the body; two threads seal and hash them.

    While one buffer is filled by the event loop, earlier ones are sealed and
    hashed, so network, hashing and encryption overlap on two cores. Whole
    chunks reach the encoder without another copy.
    """
    feed = max(1, FEED_BYTES // sink.chunk_size) * sink.chunk_size
    lanes = _Lanes(sink, feed)
    received = 0
    try:
        while True:
            buffer = await lanes.take()
            n = await body.fill(buffer)
            received += n
            if declared is not None and received > declared:
                raise UploadError(400, "length_mismatch", "The body is longer than Content-Length.")
            if n:
                lanes.submit(buffer if n == feed else memoryview(buffer)[:n], buffer)
            if n < feed:
                break
    except BaseException:
        await lanes.drain(quiet=True)  # the buffers are ours again; this error is the answer
        raise
    await lanes.drain()
    if declared is not None and received != declared:
        raise UploadError(400, "length_mismatch",
                          f"Body ended after {received} of {declared} bytes.")
    return received


async def _respond(send, status, payload):
    body = json.dumps(payload, default=str).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
