"""portal.body_reader under a real uvicorn, on uvloop and on asyncio's own loop.

The app (tests/portal/body_reader_app.py) reads each body through the reader into
buffers of the size the test asks for and answers with what it got.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.server import ROOT, free_port

MiB = 1024 * 1024


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def port(request):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.portal.body_reader_app:app", "--http",
         "portal.body_reader:HttpProtocol", "--loop", request.param, "--port", str(port),
         "--lifespan", "off", "--log-level", "warning"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the test server did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def head(method="POST", path="/", length=None, extra=()):
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock, buffered=b""):
    """(status, headers, body, bytes after it) of the next response on ``sock``."""
    data = buffered
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, "connection closed before a response"
        data += piece
    top, rest = data.split(b"\r\n\r\n", 1)
    status_line, *lines = top.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", 0))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(status_line.split()[1]), headers, rest[:length], rest[length:]


def post(port, body, view=64 * 1024):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(path=f"/?view={view}", length=len(body)) + body)
        status, headers, payload, _ = read_response(sock)
    assert status == 200
    return headers, json.loads(payload)


def expected(body, direct=True):
    return {"direct": direct, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("view", [4096, 100_003, 4 * MiB])
def test_body_arrives_whole_in_buffers_of_any_size(port, view):
    body = os.urandom(3 * MiB + 12345)
    headers, payload = post(port, body, view)
    assert payload == expected(body)
    # Read past the parser: it cannot take another request on this connection.
    assert headers["connection"] == "close"


def test_body_the_parser_already_holds_keeps_the_connection(port):
    body = b"small body" * 10
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(length=len(body)) + body)
        status, headers, payload, rest = read_response(sock)
        assert (status, json.loads(payload)) == (200, expected(body))
        assert "connection" not in headers
        sock.sendall(head(length=len(body)) + body)
        assert json.loads(read_response(sock, rest)[2]) == expected(body)


def test_expect_100_continue_gets_its_interim_answer(port):
    body = os.urandom(2 * MiB)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(length=len(body), extra=["Expect: 100-continue"]))
        status, _, _, rest = read_response(sock)
        assert status == 100
        sock.sendall(body)
        status, _, payload, _ = read_response(sock, rest)
    assert (status, json.loads(payload)) == (200, expected(body))


def events(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head("GET", "/events"))
        return json.loads(read_response(sock)[2])["events"]


def test_client_gone_mid_body_is_reported_and_the_server_goes_on(port):
    before = len(events(port))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(length=4 * MiB) + os.urandom(MiB))
    deadline = time.monotonic() + 10
    while len(events(port)) == before:
        assert time.monotonic() < deadline, "the app was never told the client left"
        time.sleep(0.05)
    assert events(port)[-1]["disconnected_after"] <= MiB
    body = os.urandom(MiB)
    assert post(port, body)[1] == expected(body)


def test_chunked_body_is_left_to_receive(port):
    body = os.urandom(300_000)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece)
                       for piece in (body[:100_000], body[100_000:])) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(extra=["Transfer-Encoding: chunked"]) + chunked)
        status, _, payload, _ = read_response(sock)
    assert (status, json.loads(payload)) == (200, expected(body, direct=False))


def test_request_without_a_length_is_left_to_receive(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head("GET"))
        assert json.loads(read_response(sock)[2]) == expected(b"", direct=False)
