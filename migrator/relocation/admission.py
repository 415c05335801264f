"""The relocation port's front door: who may hold a connection, and for how long.

Until mutual TLS and the allow-list have succeeded, a connection is a
stranger's, and anyone who can reach the port can open thousands of them.
So a stranger must cost the destination almost nothing and take nothing a
certified peer needs (docs/relocation-protocol.md, section 1):

* one thread (`FrontDoor.run`) accepts every connection and drives every TLS
  handshake on non-blocking sockets: a stranger holds no thread and no
  migration slot;
* a handshake has ONE deadline for the whole of it (``handshake_timeout``):
  a ClientHello dripped a byte at a time gets no more time than silence
  (a socket timeout would restart with every byte);
* at most ``max_unauthenticated`` strangers at once, and at most
  ``max_unauthenticated_per_address`` from one address (an IPv6 /64 counts
  as one).  Past either cap the OLDEST stranger (of that address, or of
  all) is closed to make room, rather than the newcomer refused: idle
  sockets cannot lock a peer out, a flood only pushes out its own older
  connections, and a real peer's handshake (milliseconds) survives unless
  a whole cap's worth of connections arrives within it;
* only an authenticated, allowed peer is handed on (``admit``), to take one
  of the server's migration slots; if none is free it is told so with a
  BUSY frame, then its HELLO is read and dropped briefly so that closing
  does not reset the connection before the frame is read.

Every refusal of a stranger goes through ``refuse`` as an event (the agent
counts them for the portal's audit trail, which aggregates them), but only
the first per address and ``REPORT_WINDOW`` is logged, the rest counted into
one summary line: a flood of connections cannot become a flood of log lines.

Django-free.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from migrator.tls import PeerIdentityError

from .protocol import HEADER, Msg

log = logging.getLogger("berth.relocation")

REPORT_WINDOW = 60.0        # s: one log line per address and window, then a count
REPORT_ADDRESSES = 1024     # addresses tracked for reports; beyond, one shared count
BUSY_LINGER = 1.0           # s to read (and drop) a busy peer's HELLO before closing
BUSY_READ_LIMIT = 256 * 1024
ACCEPTS_PER_WAKE = 64       # then handshakes get their turn
POLL = 0.2                  # s: how often the loop looks at the stop flag

Refuse = Callable[..., None]   # (stage, reason, peer, address, *, log_line, event)
Authorize = Callable[[ssl.SSLSocket, str], str]          # -> peer name, or PeerIdentityError
Admit = Callable[[ssl.SSLSocket, str, str], "str | None"]  # -> None, or why it is busy


def address_key(address: str) -> str:
    """What counts as one source address for the caps: an IPv4 address
    (also in its IPv4-mapped IPv6 form), or a whole IPv6 /64 - one machine
    commonly has a /64 to pick addresses from."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def busy_frame(reason: str) -> bytes:
    body = json.dumps({"reason": reason}, separators=(",", ":")).encode()
    return HEADER.pack(Msg.BUSY, len(body)) + body


@dataclass(eq=False)
class _Stranger:
    tls: ssl.SSLSocket
    address: str
    key: str
    deadline: float
    busy: bool = False   # authenticated but turned away: reading its HELLO, then closed
    read: int = 0


