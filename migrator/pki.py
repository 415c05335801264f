"""The deployment's own certificate authority for the relocation channel.

Specification and rationale: ``docs/pki.md``.  In short:

* ``CertificateAuthority.load_or_create(directory)`` creates (once) or loads an
  ECDSA P-256 CA: ``ca-key.pem`` (0600), ``ca-cert.pem`` and ``revoked.json``
  in a 0700 directory.  Files are published with ``link(2)``, which fails if the
  name exists, so processes racing on first use agree on one CA.
* ``issue_host_certificate`` gives every host a fresh P-256 key and a
  certificate whose authenticated identity is the URI SAN ``berth-host:<name>``,
  usable as TLS server and client (serverAuth + clientAuth).
* ``revoke`` / ``is_revoked`` keep a JSON revocation list; ``crl_pem`` renders
  it as a real X.509 CRL signed by the CA.

Private keys are never logged and never part of a ``repr``.

Django-free: standard library and ``cryptography`` only.  POSIX only (uses
``fcntl`` and ``os.link``), like the host agents it serves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

#: URI scheme of the identity SAN: ``berth-host:<host name>``.
IDENTITY_SCHEME = "berth-host"
#: Host names that may be certified: what AllowList patterns and URIs can hold
#: without quoting.  Case-sensitive, compared exactly.
HOST_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})")

CA_VALIDITY = dt.timedelta(days=3650)
#: Back-dating of notBefore, to tolerate small clock differences between hosts.
CLOCK_SKEW = dt.timedelta(minutes=5)
MAX_HOST_DAYS = 825
CRL_VALIDITY = dt.timedelta(days=7)

_CURVE = ec.SECP256R1
_HASH = hashes.SHA256


class PKIError(Exception):
    """The CA cannot be used or the request cannot be honoured."""


class InsecurePermissionsError(PKIError):
    """A CA file or directory is accessible to group or others."""


class CorruptCAError(PKIError):
    """The CA directory holds files that do not form a valid CA."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A host certificate and its private key, both PEM.

    ``key_pem`` is excluded from ``repr`` so it cannot leak into logs or
    tracebacks by accident.
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    serial: int
    not_after: dt.datetime
    fingerprint_sha256: str

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


# --------------------------------------------------------------------------
# helpers on certificates


def _as_certificate(cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, bytes | bytearray | memoryview):
        data = bytes(cert)
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    raise TypeError(f"expected a certificate or DER/PEM bytes, not {type(cert).__name__}")


def host_identity(cert: x509.Certificate | bytes | None) -> str | None:
    """The host name from the single ``berth-host:`` URI SAN of ``cert``.

    ``cert`` is a ``cryptography`` certificate, DER bytes (as returned by
    ``SSLSocket.getpeercert(binary_form=True)``) or PEM bytes.  Returns None
    when there is no certificate, no SAN, no ``berth-host:`` URI, more than one
    (ambiguous), or a name that is not a valid host name.  Does NOT verify the
    certificate: call it only on a certificate the TLS layer has verified.
    """
    if cert is None:
        return None
    try:
        certificate = _as_certificate(cert)
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return None
    prefix = IDENTITY_SCHEME + ":"
    names = [
        uri[len(prefix):]
        for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(prefix)
    ]
    if len(names) != 1 or not HOST_NAME_RE.fullmatch(names[0]):
        return None
    return names[0]


