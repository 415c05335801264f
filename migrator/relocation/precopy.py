"""The source side of live migration: the six stages and iterative pre-copy.

``PrecopyMigration(...).run()`` moves one running guest to another host's
`RelocationServer` and returns a result dict; ``abort()`` (any thread) stops
it at the next safe point.  The invariant: until the ACTIVATE frame has been
handed to the socket the source owns the guest, and every failure puts it
back exactly as it was (running again if it was running, throttle dropped,
nothing destroyed).  After ACTIVATE the destination owns it; if no answer
comes back the outcome is ``in_doubt`` and `resolve` settles it.  See
``docs/relocation-protocol.md`` for the commit point.

Django-free.
"""

from __future__ import annotations

import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Container
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from migrator.hypervisor.base import PAGE_SIZE, GuestNotFound, GuestState, HypervisorDriver
from migrator.tls import PeerIdentityError, check_not_revoked, expected_peer

from .protocol import (
    DEFAULT_BATCH_PAGES,
    MAX_BATCH_PAGES,
    PROTOCOL_VERSION,
    Channel,
    Fingerprints,
    FrameSender,
    Interrupted,
    Msg,
    ProtocolError,
    describe_error,
    encode_pages,
    touched_buffer,
)
from .verify import VERIFY_MODES, SampledCheck, commit_digests, prepare

log = logging.getLogger("berth.relocation")

STAGES = ("pre-migration", "reservation", "pre-copy", "stop-and-copy", "commitment",
          "activation")
SENDER_DEPTH = 2  # frames queued for the sender thread
_BANDWIDTH_SAMPLE = 256 * 1024  # smaller rounds are latency-bound: keep the last estimate


@dataclass(frozen=True)
class MigrationSettings:
    """Stop conditions and knobs, with defaults in the spirit of Xen/QEMU."""

    downtime_target_ms: float = 300.0  # QEMU's downtime-limit default
    max_rounds: int = 30               # Xen: 29 iterations + the last one
    max_data_factor: float = 3.0       # Xen's max_factor: stop once 3x memory is sent
    max_precopy_s: float = 0.0         # stop and copy once pre-copy ran this long (0: no limit)
    min_dirty_pages: int = 50          # Xen: fewer dirty pages than this -> stop
    shrink_ratio: float = 0.5          # a round must halve the dirty set to be worth it
    auto_converge: bool = False
    throttle_initial: float = 0.2      # QEMU cpu-throttle-initial (20 %)
    throttle_increment: float = 0.1    # QEMU cpu-throttle-increment (10 %)
    throttle_max: float = 0.99         # QEMU max-cpu-throttle (99 %)
    converge_trigger: float = 0.5      # throttle when dirtied >= 50 % of what was sent
    verify: str = "sampled"            # or "incremental", "full": see verify.py
    live: bool = True                  # False: xm migrate without --live (pause, copy, resume)
    max_bandwidth_mbps: float = 0.0    # the cap, MB/s (10**6 bytes/s) on the wire; 0: none
    batch_pages: int = DEFAULT_BATCH_PAGES
    connect_timeout: float = 10.0
    io_timeout: float = 30.0
    commit_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}")
        if not 1 <= self.batch_pages <= MAX_BATCH_PAGES:
            raise ValueError(f"batch_pages must be in 1..{MAX_BATCH_PAGES}")
        if self.max_rounds < 1 or self.max_data_factor < 1 or self.downtime_target_ms < 0:
            raise ValueError("max_rounds >= 1, max_data_factor >= 1, downtime_target_ms >= 0")
        if self.max_precopy_s < 0:
            raise ValueError("max_precopy_s >= 0 (0: no limit)")
        if not 0 < self.throttle_initial <= self.throttle_max < 1:
            raise ValueError("0 < throttle_initial <= throttle_max < 1")
        if not 0 <= self.max_bandwidth_mbps < float("inf"):
            raise ValueError("max_bandwidth_mbps >= 0 (0: no cap)")

    @property
    def max_bandwidth(self) -> float:
        """The cap in bytes/s (0: none)."""
        return self.max_bandwidth_mbps * 1e6


