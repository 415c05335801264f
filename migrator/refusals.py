"""Relocation refusals that agents report (``relocation.refused``): into the audit trail.

A host's relocation port refuses peers without a certificate, with another CA's, off
its allow-list, revoked, with forged or replayed tickets, or sending garbage. The agent
counts them (migrator/agent/outbox.py, ``RefusalReports``) and sends them over its
socket; here each report becomes ``relocation.refused`` through
``audit.record_refusal``, one source per reporting host and peer, so a flood on a
relocation port is a bounded number of records. The reporting host is the actor:
what it says about the peer is its word, as the details say.
"""
import ipaddress

from migrator.inventory import host_actor
from portal import audit

ACTION = "relocation.refused"
STAGES = {"connect", "tls", "authorize", "ticket", "protocol", "reservation", "commitment"}
MAX_COUNT = 1_000_000  # per report; an agent sends a report every half second at most


def record_relocation_refusal(host, message):
    """Audit one ``relocation.refused`` report of ``host``'s agent."""
    stage = str(message.get("stage"))
    stage = stage if stage in STAGES else "unknown"
    peer = _text(message.get("peer"), 200)
    address = _address(message.get("address"))
    details = {"stage": stage, "peer": peer, "address": address,
               "guest": _text(message.get("guest"), 64),
               "reason": _text(message.get("reason"), 500) or "no reason given"}
    count = _count(message.get("count"))
    if count > 1 or message.get("overflow"):
        reasons = message.get("reasons")
        details.update(reported=count, overflow=bool(message.get("overflow")),
                       reasons=[_text(r, 200) for r in reasons[:5]]
                       if isinstance(reasons, list) else [])
    audit.record_refusal(ACTION, actor=host_actor(host),
                         source=f"{host.name}:{peer or address or '-'}",
                         target=f"host:{host.name}", source_ip=address, details=details,
                         count=count)


def _text(value, limit):
    return str(value)[:limit] if value not in (None, "") else None


def _address(value):
    try:
        return str(ipaddress.ip_address(str(value).split("%", 1)[0])) if value else None
    except ValueError:
        return None


def _count(value):
    if isinstance(value, bool) or not isinstance(value, int):
        return 1
    return min(max(value, 1), MAX_COUNT)
