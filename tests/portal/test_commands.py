import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from portal import roles
from portal.models import APIToken, AuditRecord


def test_users_create_makes_a_user_with_the_role(db, capsys):
    call_command("users", "create", "carol", "--role", "auditor")
    out = capsys.readouterr().out
    assert "created carol with role auditor" in out and "password: " in out
    from django.contrib.auth import get_user_model

    assert roles.role_of(get_user_model().objects.get(username="carol")) == "auditor"


def test_users_create_refuses_a_duplicate(admin_user):
    with pytest.raises(CommandError, match="already exists"):
        call_command("users", "create", "alice", "--role", "admin")


def test_tokens_issue_prints_once_and_stores_only_a_digest(admin_user, capsys):
    call_command("tokens", "issue", "alice", "--scope", "audit:read", "--scope", "jobs:read")
    out = capsys.readouterr().out
    token = out.split("token: ")[1].split()[0]
    stored = APIToken.objects.get()
    assert stored.scopes == ["audit:read", "jobs:read"]
    assert token not in (stored.digest, stored.token_key)
    assert stored.token_key == token[:15]
    assert AuditRecord.objects.filter(action="token.issue").exists()


def test_tokens_issue_rejects_unknown_scopes(admin_user):
    with pytest.raises(CommandError, match="unknown scope"):
        call_command("tokens", "issue", "alice", "--scope", "everything")


def test_tokens_revoke_deletes_and_audits(admin_user, capsys):
    call_command("tokens", "issue", "alice", "--scope", "audit:read")
    prefix = APIToken.objects.get().token_key
    call_command("tokens", "revoke", prefix)
    assert not APIToken.objects.exists()
    assert AuditRecord.objects.filter(action="token.revoke", target=f"token:{prefix}").exists()


def test_demo_setup_reuses_generated_passwords(db, settings, tmp_path, capsys):
    settings.DATA_DIR = tmp_path
    call_command("demo", "--setup-only")
    first = capsys.readouterr().out
    call_command("demo", "--setup-only")
    assert capsys.readouterr().out == first
    assert oct((tmp_path / "demo-credentials.json").stat().st_mode & 0o777) == "0o600"


def test_demo_points_an_earlier_bundle_at_the_port_it_now_serves(db, settings, tmp_path):
    import tomllib

    settings.DATA_DIR = tmp_path
    settings.PKI_DIR, settings.AGENTS_DIR = tmp_path / "pki", tmp_path / "agents"
    call_command("demo", "--setup-only", "--port", "8000")
    call_command("demo", "--setup-only", "--port", "18123")
    for name in ("hostb", "hostc"):
        bundle = tomllib.loads((tmp_path / "agents" / name / "agent.toml").read_text())
        assert bundle["portal"]["url"] == "http://127.0.0.1:18123"
        assert bundle["host"]["name"] == name  # the rest of the bundle kept
    guests = tomllib.loads((tmp_path / "agents" / "hostb" / "agent.toml").read_text())["guests"]
    assert [g["name"] for g in guests] == ["debian_etch", "ubuntu_fuwa_nfs_domu"]
    assert oct((tmp_path / "agents" / "hostb" / "agent.toml").stat().st_mode & 0o777) == "0o600"
