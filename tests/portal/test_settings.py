"""BERTH_* settings: a wrong value stops a command with one line, not a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("name", "value", "says"), [
    ("BERTH_VAULT_CHUNK_MIB", "one", "BERTH_VAULT_CHUNK_MIB must be a number, not 'one'"),
    ("BERTH_MIGRATION_MAX_DATA_FACTOR", "lots", "BERTH_MIGRATION_MAX_DATA_FACTOR must be a number"),
    ("BERTH_MIGRATION_VERIFY", "none", "must be one of sampled, incremental, full"),
    ("BERTH_VAULT_ALGORITHM", "rot13", "must be one of aes-256-gcm, chacha20-poly1305"),
    ("BERTH_VAULT_STORAGE", "s3", "BERTH_VAULT_STORAGE=s3 needs BERTH_VAULT_S3_BUCKET"),
])
def test_a_bad_setting_is_one_line_and_a_non_zero_exit(tmp_path, name, value, says):
    env = {**os.environ, "BERTH_DATA_DIR": str(tmp_path), name: value}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert lines[0].startswith("configuration error: ") and says in lines[0]


def test_an_unreadable_audit_keyring_stops_start_up_with_one_line(tmp_path):
    keyring = tmp_path / "audit-keyring.json"
    keyring.write_text("{not json")
    env = {**os.environ, "BERTH_DATA_DIR": str(tmp_path), "BERTH_AUDIT_KEYRING": str(keyring)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("BERTH_AUDIT_KEY", None)
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert lines[0].startswith("configuration error: audit keyring") and "unreadable" in lines[0]
