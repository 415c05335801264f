"""SSL contexts and peer checks for the relocation channel (host agent to host agent).

Specification and rationale: ``docs/pki.md``.  The channel is TLS 1.3 only,
with mutual certificate authentication against the deployment CA alone.  A
peer is identified by the ``berth-host:<name>`` URI in its (verified)
certificate, never by DNS: the client turns hostname checking off and calls
``expected_peer`` after the handshake; both sides then apply the revocation
list and the ``AllowList`` (xend's ``xend-relocation-hosts-allow``).

Typical server side::

    ctx = server_context(cert, key, ca)
    tls = ctx.wrap_socket(conn, server_side=True)
    host = authorize_peer(tls, allow_list=allow, revoked_serials=ca_revoked)

Typical client side::

    ctx = client_context(cert, key, ca)
    tls = ctx.wrap_socket(sock, server_hostname=None)
    host = authorize_peer(tls, allow_list=allow, revoked_serials=ca_revoked,
                          expected_host_name="hostb")

Django-free.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Container, Iterable
from os import PathLike

from cryptography import x509

from migrator.pki import host_identity

StrPath = str | PathLike[str]


class PeerIdentityError(Exception):
    """The peer is not (or not verifiably) the host it must be, or is not allowed.

    ``peer``: its authenticated identity when the refusal came after the certificate
    was verified (revoked, not allowed), so a refusal can say who it was.
    """

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class PeerRevokedError(PeerIdentityError):
    """The peer's certificate has been revoked."""


class PeerNotAllowedError(PeerIdentityError):
    """The authenticated peer is not on the relocation allow-list."""


def _base_context(protocol: int, cert_path: StrPath, key_path: StrPath, ca_path: StrPath,
                  crl_path: StrPath | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Only the deployment CA: no load_default_certs(), no system trust store.
    ctx.load_verify_locations(cafile=ca_path)
    ctx.load_cert_chain(certfile=cert_path, keyfile=key_path)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if crl_path is not None:
        # The PEM CRL joins the trust store; OpenSSL then refuses a revoked leaf
        # during the handshake (and refuses every peer if the CRL has expired).
        ctx.load_verify_locations(cafile=crl_path)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(cert_path: StrPath, key_path: StrPath, ca_path: StrPath, *,
                   crl_path: StrPath | None = None) -> ssl.SSLContext:
    """A context for the relocation server: TLS 1.3, client certificate required.

    Only certificates issued by the CA in ``ca_path`` are accepted.  With
    ``crl_path`` (a PEM CRL from ``CertificateAuthority.crl_pem``), revoked
    clients are refused in the handshake; rebuild the context when the CRL
    changes.  Session tickets are disabled: a resumed session would skip
    certificate verification, and relocation connections are long-lived.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, cert_path, key_path, ca_path, crl_path)
    ctx.num_tickets = 0
    return ctx


def client_context(cert_path: StrPath, key_path: StrPath, ca_path: StrPath, *,
                   crl_path: StrPath | None = None) -> ssl.SSLContext:
    """A context for connecting to another host's relocation server.

    TLS 1.3, presents this host's certificate, verifies the server against the
    deployment CA only.  Hostname checking is OFF on purpose: the server is
    authenticated by its ``berth-host:`` identity, so the caller MUST call
    ``expected_peer`` (or ``authorize_peer`` with ``expected_host_name``) after
    the handshake, before sending anything.
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, cert_path, key_path, ca_path, crl_path)
    ctx.check_hostname = False  # identity is checked by expected_peer(), not by DNS name
    return ctx


def _verified_peer_der(ssl_object: ssl.SSLSocket | ssl.SSLObject) -> bytes:
    context = ssl_object.context
    if context.verify_mode != ssl.CERT_REQUIRED:
        # With CERT_NONE/OPTIONAL an unverified certificate may be returned below.
        raise PeerIdentityError("the TLS context does not require a verified peer certificate")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("the peer presented no certificate")
    return der


def peer_identity(ssl_object: ssl.SSLSocket | ssl.SSLObject) -> str:
    """The authenticated host name of the peer of a completed handshake.

    Raises ``PeerIdentityError`` if there is no verified peer certificate or it
    carries no (single, valid) ``berth-host:`` identity.
    """
    identity = host_identity(_verified_peer_der(ssl_object))
    if identity is None:
        raise PeerIdentityError("the peer certificate carries no berth-host identity")
    return identity


