"""The QEMU driver against real qemu-system-x86_64 processes (TCG)."""
import os
import re
import shutil
import time

import pytest

from migrator.agent import parse_config
from migrator.hypervisor import GuestSpec, GuestState, HypervisorError, InvalidRequest
from migrator.hypervisor.qemu import QemuDriver
from migrator.hypervisor.qemu_process import TICK_COUNTER, alive, command_line
from migrator.hypervisor.savestream import SaveStreamError
from tests.support.polling import wait_for

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed "
                                       "(apt-get install qemu-system-x86)")
MARKER = 0x2000000


@pytest.fixture
def host(tmp_path):
    made = []

    def make(name="hostb", capacity=512):
        driver = QemuDriver(name, capacity, tmp_path / name)
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.shutdown_all()


def marked(driver, value=0x1122334455667788, mib=64, start=True):
    return driver.create(GuestSpec("g", mib, 1, {"loader": [{"addr": MARKER, "data": value}]},
                                   start=start))


def ticks(driver, uuid):
    return int.from_bytes(driver.read_memory(uuid, TICK_COUNTER, 4), "little")


def test_a_guest_boots_runs_pauses_and_resumes(host):
    driver = host()
    info = marked(driver)
    assert info.state is GuestState.RUNNING and info.active and info.domid == 1
    assert driver.read_memory(info.uuid, MARKER, 8) == (0x1122334455667788).to_bytes(8, "little")
    first = ticks(driver, info.uuid)
    time.sleep(0.3)
    assert ticks(driver, info.uuid) > first  # the halt loop counts timer ticks
    paused = driver.pause(info.uuid)
    assert paused.state is GuestState.PAUSED and not paused.active
    frozen = ticks(driver, info.uuid)
    time.sleep(0.3)
    assert ticks(driver, info.uuid) == frozen
    assert driver.resume(info.uuid).active
    assert driver.capacity().used_mib == 64


def test_a_truncated_or_foreign_image_creates_no_guest_and_leaves_no_qemu(host):
    """QEMU's stream carries no checksum of page contents: the restore job's
    SHA-256 (and the vault's AEAD) guard those; QEMU refuses what it cannot
    parse, and the driver then leaves nothing behind."""
    source, dest = host("hostb"), host("hostc")
    info = marked(source)
    source.pause(info.uuid)
    pieces = list(source.save_stream(info.uuid))
    image = b"".join(pieces)
    header = len(pieces[0])
    broken = image[:header] + b"XXXX" + image[header + 4:]  # QEMU's own magic
    for bad in (image[:len(image) // 2], broken, b"BERTHSAV" + bytes(100)):
        with pytest.raises(SaveStreamError):
            dest.restore_stream([bad])
        assert dest.list() == [] and dest.capacity().used_mib == 0
        assert not list(dest.run_dir.glob("*/qemu.pid"))
    assert dest.restore_stream([image]).active  # the intact image restores


def test_a_save_stream_closed_early_puts_the_guest_back_and_it_can_resume(host):
    driver = host()
    info = marked(driver)
    driver.pause(info.uuid)
    stream = driver.save_stream(info.uuid)
    next(stream)
    next(stream)
    stream.close()
    assert driver.get(info.uuid).state is GuestState.PAUSED
    assert driver.resume(info.uuid).active


def test_guests_outlive_the_driver_and_a_new_one_reattaches(host, tmp_path):
    driver = host()
    info = marked(driver)
    pid = driver._guest(info.uuid).pid
    again = QemuDriver("hostb", 512, tmp_path / "hostb")
    assert [g.uuid for g in again.list()] == [info.uuid]
    assert again.get(info.uuid).domid == info.domid and alive(pid)
    assert again.create(GuestSpec("h", 64)).domid == info.domid + 1
    again.shutdown_all()


def test_a_guest_whose_qemu_died_is_forgotten_and_its_memory_freed(host):
    driver = host()
    info = marked(driver)
    os.kill(driver._guest(info.uuid).pid, 9)
    deadline = time.monotonic() + 5
    while driver.list() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.list() == [] and driver.capacity().used_mib == 0


def test_bad_configs_are_refused_before_qemu_starts(host):
    driver = host()
    for config, message in (({"machine": "pc,accel=kvm"}, "machine"),
                            ({"kernel": "/nonexistent"}, "not a file"),
                            ({"loader": [{"addr": 0, "data": 1 << 70}]}, "loader")):
        with pytest.raises(InvalidRequest, match=message):
            driver.create(GuestSpec("g", 64, 1, config))
    assert driver.capacity().used_mib == 0


def test_restored_and_incoming_guests_boot_without_the_loader(tmp_path):
    fresh = command_line(tmp_path, name="a,b", uuid="u", memory_mib=64, vcpus=1,
                         config={"loader": [{"addr": 16, "data": 1}]}, incoming=False,
                         paused=False)
    incoming = command_line(tmp_path, name="a,b", uuid="u", memory_mib=64, vcpus=1,
                            config={"loader": [{"addr": 16, "data": 1}]}, incoming=True,
                            paused=False)
    assert "guest=a,,b" in fresh and any(a.startswith("loader,") for a in fresh)
    assert not any(a.startswith("loader,") for a in incoming)
    assert incoming[-3:] == ["-incoming", "defer", "-S"]


def test_a_qemu_that_cannot_start_frees_its_own_claim_and_leaves_a_callers_reservation(
        tmp_path):
    driver = QemuDriver("hostb", 512, tmp_path / "b", binary="/nonexistent/qemu")
    with pytest.raises(HypervisorError, match="not installed"):
        driver.create(GuestSpec("g", 64))
    assert driver.capacity().used_mib == driver.capacity().reserved_mib == 0
    res = driver.reserve("6f1c2b1e-8a4d-4c5e-9f00-0123456789ab", 64)
    with pytest.raises(HypervisorError, match="not installed"):
        driver.commit_reservation(res.id, GuestSpec("g", 64, uuid=res.uuid))
    assert driver.capacity().reserved_mib == 64  # the relocation server releases it
    driver.release_reservation(res.id)
    assert driver.list() == [] and not [p for p in driver.run_dir.iterdir() if p.is_dir()]


@pytest.mark.slow
def test_the_documented_kernel_initrd_append_config_boots_a_real_linux_guest(
        host, tmp_path, real_guest):
    """docs/qemu.md's guest keys, through the agent's config, boot Debian's
    kernel with the busybox initramfs; its init prints TICK lines on ttyS0."""
    config = parse_config({
        "host": {"name": "hostb", "driver": "qemu", "memory_mib": 512,
                 "state_dir": str(tmp_path / "state")},
        "portal": {"url": "http://127.0.0.1:8000", "credential": "hc_x"},
        "guests": [{"name": "web-1", "memory_mib": 128, "kernel": str(real_guest.kernel),
                    "initrd": str(real_guest.initrd), "append": "console=ttyS0 quiet"}]})
    web = config.guests[0]
    driver = host()
    info = driver.create(GuestSpec(web.name, web.memory_mib, web.vcpus, web.driver_config()))
    output = wait_for(lambda: len(re.findall(rb"TICK \d+ ", out := driver.console_output(
        info.uuid).data)) >= 3 and out, "the guest's TICK lines", 120)
    assert [int(n) for n in re.findall(rb"TICK (\d+) [\d.]+\r?\n", output)][:3] == [1, 2, 3]
    assert driver.get(info.uuid).active
