"""Knocking on a relocation port from outside, as another host would."""
import socket
import ssl

from migrator import tls


def relocation_probe(cert, key, ca, port, address="127.0.0.1"):
    """Connect with this certificate: True if the server kept the connection after the
    handshake (it waits for our HELLO), False if it refused it (closed, reset, alert)."""
    context = tls.client_context(cert, key, ca)
    try:
        with socket.create_connection((address, port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=None) as conn:
            conn.settimeout(0.3)
            try:
                return conn.recv(1) != b""
            except TimeoutError:
                return True
    except (ssl.SSLError, OSError):
        return False
