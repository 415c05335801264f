"""Streaming HTTP transfers between the agent and the portal (stdlib only).

A save uploads a multi-GB stream that is produced piece by piece by the
driver, and a restore feeds a download piece by piece into the driver, so
neither ever holds an image in memory or writes it to disk.  ``http.client``
is enough for that and keeps the agent free of extra dependencies.

* `upload` sends an iterator of byte pieces as a POST body, with a
  ``Content-Length`` when the length is known (the portal requires it for
  images) and ``Transfer-Encoding: chunked`` otherwise.
* `download` opens a GET and yields the body in pieces, checking that it is
  as long as announced (``http.client`` silently accepts a short body).
* `Cancel` lets another thread break a transfer blocked in the network, so
  an abort does not wait for a socket timeout.

Errors: `HttpError` for an answer other than 2xx (with the portal's JSON
``detail`` when it sent one), `TransferError` for everything network.
Credentials travel in headers the caller builds and are never logged here.

Django-free.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

SEND_BYTES = 256 * 1024     # coalesce the driver's small record frames per send
READ_BYTES = 256 * 1024
MAX_ANSWER_BYTES = 1 << 20  # JSON answers are small; never read a huge error page whole
DEFAULT_TIMEOUT = 60.0
# The portal's error code for an image whose stored object does not match its
# record (vault/download.py); said before the first byte, as a 409.
INTEGRITY_ERROR = "integrity_error"


class TransferError(Exception):
    """The transfer failed on the network (connect, send, receive, short body)."""


class HttpError(TransferError):
    """The server answered with a status other than 2xx; ``code`` is the portal's
    stable error code (its JSON ``error``) when it sent one."""

    def __init__(self, status: int, reason: str, detail: str = "", code: str = ""):
        self.status, self.reason, self.detail, self.code = status, reason, detail, code
        super().__init__(f"HTTP {status} {reason}" + (f": {detail}" if detail else ""))


class ShortDownload(TransferError):
    """The body ended before its announced length: the connection broke, or the
    portal stopped at a chunk that failed its integrity check (it cannot say which
    once the answer has started)."""


class Cancel:
    """Thread-safe: `cancel()` shuts down the socket of the attached transfer
    (or of the next one to attach), which wakes a thread blocked in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self.cancelled = False

    def attach(self, conn: http.client.HTTPConnection | None) -> None:
        with self._lock:
            self._conn = conn
            if self.cancelled and conn is not None:
                _shutdown(conn)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._conn is not None:
                _shutdown(self._conn)


