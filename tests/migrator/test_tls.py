"""The relocation channel's TLS: real loopback handshakes between issued hosts.

Every server runs in a thread that accepts one connection, with socket
timeouts everywhere; each test stops its server (closing the listener and
joining the thread) before it returns.
"""

import datetime as dt
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migrator.pki import CertificateAuthority
from migrator.tls import (
    AllowList,
    PeerIdentityError,
    PeerNotAllowedError,
    PeerRevokedError,
    authorize_peer,
    check_not_revoked,
    client_context,
    expected_peer,
    peer_identity,
    server_context,
)

TIMEOUT = 5.0


@dataclass
class Host:
    name: str
    cert: Path
    key: Path
    ca: Path
    serial: int

    def server(self, **kw):
        return server_context(self.cert, self.key, self.ca, **kw)

    def client(self, **kw):
        return client_context(self.cert, self.key, self.ca, **kw)


def write_host(directory: Path, ca: CertificateAuthority, name: str) -> Host:
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_host_certificate(name, addresses=["127.0.0.1"])
    cert, key, ca_file = directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt"
    cert.write_bytes(issued.cert_pem)
    key.touch(mode=0o600)
    key.write_bytes(issued.key_pem)
    ca_file.write_bytes(ca.ca_cert_pem())
    return Host(name, cert, key, ca_file, issued.serial)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.load_or_create(root / "ca")
    rogue_ca = CertificateAuthority.load_or_create(root / "rogue-ca")
    hosts = {name: write_host(root / "hosts", ca, name) for name in ("hosta", "hostb", "hostc")}
    # the rogue CA certifies names of real hosts: it must not matter
    rogue = {name: write_host(root / "rogue", rogue_ca, name) for name in ("hosta", "hostb")}
    return {"root": root, "ca": ca, "rogue_ca": rogue_ca, **hosts,
            "rogue_hosta": rogue["hosta"], "rogue_hostb": rogue["hostb"]}


@dataclass
class OneShotServer:
    """Accepts one TLS connection on 127.0.0.1, runs ``check`` and answers."""

    context: ssl.SSLContext
    check: object = None  # callable(tls) -> str, raising to refuse
    identity: str | None = None
    version: str | None = None
    address: str | None = None
    error: BaseException | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self):
        try:
            conn, addr = self.listener.accept()
        except OSError as exc:
            self.error = exc
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.version = tls.version()
                    self.address = addr[0]
                    self.identity = (self.check or peer_identity)(tls)
                    tls.sendall(f"welcome {self.identity}".encode())
                    tls.recv(16)  # until the client closes
            except (OSError, PeerIdentityError) as exc:  # ssl.SSLError is an OSError
                self.error = exc

    def stop(self):
        self.listener.close()
        self._thread.join(timeout=TIMEOUT)
        assert not self._thread.is_alive(), "server thread did not stop"

    def __exit__(self, *exc_info):
        self.stop()


@dataclass
class ClientResult:
    identity: str | None = None
    version: str | None = None
    reply: bytes | None = None
    error: BaseException | None = None


def connect(context, port, check=None) -> ClientResult:
    """Handshake, run ``check`` (default: peer_identity), read the server's reply."""
    result = ClientResult()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            with context.wrap_socket(sock, server_hostname=None) as tls:
                result.version = tls.version()
                result.identity = (check or peer_identity)(tls)
                # In TLS 1.3 the client finishes its handshake before the server has
                # judged the client certificate: a refusal shows up on this read.
                result.reply = tls.recv(64)
    except (OSError, PeerIdentityError) as exc:
        result.error = exc
    return result


def assert_refused(result: ClientResult):
    """The client got an error, or at best an immediate end of stream."""
    assert result.error is not None or result.reply == b"", result


# ---------------------------------------------------------------- contexts


def test_contexts_require_tls13_and_a_verified_peer(pki):
    server = pki["hosta"].server()
    client = pki["hosta"].client()
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        # trusts the deployment CA and nothing else
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("organizationName", "Berth"),), (("commonName", "Berth deployment CA"),))]
    assert client.check_hostname is False
    assert server.num_tickets == 0


# ---------------------------------------------------------------- handshakes


def test_mutual_tls13_handshake_succeeds_and_each_side_sees_the_other(pki):
    a, b = pki["hosta"], pki["hostb"]
    with OneShotServer(b.server()) as server:
        client = connect(a.client(), server.port, check=lambda tls: expected_peer(tls, "hostb"))
    assert client.error is None and server.error is None
    assert client.identity == "hostb"
    assert server.identity == "hosta"
    assert client.reply == b"welcome hosta"
    assert server.address == "127.0.0.1"


