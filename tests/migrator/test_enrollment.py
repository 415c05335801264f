import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework import exceptions
from rest_framework.test import APIRequestFactory

from migrator import credentials, pki
from migrator.enrollment import revoke
from migrator.models import Host, Job, JobCredential, JobKind
from portal.models import AuditRecord
from tests.migrator.conftest import GUEST

ROOT = Path(__file__).resolve().parents[2]


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


def test_hosts_allow_is_given_once_per_pattern_and_a_pattern_may_hold_a_comma(portal_dirs, db):
    call_command("hosts", "enroll", "hostb", "--hosts-allow", "host[c-d]{1,2}",
                 "--hosts-allow", r"10\.0\.0\.\d+")
    config = tomllib.loads((portal_dirs / "agents" / "hostb" / "agent.toml").read_text())
    assert config["relocation"]["hosts_allow"] == ["host[c-d]{1,2}", r"10\.0\.0\.\d+"]


def test_an_invalid_hosts_allow_pattern_is_refused_in_one_line_and_nothing_made(tmp_path):
    """In its own process, as an operator runs it: exit 1, one line, no host, no bundle."""
    env = {**os.environ, "BERTH_DATA_DIR": str(tmp_path)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    run = [sys.executable, "manage.py"]
    subprocess.run([*run, "migrate", "--noinput"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    done = subprocess.run([*run, "hosts", "enroll", "hostb", "--hosts-allow", "hostc",
                           "--hosts-allow", "host(b"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
    assert "--hosts-allow: 'host(b' is not a valid regular expression" in done.stderr
    assert not (tmp_path / "agents" / "hostb").exists()
    listed = subprocess.run([*run, "hosts", "list"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "hostb" not in listed.stdout


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


def test_revoke_ends_the_hosts_unused_job_credentials(enrolled, admin_user):
    def job_on(name):
        return Job.objects.create(kind=JobKind.SAVE, requester=admin_user,
                                  source_host=Host.objects.get(name=name),
                                  guest_uuid=GUEST["uuid"], guest_name=GUEST["name"])

    hostb_upload = credentials.issue_job_credential(job_on("hostb"), JobCredential.UPLOAD)
    hostc_upload = credentials.issue_job_credential(job_on("hostc"), JobCredential.UPLOAD)

    def authenticate(secret, host):  # presented beside its host's own credential
        request = APIRequestFactory().post("/", HTTP_AUTHORIZATION=f"Job {secret}",
                                           HTTP_X_BERTH_HOST_CREDENTIAL=enrolled[host])
        return credentials.JobCredentialAuthentication().authenticate(request)

    revoke("hostb")
    with pytest.raises(exceptions.AuthenticationFailed, match="expired"):
        authenticate(hostb_upload, "hostb")  # the revoked host moves no more image bytes
    assert authenticate(hostc_upload, "hostc")[0] == admin_user
    record = AuditRecord.objects.get(action="host.revoke")
    assert record.details["job_credentials_ended"] == 1
