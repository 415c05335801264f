"""Wire format of the relocation channel: frames, page batches, fingerprints.

Byte-level specification: ``docs/relocation-protocol.md``.  Everything here is
transport only; the state machines live in ``server.py`` (destination) and
``precopy.py`` (source).

Throughput matters (a 1 GiB guest is 262 144 pages), so page batches are
built and parsed with numpy on whole frames: zero detection, index packing,
the presence bitmap, compaction of the non-zero pages and their fingerprints
are each one vectorised call per frame, never a Python loop per page.

Django-free.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import queue
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from migrator.hypervisor.base import PAGE_SIZE

PROTOCOL_VERSION = 1
DEFAULT_PORT = 8002

HEADER = struct.Struct("<BI")        # type, payload length
MAX_CONTROL = 64 * 1024              # JSON control frames
MAX_VCPU = 1024 * 1024               # vCPU state blob (savestream's limit too)
MAX_BATCH_PAGES = 2048               # 8 MiB of page data per frame at most
DEFAULT_BATCH_PAGES = 1024           # 4 MiB: large enough for TLS, small enough to abort fast
_WORDS = PAGE_SIZE // 4              # u32 words per page, for fingerprints
_FP_DOMAIN = b"berth-relocation-fingerprint-v1"
_ROOT_DOMAIN = b"berth-relocation-root-v1"


class Msg(enum.IntEnum):
    HELLO = 0x01       # source -> destination, JSON: ticket + guest + reservation request
    RESERVED = 0x02    # destination -> source, JSON
    REFUSED = 0x03     # destination -> source, JSON {stage, reason}; connection then closes
    BUSY = 0x04        # destination -> source, JSON {reason}: every migration slot is taken
    PAGES = 0x10       # source -> destination, binary page batch
    SYNC = 0x11        # source -> destination and echoed back, JSON {round}
    VCPU = 0x12        # source -> destination, binary vCPU blob (guest is paused)
    COMMIT = 0x13      # source -> destination, JSON digests
    COMMITTED = 0x20   # destination -> source, JSON: identical image held, paused
    ACTIVATE = 0x21    # source -> destination, JSON {}: THE commit point
    ACTIVATED = 0x22   # destination -> source, JSON: running there
    ABORT = 0x7F       # either way, JSON {reason}


def max_payload(mtype: int) -> int:
    """Largest payload a frame of this type may announce (checked before any
    allocation, so a peer cannot make us reserve gigabytes with 5 bytes)."""
    if mtype == Msg.PAGES:
        return pages_payload_size(MAX_BATCH_PAGES, MAX_BATCH_PAGES)
    if mtype == Msg.VCPU:
        return MAX_VCPU
    return MAX_CONTROL


def pages_payload_size(count: int, present: int) -> int:
    return 4 + 4 * count + (count + 7) // 8 + PAGE_SIZE * present


class TokenBucket:
    """Paces a byte stream to ``rate`` bytes per second (a migration's
    bandwidth cap).  Tokens accrue at ``rate`` up to ``burst``; a piece of n
    bytes (at most ``burst``) leaves once n tokens are there.  So over any
    interval of t seconds at most ``burst + rate * t`` bytes leave, and a
    sender that was idle gains no more than ``burst`` - an idle moment never
    turns into a long run at line speed.  The burst is small (64 KiB, or 5 ms
    of the rate if that is more): enough to keep TLS records whole and the
    sleeps few, too little to show in a round's rate.

    ``close()`` (any thread) ends a wait at once with an error, as a socket
    shutdown ends a blocked ``sendall``."""

    MIN_BURST = 64 * 1024
    BURST_SECONDS = 0.005

    def __init__(self, rate: float, burst: int | None = None):
        if not rate > 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.burst = int(burst or max(self.MIN_BURST, rate * self.BURST_SECONDS))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._closed = threading.Event()

    def take(self, n: int) -> None:
        """Wait until ``n`` bytes (at most ``burst``) may leave, and spend them."""
        if n > self.burst:
            raise ValueError(f"{n} bytes exceed the bucket's burst of {self.burst}")
        while True:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= n:
                self._tokens -= n
                return
            if self._closed.wait((n - self._tokens) / self.rate):
                raise OSError(errno.ECONNABORTED, "the connection was shut down")

    def pieces(self, data: bytes | memoryview):
        """``data`` in slices the bucket can pass whole."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.burst):
            yield view[start:start + self.burst]

    def close(self) -> None:
        self._closed.set()


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow."""


class PeerClosed(ConnectionError):
    """The connection ended (cleanly or not) in the middle of the protocol."""


class Interrupted(Exception):
    """A wait was cut short because the local side asked to stop."""


# --------------------------------------------------------------------------
class Channel:
    """One authenticated TLS connection carrying frames.

    ``recv`` returns a memoryview into a buffer owned by the channel that is
    valid until the next ``recv``: page data is parsed in place, never copied
    into Python objects.
    """

    POLL = 0.2  # how often a blocked read looks at the stop flag

    def __init__(self, sock: ssl.SSLSocket, *, io_timeout: float, max_rate: float = 0.0):
        self.sock = sock
        self.io_timeout = io_timeout
        self.bytes_out = 0
        # The bandwidth cap (bytes/s; 0: none) on everything this side sends.
        self._bucket = TokenBucket(max_rate) if max_rate > 0 else None
        self._unpaced = False
        self._head = bytearray(HEADER.size)
        self._small = bytearray(MAX_CONTROL)
        self._big: bytearray | None = None  # allocated on the first page frame
        self._send_lock = threading.Lock()  # ABORT may be sent from another thread
        self._timeout: float | None = None   # last value given to settimeout()

    # -- sending ------------------------------------------------------------
    def send(self, mtype: int, payload: bytes | memoryview = b"") -> None:
        frame = HEADER.pack(mtype, len(payload)) + bytes(payload)
        self.send_raw(frame)

    def send_json(self, mtype: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        if len(data) > MAX_CONTROL:
            raise ProtocolError(f"control message of {len(data)} bytes is too large")
        self.send(mtype, data)

    def send_raw(self, *parts: bytes | memoryview) -> None:
        """Send one complete frame given as consecutive parts."""
        with self._send_lock:
            self._set_timeout(self.io_timeout)
            for part in parts:
                if not len(part):
                    continue
                if self._bucket is None or self._unpaced:
                    self.sock.sendall(part)
                    self.bytes_out += len(part)
                    continue
                for piece in self._bucket.pieces(part):
                    if not self._unpaced:  # lifted mid-frame: the rest goes at once
                        self._bucket.take(len(piece))
                    self.sock.sendall(piece)
                    self.bytes_out += len(piece)

    def lift_cap(self) -> None:
        """Send the rest unpaced (any thread; from the next piece on): once the
        guest is paused, pacing would only lengthen its downtime - QEMU, too,
        sends what is left after the pause at full speed - and a frame being
        paced when a migration stops must not hold back its ABORT."""
        self._unpaced = True

    # -- receiving ----------------------------------------------------------
    def recv(self, *, timeout: float | None = None, stop: threading.Event | None = None,
             into: bytearray | None = None) -> tuple[Msg, memoryview]:
        """The next frame.  ``timeout`` bounds the wait for it to START (the
        default is the I/O timeout); once started, each read may take up to
        the I/O timeout.  With ``stop``, the wait ends with `Interrupted` soon
        after the event is set.  With ``into`` (at least ``max_payload(PAGES)``
        bytes) the payload lands there instead of the channel's buffer."""
        msg, length = self.recv_header(timeout=timeout, stop=stop)
        buf = into if into is not None else self._buffer(length)
        view = memoryview(buf)[:length]
        self.read_into(view, stop)
        return msg, view

    def recv_header(self, *, timeout: float | None = None,
                    stop: threading.Event | None = None) -> tuple[Msg, int]:
        """The next frame's type and payload length (checked against the
        type's limit); the payload is the caller's to read (`read_into`)."""
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        self._read_into(memoryview(self._head), deadline, stop)
        mtype, length = HEADER.unpack(self._head)
        try:
            msg = Msg(mtype)
        except ValueError:
            raise ProtocolError(f"unknown frame type 0x{mtype:02x}") from None
        if length > max_payload(msg):
            raise ProtocolError(f"{msg.name} frame of {length} bytes exceeds the limit")
        return msg, length

    def read_into(self, view: memoryview, stop: threading.Event | None = None) -> None:
        """Fill ``view`` from the stream (part of a frame already begun)."""
        self._read_into(view, time.monotonic() + self.io_timeout, stop)

    def recv_json(self, expected: set[Msg], **kw: Any) -> tuple[Msg, dict[str, Any]]:
        msg, payload = self.recv(**kw)
        if msg not in expected:
            raise ProtocolError(f"unexpected {msg.name} frame (expected "
                                f"{'/'.join(sorted(m.name for m in expected))})")
        return msg, decode_json(payload, msg)

    def _buffer(self, length: int) -> bytearray:
        if length <= len(self._small):
            return self._small
        if self._big is None:
            self._big = bytearray(max_payload(Msg.PAGES))
        return self._big

    def _read_into(self, view: memoryview, deadline: float,
                   stop: threading.Event | None) -> None:
        # A read returns at most one TLS record (16 KiB): 65 536 reads per
        # GiB, so the loop does nothing else while data flows.  The socket
        # timeout bounds each read (never beyond what is left), and the
        # deadline and the stop flag are looked at when a read times out;
        # settimeout() is a system call, made only when the value changes.
        if stop is not None and stop.is_set():
            raise Interrupted()
        per_read = self.POLL if stop is not None else deadline - time.monotonic()
        self._set_timeout(max(per_read, 0.001))
        recv_into, got, n = self.sock.recv_into, 0, len(view)
        while got < n:
            try:
                k = recv_into(view[got:], n - got)
            except TimeoutError:  # nothing was consumed
                if stop is not None and stop.is_set():
                    raise Interrupted() from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out waiting for the peer") from None
                self._set_timeout(min(per_read, left))
                continue
            if k == 0:
                raise PeerClosed("the peer closed the connection")
            got += k

    def _set_timeout(self, value: float) -> None:
        # Within 10 % is close enough: the deadline is enforced above.
        if self._timeout is None or not 0.9 * self._timeout <= value <= self._timeout:
            self.sock.settimeout(value)
            self._timeout = value

    def try_send_json(self, mtype: int, obj: dict[str, Any], timeout: float) -> bool:
        """Best effort (ABORT on the way out): give up rather than wait long
        for a sender stuck on a dead link."""
        if not self._send_lock.acquire(timeout=timeout):
            return False
        try:
            self.io_timeout = min(self.io_timeout, timeout)
            data = json.dumps(obj, separators=(",", ":")).encode()
            self._set_timeout(timeout)
            self.sock.sendall(HEADER.pack(mtype, len(data)) + data)
            return True
        except (OSError, ValueError):
            return False
        finally:
            self._send_lock.release()

    def shutdown(self) -> None:
        """Wake any thread blocked on this connection (it gets an error).
        Safe from another thread: the base-class shutdown leaves the TLS
        object alone, whereas SSLSocket.shutdown drops it, and a reader
        racing with that would read raw ciphertext as frames."""
        if self._bucket is not None:
            self._bucket.close()  # a sender waiting for tokens wakes too
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        # No shutdown(SHUT_RD) first: a socket shut for reading advertises a
        # zero window, and a peer still sending would wait on it until its
        # timeout instead of getting a reset from the closed socket.
        self.sock.close()