def test_negotiated_version_is_tls13(pki):
    with OneShotServer(pki["hostb"].server()) as server:
        client = connect(pki["hosta"].client(), server.port)
    assert client.version == server.version == "TLSv1.3"


def test_tls12_client_is_refused(pki):
    ctx = pki["hosta"].client()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with OneShotServer(pki["hostb"].server()) as server:
        client = connect(ctx, server.port)
    assert isinstance(client.error, ssl.SSLError)
    assert isinstance(server.error, ssl.SSLError)
    assert server.identity is None


def test_client_without_certificate_is_refused(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=pki["hosta"].ca)  # trusts the right CA, has no cert
    with OneShotServer(pki["hostb"].server()) as server:
        client = connect(ctx, server.port, check=lambda tls: "unchecked")
    assert_refused(client)
    assert isinstance(server.error, ssl.SSLError)
    assert "CERTIFICATE" in str(server.error).upper()
    assert server.identity is None


def test_client_with_certificate_from_another_ca_is_refused(pki):
    # The rogue certificate claims to be hosta, and trusts the real CA for the server.
    rogue = pki["rogue_hosta"]
    ctx = client_context(rogue.cert, rogue.key, pki["hosta"].ca)
    with OneShotServer(pki["hostb"].server()) as server:
        client = connect(ctx, server.port, check=lambda tls: expected_peer(tls, "hostb"))
    assert_refused(client)
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert server.identity is None


def test_server_with_certificate_from_another_ca_is_refused_by_the_client(pki):
    rogue = pki["rogue_hostb"]  # claims to be hostb
    server_ctx = server_context(rogue.cert, rogue.key, pki["hostb"].ca)
    with OneShotServer(server_ctx) as server:
        client = connect(pki["hosta"].client(), server.port)
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert client.identity is None and client.reply is None
    assert server.identity is None


def test_expected_peer_rejects_a_correctly_certified_but_unexpected_host(pki):
    with OneShotServer(pki["hostc"].server()) as server:
        client = connect(pki["hosta"].client(), server.port,
                         check=lambda tls: expected_peer(tls, "hostb"))
    assert isinstance(client.error, PeerIdentityError)
    assert "hostc" in str(client.error) and "hostb" in str(client.error)
    assert client.reply is None  # nothing was read from the wrong host


def test_certificate_from_the_ca_without_identity_is_refused(pki, tmp_path):
    """Signed by the deployment CA, valid for TLS, but no berth-host URI."""
    ca_dir = pki["root"] / "ca"
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    ca_cert = pki["ca"].certificate
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hosta")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                              ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("hosta")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = client_context(tmp_path / "c.crt", tmp_path / "c.key", pki["hosta"].ca)
    with OneShotServer(pki["hostb"].server()) as server:
        client = connect(ctx, server.port)
    assert client.identity == "hostb"  # the TLS handshake itself succeeded...
    assert isinstance(server.error, PeerIdentityError)  # ...but the server found no identity
    assert server.identity is None
    assert_refused(client)


# ---------------------------------------------------------------- revocation


@pytest.fixture
def revoked_host(pki, tmp_path):
    """A freshly issued host whose certificate is then revoked."""
    ca = pki["ca"]
    host = write_host(tmp_path, ca, "hostr")
    ca.revoke(host.serial)
    return host


def test_check_not_revoked_refuses_a_revoked_peer_after_handshake(pki, revoked_host):
    ca = pki["ca"]

    def check(tls):
        check_not_revoked(tls, ca.revoked_serials())
        return peer_identity(tls)

    with OneShotServer(pki["hostb"].server(), check=check) as server:
        client = connect(revoked_host.client(), server.port)
    assert isinstance(server.error, PeerRevokedError)
    assert server.identity is None
    assert_refused(client)
    # and the unrevoked host still gets in
    with OneShotServer(pki["hostb"].server(), check=check) as server:
        client = connect(pki["hosta"].client(), server.port)
    assert server.error is None and server.identity == "hosta"


def test_crl_refuses_a_revoked_client_during_the_handshake(pki, revoked_host, tmp_path):
    crl = tmp_path / "crl.pem"
    crl.write_bytes(pki["ca"].crl_pem())
    server_ctx = pki["hostb"].server(crl_path=crl)
    with OneShotServer(server_ctx) as server:
        client = connect(revoked_host.client(), server.port)
    assert isinstance(server.error, ssl.SSLCertVerificationError)
    assert "revoked" in str(server.error)
    assert_refused(client)
    with OneShotServer(server_ctx) as server:
        client = connect(pki["hosta"].client(), server.port)
    assert server.error is None and server.identity == "hosta"