class _Reports:
    """Refusals of strangers: each an event, at most one log line per address and window."""

    def __init__(self, refuse: Refuse):
        self._refuse, self._window = refuse, REPORT_WINDOW
        self._since: dict[str, float] = {}             # key -> start of its window
        self._counts: collections.Counter[str] = collections.Counter()  # not yet reported
        self._address: dict[str, str] = {}

    def refuse(self, stage: str, reason: str, address: str, key: str, now: float) -> None:
        if key not in self._since and len(self._since) >= REPORT_ADDRESSES:
            key = "*"  # past that many addresses, one shared count for the rest
        if key in self._since:
            self._counts[key] += 1  # counted for the portal's audit, not logged again
            self._refuse(stage, reason, None, address if key != "*" else "-", log_line=False)
            return
        self._since[key], self._address[key] = now, address
        self._refuse(stage, reason, None, address if key != "*" else "-")

    def flush(self, now: float, everything: bool = False) -> None:
        for key, since in list(self._since.items()):
            if not everything and now - since < self._window:
                continue
            del self._since[key]
            address = self._address.pop(key)
            count = self._counts.pop(key, 0)
            if count:
                where = f"from {key}" if key != "*" else "from other addresses"
                self._refuse("connect", f"{count} more unauthenticated connections {where} "
                             f"closed in the last {now - since:.0f} s (handshake deadline, "
                             "caps, or failed handshakes)", None,
                             address if key != "*" else "-", event=False)


