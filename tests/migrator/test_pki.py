"""The deployment CA: creation, loading, host certificates, revocation, CRL."""

import datetime as dt
import hashlib
import ipaddress
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migrator.pki import (
    CertificateAuthority,
    CorruptCAError,
    InsecurePermissionsError,
    fingerprint,
    host_identity,
)

REPO = Path(__file__).resolve().parents[2]


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def ca_dir(tmp_path):
    return tmp_path / "ca"


@pytest.fixture
def ca(ca_dir):
    return CertificateAuthority.load_or_create(ca_dir)


@pytest.fixture
def issued(ca):
    return ca.issue_host_certificate(
        "hosta", addresses=["10.0.0.5", "fd00::5"], dns_names=["hosta.example.net"])


# ---------------------------------------------------------------- the CA itself


def test_ca_is_created_in_a_private_directory_with_a_0600_key(ca, ca_dir):
    assert mode_of(ca_dir) == 0o700
    assert mode_of(ca_dir / "ca-key.pem") == 0o600
    key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate((ca_dir / "ca-cert.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    assert not [p for p in ca_dir.iterdir() if p.name.startswith(".tmp-")]


def test_ca_certificate_is_a_self_signed_ten_year_p256_ca(ca):
    cert = ca.certificate
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        "Berth deployment CA"
    cert.verify_directly_issued_by(cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3651)
    assert ca.ca_cert_pem() == cert.public_bytes(serialization.Encoding.PEM)


def test_second_load_reuses_the_same_ca(ca, ca_dir):
    key_before = (ca_dir / "ca-key.pem").read_bytes()
    again = CertificateAuthority.load_or_create(ca_dir, name="another name is ignored")
    assert again.ca_cert_pem() == ca.ca_cert_pem()
    assert again.fingerprint_sha256 == ca.fingerprint_sha256
    assert (ca_dir / "ca-key.pem").read_bytes() == key_before
    # a certificate issued by one instance chains to the other
    cert = again.issue_host_certificate("hostb", addresses=[]).certificate
    cert.verify_directly_issued_by(ca.certificate)


def test_ca_repr_shows_no_key_material(ca, ca_dir):
    key_pem = (ca_dir / "ca-key.pem").read_text()
    body = "".join(key_pem.splitlines()[1:-1])
    assert body[:20] not in repr(ca)


_RACER = """
import sys
from migrator.pki import CertificateAuthority
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
ca = CertificateAuthority.load_or_create(sys.argv[1])
print(ca.fingerprint_sha256)
"""


def test_concurrent_first_creation_by_processes_agrees_on_one_ca(ca_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(ca_dir)], cwd=REPO, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        for p in procs:  # every process has imported everything: start them together
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=10)[0].strip() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1
    assert outputs[0] == CertificateAuthority.load_or_create(ca_dir).fingerprint_sha256
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-cert.pem", "ca-key.pem"]


def test_concurrent_first_creation_by_threads_agrees_on_one_ca(ca_dir):
    barrier = threading.Barrier(8)
    results, errors = [], []

    def create():
        try:
            barrier.wait(timeout=5)
            results.append(CertificateAuthority.load_or_create(ca_dir).fingerprint_sha256)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors and len(results) == 8 and len(set(results)) == 1


def test_key_without_certificate_is_completed_from_the_key(ca_dir):
    first = CertificateAuthority.load_or_create(ca_dir)
    (ca_dir / "ca-cert.pem").unlink()  # as if the creator died between the two files
    again = CertificateAuthority.load_or_create(ca_dir)
    assert again.certificate.public_key() == first.certificate.public_key()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_ca_key_readable_by_group_or_others_is_refused(ca_dir, mode):
    CertificateAuthority.load_or_create(ca_dir)
    os.chmod(ca_dir / "ca-key.pem", mode)
    with pytest.raises(InsecurePermissionsError, match="chmod 600"):
        CertificateAuthority.load_or_create(ca_dir)


def test_ca_directory_open_to_others_is_refused(ca_dir):
    CertificateAuthority.load_or_create(ca_dir)
    os.chmod(ca_dir, 0o755)
    with pytest.raises(InsecurePermissionsError, match="chmod 700"):
        CertificateAuthority.load_or_create(ca_dir)


def test_ca_key_symlink_is_refused(ca_dir, tmp_path):
    CertificateAuthority.load_or_create(ca_dir)
    real = tmp_path / "elsewhere.pem"
    (ca_dir / "ca-key.pem").rename(real)
    (ca_dir / "ca-key.pem").symlink_to(real)
    with pytest.raises(OSError):
        CertificateAuthority.load_or_create(ca_dir)


def test_certificate_not_matching_the_key_is_refused(ca_dir, tmp_path):
    CertificateAuthority.load_or_create(ca_dir)
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    (ca_dir / "ca-cert.pem").write_bytes(other.ca_cert_pem())
    with pytest.raises(CorruptCAError, match="does not match"):
        CertificateAuthority.load_or_create(ca_dir)


# ---------------------------------------------------------------- host certificates


def test_issued_certificate_chains_to_the_ca(ca, issued):
    cert = issued.certificate
    cert.verify_directly_issued_by(ca.certificate)  # issuer name + ECDSA signature
    assert cert.issuer == ca.certificate.subject
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    # and a full RFC 5280 path validation accepts it as client and as server
    store = verification.Store([ca.certificate])
    verification.PolicyBuilder().store(store).build_client_verifier().verify(cert, [])
    verification.PolicyBuilder().store(store).build_server_verifier(
        verification.IPAddress(ipaddress.ip_address("10.0.0.5"))).verify(cert, [])


def test_issued_certificate_does_not_chain_to_another_ca(issued, tmp_path):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    with pytest.raises(InvalidSignature):  # same issuer name, different key
        issued.certificate.verify_directly_issued_by(other.certificate)


def test_issued_certificate_carries_uri_identity_names_and_addresses(issued):
    cert = issued.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hosta"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["berth-host:hosta"]
    assert san.get_values_for_type(x509.DNSName) == ["hosta.example.net"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5")]
    assert host_identity(cert) == "hosta"


def test_issued_certificate_is_for_server_and_client_auth_and_not_a_ca(issued):
    cert = issued.certificate
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign


def test_issued_certificate_fields_match_the_certificate(issued):
    cert = issued.certificate
    assert issued.serial == cert.serial_number
    assert issued.not_after == cert.not_valid_after_utc
    der = cert.public_bytes(serialization.Encoding.DER)
    assert issued.fingerprint_sha256 == hashlib.sha256(der).hexdigest() == fingerprint(cert)
    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=824) < lifetime <= dt.timedelta(days=825)


def test_each_host_gets_a_fresh_key_and_serial(ca):
    a = ca.issue_host_certificate("hosta", addresses=["10.0.0.5"])
    again = ca.issue_host_certificate("hosta", addresses=["10.0.0.5"])
    assert a.key_pem != again.key_pem and a.serial != again.serial
    assert a.certificate.public_key() != again.certificate.public_key()


def test_issued_certificate_repr_hides_the_private_key(issued):
    assert "PRIVATE KEY" not in repr(issued) and "key_pem" not in repr(issued)


def test_custom_validity_is_honoured_and_bounded(ca):
    short = ca.issue_host_certificate("hosta", addresses=[], days=30)
    assert short.not_after - dt.datetime.now(dt.UTC) < dt.timedelta(days=30)
    for days in (0, -1, 826):
        with pytest.raises(ValueError):
            ca.issue_host_certificate("hosta", addresses=[], days=days)


@pytest.mark.parametrize("bad", ["", "host a", "host:a", "-host", "a" * 64, "hôte", "a/b"])
def test_invalid_host_names_are_rejected(ca, bad):
    with pytest.raises(ValueError, match="invalid host name"):
        ca.issue_host_certificate(bad, addresses=[])


def test_invalid_addresses_and_dns_names_are_rejected(ca):
    with pytest.raises(ValueError):
        ca.issue_host_certificate("hosta", addresses=["10.0.0.300"])
    with pytest.raises(ValueError):
        ca.issue_host_certificate("hosta", addresses=[], dns_names=["*.example.net"])
    with pytest.raises(TypeError):
        ca.issue_host_certificate("hosta", addresses="10.0.0.5")


def test_host_identity_accepts_der_and_pem_and_ignores_other_certificates(ca, issued):
    der = issued.certificate.public_bytes(serialization.Encoding.DER)
    assert host_identity(der) == "hosta"
    assert host_identity(issued.cert_pem) == "hosta"
    assert host_identity(ca.certificate) is None  # no berth-host URI
    assert host_identity(None) is None
    assert fingerprint(der) == issued.fingerprint_sha256


# ---------------------------------------------------------------- revocation


def test_revocation_is_recorded_and_survives_reload(ca, ca_dir, issued):
    other = ca.issue_host_certificate("hostb", addresses=[])
    assert not ca.is_revoked(issued.serial)
    assert ca.revoke(issued.serial) is True
    assert ca.revoke(issued.serial) is False  # idempotent
    assert ca.is_revoked(issued.serial) and not ca.is_revoked(other.serial)
    reloaded = CertificateAuthority.load_or_create(ca_dir)
    assert reloaded.is_revoked(issued.serial)
    assert reloaded.revoked_serials() == {issued.serial}
    doc = json.loads((ca_dir / "revoked.json").read_text())
    assert doc["version"] == 1
    assert [int(e["serial"], 16) for e in doc["revoked"]] == [issued.serial]
    assert mode_of(ca_dir / "revoked.json") == 0o600


def test_concurrent_revocations_are_all_kept(ca):
    serials = [ca.issue_host_certificate(f"host{i}", addresses=[]).serial for i in range(8)]
    barrier = threading.Barrier(len(serials))

    def revoke(serial):
        barrier.wait(timeout=5)
        ca.revoke(serial)

    threads = [threading.Thread(target=revoke, args=(s,)) for s in serials]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert ca.revoked_serials() == set(serials)


def test_invalid_serials_are_rejected(ca):
    for bad in (0, -5, 1 << 160, "12", True):
        with pytest.raises(ValueError):
            ca.revoke(bad)


def test_malformed_revocation_list_fails_closed(ca, ca_dir, issued):
    (ca_dir / "revoked.json").write_text("{not json")
    with pytest.raises(CorruptCAError):
        ca.is_revoked(issued.serial)


def test_crl_lists_revoked_serial_and_is_signed_by_the_ca(ca, issued):
    other = ca.issue_host_certificate("hostb", addresses=[])
    ca.revoke(issued.serial)
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.issuer == ca.certificate.subject
    entry = crl.get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None and entry.revocation_date_utc <= dt.datetime.now(dt.UTC)
    assert crl.get_revoked_certificate_by_serial_number(other.serial) is None
    assert len(crl) == 1
    assert crl.next_update_utc > dt.datetime.now(dt.UTC)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0


def test_crl_is_not_valid_under_another_ca(ca, tmp_path):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    crl = x509.load_pem_x509_crl(ca.crl_pem())
    assert len(crl) == 0
    assert not crl.is_signature_valid(other.certificate.public_key())


def test_crl_numbers_increase(ca):
    def number():
        crl = x509.load_pem_x509_crl(ca.crl_pem())
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    first = number()
    assert number() > first
