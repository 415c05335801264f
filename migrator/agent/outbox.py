"""What the agent keeps for the portal: unacknowledged job results and relocation
refusals; and on disk, guest identities.

A result is the one thing about a job the portal must not miss (progress
events are disposable), and jobs keep running while the portal is away or
restarting.  So every result is kept in memory *and* in
``state_dir/outbox.json`` until an ``ack`` for its job arrives, and every
``hello`` carries what is still pending.  The file is rewritten atomically
(temporary file, fsync, rename) with mode 0600: a crash leaves the old or the
new list, never half of one.

`RefusalReports` holds the relocation port's refusals until the portal has them
(``relocation.refused``): in memory, aggregated and bounded, since an outsider
decides how many there are.

`HostState` (``state_dir/state.json``) remembers the UUID given to a config
guest that has none, so the guest keeps its identity across agent restarts,
and which guests left this host (saved into the vault), so a restart does
not boot a second copy of a guest whose image may be restored elsewhere.

`RevocationList` (``state_dir/revoked.json``) keeps the certificate serials the
portal revoked, so the relocation port refuses them from the moment the agent
starts, before (or without) a portal connection.

Django-free.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from portal.secrets import write_atomic

log = logging.getLogger("berth.agent")

FILE_NAME = "outbox.json"


class Outbox:
    """Thread-safe: job threads add, the connection loop reads and acks."""

    def __init__(self, state_dir: str | os.PathLike[str] | None):
        self._path = Path(state_dir) / FILE_NAME if state_dir is not None else None
        self._lock = threading.Lock()
        self._results: dict[str, dict[str, Any]] = self._load()

    @property
    def path(self) -> Path | None:
        return self._path

    def add(self, result: dict[str, Any]) -> None:
        """Keep a ``job.result`` message (replacing one for the same job)."""
        with self._lock:
            self._results[str(result["job"])] = dict(result)
            self._save()

    def ack(self, job_id: str) -> bool:
        """Forget a job's result; False if there was none."""
        with self._lock:
            if self._results.pop(str(job_id), None) is None:
                return False
            self._save()
            return True

    def pending(self) -> list[dict[str, Any]]:
        """The unacknowledged results, oldest first (copies)."""
        with self._lock:
            return [dict(r) for r in self._results.values()]

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._results.get(str(job_id))
            return dict(found) if found is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._results)

    # -- persistence ----------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        if self._path is None or not self._path.exists():
            return {}
        try:
            entries = json.loads(self._path.read_text(encoding="utf-8"))
            if not isinstance(entries, list):
                raise ValueError("not a list")
            return {str(e["job"]): e for e in entries}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the unreadable file for a human instead of overwriting it.
            aside = self._path.with_suffix(".json.corrupt")
            log.error("outbox %s is unreadable (%s); moved it to %s and starting empty",
                      self._path, exc, aside)
            os.replace(self._path, aside)
            return {}

    def _save(self) -> None:  # caller holds the lock
        if self._path is None:
            return
        data = json.dumps(list(self._results.values()), indent=1).encode("utf-8")
        write_atomic(self._path, data)


class RefusalReports:
    """Relocation refusals on their way to the portal.  Thread-safe.

    Anyone who reaches the relocation port can cause refusals, as many as they like,
    while the portal may be away.  So they are counted per stage and peer (its
    certified name, else its address): at most ``max_keys`` entries, a flood from more
    peers than that counted in one shared entry.  Memory stays bounded, the portal
    gets at most ``max_keys + 1`` messages per send, and no refusal goes uncounted.
    In memory only: written to disk per refusal, a flood would be disk writes.
    """

    MAX_KEYS = 64
    SAMPLE_REASONS = 5
    OVERFLOW = ("*", "(other peers)")

    def __init__(self, max_keys: int = MAX_KEYS):
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, event: dict[str, Any]) -> None:
        """Count one ``refused`` event of the relocation server."""
        now = time.time()
        self._merge({"stage": str(event.get("stage") or "-"), "peer": event.get("peer"),
                     "address": event.get("address"), "guest": event.get("guest"),
                     "reason": str(event.get("reason", "")), "count": 1,
                     "first": now, "last": now})

    def take(self) -> list[dict[str, Any]]:
        """Every pending report, forgetting them (`put_back` if they were not sent)."""
        with self._lock:
            reports, self._pending = list(self._pending.values()), {}
        return reports

    def put_back(self, reports: list[dict[str, Any]]) -> None:
        for report in reports:
            self._merge(report)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def waiting(self) -> int:
        """How many refusals wait to be sent."""
        with self._lock:
            return sum(entry["count"] for entry in self._pending.values())

    def _merge(self, report: dict[str, Any]) -> None:
        key = (str(report.get("stage")), str(report.get("peer") or report.get("address")))
        with self._lock:
            if key not in self._pending and len(self._pending) >= self.max_keys:
                key = self.OVERFLOW
            entry = self._pending.get(key)
            if entry is None:
                entry = self._pending[key] = {
                    k: report.get(k) for k in ("stage", "peer", "address", "guest", "reason")}
                if key == self.OVERFLOW:  # the first one's fields, and the fact it is shared
                    entry["overflow"] = True
                entry.update(count=0, first=report["first"], last=report["last"], reasons=[])
            entry["count"] += int(report.get("count", 1))
            entry["first"] = min(entry["first"], report["first"])
            entry["last"] = max(entry["last"], report["last"])
            reason = report.get("reason")
            summaries = [f"{report.get('stage')}: {reason}"[:200]] if reason else []
            for summary in [*summaries, *report.get("reasons", ())]:  # put back: summaries
                if summary not in entry["reasons"] and \
                        len(entry["reasons"]) < self.SAMPLE_REASONS:
                    entry["reasons"].append(summary)


