"""manage.py relocationd: one clear line on a bad config; runs and stops on SIGTERM."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from .conftest import HOST_CREDENTIAL

ROOT = Path(__file__).resolve().parents[3]


def manage(tmp_path, *args):
    env = {**os.environ, "BERTH_DATA_DIR": str(tmp_path / "data")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return subprocess.Popen([sys.executable, "manage.py", "relocationd", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_missing_config_is_a_command_error(tmp_path):
    with pytest.raises(CommandError, match=r"nope\.toml: config file not found$"):
        call_command("relocationd", "--config", str(tmp_path / "nope.toml"))


def test_bad_config_exits_non_zero_with_one_line(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text('[host]\nname = "hostb"\n')
    process = manage(tmp_path, "--config", str(bad))
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert err.strip().count("\n") == 0, err
    assert "host.state_dir: required key is missing" in err and "Traceback" not in err


def test_an_invalid_hosts_allow_pattern_exits_non_zero_with_one_line(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f'''
[host]
name = "hostb"
memory_mib = 64
state_dir = "{tmp_path / 'state'}"
[portal]
url = "http://127.0.0.1:9"
credential = "{HOST_CREDENTIAL}"
[relocation]
port = 8002
hosts_allow = ["hostc", "host[bc"]
''')
    process = manage(tmp_path, "--config", str(config))
    try:
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "relocation.hosts_allow: 'host[bc' is not a valid regular expression" in err


def test_runs_until_sigterm(tmp_path, portal):
    config = tmp_path / "agent.toml"
    config.write_text(f'''
[host]
name = "hostb"
memory_mib = 64
state_dir = "{tmp_path / 'state'}"
[portal]
url = "{portal.url}"
credential = "{HOST_CREDENTIAL}"
[[guests]]
name = "etch"
memory_mib = 4
''')
    process = manage(tmp_path, "--config", str(config))
    try:
        hello = portal.hello(timeout=60)
        assert hello["host"] == "hostb" and [g["name"] for g in hello["guests"]] == ["etch"]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "Traceback" not in err and HOST_CREDENTIAL not in err
