"""uvicorn's HTTP protocol, plus an ASGI extension that reads a body into the app's buffers.

Image uploads are the portal's largest requests. Through ASGI's ``receive()`` every
piece of a body is copied five times before the app sees it (uvloop's read buffer
into ``bytes``, httptools' body slice, uvicorn's body buffer, the message's ``bytes``,
then the app's own buffer) and costs an event-loop round trip per 64-256 KiB. On the
2-core bench machine that was about a quarter of an upload's CPU. Here the event loop
reads the socket into the app's buffer itself (``asyncio.BufferedProtocol``).

Offered as ``scope["extensions"][EXTENSION]`` for requests with a Content-Length and
no Transfer-Encoding; ``await reader.fill(view)`` returns once ``view`` is full or the
body has ended (the number of bytes) and raises ``BodyDisconnect`` if the client
goes away first. Apps that never call it get uvicorn's behaviour unchanged, and an
app served without this protocol finds no extension and uses ``receive()``.

While the reader runs, the connection's transport is handed to it and handed back
once the body is complete. The httptools parser never sees those bytes, so that
connection is closed after its response (``Connection: close``) instead of reused.

Serve with ``uvicorn --http portal.body_reader:HttpProtocol`` (``manage.py demo`` does).
This leans on uvicorn's ``HttpToolsProtocol`` internals (``cycle``, ``flow``,
``transport``, ``pipeline``): uvicorn is pinned, and tests/portal/test_body_reader.py
runs it under a real server.
"""
import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

EXTENSION = "berth.body_reader"


class BodyDisconnect(Exception):
    """The client went away before the whole body arrived."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, offering a ``BodyReader`` to each request with a length."""

    def on_headers_complete(self):
        super().on_headers_complete()
        cycle = self.cycle
        # Not for WebSocket upgrades (no new cycle) or pipelined requests (queued
        # behind another: the parser may already be past their bodies).
        if cycle is None or cycle.scope is not self.scope or any(
                queued is cycle for queued, _ in self.pipeline):
            return
        length = _content_length(self.headers)
        if length is not None:
            self.scope.setdefault("extensions", {})[EXTENSION] = BodyReader(self, cycle, length)


def _content_length(headers):
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)  # httptools has already refused a malformed one
    return length


class BodyReader(asyncio.BufferedProtocol):
    """The rest of one request's body, read by the event loop into buffers the app gives."""

    def __init__(self, http, cycle, length):
        self.http, self.cycle = http, cycle
        self.unread = length  # body bytes not yet handed to the app
        self.reading = False  # the transport is ours
        self.target, self.filled, self.waiter = None, 0, None

    async def fill(self, view) -> int:
        """Fill ``view`` from the body; the bytes filled, fewer only at the body's end."""
        view = memoryview(view)[:self.unread]
        filled = 0 if self.reading else self._from_parser(view)
        if filled < len(view) and self.cycle.more_body:
            filled += await self._from_socket(view[filled:])
        self.unread -= filled
        if self.unread == 0 and self.reading:
            self._hand_back()
        return filled

    def _from_parser(self, view):
        """What httptools parsed before the app asked: it sits in the cycle's body buffer."""
        if self.cycle.disconnected:
            raise BodyDisconnect()
        body = self.cycle.body
        n = min(len(body), len(view))
        view[:n] = body[:n]
        del body[:n]
        return n

    async def _from_socket(self, view):
        if self.cycle.disconnected:
            raise BodyDisconnect()
        self.target, self.filled = view, 0
        self.waiter = asyncio.get_running_loop().create_future()
        if not self.reading:
            self._take_over()
        self.http.flow.resume_reading()
        try:
            return await self.waiter
        finally:
            self.target = self.waiter = None

    def _take_over(self):
        cycle = self.cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        cycle.keep_alive = False  # the parser is left mid-body: no next request here
        self.reading = True
        cycle.transport.set_protocol(self)

    def _hand_back(self):
        # Reading stays paused: the connection closes after the response.
        self.reading = False
        self.cycle.transport.set_protocol(self.http)

    # asyncio.BufferedProtocol: the event loop reads into get_buffer()'s view.

    def get_buffer(self, sizehint):
        return self.target[self.filled:]

    def buffer_updated(self, nbytes):
        self.filled += nbytes
        if self.filled == len(self.target):
            self.http.flow.pause_reading()  # until the app hands over the next buffer
            self.waiter.set_result(self.filled)

    def eof_received(self):
        return self.http.eof_received()

    def connection_lost(self, exc):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(BodyDisconnect())
        self.http.connection_lost(exc)

    def pause_writing(self):
        self.http.pause_writing()

    def resume_writing(self):
        self.http.resume_writing()
