"""The ASGI app tests/portal/test_body_reader.py serves: it reads bodies through the body reader.

``POST /?view=N`` reads the body into an N-byte buffer, over and over, and answers with
its length and SHA-256 and whether the reader was offered; ``GET /events`` lists the
disconnects the reader reported.
"""
import hashlib
import json
from urllib.parse import parse_qs

from portal.body_reader import EXTENSION, BodyDisconnect

EVENTS = []


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/events":
        return await _answer(send, {"events": EVENTS})
    reader = scope.get("extensions", {}).get(EXTENSION)
    if reader is None:
        body = await _received(receive)
        return await _answer(send, {"direct": False, "length": len(body),
                                    "sha256": hashlib.sha256(body).hexdigest()})
    view = int(parse_qs(scope["query_string"].decode()).get("view", ["65536"])[0])
    digest, total, buffer = hashlib.sha256(), 0, bytearray(view)
    try:
        while True:
            n = await reader.fill(buffer)
            digest.update(memoryview(buffer)[:n])
            total += n
            if n < len(buffer):
                break
    except BodyDisconnect:
        EVENTS.append({"disconnected_after": total})
        return
    await _answer(send, {"direct": True, "length": total, "sha256": digest.hexdigest()})


async def _received(receive):
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def _answer(send, payload):
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