def fingerprint(cert: x509.Certificate | bytes) -> str:
    """Lower-case hex SHA-256 of the certificate's DER encoding."""
    der = _as_certificate(cert).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def validate_host_name(host_name: str) -> str:
    if not isinstance(host_name, str) or not HOST_NAME_RE.fullmatch(host_name):
        raise ValueError(
            f"invalid host name {host_name!r}: 1-63 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return host_name


# --------------------------------------------------------------------------
# files


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new, exclusively created temporary file in ``directory``."""
    tmp = directory / f".tmp-{secrets.token_hex(8)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (never added any)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _publish_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` atomically, only if it does not exist.

    The content is written to an O_EXCL temporary file and then hard-linked to
    its final name: ``link(2)`` fails with EEXIST when the name is taken, and
    readers never see a partial file.  Returns False if another writer won.
    """
    tmp = _write_temp(path.parent, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _replace_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = _write_temp(path.parent, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _read_file(path: Path, *, private: bool) -> bytes:
    """Read a regular file, refusing symlinks; ``private`` files must be 0600-ish."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCAError(f"{path} is not a regular file")
        if private and st.st_mode & 0o077:
            raise InsecurePermissionsError(
                f"refusing CA key {path}: mode {stat.S_IMODE(st.st_mode):04o} gives access to "
                f"group/others; run 'chmod 600 {path}' if it was not exposed, else replace the CA"
            )
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _prepare_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    else:
        os.chmod(directory, 0o700)
        return
    st = os.stat(directory, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise CorruptCAError(f"CA directory {directory} is not a directory")
    if st.st_mode & 0o077:
        raise InsecurePermissionsError(
            f"refusing CA directory {directory}: mode {stat.S_IMODE(st.st_mode):04o} gives "
            f"access to group/others; it must be 0700 (chmod 700 {directory})"
        )


@contextlib.contextmanager
def _locked(lock_path: Path):
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_serial(serial: int) -> int:
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 1 << 159:
        raise ValueError(f"invalid certificate serial number {serial!r}")
    return serial


# --------------------------------------------------------------------------
# the CA


class CertificateAuthority:
    """The deployment CA, stored in one private directory.

    Layout (see ``docs/pki.md``)::

        <directory>/            0700
            ca-key.pem          0600  PKCS#8 PEM, unencrypted, P-256
            ca-cert.pem         0644  self-signed CA certificate
            revoked.json        0600  {"version": 1, "revoked": [{"serial", "revoked_at"}]}
            revoked.lock        0600  flock(2) serialising revocations
    """

    KEY_FILE = "ca-key.pem"
    CERT_FILE = "ca-cert.pem"
    REVOKED_FILE = "revoked.json"
    REVOKED_LOCK = "revoked.lock"

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey,
                 certificate: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self.certificate = certificate

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.directory} {self.fingerprint_sha256[:16]}>"

    # -- creation / loading ------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path | str,
                       name: str = "Berth deployment CA") -> CertificateAuthority:
        """Load the CA in ``directory``, creating it on first use.

        Safe against concurrent first use by several processes: the key and the
        certificate are each published with an exclusive link, and whoever
        loses a race loads the winner's file.  A directory left with a key but
        no certificate (a crash between the two) is completed from the key.
        """
        directory = Path(directory)
        _prepare_directory(directory)
        key_path = directory / cls.KEY_FILE
        cert_path = directory / cls.CERT_FILE

        if not key_path.exists():
            key = ec.generate_private_key(_CURVE())
            if _publish_exclusive(key_path, _pem_key(key), 0o600):
                log.info("created CA key in %s", directory)
        key = cls._load_key(key_path)

        if not cert_path.exists():
            candidate = cls._self_signed(key, name)
            pem = candidate.public_bytes(serialization.Encoding.PEM)
            if _publish_exclusive(cert_path, pem, 0o644):
                log.info("created CA certificate in %s, SHA-256 %s", directory,
                         fingerprint(candidate))
        certificate = cls._load_cert(cert_path, key)
        return cls(directory, key, certificate)

    @staticmethod
    def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
        data = _read_file(path, private=True)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise CorruptCAError(f"cannot load CA key {path}") from exc  # no key bytes in message
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
            raise CorruptCAError(f"CA key {path} is not an ECDSA P-256 key")
        return key

    @staticmethod
    def _load_cert(path: Path, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(_read_file(path, private=False))
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (ValueError, x509.ExtensionNotFound) as exc:
            raise CorruptCAError(f"cannot load CA certificate {path}: {exc}") from exc
        if cert.public_key() != key.public_key():
            raise CorruptCAError(f"CA certificate {path} does not match the CA key")
        if not constraints.ca:
            raise CorruptCAError(f"{path} is not a CA certificate")
        return cert

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
        now = _now()
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Berth"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, _HASH())
        )

    # -- public ------------------------------------------------------------

    @property
    def fingerprint_sha256(self) -> str:
        return fingerprint(self.certificate)

    def ca_cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_host_certificate(self, host_name: str, *, addresses: Iterable[str],
                               dns_names: Iterable[str] = (),
                               days: int = MAX_HOST_DAYS) -> IssuedCertificate:
        """A fresh P-256 key and a certificate identifying ``host_name``.

        The identity is the URI SAN ``berth-host:<host_name>``; ``addresses``
        (IP literals) and ``dns_names`` are added as SANs too (informational
        for Berth, useful to other verifiers).  notAfter is capped at the CA's.
        """
        validate_host_name(host_name)
        if isinstance(addresses, str) or isinstance(dns_names, str):
            raise TypeError("addresses and dns_names are lists of strings")
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_HOST_DAYS:
            raise ValueError(f"days must be between 1 and {MAX_HOST_DAYS}")
        ips = [ipaddress.ip_address(a) for a in addresses]  # ValueError on garbage
        dns = [self._check_dns_name(d) for d in dns_names]

        key = ec.generate_private_key(_CURVE())
        now = _now()
        not_after = min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
        ca_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(f"{IDENTITY_SCHEME}:{host_name}"),
            *(x509.DNSName(d) for d in dns),
            *(x509.IPAddress(ip) for ip in ips),
        ]
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Berth"),
                x509.NameAttribute(NameOID.COMMON_NAME, host_name),
            ]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, _HASH())
        )
        fp = fingerprint(cert)
        log.info("issued host certificate for %s serial %x SHA-256 %s", host_name, serial, fp)
        return IssuedCertificate(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_pem_key(key),
            serial=serial,
            not_after=cert.not_valid_after_utc,
            fingerprint_sha256=fp,
        )

    @staticmethod
    def _check_dns_name(name: str) -> str:
        labels = name.split(".") if isinstance(name, str) else []
        if (not labels or len(name) > 253
                or not all(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
                           for label in labels)):
            raise ValueError(f"invalid DNS name {name!r} (ASCII/A-label form, no wildcards)")
        return name

    # -- revocation --------------------------------------------------------

    def _read_revoked(self) -> dict[int, str]:
        path = self.directory / self.REVOKED_FILE
        try:
            raw = _read_file(path, private=False)
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            if doc.get("version") != 1:
                raise ValueError("unknown version")
            return {int(entry["serial"], 16): entry["revoked_at"] for entry in doc["revoked"]}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Failing closed: an unreadable revocation list must not read as "nothing revoked".
            raise CorruptCAError(f"revocation list {path} is malformed: {exc}") from exc

    def revoke(self, serial: int) -> bool:
        """Record ``serial`` as revoked.  Returns False if it already was.

        Serialised across processes with ``flock(2)``; the list is replaced
        atomically.  Does not check that this CA issued the serial (the CA keeps
        no issuance record); revoking an unknown serial is harmless.
        """
        _check_serial(serial)
        with _locked(self.directory / self.REVOKED_LOCK):
            revoked = self._read_revoked()
            if serial in revoked:
                return False
            revoked[serial] = _now().isoformat()
            doc = {
                "version": 1,
                "revoked": [{"serial": f"{s:x}", "revoked_at": at}
                            for s, at in sorted(revoked.items())],
            }
            _replace_atomic(self.directory / self.REVOKED_FILE,
                            json.dumps(doc, indent=1).encode() + b"\n", 0o600)
        log.info("revoked host certificate serial %x", serial)
        return True

    def is_revoked(self, serial: int) -> bool:
        return serial in self._read_revoked()

    def revoked_serials(self) -> frozenset[int]:
        """A snapshot of the revoked serials, e.g. for ``tls.check_not_revoked``."""
        return frozenset(self._read_revoked())

    def crl_pem(self, *, validity: dt.timedelta = CRL_VALIDITY) -> bytes:
        """A fresh X.509 v2 CRL of every revoked serial, signed by the CA.

        thisUpdate is now, nextUpdate now + ``validity``; the CRL number is the
        current time in microseconds, so it increases from one CRL to the next.
        """
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + validity)
            .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self.certificate.extensions.get_extension_for_class(
                        x509.SubjectKeyIdentifier).value),
                critical=False,
            )
        )
        for serial, revoked_at in sorted(self._read_revoked().items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(dt.datetime.fromisoformat(revoked_at))
                .build()
            )
        crl = builder.sign(self._key, _HASH())
        return crl.public_bytes(serialization.Encoding.PEM)


__all__ = [
    "IDENTITY_SCHEME",
    "CertificateAuthority",
    "CorruptCAError",
    "InsecurePermissionsError",
    "IssuedCertificate",
    "PKIError",
    "fingerprint",
    "host_identity",
    "validate_host_name",
]
