"""The migrate job's command: parameters become the engine's settings."""
import uuid

import pytest

from migrator.agent.jobs import BadCommand
from migrator.agent.migrate import MigrateJob
from migrator.hypervisor import SimDriver

from .conftest import agent_config


def command(**parameters):
    return {"guest": str(uuid.uuid4()), "ticket": "t" * 32,
            "destination": {"host": "hostc", "address": "127.0.0.1", "port": 8002},
            "parameters": parameters}


def job(tmp_path, **parameters):
    config = agent_config(tmp_path, "http://127.0.0.1:1")
    return MigrateJob("j1", command(**parameters), driver=SimDriver("hostb", 64),
                      host=config.host, emit=lambda event: None)


def test_non_live_is_the_engines_non_live_mode_not_a_round_limit(tmp_path):
    settings = job(tmp_path, live=False, max_rounds=30).settings
    assert settings.live is False and settings.max_rounds == 30
    assert job(tmp_path).settings.live is True


def test_bad_parameters_are_a_clear_refusal(tmp_path):
    with pytest.raises(BadCommand, match="migrate parameters"):
        job(tmp_path, max_rounds=0)
    with pytest.raises(BadCommand, match="migrate parameters"):
        job(tmp_path, downtime_ms="soon")


def test_the_portals_maximum_time_reaches_the_engine(tmp_path):
    assert job(tmp_path, max_seconds=90).settings.max_precopy_s == 90
    assert job(tmp_path).settings.max_precopy_s == 0  # an old portal: no limit
    with pytest.raises(BadCommand, match="migrate parameters"):
        job(tmp_path, max_seconds=-5)


def test_the_commit_check_reaches_the_engine(tmp_path):
    assert job(tmp_path, verify="full").settings.verify == "full"
    assert job(tmp_path).settings.verify == "sampled"  # an old portal: the default
    with pytest.raises(BadCommand, match="migrate parameters"):
        job(tmp_path, verify="none")


def test_the_bandwidth_cap_reaches_the_engine(tmp_path):
    assert job(tmp_path, max_bandwidth_mbps=120).settings.max_bandwidth_mbps == 120
    assert job(tmp_path, max_bandwidth_mbps=120).settings.max_bandwidth == 120e6  # bytes/s
    assert job(tmp_path).settings.max_bandwidth_mbps == 0  # an old portal: no cap
    assert job(tmp_path, max_bandwidth_mbps=0).settings.max_bandwidth_mbps == 0
    for bad in (-1, "fast", float("inf")):
        with pytest.raises(BadCommand, match="migrate parameters"):
            job(tmp_path, max_bandwidth_mbps=bad)
