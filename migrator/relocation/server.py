"""The destination side of live migration: xend's relocation server, with TLS.

``RelocationServer`` listens on the relocation port (8002).  Its front door
(``admission.py``, one thread) holds every connection until:

1. TLS 1.3 handshake with a client certificate from the deployment CA, within
   one deadline, without a thread or a migration slot;
2. ``authorize_peer``: identity, revocation, allow-list - before reading a byte;

then the peer takes one of ``max_connections`` migration slots (or is told
BUSY) and, in its own thread:

3. the first frame (HELLO) must carry a ticket the portal announced for this
   guest and this (authenticated) source host - single use;
4. reservation: architecture, extensions, memory, disk, subnet, storage; the
   memory is reserved and an INCOMING container built, or the source is told
   why not;
5. pre-copy: PAGES frames are applied to the container as they come;
6. stop-and-copy: the vCPU state, then COMMIT with digests; if the image is
   identical the destination answers COMMITTED and waits, guest paused;
7. ACTIVATE (the commit point): resume, announce the IP, answer ACTIVATED.

Until ACTIVATE is read, any failure discards the incoming guest and frees
the reservation.  If the link drops after COMMITTED but before ACTIVATE, the
destination cannot know whether the source committed: it keeps the complete
paused guest, reports ``in_doubt`` and waits for `RelocationServer.resolve`.

Django-free.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from migrator.hypervisor.base import (
    PAGE_SIZE,
    GuestInfo,
    GuestSpec,
    HypervisorDriver,
    HypervisorError,
)
from migrator.tls import AllowList, authorize_peer

from .admission import FrontDoor
from .protocol import (
    DEFAULT_PORT,
    MAX_BATCH_PAGES,
    PROTOCOL_VERSION,
    Channel,
    DecodedBatch,
    FramePrefetcher,
    Msg,
    ProtocolError,
    decode_json,
    describe_error,
    frame_buffers,
)
from .tickets import TicketBook, TicketRefused
from .verify import VERIFY_MODES, commit_digests, prepare

log = logging.getLogger("berth.relocation")

Event = dict[str, Any]
OnEvent = Callable[[Event], None]
OnGuest = Callable[[str, GuestInfo | None], None]
_ZEROS = memoryview(bytes(MAX_BATCH_PAGES * PAGE_SIZE))


@dataclass(frozen=True)
class HostFacts:
    """What the reservation checks besides the driver: the host's subnets,
    its storage mounts and its free local disk (GiB)."""

    subnets: tuple[str, ...] = ()
    storage: tuple[str, ...] = ()
    disk_free_gib: float = 0.0
    networks: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        subnets = (self.subnets,) if isinstance(self.subnets, str) else tuple(self.subnets)
        object.__setattr__(self, "subnets", subnets)
        object.__setattr__(self, "storage", tuple(self.storage))
        # strict=False: "192.168.1.7/24" names the host's own subnet.
        object.__setattr__(self, "networks", tuple(
            ipaddress.ip_network(s, strict=False) for s in subnets))


class Refusal(Exception):
    """This migration is refused; ``stage`` says by which check."""

    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage, self.reason = stage, reason


def check_reservation(hello: dict[str, Any], driver: HypervisorDriver,
                      facts: HostFacts) -> GuestSpec:
    """The article's reservation checks.  Returns the spec to build or
    raises `Refusal`; reserves nothing."""
    guest = hello.get("guest")
    if not isinstance(guest, dict):
        raise Refusal("reservation", "HELLO carries no guest description")
    try:
        spec = GuestSpec(name=str(guest["name"]), memory_mib=int(guest["memory_mib"]),
                         vcpus=int(guest["vcpus"]), config=dict(guest["config"]),
                         uuid=str(guest["uuid"]), start=False)
    except (KeyError, TypeError, ValueError):
        raise Refusal("reservation", "HELLO's guest description is malformed") from None
    host = driver.host_info()
    arch, virt = hello.get("arch"), hello.get("virt_features")
    if arch != host.arch or not isinstance(virt, list) or set(virt) != set(host.virt_features):
        raise Refusal("reservation", f"guest runs on {arch} with {virt or 'no'} extensions; "
                      f"{host.name} is {host.arch} with {list(host.virt_features)}")
    free = driver.capacity().free_mib
    if spec.memory_mib > free:
        raise Refusal("reservation", f"not enough memory on {host.name}: guest needs "
                      f"{spec.memory_mib} MiB, {free} MiB free")
    disk = spec.config.get("disk_gib", 0)
    if not isinstance(disk, int | float) or disk > facts.disk_free_gib:
        raise Refusal("reservation", f"not enough disk on {host.name}: guest needs "
                      f"{disk} GiB, {facts.disk_free_gib} GiB free")
    _check_subnet(spec.config.get("ip"), facts, host.name)
    mounts = set(spec.config.get("storage") or ()) | set(spec.config.get("mounts") or ())
    missing = sorted(mounts - set(facts.storage))
    if missing:
        raise Refusal("reservation", f"storage not mounted on {host.name}: "
                      f"{', '.join(missing)}")
    return spec


def _check_subnet(ip: Any, facts: HostFacts, host: str) -> None:
    if not ip:
        return  # a guest without an address has nothing to keep reachable
    try:
        address = ipaddress.ip_address(str(ip))
    except ValueError:
        raise Refusal("reservation", f"guest IP {ip!r} is not an IP address") from None
    if not any(address in net for net in facts.networks):
        nets = ", ".join(facts.subnets) or "none configured"
        raise Refusal("reservation", f"guest IP {address} is outside the subnet of "
                      f"{host} ({nets}): it would be unreachable after migration")


# --------------------------------------------------------------------------
class SourceAborted(Exception):
    """The source sent ABORT."""


class _Incoming:
    """One incoming migration: the receiver state machine of one connection."""

    def __init__(self, server: RelocationServer, chan: Channel, peer: str, address: str):
        self.server, self.chan, self.peer, self.address = server, chan, peer, address
        self.driver = server.driver
        self.uuid: str | None = None
        self.name = ""
        self.reservation: str | None = None
        self.built = False
        self.state = "hello"
        self.pages = 0

    def emit(self, kind: str, **fields: Any) -> None:
        self.server.emit({"kind": kind, "guest": self.uuid, "source": self.peer, **fields})

    def run(self) -> None:
        try:
            self._reserve(self._hello())
            self._receive()
            self._await_activate()
        except Refusal as exc:
            self.server.refuse(exc.stage, exc.reason, self.peer, self.address, self.uuid)
            self._send_quietly(Msg.REFUSED, {"stage": exc.stage, "reason": exc.reason})
            self._discard(f"refused: {exc.reason}")
        except SourceAborted as exc:
            self._discard(f"the source aborted: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure must clean up
            self._failed(exc)

    # -- stages ---------------------------------------------------------------
    def _hello(self) -> dict[str, Any]:
        if self.peer == self.server.host_name:
            raise Refusal("authorize", "a guest cannot migrate to its own host")
        try:
            _, hello = self.chan.recv_json({Msg.HELLO}, timeout=self.server.handshake_timeout)
        except ProtocolError as exc:  # garbage where HELLO belongs: a refusal, audited
            raise Refusal("protocol", describe_error(exc)) from None
        guest = hello.get("guest") if isinstance(hello.get("guest"), dict) else {}
        try:
            self.server.tickets.claim(hello.get("ticket"), guest.get("uuid"), self.peer)
        except TicketRefused as exc:
            raise Refusal("ticket", str(exc)) from None
        self.uuid, self.name = str(guest.get("uuid")), str(guest.get("name"))
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise Refusal("protocol", f"protocol {hello.get('protocol')!r} is not "
                          f"supported (this host speaks {PROTOCOL_VERSION})")
        return hello

    def _reserve(self, hello: dict[str, Any]) -> None:
        spec = check_reservation(hello, self.driver, self.server.facts)
        try:
            seed = bytes.fromhex(str(hello.get("fingerprint_seed")))
        except ValueError:
            seed = b""
        self.verify = hello.get("verify")
        if not 16 <= len(seed) <= 64 or self.verify not in VERIFY_MODES:
            raise Refusal("protocol", "HELLO's fingerprint seed or verify mode is malformed")
        try:
            self.reservation = self.driver.reserve(spec.uuid, spec.memory_mib).id
            info = self.driver.commit_reservation(self.reservation, spec)
        except HypervisorError as exc:
            raise Refusal("reservation", str(exc)) from None
        self.built, self.reservation = True, None
        self.npages = info.npages
        self.fps, self.sample = prepare(self.verify, seed, self.npages)
        self.seen = np.zeros(self.npages, dtype=bool)  # pages that arrived at least once
        self.known_zero = np.ones(self.npages, dtype=bool)  # a new container is zeroed
        if self.server.populate:
            self._populate()
        self.frame_buffers = frame_buffers()  # faulted in now, while the source waits
        self.memory = self.driver.map_memory(self.uuid)  # pages are read into it in place
        self.state = "receiving"
        self.emit("stage", stage="reservation", result="reserved", domid=info.domid,
                  memory_mib=spec.memory_mib)
        self.server.guest_event("incoming", info)
        self.chan.send_json(Msg.RESERVED, {"domid": info.domid, "host": self.server.host_name})

    def _populate(self) -> None:
        """Make every page of the new container exist (zeroed), so the memory
        really exists before the source commits to sending: a reservation
        that only counts MiB can still fail - or stall - at first touch on an
        overcommitted host.  Xen populates the domain's physmap likewise."""
        self.driver.populate(self.uuid, self.npages)

    def _receive(self) -> None:
        reader = FramePrefetcher(self.chan, self.frame_buffers, self.memory, self.npages)
        try:
            while True:
                msg, payload, buf = reader.get()
                try:
                    if not self._handle(msg, payload):
                        break
                finally:
                    reader.release(buf, answered=msg is Msg.SYNC)
        finally:
            reader.stop()
        self.state = "stopped"
        missing = self.npages - int(np.count_nonzero(self.seen))
        if missing:
            raise Refusal("commitment", f"incomplete image: {missing} of {self.npages} "
                          "pages never arrived")
        # Digests now: the source computes its own at the same time.
        mine = commit_digests(self.verify, self.driver, self.uuid,
                              self.driver.get_vcpu_state(self.uuid), self.fps, self.sample)
        msg, commit = self.chan.recv_json({Msg.COMMIT, Msg.ABORT})
        if msg is Msg.ABORT:
            raise SourceAborted(commit.get("reason", "no reason"))
        self._verify(commit, mine)

    def _handle(self, msg: Msg, payload: Any) -> bool:
        """One pre-copy frame; False once the vCPU state (the last) is in."""
        if msg is Msg.PAGES:
            self._apply(payload)
        elif msg is Msg.SYNC:  # frames are applied in order: all before it are in
            self.chan.send_json(Msg.SYNC, {**decode_json(payload, msg),
                                           "pages_received": self.pages})
        elif msg is Msg.VCPU:
            self.t_stopped = time.monotonic()
            self.driver.set_vcpu_state(self.uuid, bytes(payload))
            return False
        elif msg is Msg.ABORT:
            raise SourceAborted(decode_json(payload, msg).get("reason", "no reason"))
        else:
            raise ProtocolError(f"unexpected {msg.name} during pre-copy")
        return True

    def _apply(self, batch: DecodedBatch) -> None:
        idx, present = batch.indices, batch.present
        if batch.placed is not None:  # already in the container's memory
            if self.fps is not None:
                self.fps.update_runs(idx, present, self.memory, batch.placed)
        else:
            if len(batch.data):
                self.driver.write_pages(self.uuid, idx[present],
                                        memoryview(batch.data.reshape(-1)))
            if self.fps is not None:
                self.fps.update(idx, present, batch.data)
        zero = idx[~present]
        stale = zero[~self.known_zero[zero]]  # only pages that held data need zeroing
        if len(stale):
            self.driver.write_pages(self.uuid, stale, _ZEROS[:len(stale) * PAGE_SIZE])
        self.known_zero[idx] = ~present
        self.seen[idx] = True
        self.pages += len(idx)

    def _verify(self, commit: dict[str, Any], mine: dict[str, Any]) -> None:
        if commit.get("pages_sent") != self.pages:
            raise Refusal("commitment", f"{self.pages} pages arrived, the source sent "
                          f"{commit.get('pages_sent')}")
        for key, value in mine.items():
            if commit.get(key) != value:
                raise Refusal("commitment", f"image differs from the source's: {key} "
                              f"{value} != {commit.get(key)}")
        self.emit("stage", stage="commitment", pages_received=self.pages, **mine)
        verify_ms = round((time.monotonic() - self.t_stopped) * 1000, 3)
        self.chan.send_json(Msg.COMMITTED, {**mine, "verify_ms": verify_ms})
        # Only now: if that send failed, the frame (one small TLS record) never
        # left, so the source cannot have sent ACTIVATE and discarding is safe.
        # Once it may have left, a lost link leaves us in doubt.
        self.state = "committed"

    def _await_activate(self) -> None:
        msg, body = self.chan.recv_json({Msg.ACTIVATE, Msg.ABORT},
                                        timeout=self.server.commit_timeout)
        if msg is Msg.ABORT:
            raise SourceAborted(body.get("reason", "no reason"))
        self.state = "activating"  # the commit point has passed: the guest is ours
        t = time.monotonic()
        try:
            info = self.driver.resume(self.uuid)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the guest must not run
            self._discard(f"activation failed: {exc}")  # never ran: the source may resume
            self._send_quietly(Msg.ABORT, {"reason": f"activation failed on "
                                           f"{self.server.host_name}: {exc}"})
            return
        self.state = "active"
        try:  # answer first: the source's downtime clock is still running
            self.chan.send_json(Msg.ACTIVATED, {
                "domid": info.domid, "host": self.server.host_name,
                "ip": info.config.get("ip", ""),
                "resume_ms": round((time.monotonic() - t) * 1000, 3)})
        finally:
            self.server.activated(info)

    # -- failures -------------------------------------------------------------
    def _failed(self, exc: Exception) -> None:
        reason = describe_error(exc)
        if self.state == "committed":
            self.server.hold_in_doubt(self.uuid, self.name, self.peer, reason)
        elif self.state == "active":
            log.warning("guest %s runs on %s; could not confirm to %s: %s",
                        self.uuid, self.server.host_name, self.peer, reason)
        else:
            self._discard(reason)

    def _discard(self, reason: str) -> None:
        """Give back everything this migration took on the destination."""
        try:
            if self.built:
                self.driver.destroy(self.uuid)
            elif self.reservation:
                self.driver.release_reservation(self.reservation)
        except HypervisorError:
            log.exception("could not discard incoming guest %s", self.uuid)
        if self.uuid and (self.built or self.reservation):
            self.emit("discarded", reason=reason, stage=self.state)
            self.server.guest_event("discarded", None)
        self.built, self.reservation = False, None
        log.info("incoming migration of %s from %s ended: %s", self.uuid, self.peer, reason)

    def _send_quietly(self, mtype: Msg, body: dict[str, Any]) -> None:
        try:
            self.chan.send_json(mtype, body)
        except (OSError, ValueError):
            pass


