"""Live migration of QEMU guests: QEMU's own pre-copy over TLS, framed by
Berth's relocation channel.

The relocation channel (mutual TLS, allow-list, single-use ticket) still
decides who may migrate what where, reserves the destination and owns the
commit point; only the memory and device state travel in QEMU's stream:

1. HELLO carries ``"transport": "qemu-tls"``; the destination checks the
   ticket and the reservation as for any guest, starts a QEMU with
   ``-incoming defer -S``, makes it listen on a free TLS port
   (``tls-creds-x509`` with ``verify-peer=on`` and an ``authz-simple`` that
   admits only the authenticated source host's certificate subject) and
   answers RESERVED with ``"qemu": {"port": N}``.
2. The source's QEMU migrates to that port over TLS (``tls-hostname`` is the
   destination's address, which its certificate names), with
   ``max-bandwidth`` the migration's cap (unlimited without one),
   ``downtime-limit`` and auto-converge from the migration's settings.
   ``query-migrate`` is polled and each completed QEMU iteration becomes a
   ``round`` event like the simulated engine's.
   Maximum rounds and maximum data, which QEMU lacks, are enforced by
   raising ``downtime-limit`` so that QEMU stops and copies at once.
   SYNC frames every few seconds keep the relocation channel alive.
3. When QEMU reports ``completed`` the source guest is paused
   (``postmigrate``); the source sends COMMIT, the destination checks that
   its QEMU loaded the whole stream and is paused, and answers COMMITTED.
4. ACTIVATE / ACTIVATED exactly as for the simulated engine: the destination
   ``cont``s its QEMU, the source quits its own.

Any failure before ACTIVATE: ``migrate_cancel`` on the source (QEMU resumes
the guest if it had paused it, or the engine does), the destination's QEMU
is killed and its reservation freed.  A destination QEMU that exits on a
broken incoming stream is simply cleaned up.

Django-free.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from migrator.hypervisor.base import GuestNotFound, HypervisorError

from .precopy import MigrationError, PrecopyMigration, _Aborted, past_time_limit
from .protocol import PROTOCOL_VERSION, Msg
from .server import Refusal, SourceAborted, _Incoming, check_reservation

log = logging.getLogger("berth.relocation")

TRANSPORT = "qemu-tls"
UNLIMITED_BANDWIDTH = 1 << 40      # bytes/s: QEMU 7.2 caps at 128 MiB/s unless told
FORCE_DOWNTIME_MS = 2_000_000      # QEMU's largest downtime-limit: "stop and copy now"
POLL = 0.02  # query-migrate is cheap; completion is noticed within 20 ms
KEEPALIVE = 5.0


def qemu_identity(host: str) -> str:
    """The subject QEMU's TLS layer sees in a Berth host certificate
    (``migrator.pki`` issues O=Berth, CN=<host name>), for ``authz-simple``."""
    return f"O=Berth,CN={host}"


class _QemuChannel:
    """The relocation channel, counting QEMU's stream in ``bytes_out`` so the
    engine's records say what the migration really sent."""

    def __init__(self, chan, engine: QemuMigration):
        self._chan, self._engine = chan, engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)

    @property
    def bytes_out(self) -> int:
        return self._chan.bytes_out + self._engine.qemu_bytes