def expected_peer(ssl_object: ssl.SSLSocket | ssl.SSLObject, expected_host_name: str) -> str:
    """Raise ``PeerIdentityError`` unless the peer is ``expected_host_name``; return it."""
    identity = peer_identity(ssl_object)
    if identity != expected_host_name:
        raise PeerIdentityError(
            f"peer is {identity!r}, expected {expected_host_name!r}", identity)
    return identity


def check_not_revoked(ssl_object: ssl.SSLSocket | ssl.SSLObject,
                      revoked_serials: Container[int]) -> None:
    """Raise ``PeerRevokedError`` if the peer certificate's serial is revoked.

    ``revoked_serials`` is any container of ints, e.g.
    ``CertificateAuthority.revoked_serials()``.  Serial numbers are unique per
    issuer, and the channel trusts a single CA.
    """
    der = _verified_peer_der(ssl_object)
    cert = x509.load_der_x509_certificate(der)
    if cert.serial_number in revoked_serials:
        raise PeerRevokedError(f"peer certificate serial {cert.serial_number:x} is revoked",
                               host_identity(der))


def _peer_address(ssl_object: ssl.SSLSocket | ssl.SSLObject) -> str | None:
    try:
        peer = ssl_object.getpeername()  # SSLSocket
    except (AttributeError, OSError):
        return None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """One allow-list pattern, or ValueError in one line that names it: enrolment
    and the agent's config refuse a bad one up front, not at the first migration."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{pattern!r} is not a pattern (an empty one would allow nobody)")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None


class AllowList:
    """Which authenticated peers may use the relocation channel.

    Like xend's ``xend-relocation-hosts-allow``: a list of regular expressions;
    a peer is allowed if any pattern matches, in FULL (``re.fullmatch``), its
    authenticated identity (the host name from its certificate) or its IP
    address.  Deviations from xend, on purpose:

    * an empty list allows NO ONE (xend: everyone);
    * patterns must match the whole string (xend's ``re.match`` let ``hostc``
      admit ``hostc.evil``);
    * names come from the verified certificate, never from reverse DNS;
    * a peer without an authenticated identity is never allowed, even if its
      address matches.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.5``) are matched in their IPv4
    form; IPv6 addresses in their compressed form (``fe80::1``, no zone).
    Matching is case-sensitive.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        if isinstance(patterns, str):
            raise TypeError("patterns is a list of regular expressions; use AllowList.parse()")
        self.patterns: tuple[str, ...] = tuple(patterns)
        self._compiled = tuple(compile_pattern(p) for p in self.patterns)

    @classmethod
    def parse(cls, value: str) -> AllowList:
        """From xend's setting syntax: patterns separated by whitespace."""
        return cls(value.split())

    def __repr__(self) -> str:
        return f"AllowList({list(self.patterns)!r})"

    def __bool__(self) -> bool:
        return bool(self._compiled)

    @staticmethod
    def _normalise_address(address: str | None) -> str | None:
        if not address:
            return None
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip)

    def allows(self, identity: str | None, address: str | None) -> bool:
        if not identity:
            return False
        candidates = [identity]
        normalised = self._normalise_address(address)
        if normalised is not None:
            candidates.append(normalised)
        return any(p.fullmatch(c) for p in self._compiled for c in candidates)


def authorize_peer(ssl_object: ssl.SSLSocket | ssl.SSLObject, *, allow_list: AllowList,
                   revoked_serials: Container[int] = frozenset(),
                   expected_host_name: str | None = None,
                   address: str | None = None) -> str:
    """Every post-handshake check of the relocation channel, in order.

    Identity present, (if given) equal to ``expected_host_name``, not revoked,
    and allowed by ``allow_list`` (address from ``address`` or the socket's
    peer name).  Returns the peer's host name; raises a ``PeerIdentityError``
    subclass otherwise.
    """
    identity = (expected_peer(ssl_object, expected_host_name)
                if expected_host_name is not None else peer_identity(ssl_object))
    check_not_revoked(ssl_object, revoked_serials)
    peer_address = address if address is not None else _peer_address(ssl_object)
    if not allow_list.allows(identity, peer_address):
        raise PeerNotAllowedError(
            f"peer {identity!r} at {peer_address} is not on the relocation allow-list",
            identity)
    return identity


__all__ = [
    "AllowList",
    "PeerIdentityError",
    "PeerNotAllowedError",
    "PeerRevokedError",
    "authorize_peer",
    "check_not_revoked",
    "client_context",
    "expected_peer",
    "peer_identity",
    "server_context",
]
