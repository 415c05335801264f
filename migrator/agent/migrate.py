"""Live migration on the agent: the relocation endpoint (destination) and the
migrate job (source), glue between the portal's commands and migrator.relocation.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from migrator import tls
from migrator.relocation import (
    HostFacts,
    MigrationSettings,
    PrecopyMigration,
    RelocationServer,
    TicketBook,
)
from migrator.relocation.qemu_tls import QemuMigration

from .indoubt import InDoubtBook
from .jobs import BadCommand, Job, JobAborted, JobFailed, JobInDoubt, _text, _uuid

log = logging.getLogger(__name__)
PostEvent = Callable[[str, dict[str, Any]], None]


class RelocationEndpoint:
    """This host's relocation port: tickets announced by the portal, and the
    server that accepts only those migrations (docs/relocation-protocol.md)."""

    def __init__(self, config, driver, post_event: PostEvent, in_doubt: InDoubtBook,
                 on_refused: Callable[[dict[str, Any]], None] | None = None):
        host, reloc = config.host, config.relocation
        self.tickets = TicketBook()
        self._post = post_event
        self._on_refused = on_refused  # every refusal, for the portal's audit trail
        self.in_doubt = in_doubt
        self._jobs: dict[str, str] = {}  # guest uuid -> job id, for the destination's events
        self._lock = threading.Lock()
        self.server = RelocationServer(
            driver, HostFacts(subnets=(host.subnet,) if host.subnet else (),
                              storage=tuple(host.storage), disk_free_gib=host.disk_gib),
            tls.server_context(reloc.cert, reloc.key, reloc.ca),
            tls.AllowList(reloc.hosts_allow), self.tickets, self._on_event,
            address=reloc.address, port=reloc.port, host_name=host.name,
            handshake_timeout=reloc.handshake_timeout, max_connections=reloc.max_connections,
            max_unauthenticated=reloc.max_unauthenticated,
            max_unauthenticated_per_address=reloc.max_unauthenticated_per_address)

    def start(self) -> int:
        # In-doubt guests recorded before a restart are held again, so the
        # portal's resolution finds them.
        for record in self.in_doubt.records():
            if record["role"] == "destination" and not self.server.adopt_in_doubt(record):
                log.warning("in-doubt guest %s of job %s is no longer held here",
                            record["guest"], record["job"])
        return self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def expect(self, job_id: str, command: dict[str, Any]) -> None:
        """``migrate.expect``: accept this guest from this source, once."""
        guest = str(_uuid(command.get("guest"), "guest"))
        source = _text(command, "source", "command")
        ticket = _text(command, "ticket", "command")
        expires = float(command.get("expires_in") or 300)
        self.tickets.expect(ticket, guest, source, expires_in=expires)
        with self._lock:
            self._jobs[guest] = job_id
        self._post(job_id, {"kind": "expecting", "stage": "expecting"})

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "refused" and self._on_refused is not None:
            self._on_refused(event)  # most have no job: an outsider, a forged ticket
        guest = event.get("guest")
        with self._lock:
            job_id = self._jobs.get(guest) if guest else None
            if job_id and event.get("kind") in ("announce", "discarded", "released"):
                self._jobs.pop(guest, None)
        if job_id and event.get("kind") == "in_doubt":
            self.in_doubt.add({"job": job_id, "role": "destination", "guest": guest,
                               "name": event.get("name", ""), "peer": event.get("source"),
                               "source": event.get("source"), "reason": event.get("reason", ""),
                               "since": event.get("since")})
        if job_id:
            self._post(job_id, {k: v for k, v in event.items() if k != "time"})


class MigrateJob(Job):
    """``xm migrate --live``, the source side: the six stages over mutual TLS."""

    action = "migrate"

    def parse(self, command: dict[str, Any]) -> None:
        self.guest_uuid = str(_uuid(command.get("guest"), "guest"))
        self._ticket = _text(command, "ticket", "command")
        destination = command.get("destination")
        if not isinstance(destination, dict):
            raise JobFailed("the command has no destination")
        self.dest_host = _text(destination, "host", "destination")
        self.dest_address = _text(destination, "address", "destination")
        self.dest_port = int(destination.get("port") or 8002)
        params = command.get("parameters") or {}
        try:
            self.settings = MigrationSettings(
                downtime_target_ms=float(params.get("downtime_ms", 300)),
                max_rounds=int(params.get("max_rounds", 30)),
                max_data_factor=float(params.get("max_data_factor", 3.0)),
                max_precopy_s=float(params.get("max_seconds", 0)),
                auto_converge=bool(params.get("auto_converge", False)),
                live=bool(params.get("live", True)),
                verify=str(params.get("verify", "sampled")),
                # MB/s on the wire; absent (an older portal) or 0: no cap.
                max_bandwidth_mbps=float(params.get("max_bandwidth_mbps") or 0))
        except (TypeError, ValueError) as exc:
            raise BadCommand(f"migrate parameters: {exc}") from None
        self.engine: PrecopyMigration | None = None
        self.in_doubt: InDoubtBook | None = None  # set by the agent

    def execute(self) -> dict[str, Any]:
        self._remember_guest()
        reloc = self.relocation
        context = tls.client_context(reloc.cert, reloc.key, reloc.ca)
        # A QEMU guest migrates with QEMU's own stream (relocation/qemu_tls.py).
        engine = (QemuMigration if getattr(self.driver, "migration_transport", "pages")
                  == "qemu-tls" else PrecopyMigration)
        self.engine = engine(
            self.driver, self.guest_uuid, self.dest_address, self.dest_port, self.dest_host,
            self._ticket, context, self.settings, self._forward, source_host=self.host.name,
            revoked_serials=getattr(self, "revoked_serials", frozenset()),
            on_commit=self._committing)
        if self.aborted.is_set():
            raise JobAborted(self.abort_reason)
        result = self.engine.run()
        state = result["state"]
        if state == "succeeded":
            return {k: v for k, v in result.items() if k != "settings"} | {
                "guest": self._moved_guest(result)}
        if state == "in_doubt":
            # ACTIVATE left and no answer came: the paused copy stays paused
            # (never resumed here) until the portal resolves it.
            self._record_in_doubt(result.get("reason", ""))
            raise JobInDoubt(result.get("reason") or "in doubt",
                             {k: v for k, v in result.items() if k != "settings"})
        self._resume_if_paused()
        if state == "aborted":
            raise JobAborted(result.get("reason") or self.abort_reason)
        raise JobFailed(f"{result.get('stage')}: {result.get('reason')}")

    def _committing(self):
        """The engine's commit point, before ACTIVATE leaves. Recorded on disk first:
        an agent killed from here on comes back knowing the guest may be the
        destination's (it does not boot it again; the portal settles the record).
        The agent removes the record once the outcome is known and durable."""
        self._record_in_doubt("committing: ACTIVATE about to be sent, outcome unknown")

    def _record_in_doubt(self, reason):
        if self.in_doubt is not None:
            self.in_doubt.add({"job": self.id, "role": "source", "guest": self.guest_uuid,
                               "name": self._name, "peer": self.dest_host, "reason": reason,
                               "since": time.time(), "was_active": True})

    def _moved_guest(self, result):
        """The guest as it now runs on the destination (for the portal's rows)."""
        return {"uuid": self.guest_uuid, "name": self._name, "domain_id":
                result.get("destination_domid"), "memory_mib": self._memory_mib,
                "vcpus": self._vcpus, "state": "running", "active": True,
                "config": self._config}

    def _forward(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "result":
            return  # the job.result carries it
        self.emit({k: v for k, v in event.items() if k != "time"})

    def _remember_guest(self):
        info = self.driver.get(self.guest_uuid)
        self._name, self._memory_mib, self._vcpus = info.name, info.memory_mib, info.vcpus
        self._config = {"kernel": info.config.get("kernel", ""), "ip": info.config.get("ip", ""),
                        "storage": list(info.config.get("storage", [])),
                        "workload": info.config.get("workload", {})}

    def _resume_if_paused(self):
        try:
            info = self.driver.get(self.guest_uuid)
            if not info.active:
                self.driver.resume(self.guest_uuid)
        except Exception:  # the guest is the engine's to restore; this is a safety net
            log.exception("job %s: could not resume guest %s", self.id, self.guest_uuid)

    def abort(self, reason: str | None = None) -> None:
        super().abort(reason)
        if self.engine is not None:
            self.engine.abort(self.abort_reason)