def test_crl_refuses_a_revoked_server_on_the_client(pki, revoked_host, tmp_path):
    crl = tmp_path / "crl.pem"
    crl.write_bytes(pki["ca"].crl_pem())
    with OneShotServer(revoked_host.server()) as server:
        client = connect(pki["hosta"].client(crl_path=crl), server.port)
    assert isinstance(client.error, ssl.SSLCertVerificationError)
    assert client.identity is None


# ---------------------------------------------------------------- allow-list over TLS


def test_authorize_peer_applies_the_allow_list_to_the_authenticated_peer(pki):
    ca = pki["ca"]

    def guarded(allow):
        return lambda tls: authorize_peer(tls, allow_list=allow,
                                          revoked_serials=ca.revoked_serials())

    with OneShotServer(pki["hostb"].server(), check=guarded(AllowList(["hostc"]))) as server:
        refused = connect(pki["hosta"].client(), server.port)
    assert isinstance(server.error, PeerNotAllowedError)
    assert_refused(refused)

    with OneShotServer(pki["hostb"].server(), check=guarded(AllowList([]))) as server:
        connect(pki["hosta"].client(), server.port)
    assert isinstance(server.error, PeerNotAllowedError)  # empty list: nobody

    for patterns in (["host[ab]"], [r"127\.0\.0\.1"]):
        with OneShotServer(pki["hostb"].server(), check=guarded(AllowList(patterns))) as server:
            client = connect(pki["hosta"].client(), server.port)
        assert server.error is None and server.identity == "hosta"
        assert client.reply == b"welcome hosta"


def test_authorize_peer_on_the_client_checks_the_expected_host(pki):
    allow = AllowList([".*"])
    with OneShotServer(pki["hostc"].server()) as server:
        client = connect(pki["hosta"].client(), server.port, check=lambda tls: authorize_peer(
            tls, allow_list=allow, expected_host_name="hostb"))
    assert isinstance(client.error, PeerIdentityError)


# ---------------------------------------------------------------- AllowList alone


def test_allow_list_matches_identities_in_full():
    allow = AllowList(["hostc", r"rack1-.*"])
    assert allow.allows("hostc", None)
    assert not allow.allows("hostc.evil", None)
    assert not allow.allows("evil.hostc", None)
    assert not allow.allows("xhostc", None)
    assert allow.allows("rack1-07", None)
    assert not allow.allows("rack10", None)


def test_allow_list_matches_addresses_in_full():
    allow = AllowList([r"10\.0\.0\.5", r"192\.168\.1\.\d+", "fd00::5"])
    assert allow.allows("anyhost", "10.0.0.5")
    assert not allow.allows("anyhost", "10.0.0.50")
    assert not allow.allows("anyhost", "110.0.0.5")
    assert allow.allows("anyhost", "192.168.1.77")
    assert allow.allows("anyhost", "::ffff:10.0.0.5")  # IPv4-mapped IPv6
    assert allow.allows("anyhost", "fd00:0:0::5")  # compared in canonical form
    assert allow.allows("anyhost", "fd00::5%eth0")
    assert not allow.allows("anyhost", "not-an-address")


def test_allow_list_is_default_deny_when_empty():
    assert not AllowList([]).allows("hosta", "127.0.0.1")
    assert not AllowList.parse("   ").allows("hosta", "127.0.0.1")
    assert not AllowList([])


def test_allow_list_never_allows_a_peer_without_identity():
    allow = AllowList([".*"])
    assert allow.allows("hosta", "10.0.0.1")
    assert not allow.allows(None, "10.0.0.1")
    assert not allow.allows("", "10.0.0.1")


def test_allow_list_parses_xend_syntax_and_rejects_bad_patterns():
    allow = AllowList.parse(r"^localhost$  hosta   10\.0\.0\.\d+")
    assert allow.patterns == (r"^localhost$", "hosta", r"10\.0\.0\.\d+")
    assert allow.allows("localhost", None) and allow.allows("x", "10.0.0.9")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        AllowList(["host("])
    with pytest.raises(TypeError):
        AllowList("hosta")


# ---------------------------------------------------------------- peer checks need verification


class _FakeTLS:
    def __init__(self, verify_mode, der):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.verify_mode = verify_mode
        self._der = der

    def getpeercert(self, binary_form=False):
        assert binary_form
        return self._der


def test_peer_identity_requires_a_context_that_verified_the_peer(pki):
    der = x509.load_pem_x509_certificate(pki["hosta"].cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert peer_identity(_FakeTLS(ssl.CERT_REQUIRED, der)) == "hosta"
    with pytest.raises(PeerIdentityError, match="verified"):
        peer_identity(_FakeTLS(ssl.CERT_NONE, der))
    with pytest.raises(PeerIdentityError, match="no certificate"):
        peer_identity(_FakeTLS(ssl.CERT_REQUIRED, None))