def _shutdown(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: nothing left to wake


# --------------------------------------------------------------------------
def _origin(parts) -> tuple[str, str, int | None]:
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def portal_target(portal_url: str, url: str) -> str:
    """The absolute URL for a transfer the portal asked for, which must be on
    the portal this agent is enrolled with (``portal_url``, from its bundle).

    A command carries a path relative to that URL (``api/v1/images/``); an
    absolute URL is accepted only with the same scheme, host and port, and
    under the same path.  So image bytes never go to another address (a port
    the portal does not own, say) nor over plain http when the portal is
    https, whatever the command says.  Raises `TransferError`."""
    base = urlsplit(portal_url)
    if base.scheme not in ("http", "https") or not base.hostname:
        raise TransferError("this agent has no enrolled portal URL to send image bytes to")
    prefix = base.path.rstrip("/") + "/"
    parts = urlsplit(url)
    if not parts.scheme and not parts.netloc:
        path = parts.path.lstrip("/")
        if not path or any(seg in (".", "..") for seg in path.split("/")):
            raise TransferError(f"not a path on the portal: {parts.path!r}")
        query = f"?{parts.query}" if parts.query else ""
        return f"{base.scheme}://{base.netloc}{prefix}{path}{query}"
    try:
        same = _origin(parts) == _origin(base)
    except ValueError:  # a port that is not a number
        same = False
    if not same:
        raise TransferError(f"{_where(url)} is not the enrolled portal "
                            f"{base.scheme}://{base.netloc}: refused")
    if not parts.path.startswith(prefix) or "/../" in parts.path + "/" \
            or "/./" in parts.path + "/":
        raise TransferError(f"{_where(url)} is not under the enrolled portal's URL: refused")
    return url


def connect(url: str, *, ca: str = "", timeout: float = DEFAULT_TIMEOUT,
            ) -> tuple[http.client.HTTPConnection, str]:
    """An (unopened) connection for ``url`` and the request target."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransferError(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ca or None)
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=context), target
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), target


def upload(url: str, pieces: Iterable[bytes], *, headers: Mapping[str, str],
           length: int | None = None, ca: str = "", timeout: float = DEFAULT_TIMEOUT,
           cancel: Cancel | None = None) -> tuple[int, Any]:
    """POST ``pieces`` as the body; return (status, decoded JSON answer).

    Exceptions raised by ``pieces`` itself (an abort, a driver error)
    propagate unchanged, after the connection is closed.
    """
    conn, target = connect(url, ca=ca, timeout=timeout)
    if cancel is not None:
        cancel.attach(conn)
    try:
        try:
            conn.putrequest("POST", target, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if length is not None:
                conn.putheader("Content-Length", str(length))
            else:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"cannot reach {_where(url)}: {_why(exc)}") from None
        _send_body(conn, url, pieces, chunked=length is None)
        return _answer(conn, url)
    finally:
        if cancel is not None:
            cancel.attach(None)
        conn.close()


def _send_body(conn: http.client.HTTPConnection, url: str, pieces: Iterable[bytes], *,
               chunked: bool) -> None:
    def send(data: bytes) -> None:
        try:
            conn.send(data)
        except OSError as exc:
            # The portal may have answered early (403, 413, ...) and closed the
            # connection: its reason beats "broken pipe".
            early = _early_answer(conn)
            if early is not None:
                raise early from None
            raise TransferError(f"connection to {_where(url)} lost during upload: "
                                f"{_why(exc)}") from None

    def flush(parts: list[bytes]) -> None:
        data = b"".join(parts)
        send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    buffered: list[bytes] = []
    size = 0
    for piece in pieces:
        if piece:
            buffered.append(piece)
            size += len(piece)
        if size >= SEND_BYTES:
            flush(buffered)
            buffered, size = [], 0
    if buffered:
        flush(buffered)
    if chunked:
        send(b"0\r\n\r\n")


def _early_answer(conn: http.client.HTTPConnection) -> HttpError | None:
    try:
        resp = conn.getresponse()
        status, reason, body = resp.status, resp.reason, resp.read(MAX_ANSWER_BYTES)
    except (OSError, http.client.HTTPException):
        return None
    return _http_error(status, reason, body) if not 200 <= status < 300 else None


def _answer(conn: http.client.HTTPConnection, url: str) -> tuple[int, Any]:
    try:
        resp = conn.getresponse()
        status, reason, body = resp.status, resp.reason, resp.read(MAX_ANSWER_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        raise TransferError(f"no answer from {_where(url)}: {_why(exc)}") from None
    if not 200 <= status < 300:
        raise _http_error(status, reason, body)
    return status, _json(body)


def _http_error(status: int, reason: str, raw: bytes) -> HttpError:
    decoded = _json(raw)
    detail = code = ""
    if isinstance(decoded, dict) and decoded.get("detail"):
        detail = str(decoded["detail"])
    elif raw and not isinstance(decoded, dict):
        detail = raw[:200].decode("utf-8", "replace").strip()
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        code = decoded["error"]
    return HttpError(status, reason, detail, code)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


# --------------------------------------------------------------------------
class Download:
    """An open GET response; iterate it for the body in pieces."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 url: str, chunk_size: int, cancel: Cancel | None = None):
        self._conn, self._resp, self._url, self._chunk = conn, resp, url, chunk_size
        self._cancel = cancel
        self.status = resp.status
        raw = resp.getheader("Content-Length")
        self.length = int(raw) if raw and raw.isdigit() else None
        self.received = 0

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                piece = self._resp.read(self._chunk)
            except (OSError, http.client.HTTPException) as exc:
                raise TransferError(f"download from {_where(self._url)} failed after "
                                    f"{self.received} bytes: {_why(exc)}") from None
            if not piece:
                break
            self.received += len(piece)
            yield piece
        if self.length is not None and self.received != self.length:
            raise ShortDownload(f"download from {_where(self._url)} ended after "
                                f"{self.received} of {self.length} bytes")

    def close(self) -> None:
        if self._cancel is not None:
            self._cancel.attach(None)
        self._conn.close()

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def download(url: str, *, headers: Mapping[str, str], ca: str = "",
             timeout: float = DEFAULT_TIMEOUT, chunk_size: int = READ_BYTES,
             cancel: Cancel | None = None) -> Download:
    """GET ``url``; raises `HttpError` unless the answer is 200."""
    conn, target = connect(url, ca=ca, timeout=timeout)
    if cancel is not None:
        cancel.attach(conn)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        if resp.status != 200:
            raise _http_error(resp.status, resp.reason, resp.read(MAX_ANSWER_BYTES))
    except (OSError, http.client.HTTPException) as exc:
        _close(conn, cancel)
        raise TransferError(f"cannot download from {_where(url)}: {_why(exc)}") from None
    except HttpError:
        _close(conn, cancel)
        raise
    return Download(conn, resp, url, chunk_size, cancel)


def _close(conn: http.client.HTTPConnection, cancel: Cancel | None) -> None:
    if cancel is not None:
        cancel.attach(None)
    conn.close()


def _where(url: str) -> str:
    """Scheme, host and path only: a URL could one day carry a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
