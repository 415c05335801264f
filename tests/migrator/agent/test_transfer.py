"""Streaming HTTP: bodies from iterators, early answers, short downloads, cancel."""
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from migrator.agent import transfer


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = []
    behaviour = "echo"
    gate = threading.Event()

    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(parts)
        return self.rfile.read(int(self.headers["Content-Length"]))

    def do_POST(self):
        if self.behaviour == "early":  # refuse before reading a byte, then hang up
            self._json(413, {"error": "too_large", "detail": "Images are limited."})
            self.close_connection = True
            return
        if self.behaviour == "hold":
            self.gate.wait(10)
            return
        if self.behaviour == "redirect" and self.path == "/redirect":
            self._body()
            self.send_response(307)
            self.send_header("Location", f"http://{self.headers['Host']}/followed")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self._body()
        self.seen.append((dict(self.headers), body))
        self._json(201, {"id": "img-1", "sha256": hashlib.sha256(body).hexdigest()})

    def do_GET(self):
        data = b"x" * 1_000_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(data) + (10 if "short" in self.path else 0)))
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True


@pytest.fixture
def server():
    Recorder.seen, Recorder.behaviour = [], "echo"
    Recorder.gate = threading.Event()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Recorder.gate.set()
    httpd.shutdown()
    httpd.server_close()


def pieces(total, size=7000):
    for start in range(0, total, size):
        yield bytes([start // size % 251]) * min(size, total - start)


def test_upload_with_content_length_and_chunked(server):
    data = b"".join(pieces(1_000_003))
    status, answer = transfer.upload(f"{server}/up", pieces(1_000_003),
                                     headers={"X-Test": "1"}, length=len(data))
    assert status == 201 and answer["sha256"] == hashlib.sha256(data).hexdigest()
    status, answer = transfer.upload(f"{server}/up", pieces(1_000_003), headers={})
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    (first, _), (second, _) = Recorder.seen
    assert first["Content-Length"] == str(len(data)) and first["X-Test"] == "1"
    assert second["Transfer-Encoding"] == "chunked"


def test_an_early_refusal_is_reported_with_its_detail(server):
    Recorder.behaviour = "early"
    with pytest.raises(transfer.HttpError) as caught:
        transfer.upload(f"{server}/up", pieces(50_000_000, 1 << 20), headers={},
                        length=50_000_000)
    assert caught.value.status == 413 and caught.value.detail == "Images are limited."


def test_exceptions_from_the_body_propagate_unchanged(server):
    class Boom(Exception):
        pass

    def body():
        yield b"x" * 300_000
        raise Boom()

    with pytest.raises(Boom):
        transfer.upload(f"{server}/up", body(), headers={}, length=600_000)


def test_cancel_wakes_a_blocked_upload(server):
    Recorder.behaviour = "hold"
    cancel = transfer.Cancel()
    threading.Timer(0.3, cancel.cancel).start()
    started = time.monotonic()
    with pytest.raises(transfer.TransferError):
        transfer.upload(f"{server}/up", pieces(64_000_000, 1 << 20), headers={},
                        length=64_000_000, cancel=cancel)
    assert time.monotonic() - started < 5


def test_download_streams_and_detects_a_short_body(server):
    with transfer.download(f"{server}/full", headers={}) as dl:
        assert dl.length == 1_000_000
        assert sum(len(p) for p in dl) == 1_000_000
    with transfer.download(f"{server}/short", headers={}) as dl, \
            pytest.raises(transfer.TransferError, match="ended after 1000000 of 1000010"):
        for _ in dl:
            pass


def test_connection_refused_is_a_transfer_error():
    with pytest.raises(transfer.TransferError, match="cannot"):
        transfer.download("http://127.0.0.1:9/x", headers={}, timeout=2)
    with pytest.raises(transfer.TransferError, match="not an http"):
        transfer.upload("ftp://x/y", [], headers={})


@pytest.mark.parametrize(("portal", "url", "expected"), [
    ("https://berth.example:8443", "api/v1/images/", "https://berth.example:8443/api/v1/images/"),
    ("https://berth.example/prefix", "api/v1/images/x/content",
     "https://berth.example/prefix/api/v1/images/x/content"),
    ("http://127.0.0.1:9000", "/api/v1/images/", "http://127.0.0.1:9000/api/v1/images/"),
    ("https://berth.example", "https://BERTH.example:443/api/v1/images/",
     "https://BERTH.example:443/api/v1/images/"),
])
def test_transfer_urls_resolve_on_the_enrolled_portal(portal, url, expected):
    assert transfer.portal_target(portal, url) == expected


@pytest.mark.parametrize(("portal", "url"), [
    ("http://127.0.0.1:9000", "http://127.0.0.1:8000/api/v1/images/"),    # another port
    ("http://127.0.0.1:9000", "http://evil.example:9000/api/v1/images/"),  # another host
    ("https://berth.example", "http://berth.example/api/v1/images/"),      # TLS stripped
    ("https://berth.example", "http://berth.example:443/api/v1/images/"),
    ("https://berth.example/prefix", "https://berth.example/other/api/v1/images/"),
    ("https://berth.example/prefix", "https://berth.example/prefix/../x"),
    ("https://berth.example", "../api/v1/images/"),
    ("https://berth.example", "//evil.example/api/v1/images/"),
    ("https://berth.example", "ftp://berth.example/api/v1/images/"),
    ("", "api/v1/images/"),                                                 # no enrolled URL
])
def test_transfer_urls_off_the_enrolled_portal_are_refused(portal, url):
    with pytest.raises(transfer.TransferError):
        transfer.portal_target(portal, url)


def test_a_redirect_is_not_followed_elsewhere(server):
    """A 3xx (say, to plain http or another host) is an answer, not a new address."""
    Recorder.behaviour = "redirect"
    with pytest.raises(transfer.HttpError) as caught:
        transfer.upload(f"{server}/redirect", [b"x" * 1000], headers={}, length=1000)
    assert caught.value.status == 307
    assert Recorder.seen == []  # nothing reached /followed
