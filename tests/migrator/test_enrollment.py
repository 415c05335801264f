import stat
import tomllib

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from migrator import credentials, pki
from migrator.models import Host
from portal.models import AuditRecord


def test_enroll_writes_a_private_bundle_with_a_certificate(portal_dirs, db, capsys):
    call_command("hosts", "enroll", "hostb", "--relocation-port", "8002",
                 "--storage", "hosta:/xen-storage", "--hosts-allow", "hostc")
    bundle = portal_dirs / "agents" / "hostb"
    for name in ("agent.toml", "cert.pem", "key.pem", "ca.pem"):
        assert stat.S_IMODE((bundle / name).stat().st_mode) == 0o600
    config = tomllib.loads((bundle / "agent.toml").read_text())
    assert config["relocation"]["hosts_allow"] == ["hostc"]
    assert config["host"]["storage"] == ["hosta:/xen-storage"]
    host = Host.objects.get(name="hostb")
    assert host.credential_digest == credentials.digest(config["portal"]["credential"])
    assert config["portal"]["credential"] not in host.credential_digest
    assert pki.host_identity((bundle / "cert.pem").read_bytes()) == "hostb"
    assert AuditRecord.objects.filter(action="host.enroll", target="host:hostb").exists()


def test_enrolling_twice_is_refused(portal_dirs, db):
    call_command("hosts", "enroll", "hostb")
    with pytest.raises(CommandError, match="already enrolled"):
        call_command("hosts", "enroll", "hostb")


def test_bad_host_name_is_refused(portal_dirs, db):
    with pytest.raises(CommandError):
        call_command("hosts", "enroll", "../etc")


def test_revoke_cuts_credential_and_certificate(portal_dirs, db):
    call_command("hosts", "enroll", "hostb")
    config = tomllib.loads((portal_dirs / "agents" / "hostb" / "agent.toml").read_text())
    call_command("hosts", "revoke", "hostb")
    assert credentials.host_for_credential(config["portal"]["credential"]) is None
    host = Host.objects.get(name="hostb")
    ca = pki.CertificateAuthority.load_or_create(portal_dirs / "pki")
    assert ca.is_revoked(int(host.cert_serial))
    assert AuditRecord.objects.filter(action="host.revoke").exists()
    with pytest.raises(CommandError, match="already revoked"):
        call_command("hosts", "revoke", "hostb")