def decode_json(payload: memoryview, msg: Msg) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{msg.name} frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{msg.name} frame is not a JSON object")
    return obj


# --------------------------------------------------------------------------
class Fingerprints:
    """Per-page 64-bit fingerprints and the root digest over them.

    ``fp(page) = sum(w[j] * k[j]) mod 2**64`` over the page's 1024 little-endian
    u32 words ``w`` with 64-bit keys ``k`` derived from a per-migration seed
    (a multilinear hash: for two different pages the chance of equal
    fingerprints is at most 2**-32 whatever their content).  A zero page's
    fingerprint is 0.  Both ends keep a table updated for every page they
    send or apply; after the pause the root (SHA-256 over the table) says
    whether the destination holds what the source last read, without hashing
    the whole memory inside the downtime.
    """

    def __init__(self, seed: bytes, npages: int):
        raw = hashlib.shake_256(_FP_DOMAIN + seed).digest(_WORDS * 8)
        self.keys = np.frombuffer(raw, dtype="<u8").copy()
        self.table = np.zeros(npages, dtype=np.uint64)

    def of(self, pages: np.ndarray) -> np.ndarray:
        """Fingerprints of a (n, PAGE_SIZE) uint8 array of pages."""
        if len(pages) == 0:
            return np.zeros(0, dtype=np.uint64)
        words = pages.reshape(len(pages), PAGE_SIZE).view("<u4")
        return np.einsum("ij,j->i", words, self.keys, dtype=np.uint64, casting="unsafe")

    def update(self, indices: np.ndarray, present: np.ndarray, data: np.ndarray) -> None:
        """Record a batch: ``data`` holds the present pages, in order."""
        self.table[indices[~present]] = 0
        self.table[indices[present]] = self.of(data)

    def update_runs(self, indices: np.ndarray, present: np.ndarray, memory: np.ndarray,
                    runs: list[tuple[int, int]]) -> None:
        """Record a batch whose present pages were read straight into
        ``memory`` (the (npages, PAGE_SIZE) guest memory), as ``runs``."""
        self.table[indices[~present]] = 0
        for start, stop in runs:
            self.table[start:stop] = self.of(memory[start:stop])

    def root(self) -> str:
        h = hashlib.sha256(_ROOT_DOMAIN)
        h.update(struct.pack("<Q", len(self.table)))
        h.update(self.table.astype("<u8", copy=False).tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    head: bytes          # frame header + count + indices + bitmap
    data: memoryview     # the non-zero pages, in index order
    pages: int           # pages in the batch
    data_pages: int      # of which non-zero (carried)

    @property
    def size(self) -> int:
        return len(self.head) + len(self.data)


def encode_pages(indices: np.ndarray, data: bytes | memoryview,
                 fingerprints: Fingerprints | None = None,
                 scratch: bytearray | None = None) -> EncodedBatch:
    """A PAGES frame for ``data`` (the pages at ``indices``, concatenated).

    Payload: u32 count, count x u32 page index (strictly increasing), the
    presence bitmap (bit j, LSB first, set = page j's bytes follow), then the
    non-zero pages in index order.  The frame comes in two parts, sent back
    to back, so the page bytes are never copied behind a header: when no page
    is zero they are ``data`` itself, else one boolean-mask gather (into
    ``scratch``, a reusable buffer as large as ``data``, if given).  With
    ``fingerprints`` (``verify="incremental"``) the pages are recorded there.
    """
    count = len(indices)
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_PAGES} pages")
    pages = np.frombuffer(data, dtype=np.uint8).reshape(count, PAGE_SIZE)
    if fingerprints is not None:
        present = _fingerprint_and_find_data(pages, indices, fingerprints)
    else:
        present = _find_data(pages)
    npresent = int(np.count_nonzero(present))
    if npresent == count:
        carried = pages
    elif scratch is not None:
        carried = np.frombuffer(scratch, dtype=np.uint8, count=npresent * PAGE_SIZE).reshape(
            npresent, PAGE_SIZE)
        np.compress(present, pages, axis=0, out=carried)
    else:
        carried = pages[present]
    head = b"".join((
        HEADER.pack(Msg.PAGES, pages_payload_size(count, npresent)),
        struct.pack("<I", count),
        indices.astype("<u4").tobytes(),
        np.packbits(present, bitorder="little").tobytes()))
    return EncodedBatch(head, memoryview(carried.reshape(-1)), count, npresent)


