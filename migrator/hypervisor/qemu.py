"""The QEMU driver: real ``qemu-system-x86_64`` guests (TCG), managed over QMP.

Same interface as the simulated driver (`base.HypervisorDriver`), with what
QEMU does itself left to QEMU:

* **Lifecycle**: one daemonized QEMU per guest (`qemu_process`), paused and
  resumed with QMP ``stop``/``cont``, destroyed with ``quit`` (SIGKILL if the
  monitor does not answer).  Guests outlive the agent: a new driver on the
  same run directory re-attaches to every QEMU whose monitor answers, and
  forgets (and cleans up after) the ones that died.
* **Save**: the save stream is a small Berth header followed by QEMU's own
  migration stream, which QEMU writes into one end of a socketpair handed
  over with ``getfd`` (``migrate fd:``); the driver yields what arrives.
  The plaintext state only ever flows through that socket.  QEMU refuses to
  migrate a guest twice from the same pause, so a save stream can be read
  once: ``replayable_save = False`` tells the save job to upload in one pass.
* **Restore**: a new QEMU with ``-incoming defer -S`` (same UUID, new domain
  ID) reads the stream from a pipe (``migrate-incoming fd:``).
* **Live migration**: QEMU's pre-copy over TLS (`listen_incoming`,
  `migrate_start`, `migration_status`, `migrate_cancel`), driven by
  ``migrator.relocation.qemu_tls``.  The page-level methods of the interface
  that the simulated engine uses (dirty log, page writes, vCPU blobs,
  throttle) are refused: QEMU migrates memory itself.
* **Console**: every guest's serial port (ttyS0) is a socket the driver
  reads into a bounded ring per guest that survives an agent restart
  (`console`); `console_output` and `console_write` serve it.
* **Memory reads** (`memory_digest`, `read_memory`): QMP ``pmemsave`` into a
  FIFO read by the agent; never a file on disk.

Guest config keys: ``machine`` (default ``pc``), ``kernel``, ``initrd``,
``append``, ``disk`` (raw image; must be on shared storage to migrate),
``loader`` (initial memory content for a fresh boot, QEMU's generic loader).
Without kernel and disk the guest boots a tiny halt loop that counts timer
ticks at 0x7e00.  See ``docs/qemu.md``.

Django-free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import qemu_process as proc
from .accounting import HostAccounting
from .base import (
    PAGE_SIZE,
    Capacity,
    GuestInfo,
    GuestNotFound,
    GuestSpec,
    GuestState,
    HostInfo,
    HypervisorDriver,
    HypervisorError,
    InvalidGuestState,
    InvalidRequest,
    Reservation,
    check_shape,
    norm_uuid,
)
from .console import RING_FILE, SOCKET, ConsoleOutput, ConsoleReader, ConsoleRing
from .qmp import QMP, QMPError, QMPGone
from .savestream import MalformedStream, SaveStreamError, TruncatedStream

log = logging.getLogger("berth.qemu")
TlsFiles = proc.TlsFiles

MAGIC = b"BERTHQMU"
VERSION = 1
_PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header JSON length
MAX_HEADER = 1 << 20
READ_BYTES = 1 << 20
# What QEMU's run states mean for Berth (the rest: not running).
_RUNNING = {"running"}
# What a save's ``migrate fd:`` relies on, set before each save: QEMU keeps
# migration parameters for its lifetime, so a guest that arrived by live
# migration still holds the incoming side's tls-creds/tls-authz, and one whose
# migration was aborted the client's tls-creds/tls-hostname and its bandwidth
# - with them the save would try TLS on the agent's socketpair (and fail, or
# wait for a handshake that never comes).
SAVE_PARAMETERS = {"tls-creds": "", "tls-hostname": "", "tls-authz": "",
                   "max-bandwidth": 1 << 40}  # bytes/s: QEMU 7.2's default is 128 MiB/s
UNSUPPORTED = ("the QEMU driver does not expose guest pages: QEMU migrates memory itself "
               "(see docs/qemu.md)")


class _Guest:
    """One guest's record; ``lock`` serialises its state changes."""

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.dir = directory
        self.uuid: str = meta["uuid"]
        self.name: str = meta["name"]
        self.domid: int = meta["domid"]
        self.memory_mib: int = meta["memory_mib"]
        self.vcpus: int = meta["vcpus"]
        self.config: dict[str, Any] = meta["config"]
        self.state = GuestState(meta.get("state", "running"))
        self.pid: int | None = meta.get("pid")
        self.lock = threading.RLock()
        self.console: ConsoleReader | None = None

    def open_console(self) -> None:
        self.console = ConsoleReader(str(self.dir / SOCKET), ConsoleRing(self.dir / RING_FILE),
                                     self.name)

    def close_console(self) -> None:
        if self.console is not None:
            self.console.stop()

    @property
    def qmp_path(self) -> str:
        return str(self.dir / "qmp.sock")

    @property
    def watch_path(self) -> str:
        return str(self.dir / "watch.sock")

    def meta(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "domid": self.domid,
                "memory_mib": self.memory_mib, "vcpus": self.vcpus, "config": self.config,
                "state": self.state.value, "pid": self.pid}

    def save(self) -> None:
        proc.write_json(self.dir / "meta.json", self.meta())

    def qmp(self, timeout: float = 10.0):
        return QMP.session(self.qmp_path, timeout)


