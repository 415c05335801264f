"""Raw sockets against a relocation port, as an attacker without a
certificate holds them: idle TCP connections, and TLS handshakes begun with
part of a real ClientHello and then left to stall."""

from __future__ import annotations

import contextlib
import socket
import ssl

ATTACKER = "127.0.0.2"  # agents and engines under test connect from 127.0.0.1


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client: its ClientHello record
    (the same whoever sends it: no certificate goes in the first flight)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def stranger(port: int, address: str = ATTACKER, send: bytes = b"",
             host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``host:port`` from ``address`` that sends ``send``
    (nothing: idle) and then nothing more."""
    sock = socket.create_connection((host, port), timeout=5, source_address=(address, 0))
    if send:
        sock.sendall(send)
    return sock


def hold(port: int, idle: int, slow: int, address: str = ATTACKER) -> list[socket.socket]:
    """``idle`` silent connections and ``slow`` ones stalled inside the
    handshake (the record header and the first bytes of a ClientHello)."""
    half = client_hello()[:60]
    return ([stranger(port, address) for _ in range(idle)]
            + [stranger(port, address, send=half) for _ in range(slow)])


def closed_by_server(sock: socket.socket, wait: float = 0.0) -> bool:
    """True once the server has closed this connection (EOF, reset, or a TLS
    alert and then EOF); False if it is still open after ``wait`` seconds."""
    sock.settimeout(max(wait, 0.001))
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
