"""Migrations this agent holds in doubt, kept on disk until the portal settles them.

Around the commit point a lost link can leave a migration whose outcome one
side cannot know (docs/relocation-protocol.md, section 6): the source sent
ACTIVATE and heard nothing back, or the destination answered COMMITTED and
never saw ACTIVATE.  That side keeps its complete copy **paused** and must not
guess.  The record of it must survive an agent restart - forgetting it would
leave a paused guest nobody resolves - so `InDoubtBook` keeps the records in
``state_dir/in_doubt.json`` (atomic rewrite, mode 0600, like the outbox) and
the agent reports them in every ``hello``.  The portal then asks both agents
what they hold (`holding`) and sends ``migrate.resolve`` with the side that
keeps the guest; `settle` applies it.

Django-free.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from migrator.hypervisor.base import GuestNotFound, HypervisorDriver
from migrator.relocation.precopy import settle_source
from portal.secrets import write_atomic

ROLES = ("source", "destination")
KEEP = ("source", "destination")


class InDoubtBook:
    """Thread-safe; one record per job: ``job``, ``guest``, ``role``, the
    ``peer`` host, ``reason``, ``since`` (epoch s), and for the source
    ``was_active`` (resume the guest if it is kept there)."""

    FILE_NAME = "in_doubt.json"

    def __init__(self, state_dir: str | Path | None):
        self._path = Path(state_dir) / self.FILE_NAME if state_dir is not None else None
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = self._load()

    def add(self, record: dict[str, Any]) -> None:
        if record.get("role") not in ROLES or not record.get("job") or not record.get("guest"):
            raise ValueError(f"incomplete in-doubt record: {record!r}")
        with self._lock:
            self._records[str(record["job"])] = dict(record)
            self._save()

    def remove(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._records.pop(str(job_id), None)
            if record is not None:
                self._save()
            return record

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._records.get(str(job_id))
            return dict(found) if found is not None else None

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._records.values()]

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            entries = json.loads(self._path.read_text(encoding="utf-8"))
            return {str(e["job"]): dict(e) for e in entries}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Refuse to start rather than forget a paused guest nobody would resolve.
            raise OSError(f"in-doubt record {self._path} is unreadable: {exc}") from None

    def _save(self) -> None:  # caller holds the lock
        if self._path is not None:
            write_atomic(self._path, json.dumps(list(self._records.values()),
                                                indent=1).encode("utf-8"))


def holding(driver: HypervisorDriver, guest_uuid: str) -> dict[str, Any]:
    """What this host holds of a guest: ``running``, ``paused`` or ``none``."""
    try:
        info = driver.get(guest_uuid)
    except GuestNotFound:
        return {"holds": "none", "guest_state": "", "domain_id": None}
    return {"holds": "running" if info.active else "paused",
            "guest_state": info.state.value, "domain_id": info.domid}


def settle(record: dict[str, Any], keep: str, driver: HypervisorDriver, server: Any) -> None:
    """Apply the portal's decision to one in-doubt record.  ``server`` is the
    relocation server (destination side), which resumes (and announces) or
    discards the held copy."""
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, not {keep!r}")
    if record["role"] == "source":
        settle_source(driver, record["guest"], keep == "destination",
                      resume=bool(record.get("was_active", True)))
        return
    if server is None:
        raise ValueError("this host has no relocation server to settle the held copy")
    # Idempotent; after a restart the server learns the record here.  False:
    # the held copy is gone or already runs - there is nothing left to settle.
    if server.adopt_in_doubt(record):
        server.resolve(record["guest"], activate=keep == "destination")