class QemuDriver(HypervisorDriver):
    """A host whose guests are QEMU processes, state in ``run_dir``."""

    replayable_save = False        # a QEMU save stream can be read once (see module doc)
    migration_transport = "qemu-tls"

    def __init__(self, name: str, capacity_mib: int, run_dir: str | os.PathLike[str], *,
                 arch: str = "x86_64", virt_features: Iterable[str] = (),
                 tls: proc.TlsFiles | None = None, binary: str = proc.QEMU_BINARY):
        self._host = HostInfo(name, "qemu", arch, tuple(virt_features), capacity_mib)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.run_dir, 0o700)
        self.tls, self.binary = tls, binary
        self._acct: HostAccounting[_Guest] = HostAccounting(
            self._host, domid_file=self.run_dir / "next_domid")
        self._attach()

    # -- re-attaching after an agent restart --------------------------------------
    def _attach(self) -> None:
        for directory in sorted(p for p in self.run_dir.iterdir() if p.is_dir()):
            meta = proc.read_json(directory / "meta.json")
            if meta is None:
                if directory.name.startswith("tls-"):
                    continue
                proc.remove_dir(directory)
                continue
            guest = _Guest(directory, meta)
            pid = proc.read_pid(directory)
            if guest.state is GuestState.INCOMING or not proc.is_qemu(pid, guest.uuid):
                # An incoming guest belonged to a migration or restore that
                # died with the previous agent: it never ran, drop it.
                log.warning("guest %s (%s): QEMU is gone or was incoming; cleaning up",
                            guest.name, guest.uuid)
                proc.kill(pid, guest.uuid)
                proc.remove_dir(directory)
                continue
            guest.pid = pid
            if guest.state in (GuestState.SAVING, GuestState.MIGRATING):
                guest.state = GuestState.PAUSED  # the job that held it is gone
                guest.save()
            self._acct.guests[guest.uuid] = guest
            guest.open_console()
            log.info("re-attached to guest %s (%s), QEMU pid %s", guest.name, guest.uuid, pid)

    # -- host ---------------------------------------------------------------------
    def host_info(self) -> HostInfo:
        return self._host

    def capacity(self) -> Capacity:
        return self._acct.capacity()

    # -- lifecycle ----------------------------------------------------------------
    def create(self, spec: GuestSpec) -> GuestInfo:
        uuid = norm_uuid(spec.uuid) if spec.uuid else str(uuidlib.uuid4())
        check_shape(spec.name, spec.memory_mib, spec.vcpus)
        config = json.loads(json.dumps(spec.config))
        proc.check_config(config)
        res = self._acct.claim(uuid, spec.memory_mib)
        state = GuestState.RUNNING if spec.start else GuestState.PAUSED
        guest = self._start(res, spec.name, spec.vcpus, config, state, incoming=False)
        return self._info(guest)

    def _start(self, res: Reservation, name: str, vcpus: int, config: dict[str, Any],
               state: GuestState, *, incoming: bool, owned: bool = True) -> _Guest:
        """Launch QEMU for a reservation and swap the reservation for the guest.
        If QEMU fails, a reservation this call made (``owned``) is released; a
        caller's reservation is left for the caller to release."""
        directory = self.run_dir / res.uuid
        meta = {"uuid": res.uuid, "name": name, "domid": 0, "memory_mib": res.memory_mib,
                "vcpus": vcpus, "config": config, "state": state.value}
        try:
            proc.remove_dir(directory)
            directory.mkdir(mode=0o700)
            guest = _Guest(directory, meta)
            guest.domid = self._acct.next_domid()
            argv = proc.command_line(directory, name=name, uuid=res.uuid,
                                     memory_mib=res.memory_mib, vcpus=vcpus, config=config,
                                     incoming=incoming, paused=state is not GuestState.RUNNING,
                                     binary=self.binary)
            guest.save()  # before launch: a crash in between leaves a record to clean up
            guest.pid = proc.launch(directory, argv)
            guest.save()
        except BaseException:
            if owned:
                self._acct.drop(res.id)
            with contextlib.suppress(Exception):
                proc.kill(proc.read_pid(directory), res.uuid)
            proc.remove_dir(directory)
            raise
        # QEMU runs now, so the guest is accounted even if the caller released
        # its reservation meanwhile.
        with self._acct.lock:
            self._acct.drop(res.id)
            self._acct.guests[guest.uuid] = guest
        guest.open_console()
        log.info("started QEMU for guest %s (%s), domain %d, pid %s", name, res.uuid,
                 guest.domid, guest.pid)
        return guest

    def _guest(self, uuid: str) -> _Guest:
        return self._acct.guest(uuid)

    def _status(self, guest: _Guest) -> str | None:
        """QEMU's run state, or None if its QEMU is gone (then forgotten)."""
        try:
            with guest.qmp() as qmp:
                return str(qmp.command("query-status")["status"])
        except QMPGone:
            if proc.is_qemu(guest.pid, guest.uuid):
                raise HypervisorError(f"guest {guest.name}: QEMU does not answer on its "
                                      "monitor") from None
        self._forget(guest, f"QEMU exited ({proc.log_tail(guest.dir)})")
        return None

    def _forget(self, guest: _Guest, why: str) -> None:
        if not self._acct.remove(guest):
            return
        log.warning("guest %s (%s) is gone from %s: %s", guest.name, guest.uuid,
                    self._host.name, why)
        guest.close_console()
        proc.kill(guest.pid, guest.uuid)
        proc.remove_dir(guest.dir)

    def _info(self, guest: _Guest, status: str | None = "") -> GuestInfo:
        if status == "":
            status = self._status(guest)
        if status is None:
            raise GuestNotFound(f"guest {guest.name} ({guest.uuid}) is gone: its QEMU exited")
        active = status in _RUNNING
        with guest.lock:
            state = guest.state
            if state in (GuestState.RUNNING, GuestState.PAUSED):
                state = GuestState.RUNNING if active else GuestState.PAUSED
            return GuestInfo(uuid=guest.uuid, name=guest.name, domid=guest.domid, state=state,
                             active=active, memory_mib=guest.memory_mib, vcpus=guest.vcpus,
                             config=json.loads(json.dumps(guest.config)),
                             host=self._host.name, dirty_log=False, throttle=1.0,
                             pages_written=0)

    def list(self) -> list[GuestInfo]:
        infos = []
        for guest in self._acct.by_domid():
            try:
                infos.append(self._info(guest))
            except GuestNotFound:
                continue
            except HypervisorError:  # its monitor is busy: report what Berth knows
                infos.append(self._info(guest, "running" if guest.state in (
                    GuestState.RUNNING, GuestState.MIGRATING) else "paused"))
        return infos

    def get(self, uuid: str) -> GuestInfo:
        return self._info(self._guest(uuid))

    def _set_state(self, guest: _Guest, state: GuestState) -> None:
        with guest.lock:
            guest.state = state
            guest.save()

    def pause(self, uuid: str) -> GuestInfo:
        guest = self._guest(uuid)
        with guest.lock:
            self._qmp(guest, "stop")
            if guest.state is GuestState.RUNNING:
                self._set_state(guest, GuestState.PAUSED)
        return self._info(guest)

    def resume(self, uuid: str) -> GuestInfo:
        guest = self._guest(uuid)
        with guest.lock:
            if guest.state is GuestState.SAVING:
                raise InvalidGuestState(f"guest {guest.name} is busy: a save is in progress")
            self._qmp(guest, "cont")
            if guest.state is not GuestState.MIGRATING:
                self._set_state(guest, GuestState.RUNNING)
        return self._info(guest)

    def _qmp(self, guest: _Guest, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            with guest.qmp() as qmp:
                return qmp.command(command, args)
        except QMPGone:
            self._status(guest)  # forgets it if QEMU died
            raise GuestNotFound(f"guest {guest.name}: its QEMU is gone") from None
        except QMPError as exc:
            raise HypervisorError(f"guest {guest.name}: QEMU refused {command}: {exc}") from None

    def destroy(self, uuid: str) -> None:
        guest = self._guest(uuid)
        with guest.lock:
            if guest.state is GuestState.SAVING:
                raise InvalidGuestState(f"guest {guest.name} is busy: a save is in progress")
            with contextlib.suppress(QMPError):
                with guest.qmp(timeout=3) as qmp:
                    qmp.command("quit")
            deadline = time.monotonic() + 5
            while proc.alive(guest.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            self._acct.remove(guest)
            guest.close_console()
            proc.kill(guest.pid, guest.uuid)
            proc.remove_dir(guest.dir)

    def close(self) -> None:
        """Disconnect from the guests' consoles; QEMU processes outlive the
        driver on purpose."""
        for guest in list(self._acct.guests.values()):
            guest.close_console()

    def shutdown_all(self) -> None:
        """Destroy every guest (tests, and an operator emptying a host)."""
        for guest in list(self._acct.guests.values()):
            with contextlib.suppress(HypervisorError):
                self.destroy(guest.uuid)

    # -- save / restore -----------------------------------------------------------
    def _header(self, guest: _Guest) -> bytes:
        host = self._host
        meta = {"uuid": guest.uuid, "name": guest.name, "memory_mib": guest.memory_mib,
                "vcpus": guest.vcpus, "arch": host.arch,
                "virt_features": list(host.virt_features), "config": guest.config,
                "driver": "qemu"}
        body = json.dumps(meta, sort_keys=True).encode()
        return _PREAMBLE.pack(MAGIC, VERSION, 0, len(body)) + body

    def save_stream(self, uuid: str, *, batch_pages: int = 256) -> Iterator[bytes]:
        from .savestream import GuardedStream

        guest = self._guest(uuid)
        with guest.lock:
            info = self._info(guest)
            if info.active or guest.state not in (GuestState.PAUSED, GuestState.SAVED):
                raise InvalidGuestState(
                    f"guest {guest.name} must be paused to save (it is {info.state.value}"
                    f"{', active' if info.active else ''})")
            guest.state = GuestState.SAVING

        def done(completed: bool) -> None:
            with guest.lock:
                if guest.state is GuestState.SAVING:
                    self._set_state(guest, GuestState.SAVED if completed else GuestState.PAUSED)

        return GuardedStream(self._save_pieces(guest), done)

    def _save_pieces(self, guest: _Guest) -> Iterator[bytes]:
        yield self._header(guest)
        mine, theirs = socket.socketpair()
        try:
            # No monitor connection is held while the stream flows (an upload
            # can take minutes): QEMU serves one client per monitor socket.
            try:
                with guest.qmp() as qmp:
                    qmp.command("migrate-set-parameters", SAVE_PARAMETERS)
                    qmp.command("getfd", {"fdname": "berth-save"}, fds=[theirs.fileno()])
                    theirs.close()
                    qmp.command("migrate", {"uri": "fd:berth-save"})
            except QMPError as exc:
                raise InvalidGuestState(f"guest {guest.name}: QEMU cannot save: {exc}") from None
            finished = False
            try:
                while chunk := mine.recv(READ_BYTES):
                    yield chunk
                finished = True
            finally:
                if not finished:  # closed early or failed: stop QEMU writing, and wait
                    with contextlib.suppress(QMPError):
                        self.migrate_cancel(guest.uuid)
            with guest.qmp() as qmp:
                status = self._wait_migration(qmp, ("completed", "failed", "cancelled"))
            if status.get("status") != "completed":
                raise HypervisorError(f"guest {guest.name}: QEMU's save failed: "
                                      f"{status.get('error-desc', status.get('status'))}")
        finally:
            mine.close()
            theirs.close()

    @staticmethod
    def _wait_migration(qmp: QMP, final: Sequence[str], timeout: float = 60.0
                        ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = qmp.command("query-migrate")
            if status.get("status") in final or time.monotonic() > deadline:
                return status
            time.sleep(0.02)

    def restore_stream(self, chunks: Iterable[bytes], *, start: bool = True,
                       reservation_id: str | None = None) -> GuestInfo:
        pieces = iter(chunks)
        meta, rest = _read_header(pieces)
        self._check_image(meta)
        uuid = norm_uuid(meta["uuid"])
        res = (self._use_reservation(reservation_id, uuid, meta["memory_mib"])
               if reservation_id else self._acct.claim(uuid, meta["memory_mib"]))
        guest = self._start(res, meta["name"], meta["vcpus"], meta["config"],
                            GuestState.INCOMING, incoming=True, owned=not reservation_id)
        try:
            self._feed(guest, rest, pieces)
        except BaseException:
            self._discard(guest)
            raise
        self._set_state(guest, GuestState.PAUSED)
        return self.resume(uuid) if start else self._info(guest)

    def _check_image(self, meta: dict[str, Any]) -> None:
        try:
            norm_uuid(meta["uuid"])
            check_shape(meta["name"], meta["memory_mib"], meta["vcpus"])
            proc.check_config(meta["config"])
        except (KeyError, TypeError, InvalidRequest) as exc:
            raise MalformedStream(f"QEMU image header is invalid: {exc}") from None
        self._host.check_compatible(meta.get("arch"), meta.get("virt_features") or ())

    def _use_reservation(self, reservation_id: str, uuid: str, memory_mib: int) -> Reservation:
        res = self._acct.reservation(reservation_id)
        if res.uuid != uuid or res.memory_mib < memory_mib:
            raise InvalidRequest(f"reservation {res.id} does not fit guest {uuid}")
        return res

    def _feed(self, guest: _Guest, first: bytes, pieces: Iterator[bytes]) -> None:
        """Pipe the rest of the stream into ``migrate-incoming fd:``."""
        read_end, write_end = os.pipe()
        try:
            with guest.qmp() as qmp:
                qmp.command("getfd", {"fdname": "berth-restore"}, fds=[read_end])
                os.close(read_end)
                read_end = -1
                qmp.command("migrate-incoming", {"uri": "fd:berth-restore"})
            with os.fdopen(write_end, "wb", buffering=0) as pipe:
                write_end = -1
                try:
                    if first:
                        pipe.write(first)
                    for piece in pieces:
                        pipe.write(piece)
                except BrokenPipeError:
                    raise TruncatedStream("QEMU rejected the image: "
                                          f"{proc.log_tail(guest.dir)}") from None
            with guest.qmp() as qmp:
                status = self._wait_migration(qmp, ("completed", "failed"))
        except (QMPGone, BrokenPipeError):
            raise MalformedStream(f"QEMU rejected the image: {proc.log_tail(guest.dir)}"
                                  ) from None
        finally:
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)
        if status.get("status") != "completed":
            raise MalformedStream(f"QEMU rejected the image: "
                                  f"{status.get('error-desc') or proc.log_tail(guest.dir)}")

    def _discard(self, guest: _Guest) -> None:
        self._acct.remove(guest)
        guest.close_console()
        proc.kill(guest.pid, guest.uuid)
        proc.remove_dir(guest.dir)

    # -- console ------------------------------------------------------------------
    def console_output(self, uuid: str, since: int = 0) -> ConsoleOutput:
        """The guest's serial output from offset ``since`` on, as far as the
        ring (`console.RING_BYTES`) still holds it."""
        guest = self._guest(uuid)
        if guest.console is None:
            raise GuestNotFound(f"guest {guest.name} has no console")
        return guest.console.ring.read(since)

    def console_write(self, uuid: str, data: bytes) -> None:
        """Input for the guest's serial port."""
        guest = self._guest(uuid)
        if guest.console is None:
            raise GuestNotFound(f"guest {guest.name} has no console")
        guest.console.write(data)

    # -- memory -------------------------------------------------------------------
    def memory_digest(self, uuid: str) -> str:
        """SHA-256 of guest-physical memory 0 .. memory size (the guest is
        paused for the read if it was running)."""
        return self._read(uuid, 0, 0)[0]

    def read_memory(self, uuid: str, addr: int, size: int) -> bytes:
        """Bytes of guest-physical memory (tests and diagnostics)."""
        return self._read(uuid, addr, size)[1]

    def _read(self, uuid: str, addr: int, size: int) -> tuple[str, bytes]:
        guest = self._guest(uuid)
        total = guest.memory_mib << 20
        if addr < 0 or size < 0 or addr + size > total:
            raise InvalidRequest(f"memory range outside 0..{total}")
        with guest.lock, guest.qmp(timeout=120) as qmp:
            running = qmp.command("query-status")["status"] in _RUNNING
            if running:
                qmp.command("stop")
            try:
                reader = proc.pmemsave(qmp, guest.dir, 0, total, keep=(addr, size))
            finally:
                if running:
                    qmp.command("cont")
        return reader.digest.hexdigest(), bytes(reader.kept)

    def read_pages(self, uuid: str, indices: Sequence[int] | np.ndarray) -> bytes:
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return b"".join(self.read_memory(uuid, i * PAGE_SIZE, PAGE_SIZE) for i in idx)

    def write_pages(self, uuid: str, indices: Sequence[int] | np.ndarray, data: bytes) -> None:
        raise InvalidRequest(UNSUPPORTED)

    def get_vcpu_state(self, uuid: str) -> bytes:
        raise InvalidRequest(UNSUPPORTED)

    def set_vcpu_state(self, uuid: str, blob: bytes) -> None:
        raise InvalidRequest(UNSUPPORTED)

    def dirty_log_start(self, uuid: str) -> None:
        raise InvalidRequest(UNSUPPORTED)

    def dirty_log_stop(self, uuid: str) -> None:
        raise InvalidRequest(UNSUPPORTED)

    def dirty_log_read_and_clear(self, uuid: str) -> np.ndarray:
        raise InvalidRequest(UNSUPPORTED)

    def throttle(self, uuid: str, factor: float) -> None:
        raise InvalidRequest("the QEMU driver throttles through QEMU's auto-converge")

    # -- reservations and migration ---------------------------------------------------
    def reserve(self, uuid: str, memory_mib: int) -> Reservation:
        return self._acct.reserve(uuid, memory_mib)

    def commit_reservation(self, reservation_id: str, spec: GuestSpec) -> GuestInfo:
        """Start an incoming QEMU (``-incoming defer -S``) for a migration."""
        res = self._acct.reservation_for(reservation_id, spec)
        config = json.loads(json.dumps(spec.config))
        proc.check_config(config)
        guest = self._start(res, spec.name, spec.vcpus, config, GuestState.INCOMING,
                            incoming=True, owned=False)
        return self._info(guest)

    def release_reservation(self, reservation_id: str) -> None:
        self._acct.release(reservation_id)

    def begin_migration(self, uuid: str) -> GuestInfo:
        guest = self._guest(uuid)
        with guest.lock:
            if guest.state not in (GuestState.RUNNING, GuestState.PAUSED):
                raise InvalidGuestState(f"guest {guest.name} is busy ({guest.state.value})")
            self._set_state(guest, GuestState.MIGRATING)
        return self._info(guest)

    def end_migration(self, uuid: str, *, succeeded: bool) -> None:
        guest = self._guest(uuid)
        if succeeded:
            with guest.lock:
                guest.state = GuestState.PAUSED
            self.destroy(uuid)
            return
        with guest.lock:
            if guest.state is not GuestState.MIGRATING:
                raise InvalidGuestState(f"guest {guest.name} is not migrating")
            self._set_state(guest, GuestState.PAUSED)  # _info reports running if it runs

    def _tls_object(self, qmp: QMP, endpoint: str) -> str:
        if self.tls is None:
            raise HypervisorError(f"host {self._host.name} has no relocation certificate: "
                                  "QEMU cannot migrate over TLS")
        directory = proc.tls_dir(self.run_dir, self.tls, endpoint)
        object_id = f"berth-tls-{endpoint}-{uuidlib.uuid4().hex[:8]}"
        qmp.command("object-add", {"qom-type": "tls-creds-x509", "id": object_id,
                                   "dir": str(directory), "endpoint": endpoint,
                                   "verify-peer": True})
        return object_id

    def listen_incoming(self, uuid: str, address: str, source_identity: str) -> int:
        """Make an incoming guest's QEMU listen for QEMU's TLS migration
        stream on ``address`` (a free port), accepting only a client whose
        certificate comes from the deployment CA and whose subject is
        ``source_identity``; returns the port."""
        guest = self._guest(uuid)
        with guest.qmp() as qmp:
            creds = self._tls_object(qmp, "server")
            authz = f"berth-authz-{uuidlib.uuid4().hex[:8]}"
            qmp.command("object-add", {"qom-type": "authz-simple", "id": authz,
                                       "identity": source_identity})
            qmp.command("migrate-set-parameters", {"tls-creds": creds, "tls-authz": authz})
            host = f"[{address}]" if ":" in address else address
            qmp.command("migrate-incoming", {"uri": f"tcp:{host}:0"})
            listening = qmp.command("query-migrate").get("socket-address") or []
        if not listening:
            raise HypervisorError(f"guest {guest.name}: QEMU is not listening for the stream")
        return int(listening[0]["port"])

    def migrate_start(self, uuid: str, address: str, port: int, *, tls_hostname: str,
                      parameters: dict[str, Any], capabilities: dict[str, bool]) -> None:
        """Start QEMU's pre-copy of a migrating guest to ``address:port`` over TLS."""
        guest = self._guest(uuid)
        try:
            with guest.qmp() as qmp:
                creds = self._tls_object(qmp, "client")
                qmp.command("migrate-set-capabilities", {"capabilities": [
                    {"capability": k, "state": v} for k, v in capabilities.items()]})
                # tls-authz judges incoming clients: a guest that arrived by
                # migration still has its own; a sender needs none.
                qmp.command("migrate-set-parameters", {
                    **parameters, "tls-creds": creds, "tls-hostname": tls_hostname,
                    "tls-authz": ""})
                host = f"[{address}]" if ":" in address else address
                qmp.command("migrate", {"uri": f"tcp:{host}:{port}"})
        except QMPError as exc:
            raise HypervisorError(f"guest {guest.name}: QEMU cannot start the migration: "
                                  f"{exc}") from None

    def migration_parameters(self, uuid: str, parameters: dict[str, Any]) -> None:
        self._qmp(self._guest(uuid), "migrate-set-parameters", parameters)

    def query_migration_parameters(self, uuid: str) -> dict[str, Any]:
        """QEMU's ``query-migrate-parameters``: what its migration runs with now
        (``max-bandwidth`` in bytes/s, ``downtime-limit`` …)."""
        return self._qmp(self._guest(uuid), "query-migrate-parameters") or {}

    def migration_status(self, uuid: str) -> dict[str, Any]:
        """QEMU's ``query-migrate`` for this guest ({} if none ran)."""
        return self._qmp(self._guest(uuid), "query-migrate") or {}

    def migrate_cancel(self, uuid: str, timeout: float = 10.0) -> dict[str, Any]:
        """Cancel QEMU's migration and wait until it has stopped; the guest
        runs on as before (QEMU restarts it if it had paused it)."""
        guest = self._guest(uuid)
        with guest.qmp() as qmp:
            qmp.command("migrate_cancel")
            return self._wait_migration(qmp, ("cancelled", "failed", "completed", "none"),
                                        timeout)

    def watch(self, uuid: str) -> QMP:
        """A QMP connection on the guest's second monitor, for a migration
        engine to poll and to receive events (STOP, MIGRATION) on."""
        return QMP(self._guest(uuid).watch_path)


def _read_header(pieces: Iterator[bytes]) -> tuple[dict[str, Any], bytes]:
    """The Berth header of a QEMU image; returns it and the bytes after it."""
    buf = b""
    need = _PREAMBLE.size
    while len(buf) < need:
        try:
            piece = next(pieces)
        except StopIteration:
            raise TruncatedStream("the image ends inside its header") from None
        buf += piece
        if len(buf) >= _PREAMBLE.size and need == _PREAMBLE.size:
            magic, version, _, length = _PREAMBLE.unpack_from(buf)
            if magic != MAGIC:
                raise MalformedStream("not a QEMU image of Berth (bad magic)")
            if version != VERSION or length > MAX_HEADER:
                raise MalformedStream(f"unsupported QEMU image version {version}")
            need = _PREAMBLE.size + length
    try:
        meta = json.loads(buf[_PREAMBLE.size:need])
    except ValueError:
        raise MalformedStream("the QEMU image header is not JSON") from None
    if not isinstance(meta, dict):
        raise MalformedStream("the QEMU image header is not an object")
    return meta, buf[need:]


__all__ = ["QemuDriver", "SaveStreamError", "TlsFiles"]