class FrontDoor:
    """Accepts on ``listener`` and holds every unauthenticated connection
    (see the module's docstring).  ``run()`` in one thread until ``stop``
    is set; ``run`` closes the listener and every connection it still holds."""

    def __init__(self, listener: socket.socket, context: ssl.SSLContext, *,
                 handshake_timeout: float, max_unauthenticated: int,
                 max_unauthenticated_per_address: int, authorize: Authorize,
                 admit: Admit, refuse: Refuse):
        self.listener, self.context = listener, context
        self.handshake_timeout = handshake_timeout
        self.max_total, self.max_per_address = (max_unauthenticated,
                                                max_unauthenticated_per_address)
        self._authorize, self._admit, self._refuse = authorize, admit, refuse
        self._reports = _Reports(refuse)
        self._selector = selectors.DefaultSelector()
        # Both in arrival order, so the oldest comes first (and so does the
        # earliest deadline: every stranger gets the same time).
        self._strangers: collections.OrderedDict[_Stranger, None] = collections.OrderedDict()
        self._by_key: dict[str, collections.OrderedDict[_Stranger, None]] = {}
        self._busy: collections.OrderedDict[_Stranger, None] = collections.OrderedDict()
        self._accept_failed = -REPORT_WINDOW  # when accept() last failed (logged once a window)

    def run(self, stop) -> None:
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        try:
            while not stop.is_set():
                now = time.monotonic()
                wait = POLL
                for queue in (self._strangers, self._busy):
                    if queue:
                        wait = min(wait, max(next(iter(queue)).deadline - now, 0.0))
                for key, _ in self._selector.select(wait):
                    try:
                        if key.data is None:
                            self._accept()
                        elif key.data.busy:
                            self._linger(key.data)
                        else:
                            self._handshake(key.data)
                    except Exception:  # noqa: BLE001 - one bad connection must not close the port
                        log.exception("relocation front door: unexpected error")
                        if key.data is not None:
                            self._drop(key.data)
                self._expire(time.monotonic())
        finally:
            for item in list(self._strangers) + list(self._busy):
                self._drop(item)
            self._reports.flush(time.monotonic(), everything=True)
            self._selector.close()
            self.listener.close()

    # -- strangers ------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, a reset before accept...
                now = time.monotonic()
                if now - self._accept_failed >= REPORT_WINDOW:
                    self._accept_failed = now
                    log.warning("relocation accept failed: %s", exc)
                time.sleep(0.05)  # the listener stays readable: do not spin on it
                return
            address = str(addr[0])
            item = _Stranger(None, address, address_key(address),  # type: ignore[arg-type]
                             time.monotonic() + self.handshake_timeout)
            mine = self._by_key.get(item.key, {})
            if len(mine) >= self.max_per_address:
                self._close_stranger(next(iter(mine)), "closed to make room: "
                                     f"{self.max_per_address} unauthenticated connections "
                                     f"from {item.key} already")
            elif len(self._strangers) >= self.max_total:
                self._close_stranger(next(iter(self._strangers)), "closed to make room: "
                                     f"{self.max_total} unauthenticated connections already")
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                item.tls = self.context.wrap_socket(conn, server_side=True,
                                                    do_handshake_on_connect=False)
            except (OSError, ValueError) as exc:
                conn.close()
                self._report("tls", f"TLS handshake failed: {exc}", item)
                continue
            self._strangers[item] = None
            self._by_key.setdefault(item.key, collections.OrderedDict())[item] = None
            self._selector.register(item.tls, selectors.EVENT_READ, item)
            self._handshake(item)  # usually wants to read: the ClientHello is not there yet

    def _handshake(self, item: _Stranger) -> None:
        try:
            item.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(item.tls, selectors.EVENT_READ, item)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(item.tls, selectors.EVENT_WRITE, item)
            return
        except (ssl.SSLError, OSError, ValueError) as exc:
            self._close_stranger(item, f"TLS handshake failed: {_tls_reason(exc)}", "tls")
            return
        self._forget(item)
        self._selector.unregister(item.tls)
        self._authenticated(item)

    def _authenticated(self, item: _Stranger) -> None:
        try:
            peer = self._authorize(item.tls, item.address)
        except PeerIdentityError as exc:
            self._refuse("authorize", str(exc), exc.peer, item.address)  # named once verified
            item.tls.close()
            return
        except Exception:  # noqa: BLE001 - a certificate we cannot read is no peer
            log.exception("relocation: could not check the peer at %s", item.address)
            item.tls.close()
            return
        try:
            busy = self._admit(item.tls, peer, item.address)
        except Exception:  # noqa: BLE001 - the front door must keep serving
            log.exception("relocation: could not admit %s from %s", peer, item.address)
            item.tls.close()
            return
        if busy is None:
            return  # the connection is the server's now
        self._refuse("busy", busy, peer, item.address)
        try:
            item.tls.send(busy_frame(busy))  # small: fits the empty send buffer
        except (ssl.SSLError, OSError):
            item.tls.close()
            return
        item.busy, item.deadline = True, time.monotonic() + BUSY_LINGER
        if len(self._busy) >= self.max_total:
            self._drop(next(iter(self._busy)))
        self._busy[item] = None
        self._selector.register(item.tls, selectors.EVENT_READ, item)

    def _linger(self, item: _Stranger) -> None:
        """Read and drop what a busy peer sends (its HELLO) until it closes."""
        try:
            while item.read < BUSY_READ_LIMIT:
                data = item.tls.recv(16384)
                if not data:
                    break
                item.read += len(data)
            else:
                self._drop(item)
                return
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._drop(item)

    def _expire(self, now: float) -> None:
        while self._strangers:
            item = next(iter(self._strangers))
            if item.deadline > now:
                break
            self._close_stranger(item, "TLS handshake not completed within "
                                 f"{self.handshake_timeout:g} s", "tls")
        while self._busy and next(iter(self._busy)).deadline <= now:
            self._drop(next(iter(self._busy)))
        self._reports.flush(now)

    def _close_stranger(self, item: _Stranger, reason: str, stage: str = "connect") -> None:
        self._drop(item)
        self._report(stage, reason, item)

    def _report(self, stage: str, reason: str, item: _Stranger) -> None:
        self._reports.refuse(stage, reason, item.address, item.key, time.monotonic())

    def _forget(self, item: _Stranger) -> None:
        self._strangers.pop(item, None)
        mine = self._by_key.get(item.key)
        if mine is not None:
            mine.pop(item, None)
            if not mine:
                del self._by_key[item.key]

    def _drop(self, item: _Stranger) -> None:
        self._forget(item)
        self._busy.pop(item, None)
        try:
            self._selector.unregister(item.tls)
        except (KeyError, ValueError):
            pass
        item.tls.close()


def _tls_reason(exc: BaseException) -> str:
    """The one-line reason of a failed handshake, for the refusal."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return str(exc) or type(exc).__name__


__all__ = ["FrontDoor", "address_key", "busy_frame"]