# --------------------------------------------------------------------------
class RelocationServer:
    """The relocation listener.  ``allow_list`` and ``revoked_serials`` are
    plain attributes: the agent may replace them while the server runs."""

    def __init__(self, driver: HypervisorDriver, host_facts: HostFacts,
                 tls_context: ssl.SSLContext, allow_list: AllowList, tickets: TicketBook,
                 on_event: OnEvent | None = None, *,
                 revoked_serials: Container[int] = frozenset(),
                 address: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 on_guest: OnGuest | None = None, host_name: str | None = None,
                 io_timeout: float = 30.0, handshake_timeout: float = 5.0,
                 commit_timeout: float = 30.0, max_connections: int = 8,
                 max_unauthenticated: int = 64, max_unauthenticated_per_address: int = 8,
                 populate: bool = True):
        self.driver, self.facts, self.context = driver, host_facts, tls_context
        self.allow_list, self.tickets, self.revoked_serials = allow_list, tickets, revoked_serials
        self.address, self.port = address, port
        self.host_name = host_name or driver.host_info().name
        self.io_timeout, self.handshake_timeout = io_timeout, handshake_timeout
        self.commit_timeout, self.max_connections = commit_timeout, max_connections
        if handshake_timeout <= 0 or min(max_connections, max_unauthenticated,
                                         max_unauthenticated_per_address) < 1:
            raise ValueError("handshake_timeout > 0; max_connections, max_unauthenticated "
                             "and max_unauthenticated_per_address >= 1")
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_address = max_unauthenticated_per_address
        self.populate = populate
        self._on_event, self._on_guest = on_event, on_guest
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._front: FrontDoor | None = None
        self._thread: threading.Thread | None = None
        # An authenticated migration's thread -> its TLS socket and its peer:
        # the taken migration slots.
        self._conns: dict[threading.Thread, tuple[ssl.SSLSocket, str]] = {}
        self._in_doubt: dict[str, dict[str, Any]] = {}
        # A QEMU host takes QEMU's own TLS stream, not pages (qemu_tls.py).
        self.incoming: type[_Incoming] = _Incoming
        if getattr(driver, "migration_transport", "pages") == "qemu-tls":
            from .qemu_tls import QemuIncoming
            self.incoming = QemuIncoming

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> int:
        """Listen (port 0 picks a free port) and serve in a background
        thread; returns the bound port."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address, self.port))
        listener.listen(128)  # the front door drains it at once, even under a flood
        self.port = listener.getsockname()[1]
        self._front = FrontDoor(
            listener, self.context, handshake_timeout=self.handshake_timeout,
            max_unauthenticated=self.max_unauthenticated,
            max_unauthenticated_per_address=self.max_unauthenticated_per_address,
            authorize=self._authorize, admit=self._admit, refuse=self.refuse)
        self._thread = threading.Thread(target=self._front.run, args=(self._stopping,),
                                        name=f"relocation-{self.port}", daemon=True)
        self._thread.start()
        log.info("relocation server of %s listening on %s:%d", self.host_name,
                 self.address, self.port)
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection at once (what a crash of
        the destination looks like to the source); incoming guests that had
        not committed are discarded by their threads."""
        self._stopping.set()
        with self._lock:
            conns = list(self._conns.items())
        for _, (sock, _peer) in conns:
            try:
                # Like a crash: the close that follows resets the connection,
                # so a source blocked in sendall fails at once.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # see Channel.shutdown
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        for thread, _ in conns:
            thread.join(timeout)

    def active(self) -> list[str]:
        """The peers of the migrations holding a slot now."""
        with self._lock:
            return [peer for _, peer in self._conns.values()]

    def _authorize(self, tls: ssl.SSLSocket, address: str) -> str:
        return authorize_peer(tls, allow_list=self.allow_list,
                              revoked_serials=self.revoked_serials, address=address)

    def _admit(self, tls: ssl.SSLSocket, peer: str, address: str) -> str | None:
        """An authenticated, allowed peer takes a migration slot and a thread;
        returns None, or why it cannot (the front door then says BUSY)."""
        with self._lock:
            if self._stopping.is_set():
                return f"{self.host_name} is shutting down"
            if len(self._conns) >= self.max_connections:
                return f"all {self.max_connections} migration slots are taken"
            thread = threading.Thread(target=self._connection, args=(tls, peer, address),
                                      name=f"relocation-in-{peer}", daemon=True)
            self._conns[thread] = (tls, peer)
        thread.start()
        return None

    def _connection(self, tls: ssl.SSLSocket, peer: str, address: str) -> None:
        try:
            tls.settimeout(self.io_timeout)  # blocking again: the front door's was not
            chan = Channel(tls, io_timeout=self.io_timeout)
            try:
                self.incoming(self, chan, peer, address).run()
            finally:
                chan.close()
        finally:
            with self._lock:
                self._conns.pop(threading.current_thread(), None)
            tls.close()

    # -- reporting ------------------------------------------------------------
    def emit(self, event: Event) -> None:
        event = {"side": "destination", "host": self.host_name, "time": time.time(), **event}
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # reporting must never break a migration
                log.exception("relocation on_event callback failed")

    def guest_event(self, what: str, info: GuestInfo | None) -> None:
        if self._on_guest is not None:
            try:
                self._on_guest(what, info)
            except Exception:
                log.exception("relocation on_guest callback failed")

    def refuse(self, stage: str, reason: str, peer: str | None, address: str | None,
               guest: str | None = None, *, log_line: bool = True,
               event: bool = True) -> None:
        """One clear log line and one event per refusal (the event reaches the portal's
        audit trail, counted). The front door logs only the first refusal of a flood
        from one address (``log_line=False`` for the rest, whose events still count)
        and then a summary line (``event=False``: its refusals were counted already)."""
        if log_line:
            log.warning("relocation refused on %s: stage=%s peer=%s address=%s guest=%s: %s",
                        self.host_name, stage, peer or "-", address or "-", guest or "-", reason)
        if event:
            self.emit({"kind": "refused", "stage": stage, "peer": peer, "address": address,
                       "guest": guest, "reason": reason})

    def activated(self, info: GuestInfo) -> None:
        ip = info.config.get("ip", "")
        # The simulated gratuitous ARP: the network learns where the guest went.
        log.info("gratuitous ARP: guest %s (%s) at %s is now on host %s, domain %d",
                 info.name, info.uuid, ip or "no address", self.host_name, info.domid)
        self.emit({"kind": "stage", "stage": "activation", "guest": info.uuid,
                   "domid": info.domid, "ip": ip})
        self.emit({"kind": "announce", "guest": info.uuid, "ip": ip, "domid": info.domid})
        self.guest_event("activated", info)

    # -- the in-doubt window ----------------------------------------------------
    def hold_in_doubt(self, uuid: str, name: str, peer: str, reason: str) -> None:
        record = {"guest": uuid, "name": name, "source": peer, "reason": reason,
                  "since": time.time()}
        with self._lock:
            self._in_doubt[uuid] = record
        log.error("migration of %s from %s is IN DOUBT on %s (%s): the complete image is "
                  "held paused; the source may or may not have committed. Resolve with "
                  "resolve(activate=True) if the source gave the guest up, else False.",
                  uuid, peer, self.host_name, reason)
        self.emit({"kind": "in_doubt", **record})
        self.guest_event("in_doubt", self.driver.get(uuid))

    def adopt_in_doubt(self, record: dict[str, Any]) -> bool:
        """Hold again an in-doubt guest recorded before a restart (the agent
        keeps these records on disk): only one the driver still holds, paused.
        No event: the agent reports its records itself."""
        uuid = str(record.get("guest"))
        try:
            info = self.driver.get(uuid)
        except HypervisorError:
            return False
        if info.active:
            return False
        with self._lock:
            self._in_doubt[uuid] = {"guest": uuid, "name": str(record.get("name", info.name)),
                                    "source": record.get("source"),
                                    "reason": record.get("reason", ""),
                                    "since": record.get("since", time.time())}
        return True

    def in_doubt(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(v) for v in self._in_doubt.values()]

    def resolve(self, guest_uuid: str, activate: bool) -> GuestInfo | None:
        """End an in-doubt migration: activate the held guest (the source
        did commit and gave it up) or discard it (the source kept it)."""
        with self._lock:
            record = self._in_doubt.pop(guest_uuid, None)
        if record is None:
            raise KeyError(f"no in-doubt migration of guest {guest_uuid}")
        if activate:
            info = self.driver.resume(guest_uuid)
            self.activated(info)
            return info
        self.driver.destroy(guest_uuid)
        self.emit({"kind": "discarded", "guest": guest_uuid, "reason": "resolved: the "
                   "source kept the guest", "stage": "in_doubt"})
        self.guest_event("discarded", None)
        return None


__all__ = ["HostFacts", "Refusal", "RelocationServer", "check_reservation"]
