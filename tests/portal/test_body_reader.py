"""portal.body_reader under a real uvicorn: on uvloop, on asyncio's own loop, and over TLS.

The app (tests/portal/body_reader_app.py) reads each body through the reader into
buffers of the size the test asks for and answers with what it got.
"""
import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.server import ROOT, free_port

MiB = 1024 * 1024


@dataclass
class Server:
    port: int
    tls: ssl.SSLContext | None  # the client's context when the server speaks TLS

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port))
        return self.tls.wrap_socket(sock, server_hostname="127.0.0.1") if self.tls else sock


def certificate_for_loopback(folder):
    """A self-signed certificate for 127.0.0.1: (key file, certificate file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


@pytest.fixture(scope="module", params=["uvloop", "asyncio", "uvloop+tls"])
def server(request, tmp_path_factory):
    loop, _, tls = request.param.partition("+")
    port, args, client_tls = free_port(), [], None
    if tls:
        key_file, cert_file = certificate_for_loopback(tmp_path_factory.mktemp("tls"))
        args = ["--ssl-keyfile", str(key_file), "--ssl-certfile", str(cert_file)]
        client_tls = ssl.create_default_context(cafile=str(cert_file))
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.portal.body_reader_app:app", "--http",
         "portal.body_reader:HttpProtocol", "--loop", loop, "--port", str(port),
         "--lifespan", "off", "--log-level", "warning", *args], cwd=ROOT)
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
        yield Server(port, client_tls)
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


def post(server, body, view=64 * 1024):
    with server.connect() as sock:
        sock.sendall(head(path=f"/?view={view}", length=len(body)) + body)
        status, headers, payload, _ = read_response(sock)
    assert status == 200
    return headers, json.loads(payload)


def expected(body, direct=True):
    return {"direct": direct, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("view", [4096, 100_003, 4 * MiB])
def test_body_arrives_whole_in_buffers_of_any_size(server, view):
    body = os.urandom(3 * MiB + 12345)
    headers, payload = post(server, body, view)
    assert payload == expected(body)
    # Read past the parser: it cannot take another request on this connection.
    assert headers["connection"] == "close"


def test_body_the_parser_already_holds_keeps_the_connection(server):
    body = b"small body" * 10
    with server.connect() as sock:
        sock.sendall(head(length=len(body)) + body)
        status, headers, payload, rest = read_response(sock)
        assert (status, json.loads(payload)) == (200, expected(body))
        assert "connection" not in headers
        sock.sendall(head(length=len(body)) + body)
        assert json.loads(read_response(sock, rest)[2]) == expected(body)


def test_expect_100_continue_gets_its_interim_answer(server):
    body = os.urandom(2 * MiB)
    with server.connect() as sock:
        sock.sendall(head(length=len(body), extra=["Expect: 100-continue"]))
        status, _, _, rest = read_response(sock)
        assert status == 100
        sock.sendall(body)
        status, _, payload, _ = read_response(sock, rest)
    assert (status, json.loads(payload)) == (200, expected(body))


def events(server):
    with server.connect() as sock:
        sock.sendall(head("GET", "/events"))
        return json.loads(read_response(sock)[2])["events"]


def test_client_gone_mid_body_is_reported_and_the_server_goes_on(server):
    before = len(events(server))
    with server.connect() as sock:
        sock.sendall(head(length=4 * MiB) + os.urandom(MiB))
    deadline = time.monotonic() + 10
    while len(events(server)) == before:
        assert time.monotonic() < deadline, "the app was never told the client left"
        time.sleep(0.05)
    assert events(server)[-1]["disconnected_after"] <= MiB
    body = os.urandom(MiB)
    assert post(server, body)[1] == expected(body)


def test_chunked_body_is_left_to_receive(server):
    body = os.urandom(300_000)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece)
                       for piece in (body[:100_000], body[100_000:])) + b"0\r\n\r\n"
    with server.connect() as sock:
        sock.sendall(head(extra=["Transfer-Encoding: chunked"]) + chunked)
        status, _, payload, _ = read_response(sock)
    assert (status, json.loads(payload)) == (200, expected(body, direct=False))


def test_request_without_a_length_is_left_to_receive(server):
    with server.connect() as sock:
        sock.sendall(head("GET"))
        assert json.loads(read_response(sock)[2]) == expected(b"", direct=False)