class QemuMigration(PrecopyMigration):
    """The source side for a QEMU guest; same constructor, ``run``, ``abort``,
    ``resolve`` and events as `PrecopyMigration`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.qemu_bytes = 0
        self.qemu_status: dict[str, Any] = {}  # the last query-migrate answer
        self._qemu_port: int | None = None
        self._watch: Any = None
        self._started = self._completed = False
        self._sync_count = 1  # QEMU synchronises the dirty bitmap once at setup
        self._round_start = (0.0, 0, 0)  # time, bytes, pages at the start of the round
        self._last_remaining = 0
        self._keepalive_at = 0.0
        self._syncs = 0
        self._forced = False
        # bytes/s for QEMU's max-bandwidth: the migration's cap, else none (tests
        # may lower it to slow a migration down).
        self.max_bandwidth = int(self.settings.max_bandwidth) or UNLIMITED_BANDWIDTH

    def run(self) -> dict[str, Any]:
        try:
            return super().run()
        finally:
            if self._watch is not None:
                self._watch.close()

    # -- stages -------------------------------------------------------------------
    def _reserve(self) -> None:
        self._stage_event("reservation", destination=self.dest_host)
        self._chan = _QemuChannel(self._connect(), self)
        info, host = self._info, self.driver.host_info()
        self._chan.send_json(Msg.HELLO, {
            "protocol": PROTOCOL_VERSION, "ticket": self.ticket, "transport": TRANSPORT,
            "source_host": self.source_host, "arch": host.arch,
            "virt_features": list(host.virt_features),
            "guest": {"uuid": info.uuid, "name": info.name, "memory_mib": info.memory_mib,
                      "vcpus": info.vcpus, "config": info.config}})
        body = self._reservation_answer(self.settings.io_timeout)
        self._dest_domid = body.get("domid")
        try:
            self._qemu_port = int(body["qemu"]["port"])
        except (KeyError, TypeError, ValueError):
            raise MigrationError("reservation", f"{self.dest_host} gave no QEMU port") from None

    def _precopy(self) -> None:
        """Start QEMU's migration and follow it to completion (QEMU's own
        stop-and-copy included: it pauses the guest itself)."""
        s = self.settings
        self._stage_event("pre-copy", destination_domid=self._dest_domid)
        self._watch = self.driver.watch(self.uuid)
        params = {"max-bandwidth": self.max_bandwidth,
                  "downtime-limit": int(s.downtime_target_ms),
                  "cpu-throttle-initial": round(s.throttle_initial * 100),
                  "cpu-throttle-increment": round(s.throttle_increment * 100),
                  "max-cpu-throttle": round(s.throttle_max * 100)}
        if self._stop_reason == "not_live":
            params["downtime-limit"] = FORCE_DOWNTIME_MS
        self._t_send = time.monotonic()
        self._round_start = (self._t_send, 0, 0)
        self._keepalive_at = self._t_send + KEEPALIVE
        self.driver.migrate_start(self.uuid, self.dest[0], self._qemu_port,
                                  tls_hostname=self.dest[0], parameters=params,
                                  capabilities={"auto-converge": s.auto_converge})
        self._started = True
        self._follow()

    def _follow(self) -> None:
        while True:
            if self._abort.is_set():
                raise _Aborted()
            status = self._watch.command("query-migrate")
            state = status.get("status")
            self._observe(status)
            if state == "completed":
                self._completed = True
                return
            if state in ("failed", "cancelled"):
                raise MigrationError("pre-copy", f"QEMU's migration {state}: "
                                     f"{status.get('error-desc', 'no reason given')}")
            if state in ("device", "pre-switchover"):
                self._stopped()
            self._enforce_limits(status)
            if time.monotonic() >= self._keepalive_at:
                self._syncs += 1
                self._sync(self._syncs)
                self._keepalive_at = time.monotonic() + KEEPALIVE
            time.sleep(POLL)

    def _observe(self, status: dict[str, Any]) -> None:
        """Round events from QEMU's counters: iteration n ends when the
        dirty bitmap is synchronised for the (n+1)-th time."""
        self.qemu_status = status
        ram = status.get("ram") or {}
        self.qemu_bytes = int(ram.get("transferred", self.qemu_bytes))
        self._last_remaining = int(ram.get("remaining", self._last_remaining))
        syncs = int(ram.get("dirty-sync-count", 0))
        pages = int(ram.get("normal", 0)) + int(ram.get("duplicate", 0))
        while syncs > self._sync_count:
            self._sync_count += 1
            t0, bytes0, pages0 = self._round_start
            now = time.monotonic()
            took = max(now - t0, 1e-6)
            dirty = self._last_remaining // 4096
            bandwidth = float(ram.get("mbps", 0.0)) * 1e6 / 8  # QEMU's mbps is Mbit/s
            expected = float(status.get("expected-downtime", 0)) / 1000
            self._round_event(self._sync_count - 1, pages - pages0, dirty, took,
                              self.qemu_bytes - bytes0, bandwidth or self.qemu_bytes / took,
                              expected)
            self._round_start = (now, self.qemu_bytes, pages)
        # The job's figures are QEMU's, as its rounds are: pages sent (zero pages
        # included, as "duplicate") and those that carried data ("normal").
        self._pages = max(self._pages, pages)
        self._data_pages = max(self._data_pages, int(ram.get("normal", 0)))
        # QEMU reports the throttle only while it applies it and drops it (and the
        # figure) on completion; auto-converge only ever raises it within a
        # migration, so the highest seen is the one the last round ran under.
        self._throttle = max(self._throttle,
                             float(status.get("cpu-throttle-percentage", 0)) / 100)
        if status.get("status") == "completed":
            self._send_time = max(status.get("total-time", 0) / 1000, 1e-6)

    def _enforce_limits(self, status: dict[str, Any]) -> None:
        """QEMU has no round, data or time limit: past one, tell it to stop and
        copy now (the largest downtime-limit always fits)."""
        s, ram = self.settings, status.get("ram") or {}
        if self._forced or status.get("status") != "active":
            return
        rounds = max(int(ram.get("dirty-sync-count", 1)) - 1, 0)
        limit = s.max_data_factor * self._info.memory_mib * (1 << 20)
        reason = ("max_rounds" if rounds >= s.max_rounds
                  else "max_data" if self.qemu_bytes + self._last_remaining > limit
                  else "max_time" if past_time_limit(s, self._t_send) else None)
        if reason:
            self._stop_reason, self._forced = reason, True
            self.driver.migration_parameters(self.uuid, {"downtime-limit": FORCE_DOWNTIME_MS})

    def _stopped(self) -> None:
        """QEMU paused the guest for its stop-and-copy (once)."""
        if self._paused:
            return
        self._paused = True
        self._t_pause = self._pause_time()
        self._stop_reason = self._stop_reason or "downtime_target"
        self._mark("paused")
        self._stage_event("stop-and-copy", reason=self._stop_reason,
                          dirty_pages=self._last_remaining // 4096)

    def _pause_time(self) -> float:
        """When QEMU stopped the vCPUs (its STOP event), on the monotonic clock."""
        for event in reversed(self._watch.events if self._watch is not None else []):
            if event.get("event") == "STOP":
                stamp = event.get("timestamp") or {}
                wall = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
                return time.monotonic() - max(time.time() - wall, 0.0)
        return time.monotonic()

    def _stop_and_copy(self) -> None:
        """QEMU already stopped and copied: record it and ask to commit."""
        self._stopped()
        self._mark("last_pages_sent")
        self._mine = {"qemu": "completed"}
        self._chan.send_json(Msg.COMMIT, {**self._mine, "qemu_bytes": self.qemu_bytes})
        self._mark("commit_sent")

    def _copy_paused(self) -> None:
        """Non-live: pause first, then one QEMU pass with nothing left to iterate."""
        self._stop_reason = "not_live"
        self._pause()
        self._paused = False  # _stopped() records the stage and the downtime start
        t_pause = self._t_pause
        self._precopy()
        self._stopped()
        self._t_pause = t_pause
        self._stop_and_copy()

    def _finish(self, state: str, reason: str, stage: str | None = None) -> dict[str, Any]:
        """The engine's record plus QEMU's own account of its stream."""
        result = super()._finish(state, reason, stage)
        q, ram = self.qemu_status, self.qemu_status.get("ram") or {}
        result["qemu"] = {"status": q.get("status"), "total_time_ms": q.get("total-time"),
                          "setup_time_ms": q.get("setup-time"), "downtime_ms": q.get("downtime"),
                          "transferred": ram.get("transferred"), "mbps": ram.get("mbps"),
                          "iterations": max(int(ram.get("dirty-sync-count", 1)) - 1, 0),
                          "dirty_pages_rate": ram.get("dirty-pages-rate")}
        return result

    # -- failure --------------------------------------------------------------------
    def _rollback_local(self) -> None:
        if self._started and not self._completed:
            try:
                self.driver.migrate_cancel(self.uuid)
            except HypervisorError:
                log.exception("migration of %s: migrate_cancel failed", self.uuid)
        was_active = self._was_active
        super()._rollback_local()
        with contextlib.suppress(GuestNotFound):
            if was_active and not self.driver.get(self.uuid).active:
                self.driver.resume(self.uuid)  # QEMU paused it for a switchover we refused


class QemuIncoming(_Incoming):
    """The destination side for a QEMU host (chosen by `RelocationServer`)."""

    def _reserve(self, hello: dict[str, Any]) -> None:
        if hello.get("transport") != TRANSPORT:
            raise Refusal("protocol", f"{self.server.host_name} runs QEMU guests: it accepts "
                          f"only QEMU migrations (transport {TRANSPORT})")
        spec = check_reservation(hello, self.driver, self.server.facts)
        try:
            self.reservation = self.driver.reserve(spec.uuid, spec.memory_mib).id
            info = self.driver.commit_reservation(self.reservation, spec)
            self.built, self.reservation = True, None
            port = self.driver.listen_incoming(self.uuid, self.server.address,
                                               qemu_identity(self.peer))
        except HypervisorError as exc:
            raise Refusal("reservation", str(exc)) from None
        self.state = "receiving"
        self.emit("stage", stage="reservation", result="reserved", domid=info.domid,
                  memory_mib=spec.memory_mib)
        self.server.guest_event("incoming", info)
        self.chan.send_json(Msg.RESERVED, {"domid": info.domid, "host": self.server.host_name,
                                           "qemu": {"port": port}})

    def _receive(self) -> None:
        while True:
            msg, body = self.chan.recv_json({Msg.SYNC, Msg.COMMIT, Msg.ABORT})
            if msg is Msg.ABORT:
                raise SourceAborted(body.get("reason", "no reason"))
            if msg is Msg.COMMIT:
                break
            status = self.driver.migration_status(self.uuid).get("status")
            self.chan.send_json(Msg.SYNC, {**body, "pages_received": 0, "qemu_status": status})
        self.t_stopped = time.monotonic()
        self.state = "stopped"
        status = self._loaded()
        if status != "completed":
            raise Refusal("commitment", f"QEMU on {self.server.host_name} did not load the "
                          f"whole stream (migration {status})")
        if self.driver.get(self.uuid).active:
            raise Refusal("commitment", "the incoming guest runs before activation")
        mine = {"qemu": "completed"}
        self.emit("stage", stage="commitment", pages_received=0, **mine)
        self.chan.send_json(Msg.COMMITTED, {**mine, "verify_ms": round(
            (time.monotonic() - self.t_stopped) * 1000, 3)})
        self.state = "committed"

    def _loaded(self) -> str:
        """Wait (briefly) for the incoming QEMU to finish loading the stream."""
        deadline = time.monotonic() + self.server.commit_timeout
        status = "none"
        while time.monotonic() < deadline:
            try:
                status = self.driver.migration_status(self.uuid).get("status", "none")
            except GuestNotFound:
                return "failed: QEMU exited"
            if status in ("completed", "failed"):
                return status
            time.sleep(0.02)
        return status

    def _discard(self, reason: str) -> None:
        """As for any guest - except that an incoming QEMU may already have
        exited by itself on a broken stream (the driver then forgot it)."""
        if self.built and self.uuid:
            try:
                self.driver.get(self.uuid)
            except GuestNotFound:
                self.built = False
                self.emit("discarded", reason=reason, stage=self.state)
                self.server.guest_event("discarded", None)
                log.info("incoming migration of %s from %s ended (its QEMU exited): %s",
                         self.uuid, self.peer, reason)
                return
        super()._discard(reason)


__all__ = ["QemuIncoming", "QemuMigration", "qemu_identity"]