def _find_data(pages: np.ndarray) -> np.ndarray:
    """Which pages carry data.  A page whose first 64-bit word is set does,
    without reading the rest of it (on random memory that is every page);
    the others are read whole - max() over u64 words is the cheapest
    whole-page "any byte set" test - one by one when they are few, else the
    whole batch in one pass."""
    words = pages.view("<u8")
    present = words[:, 0] != 0
    unsure = np.flatnonzero(~present)
    if 4 * len(unsure) > len(pages):
        return words.max(axis=1) != 0
    if len(unsure):
        present[unsure] = words[unsure].max(axis=1) != 0
    return present


def _fingerprint_and_find_data(pages: np.ndarray, indices: np.ndarray,
                               fingerprints: Fingerprints) -> np.ndarray:
    """Fingerprint a batch and return which pages carry data.  A zero page's
    fingerprint is 0 and any other page's is not, but with a chance of
    2**-32: so the fingerprint doubles as the zero-page test (one pass over
    the pages instead of two), and only its rare false zeros are looked at
    byte by byte."""
    fps = fingerprints.of(pages)
    fingerprints.table[indices] = fps  # 0 for zero pages, as the receiver records them
    present = fps != 0
    candidates = np.flatnonzero(~present)
    if len(candidates):
        present[candidates] = pages[candidates].view("<u8").max(axis=1) != 0
    return present