class HostState:
    """Thread-safe; written atomically like the outbox."""

    FILE_NAME = "state.json"

    def __init__(self, state_dir: str | os.PathLike[str] | None):
        self._path = Path(state_dir) / self.FILE_NAME if state_dir is not None else None
        self._lock = threading.Lock()
        self._uuids: dict[str, str] = {}
        self._departed: set[str] = set()
        self._load()

    def uuid_for(self, name: str) -> str:
        """The stable UUID of a config guest without one (made on first use)."""
        with self._lock:
            if name not in self._uuids:
                self._uuids[name] = str(uuidlib.uuid4())
                self._save()
            return self._uuids[name]

    def is_departed(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._departed

    def set_departed(self, uuid: str, departed: bool) -> None:
        with self._lock:
            if departed == (uuid in self._departed):
                return
            (self._departed.add if departed else self._departed.discard)(uuid)
            self._save()

    def _load(self) -> None:
        if self._path is None or not self._path.exists():
            return
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            self._uuids = {str(k): str(v) for k, v in data.get("guest_uuids", {}).items()}
            self._departed = {str(u) for u in data.get("departed", [])}
        except (OSError, ValueError, AttributeError) as exc:
            raise OSError(f"agent state {self._path} is unreadable: {exc}") from None

    def _save(self) -> None:  # caller holds the lock
        if self._path is not None:
            data = {"guest_uuids": self._uuids, "departed": sorted(self._departed)}
            write_atomic(self._path, json.dumps(data, indent=1).encode("utf-8"))


class RevocationList:
    """Revoked host certificate serials the portal has sent. Thread-safe; written
    atomically like the outbox. Only ever grows: a revocation is for good (a host
    comes back with a new certificate), so a portal that forgot one - a database
    restored from an old backup - cannot bring a revoked certificate back. An
    unreadable file stops the agent rather than reading as "nothing revoked"."""

    FILE_NAME = "revoked.json"

    def __init__(self, state_dir: str | os.PathLike[str] | None):
        self._path = Path(state_dir) / self.FILE_NAME if state_dir is not None else None
        self._lock = threading.Lock()
        self._serials: frozenset[int] = self._load()

    @property
    def serials(self) -> frozenset[int]:
        with self._lock:
            return self._serials

    def add(self, serials: frozenset[int]) -> frozenset[int]:
        """Keep these serials too; returns the whole list (on disk before it returns)."""
        with self._lock:
            if not serials <= self._serials:
                self._serials = self._serials | serials
                if self._path is not None:
                    data = {"version": 1, "revoked_serials": sorted(self._serials)}
                    write_atomic(self._path, json.dumps(data, indent=1).encode("utf-8"))
            return self._serials

    def _load(self) -> frozenset[int]:
        if self._path is None or not self._path.exists():
            return frozenset()
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            if data.get("version") != 1:
                raise ValueError("unknown version")
            serials = data["revoked_serials"]
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in serials):
                raise ValueError("serials must be integers")
            return frozenset(serials)
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise OSError(f"revocation list {self._path} is unreadable: {exc}") from None


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create the state directory 0700 (it holds job results and guest ids)."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
