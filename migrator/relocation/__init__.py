"""Live migration over the relocation channel (Django-free).

* `protocol` - frames, page batches, fingerprints (``docs/relocation-protocol.md``);
* `tickets`  - single-use tickets the portal announces to the destination;
* `admission` - the destination's front door: TLS handshakes under a deadline,
  caps on unauthenticated connections, migration slots, BUSY;
* `server`   - the destination: peer checks, reservation, receiver;
* `precopy`  - the source: the six stages and the iterative pre-copy engine.
"""

from .precopy import STAGES, MigrationSettings, PrecopyMigration
from .protocol import DEFAULT_PORT, PROTOCOL_VERSION
from .server import HostFacts, RelocationServer, check_reservation
from .tickets import Ticket, TicketBook, TicketRefused

__all__ = [
    "DEFAULT_PORT", "PROTOCOL_VERSION", "STAGES", "HostFacts", "MigrationSettings",
    "PrecopyMigration", "RelocationServer", "Ticket", "TicketBook", "TicketRefused",
    "check_reservation",
]
