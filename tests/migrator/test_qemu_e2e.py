"""The QEMU driver end to end: the real portal, real agents (subprocesses), real
qemu-system-x86_64 guests (TCG), the vault, and QEMU's own TLS migration."""
import contextlib
import os
import secrets
import shutil
import signal
import time
from pathlib import Path

import pytest

from migrator.hypervisor.qemu_process import TICK_COUNTER, alive, read_pid
from migrator.hypervisor.qmp import QMP
from tests.migrator.test_save_restore_e2e import Deployment

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed "
                                       "(apt-get install qemu-system-x86)")
MARKER_ADDR = 0x2000000


class QemuDeployment(Deployment):
    """The demo's two hosts with ``BERTH_DEMO_DRIVER=qemu``; debian_etch (128 MiB)
    boots with a random 8-byte marker in its memory."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.portal.env["BERTH_DEMO_DRIVER"] = "qemu"
        self.marker = secrets.randbits(63) | 1
        self.data = Path(self.portal.env["BERTH_DATA_DIR"])

    def start_agent(self, name):
        config = Path(self.config(name))
        text = config.read_text()
        line = f'name = "debian_etch"\nloader = [{{ addr = {MARKER_ADDR}, data = {self.marker} }}]'
        if "loader" not in text and 'name = "debian_etch"' in text:
            config.write_text(text.replace('name = "debian_etch"', line))
        super().start_agent(name)

    def qmp(self, host, uuid):
        return QMP.session(str(self.data / f"agents/{host}/state/qemu/{uuid}/qmp.sock"))

    def qemu_pid(self, host, uuid):
        return read_pid(self.data / f"agents/{host}/state/qemu/{uuid}")

    def stop(self):
        super().stop()
        # QEMU guests outlive their agents by design: end the ones this test made.
        for pidfile in self.data.glob("agents/*/state/qemu/*/qemu.pid"):
            pid = read_pid(pidfile.parent)
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def deployment(tmp_path):
    system = QemuDeployment(tmp_path)
    try:
        system.start()
        yield system
    finally:  # also when start() fails: its QEMU guests must not outlive the test
        system.stop()


def read_u64(qmp, addr):
    return int(qmp.hmp(f"xp /1gx {addr:#x}").split(":")[1].split()[0], 16)


def test_a_running_qemu_guest_saved_into_the_vault_resumes_on_the_other_host(deployment):
    before = deployment.guest("debian_etch")
    assert before["host"] == "hostb" and before["state"] == "running"
    with deployment.qmp("hostb", before["uuid"]) as qmp:
        assert read_u64(qmp, MARKER_ADDR) == deployment.marker
        ticks = read_u64(qmp, TICK_COUNTER) & 0xFFFFFFFF
    job = deployment.api.post(f"/api/v1/guests/{before['uuid']}/save")
    assert job.status_code == 202, job.text
    saved = deployment.finished(job.json()["id"])
    assert saved["state"] == "succeeded", saved
    source_pid = deployment.qemu_pid("hostb", before["uuid"])
    assert source_pid is None  # the saved guest's QEMU is gone with its directory

    job = deployment.api.post(f"/api/v1/images/{saved['image']}/restore", json={"host": "hostc"})
    assert job.status_code == 202, job.text
    restored = deployment.finished(job.json()["id"])
    assert restored["state"] == "succeeded", restored
    # pmemsave of all guest memory, paused, on both sides: byte for byte.
    assert restored["result"]["memory_sha256"] == saved["result"]["memory_sha256"]
    after = deployment.wait_for(
        lambda: (g := deployment.guest("debian_etch"))["host"] == "hostc" and g,
        "the guest on hostc")
    assert after["uuid"] == before["uuid"]  # a new QEMU (domain) on hostc, same identity
    with deployment.qmp("hostc", after["uuid"]) as qmp:
        assert qmp.command("query-status")["status"] == "running"
        # The restored QEMU boots without the loader: the marker came in the stream.
        assert read_u64(qmp, MARKER_ADDR) == deployment.marker
        first = read_u64(qmp, TICK_COUNTER) & 0xFFFFFFFF
        assert first >= ticks
        time.sleep(0.3)
        assert read_u64(qmp, TICK_COUNTER) & 0xFFFFFFFF > first  # its vCPU executes


def test_qemu_guests_survive_an_agent_restart(deployment):
    guest = deployment.guest("debian_etch")
    pid = deployment.qemu_pid("hostb", guest["uuid"])
    deployment.kill_agent("hostb")
    assert alive(pid)
    deployment.start_agent("hostb")
    log = deployment.data / "agent-hostb.log"
    deployment.wait_for(lambda: "re-attached to guest debian_etch" in log.read_text()
                        and "connected to the portal" in log.read_text().split(
                            "re-attached to guest debian_etch")[-1],
                        "the new agent to re-attach and connect")
    again = deployment.wait_for(
        lambda: (g := deployment.guest("debian_etch"))["host"] == "hostb" and g, "the guest")
    assert again["domain_id"] == guest["domain_id"]  # re-attached, not rebooted
    assert deployment.qemu_pid("hostb", guest["uuid"]) == pid


def test_live_migration_over_qemu_tls_moves_the_guest_and_its_memory(deployment):
    before = deployment.guest("debian_etch")
    source_pid = deployment.qemu_pid("hostb", before["uuid"])
    response = deployment.api.post(f"/api/v1/guests/{before['uuid']}/migrate",
                                   json={"destination": "hostc", "live": True})
    assert response.status_code == 202, response.text
    job = deployment.finished(response.json()["id"])
    assert job["state"] == "succeeded", job
    stages = [step["stage"] for step in job["timeline"]]
    for stage in ("pre-migration", "reservation", "pre-copy", "stop-and-copy", "commitment",
                  "activation"):
        assert stage in stages, stages
    result = job["result"]
    assert job["rounds"] and result["rounds"] >= 1 and result["stop_reason"]
    assert result["downtime_ms"] is not None and result["bytes_sent"] > 0
    after = deployment.wait_for(
        lambda: (g := deployment.guest("debian_etch"))["host"] == "hostc" and g,
        "the guest on hostc")
    assert after["uuid"] == before["uuid"]
    assert deployment.wait_for(lambda: not alive(source_pid), "the source QEMU to exit")
    with deployment.qmp("hostc", after["uuid"]) as qmp:
        assert qmp.command("query-status")["status"] == "running"
        assert read_u64(qmp, MARKER_ADDR) == deployment.marker
    hostb = [g["name"] for g in deployment.get("/api/v1/guests/")["results"]
             if g["host"] == "hostb"]
    assert hostb == ["ubuntu_fuwa_nfs_domu"]