def past_time_limit(settings: MigrationSettings, started: float) -> bool:
    """Pre-copy has run for its maximum time (checked between rounds)."""
    return bool(settings.max_precopy_s) and time.monotonic() - started >= settings.max_precopy_s


class MigrationError(Exception):
    """The migration cannot go on; the message is shown to the operator."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage


class _Declined(MigrationError):
    """The destination said no AFTER ACTIVATE and guarantees it never ran
    the guest: rolling back on the source is safe."""


class _Aborted(Exception):
    pass


def settle_source(driver: HypervisorDriver, guest_uuid: str, destination_running: bool,
                  *, resume: bool = True) -> None:
    """Settle the paused source copy of an in-doubt migration (also after an
    agent restart, when the engine is gone): destroy it once the destination
    runs (or was told to run) the guest, else take the guest back - dirty log
    off, migration ended - and resume it (``resume``: it was running before).
    A copy that is already gone is left alone."""
    try:
        info = driver.get(guest_uuid)
    except GuestNotFound:
        return
    if destination_running:
        driver.end_migration(guest_uuid, succeeded=True)  # destroys the paused copy
        return
    if info.dirty_log:
        driver.dirty_log_stop(guest_uuid)
    if info.state is GuestState.MIGRATING:
        driver.end_migration(guest_uuid, succeeded=False)
    if resume and not info.active:
        driver.resume(guest_uuid)


class PrecopyMigration:
    """One outgoing live migration.  Construct, then ``run()`` in a thread."""

    def __init__(self, driver: HypervisorDriver, guest_uuid: str, dest_address: str,
                 dest_port: int, dest_host_name: str, ticket: str,
                 tls_context: ssl.SSLContext, settings: MigrationSettings | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None, *,
                 revoked_serials: Container[int] = frozenset(),
                 source_host: str | None = None,
                 on_commit: Callable[[], None] | None = None):
        self.driver, self.uuid = driver, guest_uuid
        self.dest = (dest_address, dest_port)
        self.dest_host, self.ticket, self.context = dest_host_name, ticket, tls_context
        self.settings = settings or MigrationSettings()
        self.revoked = revoked_serials
        self.source_host = source_host or driver.host_info().name
        self._on_event = on_event
        # Called at the commit point, before ACTIVATE leaves: the caller makes durable
        # that this host is giving the guest up (an exception here rolls back instead).
        self._on_commit = on_commit
        self._lock = threading.Lock()          # abort() vs the commit point
        self._abort = threading.Event()
        self._abort_reason = ""
        self._activate_sent = False
        self._chan: Channel | None = None
        self._sender: FrameSender | None = None
        self._memory: np.ndarray | None = None  # the guest's, if the driver maps it
        self._fps: Fingerprints | None = None    # verify="incremental" only
        self._sample: SampledCheck | None = None  # verify="sampled" only
        self._buffers: list[tuple[bytearray, bytearray]] = []  # see _reserve, _send_pages
        self._stage = "pre-migration"
        self._began = self._dirty_log = self._paused = False
        self._was_active = False
        self._rounds: list[dict[str, Any]] = []
        self._pages = self._data_pages = 0
        self._send_time = 0.0
        self._stop_reason: str | None = None
        self._throttle = 0.0
        self._t_pause: float | None = None
        self._downtime: float | None = None
        self._marks: dict[str, float] = {}      # downtime breakdown: s after the pause
        self._dest_times: dict[str, Any] = {}   # ... and the destination's own timings
        self._dest_domid: int | None = None
        self._info: Any = None
        self.result: dict[str, Any] | None = None

    # -- public -----------------------------------------------------------------
    def abort(self, reason: str = "aborted by request") -> bool:
        """Ask the migration to stop.  True if it will roll back; False if
        the commit point has passed (the destination owns the guest)."""
        with self._lock:
            if self._activate_sent:
                return False
            self._abort_reason = reason
            self._abort.set()
            return True

    def run(self) -> dict[str, Any]:
        """Migrate; never raises.  Returns (and stores in ``self.result``)
        the final record; ``state`` is succeeded, failed, aborted or in_doubt."""
        self._t0 = time.monotonic()
        try:
            self._premigration()
            self._reserve()
            if self.settings.live:
                self._precopy()
                self._stop_and_copy()
            else:
                self._copy_paused()
            self._commit_and_activate()
            return self._finish("succeeded", "")
        except Exception as exc:  # noqa: BLE001 - every failure ends in one record
            return self._fail(exc)
        finally:
            if self._chan is not None:
                self._chan.shutdown()  # wakes a sender blocked in sendall
            if self._sender is not None:
                self._sender.close()
            if self._chan is not None:
                self._chan.close()

    def resolve(self, destination_running: bool) -> dict[str, Any]:
        """Settle an ``in_doubt`` outcome once the portal knows what the
        destination did: destroy the paused source copy, or take it back."""
        if self.result is None or self.result["state"] != "in_doubt":
            raise RuntimeError("only an in-doubt migration can be resolved")
        settle_source(self.driver, self.uuid, destination_running, resume=self._was_active)
        self._dirty_log = self._began = self._paused = False
        if destination_running:
            return self._finish("succeeded", "resolved: the destination runs the guest")
        return self._finish("failed", "resolved: the destination never ran the guest; "
                                      "the guest runs on the source again")

    # -- stages -------------------------------------------------------------------
    def _premigration(self) -> None:
        info = self.driver.get(self.uuid)
        if info.state is not GuestState.RUNNING:
            # Live migration moves a running guest; a paused one is saved.
            raise MigrationError("pre-migration", f"guest {info.name} is {info.state.value}, "
                                 "not running")
        if self.dest_host == self.source_host:
            raise MigrationError("pre-migration", "a guest cannot migrate to its own host")
        self._info, self._was_active = info, info.active
        self._stage_event("pre-migration", domid=info.domid, memory_mib=info.memory_mib,
                          active=info.active)
        self.driver.begin_migration(self.uuid)
        self._began = True

    def _reserve(self) -> None:
        self._stage_event("reservation", destination=self.dest_host)
        self._chan = self._connect()
        info, host = self._info, self.driver.host_info()
        self._seed = secrets.token_bytes(32)
        self._chan.send_json(Msg.HELLO, {
            "protocol": PROTOCOL_VERSION, "ticket": self.ticket,
            "source_host": self.source_host, "arch": host.arch,
            "virt_features": list(host.virt_features),
            "guest": {"uuid": info.uuid, "name": info.name, "memory_mib": info.memory_mib,
                      "vcpus": info.vcpus, "config": info.config},
            "fingerprint_seed": self._seed.hex(), "verify": self.settings.verify})
        # Read buffers, faulted in while the destination reserves (see _send_pages).
        size = self.settings.batch_pages * PAGE_SIZE
        self._buffers = [(touched_buffer(size), touched_buffer(size))
                         for _ in range(FrameSender.buffers_for(SENDER_DEPTH))]
        # The destination populates the container before answering: allow
        # for it (a few seconds per GiB at worst).
        wait = self.settings.io_timeout + 5.0 * info.memory_mib / 1024
        self._dest_domid = self._reservation_answer(wait).get("domid")

    def _reservation_answer(self, wait: float) -> dict[str, Any]:
        """RESERVED's body; REFUSED or BUSY end the migration with the reason."""
        msg, body = self._chan.recv_json({Msg.RESERVED, Msg.REFUSED, Msg.BUSY},
                                         timeout=wait, stop=self._abort)
        if msg is Msg.BUSY:
            # Authenticated, but every migration slot there is taken: a
            # moment's condition of the destination, not a trust problem.
            raise MigrationError("reservation", f"{self.dest_host}'s relocation port is "
                                 f"busy ({body.get('reason')}); try again later")
        if msg is Msg.REFUSED:
            raise MigrationError("reservation", f"{self.dest_host} refused "
                                 f"({body.get('stage')}): {body.get('reason')}")
        return body

    def _connect(self) -> Channel:
        s = self.settings
        try:
            sock = socket.create_connection(self.dest, timeout=s.connect_timeout)
        except OSError as exc:
            raise MigrationError("reservation", f"cannot connect to {self.dest_host} at "
                                 f"{self.dest[0]}:{self.dest[1]}: {exc}") from None
        tls: ssl.SSLSocket | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.context.wrap_socket(sock, server_hostname=None)
            # Identity before a single byte of the guest leaves this host.
            expected_peer(tls, self.dest_host)
            check_not_revoked(tls, self.revoked)
        except (ssl.SSLEOFError, ConnectionResetError) as exc:
            # Cut before any certificate was judged: the destination's front
            # door closes unauthenticated connections it has no room for.
            (tls or sock).close()
            raise MigrationError("reservation", f"{self.dest_host} closed the connection "
                                 "during the TLS handshake, before any certificate was "
                                 "checked (its relocation port may be overloaded): "
                                 f"{describe_error(exc)}") from None
        except (OSError, PeerIdentityError) as exc:
            (tls or sock).close()
            raise MigrationError("reservation", f"cannot authenticate {self.dest_host}: "
                                 f"{describe_error(exc)}") from None
        return Channel(tls, io_timeout=s.io_timeout, max_rate=s.max_bandwidth)

    def _start_sending(self) -> None:
        self._fps, self._sample = prepare(self.settings.verify, self._seed, self._info.npages)
        self._memory = self.driver.map_memory(self.uuid)
        self._sender = FrameSender(self._chan, SENDER_DEPTH)

    def _precopy(self) -> None:
        s, npages = self.settings, self._info.npages
        self._start_sending()
        self.driver.dirty_log_start(self.uuid)
        self._dirty_log = True
        self._stage_event("pre-copy", destination_domid=self._dest_domid)
        self._t_precopy = time.monotonic()
        to_send, bandwidth = np.arange(npages, dtype=np.int64), 0.0
        for rnd in range(1, s.max_rounds + 1):
            t, wire0 = time.monotonic(), self._chan.bytes_out
            self._send_pages(to_send)
            self._sync(rnd)
            took = max(time.monotonic() - t, 1e-6)
            dirty = self.driver.dirty_log_read_and_clear(self.uuid)
            wire = self._chan.bytes_out - wire0
            if wire >= _BANDWIDTH_SAMPLE or not bandwidth:
                bandwidth = wire / took
            expected = len(dirty) * PAGE_SIZE / bandwidth
            self._round_event(rnd, len(to_send), len(dirty), took, wire, bandwidth, expected)
            self._stop_reason = self._should_stop(rnd, len(to_send), len(dirty), expected)
            if self._stop_reason:
                self._pending = dirty
                return
            self._converge(len(to_send), len(dirty))
            to_send = dirty

    def _sync(self, rnd: int) -> None:
        """Wait until the destination has applied everything sent so far.
        Socket buffers hold megabytes: without this, a round would look
        faster than it is, and the destination's backlog would be worked off
        inside the downtime, after the pause."""
        self._chan.send_json(Msg.SYNC, {"round": rnd})
        _, body = self._chan.recv_json({Msg.SYNC}, stop=self._abort)
        if body.get("round") != rnd:
            raise ProtocolError(f"SYNC answer for round {body.get('round')}, expected {rnd}")

    def _should_stop(self, rnd: int, sent: int, dirty: int, expected_s: float) -> str | None:
        s = self.settings
        if expected_s * 1000 <= s.downtime_target_ms and (
                dirty <= s.min_dirty_pages or dirty > s.shrink_ratio * sent):
            return "downtime_target"  # fits, and another round would not pay
        if rnd >= s.max_rounds:
            return "max_rounds"
        limit = s.max_data_factor * self._info.npages * PAGE_SIZE
        if self._chan.bytes_out + dirty * PAGE_SIZE > limit:
            return "max_data"
        if past_time_limit(s, self._t_precopy):
            return "max_time"
        return None

    def _converge(self, sent: int, dirty: int) -> None:
        """Auto-converge: a guest that dirties memory about as fast as we
        send it is slowed down, step by step, until pre-copy catches up."""
        s = self.settings
        if not s.auto_converge or dirty < s.converge_trigger * sent:
            return
        pct = s.throttle_initial if not self._throttle else self._throttle + s.throttle_increment
        self._throttle = min(pct, s.throttle_max)
        self.driver.throttle(self.uuid, 1.0 - self._throttle)
        self._emit({"kind": "throttle", "stage": "pre-copy",
                    "throttle": round(self._throttle, 3)})

    def _send_pages(self, indices: np.ndarray) -> None:
        """Read, encode and queue every page; returns once all are sent."""
        step, t = self.settings.batch_pages, time.monotonic()
        for n, start in enumerate(range(0, len(indices), step)):
            if self._abort.is_set():
                raise _Aborted()
            batch = indices[start:start + step]
            read, gather = self._buffers[n % len(self._buffers)]
            encoded = encode_pages(batch, self._read(batch, read), self._fps, gather)
            self._sender.put((encoded.head, encoded.data), self._abort)
            self._pages += encoded.pages
            self._data_pages += encoded.data_pages
        self._sender.drain(self._abort)
        self._send_time += time.monotonic() - t

    def _read(self, batch: np.ndarray, buffer: bytearray) -> memoryview:
        """The pages of ``batch``.  A run of consecutive pages of mapped
        memory is sent from where it lies: TLS encrypts straight from guest
        memory.  The guest may write such a page before it is encrypted;
        the dirty log has it, and the next round (or the stop-and-copy)
        sends it again, so both ends' fingerprints agree at the end.
        Otherwise pages are copied into buffers used in rotation, never
        allocated per batch: fresh memory costs a page fault per 4 KiB
        touched (≈11 µs in a nested VM), more than copying it."""
        first, last = int(batch[0]), int(batch[-1])
        if self._memory is not None and last - first == len(batch) - 1:
            return memoryview(self._memory[first:last + 1].reshape(-1))
        return self.driver.read_pages_into(self.uuid, batch, buffer)

    def _pause(self) -> None:
        self._t_pause = time.monotonic()  # the downtime starts here
        self.driver.pause(self.uuid)
        self._paused = True
        # The bandwidth cap paces pre-copy only: the guest is paused now, and
        # every paced second would be a second more of downtime.
        self._chan.lift_cap()

    def _stop_and_copy(self) -> None:
        self._pause()
        final = np.union1d(self._pending, self.driver.dirty_log_read_and_clear(self.uuid))
        self._mark("paused")
        self._stage_event("stop-and-copy", reason=self._stop_reason, dirty_pages=len(final))
        self._send_pages(final)
        self._mark("last_pages_sent")
        self._send_vcpu_and_commit()

    def _copy_paused(self) -> None:
        """Non-live migration (``xm migrate`` without ``--live``): pause first,
        then send every page once and the vCPU state.  One copy round, no
        dirty log (a paused guest writes nothing); the downtime is the whole
        copy, and is recorded as such."""
        npages = self._info.npages
        self._start_sending()
        self._stop_reason = "not_live"
        self._pause()
        self._mark("paused")
        self._stage_event("stop-and-copy", reason="not_live", dirty_pages=npages)
        t, wire0 = time.monotonic(), self._chan.bytes_out
        self._send_pages(np.arange(npages, dtype=np.int64))
        self._sync(1)
        took = max(time.monotonic() - t, 1e-6)
        wire = self._chan.bytes_out - wire0
        self._round_event(1, npages, 0, took, wire, wire / took, 0.0, stage="stop-and-copy")
        self._mark("last_pages_sent")
        self._send_vcpu_and_commit()

    def _send_vcpu_and_commit(self) -> None:
        vcpu = self.driver.get_vcpu_state(self.uuid)
        self._chan.send(Msg.VCPU, vcpu)
        # The destination computes its digests while we compute ours.
        self._mine = commit_digests(self.settings.verify, self.driver, self.uuid, vcpu,
                                    self._fps, self._sample)
        self._chan.send_json(Msg.COMMIT, {**self._mine, "pages_sent": self._pages})
        self._mark("commit_sent")

    def _commit_and_activate(self) -> None:
        chan, s = self._chan, self.settings
        self._stage = "commitment"
        msg, body = chan.recv_json({Msg.COMMITTED, Msg.REFUSED, Msg.ABORT},
                                   timeout=s.commit_timeout, stop=self._abort)
        if msg is not Msg.COMMITTED:
            raise MigrationError("commitment", f"{self.dest_host} did not commit: "
                                 f"{body.get('reason')}")
        self._mark("committed")
        self._dest_times = {k: body.get(k) for k in ("verify_ms",)}
        theirs = {k: body.get(k) for k in self._mine}
        if theirs != self._mine:
            raise MigrationError("commitment", f"images differ: ours {self._mine}, "
                                 f"theirs {theirs}")
        if self._on_commit is not None:
            # Before ACTIVATE can leave: if this process dies past here, the host must
            # not run the guest again when it comes back (the destination may own it).
            self._on_commit()
        self._stage_event("commitment", **self._mine)
        with self._lock:  # the commit point: after this line, no abort, no rollback
            if self._abort.is_set():
                raise _Aborted()
            self._activate_sent = True
        try:
            chan.send_json(Msg.ACTIVATE, {})
        except OSError as exc:
            # The one TLS record did not fully leave, so the destination
            # cannot have read ACTIVATE: taking the guest back is safe.
            raise _Declined("commitment", f"ACTIVATE could not be sent: {describe_error(exc)}; "
                            "the destination cannot have activated") from None
        msg, body = chan.recv_json({Msg.ACTIVATED, Msg.ABORT}, timeout=s.commit_timeout)
        if msg is Msg.ABORT:
            raise _Declined("activation", f"{self.dest_host} could not activate: "
                            f"{body.get('reason')}")
        self._downtime = time.monotonic() - self._t_pause
        self._mark("activated")
        self._dest_times["resume_ms"] = body.get("resume_ms")
        self._dest_domid = body.get("domid", self._dest_domid)
        self._stage = "activation"
        self.driver.end_migration(self.uuid, succeeded=True)  # destroys our paused copy
        self._stage_event("activation", destination=self.dest_host, domid=self._dest_domid,
                          ip=body.get("ip", ""), downtime_ms=round(self._downtime * 1000, 3))

    # -- failure ------------------------------------------------------------------
    def _fail(self, exc: Exception) -> dict[str, Any]:
        stage = getattr(exc, "stage", self._stage)
        reason = (self._abort_reason if isinstance(exc, _Aborted | Interrupted)
                  else str(exc) if isinstance(exc, MigrationError) else describe_error(exc))
        if self._activate_sent and not isinstance(exc, _Declined):
            # ACTIVATE may or may not have arrived: neither side may guess.
            log.error("migration of %s to %s is IN DOUBT (%s): the paused guest is kept "
                      "here until resolve()", self.uuid, self.dest_host, reason)
            self._emit({"kind": "in_doubt", "stage": "activation", "reason": reason})
            return self._finish("in_doubt", f"no answer after ACTIVATE: {reason}", stage)
        self._send_abort(reason)
        self._rollback_local()
        state = "aborted" if isinstance(exc, _Aborted | Interrupted) else "failed"
        log.warning("migration of %s to %s %s at %s: %s", self.uuid, self.dest_host, state,
                    stage, reason)
        return self._finish(state, reason, stage)

    def _send_abort(self, reason: str) -> None:
        # Best effort: the destination discards on a dropped link anyway.
        if self._chan is not None:
            # A frame being paced holds the channel (seconds, under a low cap):
            # finish it at once, so ABORT follows it within try_send_json's wait.
            self._chan.lift_cap()
            self._chan.try_send_json(Msg.ABORT, {"reason": reason[:1000]}, timeout=2.0)

    def _rollback_local(self) -> None:
        """Put the guest back exactly as it was before the migration."""
        steps = []
        if self._dirty_log:
            steps.append(lambda: self.driver.dirty_log_stop(self.uuid))
        if self._began:
            steps.append(lambda: self.driver.end_migration(self.uuid, succeeded=False))
        if self._paused and self._was_active:
            steps.append(lambda: self.driver.resume(self.uuid))
        for step in steps:
            try:
                step()
            except Exception:  # one failed step must not skip the resume
                log.exception("rollback of %s: a step failed", self.uuid)
        self._dirty_log = self._began = self._paused = False

    # -- reporting ------------------------------------------------------------------
    def _finish(self, state: str, reason: str, stage: str | None = None) -> dict[str, Any]:
        memory = self._info.npages * PAGE_SIZE if self._info is not None else 0
        sent = self._chan.bytes_out if self._chan is not None else 0
        self.result = {
            "state": state, "reason": reason, "stage": stage or self._stage,
            "guest": self.uuid, "source_host": self.source_host,
            "destination_host": self.dest_host,
            "total_time_s": round(time.monotonic() - self._t0, 4),
            "downtime_ms": None if self._downtime is None else round(self._downtime * 1000, 3),
            "bytes_sent": sent, "memory_bytes": memory,
            "bytes_ratio": round(sent / memory, 4) if memory else None,
            "rounds": len(self._rounds), "stop_reason": self._stop_reason,
            "pages_sent": self._pages, "data_pages": self._data_pages,
            "channel_mbps": round(sent / self._send_time / 1e6, 1) if self._send_time else None,
            "throttle": round(self._throttle, 3), "verify": self.settings.verify,
            "max_bandwidth_mbps": self.settings.max_bandwidth_mbps or None,
            "source_domid": self._info.domid if self._info is not None else None,
            "destination_domid": self._dest_domid,
            "downtime_breakdown_ms": {
                **{k: round(v * 1000, 3) for k, v in self._marks.items()},
                **{f"destination_{k}": v for k, v in self._dest_times.items()}},
            "settings": asdict(self.settings), "round_log": list(self._rounds),
        }
        self._emit({"kind": "result", **{k: v for k, v in self.result.items()
                                         if k not in ("settings", "round_log")}})
        return self.result

    def _round_event(self, rnd: int, sent: int, dirty: int, took: float, wire: int,
                     bandwidth: float, expected: float, stage: str = "pre-copy") -> None:
        stats = {"round": rnd, "pages_sent": sent, "dirty_pages": dirty,
                 "dirty_rate": round(dirty / took, 1), "bandwidth_mbps": round(bandwidth / 1e6, 1),
                 "expected_downtime_ms": round(expected * 1000, 3),
                 "duration_s": round(took, 4), "round_bytes": wire,
                 "bytes_sent": self._chan.bytes_out, "throttle": round(self._throttle, 3)}
        self._rounds.append(stats)
        self._emit({"kind": "round", "stage": stage, **stats})

    def _mark(self, name: str) -> None:
        self._marks[name] = time.monotonic() - (self._t_pause or 0.0)

    def _stage_event(self, stage: str, **fields: Any) -> None:
        self._stage = stage
        self._emit({"kind": "stage", "stage": stage, **fields})

    def _emit(self, event: dict[str, Any]) -> None:
        if self._on_event is None:
            return
        event = {"side": "source", "guest": self.uuid, "host": self.source_host,
                 "elapsed": round(time.monotonic() - self._t0, 4), **event}
        try:
            self._on_event(event)
        except Exception:  # progress reporting must never break a migration
            log.exception("migration on_event callback failed")
