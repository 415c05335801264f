"""A QEMU guest's serial console: the bounded ring, its file, and the real
Linux guest's TICK lines through an agent restart."""
import re

import pytest

from migrator.hypervisor import GuestSpec
from migrator.hypervisor.console import RING_BYTES, RING_FILE, ConsoleRing
from migrator.hypervisor.qemu import QemuDriver
from tests.support.polling import wait_for

TICK = re.compile(rb"TICK (\d+) [\d.]+\r?\n")
BOOT_SECONDS = 120  # Debian's kernel under TCG on a busy machine


def ticks(data: bytes) -> list[int]:
    return [int(n) for n in TICK.findall(data)]


def test_the_ring_keeps_the_newest_bytes_and_its_file_stays_bounded(tmp_path):
    ring = ConsoleRing(tmp_path / RING_FILE, size=1000)
    for i in range(100):
        ring.append(b"%04d" % i * 10)  # 40 bytes each, 4000 in all
        assert (tmp_path / RING_FILE).stat().st_size <= 8 + 2 * 1000
    out = ring.read()
    assert (out.start, out.end, len(out.data)) == (3000, 4000, 1000)
    assert out.data.endswith(b"0099" * 10) and out.data.startswith(b"0075")
    assert ring.read(since=3960).data == b"0099" * 10
    assert ring.read(since=4000).data == b""
    assert ring.read(since=10).start == 3000  # older than the ring: from its oldest byte


def test_a_new_ring_on_the_same_file_continues_where_the_last_one_stopped(tmp_path):
    ring = ConsoleRing(tmp_path / RING_FILE, size=1000)
    ring.append(b"a" * 1500)
    ring.append(b"b" * 300)
    again = ConsoleRing(tmp_path / RING_FILE, size=1000)
    assert again.read() == ring.read()
    again.append(b"c")
    assert again.read(since=1800).data == b"c" and again.read().end == 1801
    assert (tmp_path / RING_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_the_real_guests_console_survives_an_agent_restart_and_takes_input(
        real_guest, tmp_path):
    driver = QemuDriver("hostb", 512, tmp_path / "b")
    try:
        info = driver.create(GuestSpec("web-1", 128, 1, real_guest.config()))
        first = wait_for(lambda: len(ticks(driver.console_output(info.uuid).data)) >= 5
                         and driver.console_output(info.uuid), "TICK lines", BOOT_SECONDS)
        assert ticks(first.data)[:5] == [1, 2, 3, 4, 5]
        driver.close()  # the agent stops; QEMU runs on

        again = QemuDriver("hostb", 512, tmp_path / "b")
        kept = again.console_output(info.uuid)
        assert kept.data.startswith(first.data)  # the history is kept
        later = wait_for(lambda: (out := again.console_output(info.uuid, kept.end)).data
                         and ticks(out.data) and out, "TICK lines after the restart", 30)
        assert ticks(later.data)[0] > ticks(kept.data)[-1]  # the counter goes on
        again.console_write(info.uuid, b"echo $((6*7))-answer\n")
        wait_for(lambda: b"42-answer" in again.console_output(info.uuid, later.end).data,
                 "the shell to answer", 30)
        # Only root reaches the console's socket and history.
        directory = again.run_dir / info.uuid
        assert directory.stat().st_mode & 0o777 == 0o700
        assert (directory / RING_FILE).stat().st_mode & 0o777 == 0o600

        # A guest that floods its console costs the agent the ring, no more.
        again.console_write(info.uuid, b"yes berth-flood | head -c 700000; echo flood-$((40+2))\n")
        wait_for(lambda: b"flood-42\r\n" in again.console_output(info.uuid).data[-4096:],
                 "the flood to end", 120)
        flooded = again.console_output(info.uuid)
        assert flooded.end - flooded.start == len(flooded.data) == RING_BYTES
        assert flooded.end > 700000
        assert (directory / RING_FILE).stat().st_size <= 8 + 2 * RING_BYTES
        again.close()
    finally:
        driver.shutdown_all()
