"""The agent's relocation port refuses certificates the portal revoked: at once when the
portal pushes the list, and from the first handshake after a restart (kept on disk),
before and without a portal connection."""
import json
import subprocess
import sys

import pytest

from migrator.agent import Agent, parse_config
from migrator.hypervisor import SimDriver
from migrator.pki import CertificateAuthority
from tests.support.polling import wait_for
from tests.support.relocation import relocation_probe
from tests.support.server import ROOT, free_port

from .conftest import HOST_CREDENTIAL, FakeWsPortal


@pytest.fixture
def pki(tmp_path):
    """hostc (the agent under test) and hostb (its peer, soon revoked), one CA."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    out = {"ca": tmp_path / "ca.pem"}
    out["ca"].write_bytes(ca.ca_cert_pem())
    for name in ("hostb", "hostc"):
        issued = ca.issue_host_certificate(name, addresses=["127.0.0.1"])
        (tmp_path / f"{name}.pem").write_bytes(issued.cert_pem)
        (tmp_path / f"{name}-key.pem").touch(mode=0o600)
        (tmp_path / f"{name}-key.pem").write_bytes(issued.key_pem)
        out[name] = {"cert": tmp_path / f"{name}.pem", "key": tmp_path / f"{name}-key.pem",
                     "serial": issued.serial}
    return out


def hostc_config(tmp_path, pki, portal_url, port):
    return {
        "host": {"name": "hostc", "driver": "sim", "arch": "x86_64", "virt_extensions": ["vmx"],
                 "memory_mib": 256, "disk_gib": 100, "subnet": "192.168.1.0/24",
                 "storage": ["hosta:/xen-storage"], "state_dir": str(tmp_path / "state")},
        "portal": {"url": portal_url, "credential": HOST_CREDENTIAL, "ca": ""},
        "relocation": {"address": "127.0.0.1", "port": port, "hosts_allow": ["hostb"],
                       "cert": str(pki["hostc"]["cert"]), "key": str(pki["hostc"]["key"]),
                       "ca": str(pki["ca"])},
    }


@pytest.fixture
def start_hostc(tmp_path, pki):
    agents = []

    def start(portal_url):
        port = free_port()
        config = parse_config(hostc_config(tmp_path, pki, portal_url, port), source="test.toml")
        agent = Agent(config, SimDriver("hostc", 256), backoff=(0.05, 0.2), poll=0.1)
        agents.append(agent)
        agent.start()
        return agent, port

    yield start
    for agent in agents:
        agent.stop()
        agent.driver.close()


def hostb_knocks(pki, port):
    b = pki["hostb"]
    return relocation_probe(b["cert"], b["key"], pki["ca"], port)


def test_a_pushed_revocation_is_refused_without_a_restart_and_kept_on_disk(
        tmp_path, pki, start_hostc):
    portal = FakeWsPortal().start()
    try:
        agent, port = start_hostc(portal.url)
        portal.hello()
        assert hostb_knocks(pki, port)
        portal.send({"type": "revocations", "revoked_serials": [pki["hostb"]["serial"]]})
        wait_for(lambda: not hostb_knocks(pki, port), "hostb refused", timeout=2)
        kept = tmp_path / "state" / "revoked.json"  # written just after the port refuses
        wait_for(kept.exists, "the list on disk", timeout=2)
        assert json.loads(kept.read_text())["revoked_serials"] == [pki["hostb"]["serial"]]
    finally:
        portal.stop()


def test_a_restarted_agent_refuses_revoked_certificates_before_reaching_the_portal(
        tmp_path, pki, start_hostc):
    portal = FakeWsPortal().start()
    try:
        first, _ = start_hostc(portal.url)
        portal.hello()
        portal.send({"type": "revocations", "revoked_serials": [pki["hostb"]["serial"]]})
        wait_for(lambda: pki["hostb"]["serial"] in first.revoked_serials, "the list", 2)
    finally:
        portal.stop()
    first.stop()
    # The portal is gone: the list on disk is all the new agent has.
    _, port = start_hostc(f"http://127.0.0.1:{free_port()}")
    assert not hostb_knocks(pki, port)


def test_the_list_only_grows_a_portal_that_forgot_cannot_unrevoke(tmp_path, pki, start_hostc):
    portal = FakeWsPortal().start()
    try:
        agent, port = start_hostc(portal.url)
        portal.hello()
        portal.send({"type": "revocations", "revoked_serials": [pki["hostb"]["serial"]]})
        wait_for(lambda: not hostb_knocks(pki, port), "hostb refused", timeout=2)
        portal.send({"type": "welcome", "host": "hostc", "revoked_serials": []})
        portal.send({"type": "revocations", "revoked_serials": [12345]})
        wait_for(lambda: 12345 in agent.revoked_serials, "the new serial", 2)
        assert not hostb_knocks(pki, port)
    finally:
        portal.stop()


def test_an_unreadable_revocation_list_stops_the_agent_with_one_line(tmp_path, pki):
    port = free_port()
    config = hostc_config(tmp_path, pki, f"http://127.0.0.1:{free_port()}", port)
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "revoked.json").write_text('{"version": 1, "revoked_serials": "x"')
    lines = ["[host]"] + [f"{k} = {json.dumps(v)}" for k, v in config["host"].items()]
    for table in ("portal", "relocation"):
        lines += [f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in config[table].items()]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    done = subprocess.run([sys.executable, "manage.py", "relocationd", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "revoked.json is unreadable" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