@dataclass
class DecodedBatch:
    indices: np.ndarray   # int64, strictly increasing, < npages
    present: np.ndarray   # bool, per index
    data: np.ndarray      # (present pages, PAGE_SIZE) uint8 view into the frame
    placed: list[tuple[int, int]] | None = None  # or: already in guest memory, as runs


def page_head_size(count: int) -> int:
    """Bytes of a PAGES payload before its page data."""
    return 4 + 4 * count + (count + 7) // 8


def _page_count(raw: np.ndarray, length: int) -> int:
    if length < 4:
        raise ProtocolError("PAGES frame is truncated")
    count = int(raw[:4].view("<u4")[0])
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise ProtocolError(f"PAGES frame holds {count} pages (1..{MAX_BATCH_PAGES})")
    if length < page_head_size(count):
        raise ProtocolError("PAGES frame is truncated")
    return count


def _parse_page_head(raw: np.ndarray, count: int, length: int,
                     npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and presence flags from a PAGES payload's head (``raw``
    holds at least `page_head_size` bytes), checked against the payload's
    ``length`` - before a single page byte is read."""
    head = page_head_size(count)
    indices = raw[4:4 + 4 * count].view("<u4").astype(np.int64)
    if indices[-1] >= npages or (count > 1 and not np.all(indices[1:] > indices[:-1])):
        raise ProtocolError("PAGES indices must increase strictly and stay below "
                            f"{npages}")
    bits = np.unpackbits(raw[4 + 4 * count:head], bitorder="little")
    if bits[count:].any():
        raise ProtocolError("PAGES bitmap has padding bits set")
    present = bits[:count].astype(bool)
    expected = head + int(np.count_nonzero(present)) * PAGE_SIZE
    if length != expected:
        raise ProtocolError(f"PAGES frame is {length} bytes, its bitmap says {expected}")
    return indices, present


def decode_pages(payload: memoryview, npages: int) -> DecodedBatch:
    """Parse and validate a PAGES payload in place (destination side)."""
    raw = np.frombuffer(payload, dtype=np.uint8)
    count = _page_count(raw, len(payload))
    indices, present = _parse_page_head(raw, count, len(payload), npages)
    data = raw[page_head_size(count):].reshape(-1, PAGE_SIZE)
    return DecodedBatch(indices, present, data)


DIRECT_RUNS = 8  # a batch in at most this many runs of pages is read in place


def page_runs(indices: np.ndarray, limit: int) -> list[tuple[int, int]] | None:
    """Strictly increasing page indices as [start, stop) runs of consecutive
    pages; None if there are more than ``limit`` runs."""
    if not len(indices):
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    if len(breaks) >= limit:
        return None
    bounds = [0, *breaks.tolist(), len(indices)]
    return [(int(indices[a]), int(indices[b - 1]) + 1) for a, b in zip(bounds, bounds[1:],
                                                                         strict=False)]


def read_pages_frame(chan: Channel, length: int, buf: bytearray, memory: np.ndarray | None,
                     npages: int, after: int = -1) -> DecodedBatch:
    """Read the payload of a PAGES frame whose header `Channel.recv_header`
    returned.  The head (indices, bitmap) is read and checked first - its
    pages must all lie beyond page ``after``, the round's last so far: pages
    read in place land while earlier frames of the round are still being
    applied, and this rule (the source sends each round as a sorted set)
    means no page is written twice out of order.  Then,
    if the present pages lie in a few runs and the guest's ``memory`` is
    mapped, TLS decrypts them straight into it - no copy, as Xen's restore
    maps guest frames - else the pages land in ``buf`` for the caller to
    scatter."""
    view = memoryview(buf)
    chan.read_into(view[:4])
    count = _page_count(np.frombuffer(buf, dtype=np.uint8, count=4), length)
    head = page_head_size(count)
    chan.read_into(view[4:head])
    indices, present = _parse_page_head(np.frombuffer(buf, dtype=np.uint8, count=head),
                                        count, length, npages)
    if indices[0] <= after:
        raise ProtocolError("PAGES indices must increase across the frames of a round")
    runs = page_runs(indices[present], DIRECT_RUNS) if memory is not None else None
    if runs is None:
        chan.read_into(view[head:length])
        data = np.frombuffer(buf, dtype=np.uint8, count=length - head, offset=head)
        return DecodedBatch(indices, present, data.reshape(-1, PAGE_SIZE))
    for start, stop in runs:
        chan.read_into(memoryview(memory[start:stop].reshape(-1)))
    return DecodedBatch(indices, present, np.zeros((0, PAGE_SIZE), np.uint8), runs)


# --------------------------------------------------------------------------
# pipelining: overlap TLS with the page work on either side
class FrameSender:
    """Sends queued frames from its own thread, so that reading and encoding
    the next batch overlaps the TLS encryption of this one (the ssl module
    releases the GIL while it encrypts).  The first send error is kept and
    raised to the producer at its next put/drain.

    Once ``put`` returns, at most ``depth + 1`` frames are still unsent (the
    queue's and the one being sent): a producer that reuses buffers needs
    ``buffers_needed`` of them in rotation."""

    def __init__(self, chan: Channel, depth: int = 2):
        self.buffers_needed = self.buffers_for(depth)
        self._chan = chan
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="relocation-sender",
                                        daemon=True)
        self._thread.start()

    @staticmethod
    def buffers_for(depth: int) -> int:
        return depth + 2

    def put(self, parts: tuple[Any, ...], stop: threading.Event) -> None:
        while True:
            self._check(stop)
            try:
                self._queue.put(parts, timeout=0.1)
                return
            except queue.Full:
                continue

    def drain(self, stop: threading.Event) -> None:
        while self._queue.unfinished_tasks:
            self._check(stop)
            time.sleep(0.0002)  # a round ends once; a short poll costs nothing
        self._check(None)

    def _check(self, stop: threading.Event | None) -> None:
        if self.error is not None:
            raise self.error
        if stop is not None and stop.is_set():
            raise Interrupted()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                parts = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if self.error is None:  # after an error, only drain the queue
                    self._chan.send_raw(*parts)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self.error = exc
            finally:
                self._queue.task_done()


def touched_buffer(size: int) -> bytearray:
    """A buffer whose pages are already faulted in.  A fresh allocation costs
    a page fault per 4 KiB at first write (≈11-30 µs each in a nested VM):
    done while the connection is being set up, not in the middle of pre-copy."""
    buf = bytearray(size)
    np.frombuffer(buf, dtype=np.uint8)[::PAGE_SIZE] = 1
    return buf


def frame_buffers() -> list[bytearray]:
    """The destination's two PAGES frame buffers (see `FramePrefetcher`)."""
    return [touched_buffer(max_payload(Msg.PAGES)) for _ in range(2)]


class FramePrefetcher:
    """Reads pre-copy frames ahead on its own thread, into two buffers used
    in turn (or, for runs of pages, straight into the guest's ``memory``, see
    `read_pages_frame`), while the connection thread applies the previous
    frame: TLS decryption (which releases the GIL) overlaps writing and
    fingerprinting pages.  Stops after the VCPU or ABORT frame.

    An OpenSSL connection must never be read and written by two threads at
    once, so after a SYNC frame (which the connection thread answers) the
    reader waits until the answer is out; the source sends nothing in
    between anyway."""

    def __init__(self, chan: Channel, buffers: list[bytearray] | None = None,
                 memory: np.ndarray | None = None, npages: int = 0):
        self._chan = chan
        self._memory, self._npages = memory, npages
        self._free: queue.Queue[bytearray | None] = queue.Queue()
        self._ready: queue.Queue[Any] = queue.Queue()
        self._answered = threading.Event()
        for buf in buffers or frame_buffers():
            self._free.put(buf)
        self._thread = threading.Thread(target=self._run, name="relocation-reader",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            last = -1  # the highest page index of this round so far
            while (buf := self._free.get()) is not None:
                msg, length = self._chan.recv_header()
                if msg is Msg.PAGES:
                    payload: Any = read_pages_frame(self._chan, length, buf, self._memory,
                                                    self._npages, last)
                    last = int(payload.indices[-1])
                else:
                    payload = memoryview(buf)[:length]
                    self._chan.read_into(payload)
                self._answered.clear()
                self._ready.put((msg, payload, buf))
                if msg in (Msg.VCPU, Msg.ABORT):
                    return
                if msg is Msg.SYNC:
                    last = -1
                    self._answered.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._ready.put(exc)

    def get(self) -> tuple[Msg, memoryview, bytearray]:
        # The reader's own reads are bounded by the I/O timeout; so is this.
        try:
            item = self._ready.get(timeout=self._chan.io_timeout * 2 + 1)
        except queue.Empty:
            raise TimeoutError("timed out waiting for the peer") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, buf: bytearray, answered: bool = False) -> None:
        self._free.put(buf)
        if answered:
            self._answered.set()

    def stop(self) -> None:
        """End the reader before anyone else touches the connection: after
        VCPU/ABORT it has returned; otherwise (a failure) it may be blocked
        reading, and the connection is shut to wake it."""
        self._free.put(None)
        self._answered.set()
        self._thread.join(0.05)
        if self._thread.is_alive():
            self._chan.shutdown()
            self._thread.join(self._chan.io_timeout)


def describe_error(exc: BaseException) -> str:
    """One line for an operator: what went wrong on the channel."""
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the peer"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc}"
    if isinstance(exc, ConnectionError | OSError):
        return f"connection lost: {exc}"
    return f"{type(exc).__name__}: {exc}"
