"""The Berth save-stream format: a guest's saved state as a byte stream.

Byte-level specification: ``docs/save-stream.md``.  In short::

    preamble  "BERTHSAV" u16 version u16 flags
    record H  header (uuid, sizes, name, arch, virt, config JSON)
    record C  vCPU state blob
    record P  page batch: first page, count, presence bitmap, non-zero pages
    ...       (batches contiguous, in page order, covering all memory)
    record T  trailer: page counts, SHA-256 of memory, SHA-256 of stream

Every record is ``tag(1) length(u32 LE) payload``.  Both sides work in bounded
memory: the writer yields one batch at a time and the parser buffers at most
one record.  The format is integrity-checked but NOT authenticated or
encrypted; the vault wraps it for that.

Django-free.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAGE_SIZE = 4096
MAGIC = b"BERTHSAV"
VERSION = 1
PREAMBLE = MAGIC + struct.pack("<HH", VERSION, 0)

TAG_HEADER = b"H"
TAG_VCPU = b"C"
TAG_PAGES = b"P"
TAG_TRAILER = b"T"

MAX_BATCH_PAGES = 4096
_REC = struct.Struct("<cI")
_HDR_FIXED = struct.Struct("<16sIIQH")   # uuid, page_size, memory_mib, npages, vcpus
_BATCH = struct.Struct("<QI")            # first page, count
_TRAILER = struct.Struct("<QQ32s32s")    # npages, data pages, memory sha, stream sha
# Upper bounds checked before buffering a record, so garbage cannot make the
# parser buffer gigabytes.
_MAX_LEN = {
    TAG_HEADER: 1 << 20,
    TAG_VCPU: 1 << 20,
    TAG_PAGES: _BATCH.size + MAX_BATCH_PAGES // 8 + MAX_BATCH_PAGES * PAGE_SIZE,
    TAG_TRAILER: _TRAILER.size,
}


class SaveStreamError(ValueError):
    """The stream cannot be accepted."""


class MalformedStream(SaveStreamError):
    """Bad magic/version, unknown or misplaced record, inconsistent field."""


class TruncatedStream(SaveStreamError):
    """The stream ended before its trailer."""


class DigestMismatch(SaveStreamError):
    """The memory or stream SHA-256 in the trailer does not match."""


@dataclass(frozen=True)
class StreamHeader:
    uuid: str
    name: str
    memory_mib: int
    vcpus: int
    arch: str = "x86_64"
    virt_features: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    page_size: int = PAGE_SIZE

    @property
    def npages(self) -> int:
        return self.memory_mib * (1 << 20) // self.page_size


@dataclass(frozen=True)
class ParsedStream:
    header: StreamHeader
    vcpu_state: bytes
    memory: np.ndarray  # flat uint8, npages * PAGE_SIZE
    data_pages: int     # non-zero pages carried by the stream
    memory_sha256: str


# --------------------------------------------------------------------------
# encoding
def _record(tag: bytes, payload: bytes) -> bytes:
    return _REC.pack(tag, len(payload)) + payload


def _str16(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string field longer than 65535 bytes")
    return struct.pack("<H", len(raw)) + raw


def encode_header(h: StreamHeader) -> bytes:
    cfg = json.dumps(h.config, sort_keys=True, separators=(",", ":")).encode()
    return b"".join((
        _HDR_FIXED.pack(uuidlib.UUID(h.uuid).bytes, h.page_size, h.memory_mib,
                        h.npages, h.vcpus),
        _str16(h.name), _str16(h.arch), _str16(",".join(h.virt_features)),
        struct.pack("<I", len(cfg)), cfg,
    ))


def _as_pages(memory: np.ndarray, npages: int) -> np.ndarray:
    if memory.dtype != np.uint8 or memory.size != npages * PAGE_SIZE:
        raise ValueError(f"memory must be {npages * PAGE_SIZE} uint8 bytes")
    if not memory.flags.c_contiguous:
        raise ValueError("memory must be C-contiguous")
    return memory.reshape(npages, PAGE_SIZE)


def write_stream(
    header: StreamHeader, vcpu_state: bytes, memory: np.ndarray,
    *, batch_pages: int = 256,
) -> Iterator[bytes]:
    """Yield the save stream of ``memory`` piece by piece.

    ``memory`` must not change while the generator runs (the guest is
    paused); the memory digest is computed from the bytes as they are sent.
    """
    if not 1 <= batch_pages <= MAX_BATCH_PAGES:
        raise ValueError(f"batch_pages must be in 1..{MAX_BATCH_PAGES}")
    if header.page_size != PAGE_SIZE:
        raise ValueError(f"only {PAGE_SIZE}-byte pages are supported")
    pages = _as_pages(memory, header.npages)
    stream_h, mem_h = hashlib.sha256(), hashlib.sha256()

    def emit(piece: bytes) -> bytes:
        stream_h.update(piece)
        return piece

    yield emit(PREAMBLE + _record(TAG_HEADER, encode_header(header)))
    yield emit(_record(TAG_VCPU, bytes(vcpu_state)))
    data_pages = 0
    for first in range(0, header.npages, batch_pages):
        block = pages[first:first + batch_pages]
        mem_h.update(block)  # zero pages count in the memory digest
        present = block.view(np.uint64).any(axis=1)
        bitmap = np.packbits(present, bitorder="little").tobytes()
        data = block[present].tobytes()
        length = _BATCH.size + len(bitmap) + len(data)
        yield emit(_REC.pack(TAG_PAGES, length)
                   + _BATCH.pack(first, len(block)) + bitmap)
        if data:
            yield emit(data)
        data_pages += len(data) // PAGE_SIZE
    yield _record(TAG_TRAILER, _TRAILER.pack(
        header.npages, data_pages, mem_h.digest(), stream_h.digest()))


# --------------------------------------------------------------------------
# decoding
class _Reader:
    """Bounds-checked cursor over one record payload."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MalformedStream(f"{self.what} record too short")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def text(self, width: str = "<H") -> str:
        (n,) = struct.unpack(width, self.take(struct.calcsize(width)))
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedStream(f"{self.what}: invalid UTF-8") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MalformedStream(f"{self.what} record has trailing bytes")


def decode_header(payload: bytes) -> StreamHeader:
    r = _Reader(payload, "header")
    raw_uuid, page_size, memory_mib, npages, vcpus = r.unpack(_HDR_FIXED)
    name, arch, virt = r.text(), r.text(), r.text()
    try:
        config = json.loads(r.text("<I"))
    except json.JSONDecodeError as exc:
        raise MalformedStream(f"header config is not JSON: {exc}") from exc
    r.end()
    if page_size != PAGE_SIZE:
        raise MalformedStream(f"unsupported page size {page_size}")
    if memory_mib < 1 or vcpus < 1 or not isinstance(config, dict):
        raise MalformedStream("header has zero memory/vCPUs or a non-object config")
    h = StreamHeader(
        uuid=str(uuidlib.UUID(bytes=raw_uuid)), name=name, memory_mib=memory_mib,
        vcpus=vcpus, arch=arch,
        virt_features=tuple(v for v in virt.split(",") if v), config=config,
    )
    if h.npages != npages:
        raise MalformedStream(f"header page count {npages} != {h.npages} for "
                              f"{memory_mib} MiB")
    return h


def read_header(prefix: bytes) -> StreamHeader:
    """Decode the header from the first bytes of a stream (pre-checks)."""
    _check_preamble(prefix)
    start = len(PREAMBLE)
    if len(prefix) < start + _REC.size:
        raise TruncatedStream("stream ends inside the header")
    tag, length = _REC.unpack_from(prefix, start)
    if tag != TAG_HEADER or length > _MAX_LEN[TAG_HEADER]:
        raise MalformedStream("stream does not start with a header record")
    body = prefix[start + _REC.size:start + _REC.size + length]
    if len(body) < length:
        raise TruncatedStream("stream ends inside the header")
    return decode_header(body)


def _check_preamble(data: bytes) -> None:
    if len(data) < len(PREAMBLE):
        raise TruncatedStream("stream ends inside the preamble")
    if data[:len(MAGIC)] != MAGIC:
        raise MalformedStream("not a Berth save stream (bad magic)")
    version, flags = struct.unpack_from("<HH", data, len(MAGIC))
    if version != VERSION:
        raise MalformedStream(f"unsupported save-stream version {version}")
    if flags != 0:
        raise MalformedStream(f"unknown save-stream flags {flags:#x}")


Allocator = Callable[[StreamHeader], np.ndarray]


def _zeros(header: StreamHeader) -> np.ndarray:
    return np.zeros(header.npages * PAGE_SIZE, dtype=np.uint8)


class SaveStreamParser:
    """Incremental parser: ``feed()`` pieces of any size, then ``close()``.

    ``allocate(header)`` is called once the header is known and returns the
    destination memory (flat uint8 of ``npages * PAGE_SIZE``); it is where a
    driver checks compatibility and claims capacity, and may raise.  Pages
    are written into it as batches arrive.  After any error the parser is
    dead; the caller must discard the destination memory.
    """

    def __init__(self, allocate: Allocator | None = None):
        self._allocate = allocate or _zeros
        self._buf = bytearray()
        self._expect = "preamble"  # preamble, H, C, P/T, done
        self._stream_h = hashlib.sha256()
        self._mem_h = hashlib.sha256()
        self._next_page = 0
        self._data_pages = 0
        self._failed: Exception | None = None
        self.header: StreamHeader | None = None
        self.vcpu_state: bytes | None = None
        self.memory: np.ndarray | None = None
        self._pages: np.ndarray | None = None
        self._memory_sha = ""

    @property
    def done(self) -> bool:
        return self._expect == "done"

    def feed(self, data: bytes) -> None:
        if self._failed is not None:
            raise MalformedStream(f"parser already failed: {self._failed}")
        if self.done:
            if data:
                self._failed = MalformedStream("data after the trailer")
                raise self._failed
            return
        self._buf += data
        try:
            consumed = self._drain()
        except Exception as exc:
            self._failed = exc
            raise
        del self._buf[:consumed]

    def close(self) -> ParsedStream:
        if self._failed is not None:
            raise MalformedStream(f"parser already failed: {self._failed}")
        if not self.done:
            where = "preamble" if self._expect == "preamble" else f"{self._expect} record"
            raise TruncatedStream(
                f"stream ends before its trailer (expecting {where}, "
                f"{self._next_page} pages received, {len(self._buf)} bytes pending)")
        assert self.header and self.memory is not None and self.vcpu_state is not None
        return ParsedStream(self.header, self.vcpu_state, self.memory,
                            self._data_pages, self._memory_sha)

    # -- internals ----------------------------------------------------------
    def _drain(self) -> int:
        """Process every complete unit in the buffer; return bytes consumed."""
        buf, pos = self._buf, 0
        if self._expect == "preamble":
            if len(buf) < len(PREAMBLE):
                return 0
            _check_preamble(bytes(buf[:len(PREAMBLE)]))
            self._stream_h.update(buf[:len(PREAMBLE)])
            pos, self._expect = len(PREAMBLE), "H"
        while not self.done and len(buf) - pos >= _REC.size:
            tag, length = _REC.unpack_from(buf, pos)
            self._check_tag(tag, length)
            end = pos + _REC.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[pos + _REC.size:end])
            if tag != TAG_TRAILER:  # the trailer is not part of its own digest
                self._stream_h.update(_REC.pack(tag, length))
                self._stream_h.update(payload)
            self._handle(tag, payload)
            pos = end
        if self.done and pos < len(buf):
            raise MalformedStream("data after the trailer")
        return pos

    def _check_tag(self, tag: bytes, length: int) -> None:
        if tag not in _MAX_LEN:
            raise MalformedStream(f"unknown record type {tag!r}")
        allowed = {"H": (TAG_HEADER,), "C": (TAG_VCPU,),
                   "P/T": (TAG_PAGES, TAG_TRAILER)}[self._expect]
        if tag not in allowed:
            raise MalformedStream(
                f"record {tag.decode()!r} where {self._expect} was expected")
        if length > _MAX_LEN[tag]:
            raise MalformedStream(f"record {tag.decode()!r} too long ({length} bytes)")

    def _handle(self, tag: bytes, payload: bytes) -> None:
        if tag == TAG_HEADER:
            self.header = decode_header(payload)
            self._start_memory(self.header)
            self._expect = "C"
        elif tag == TAG_VCPU:
            self.vcpu_state, self._expect = payload, "P/T"
        elif tag == TAG_PAGES:
            self._apply_batch(payload)
        else:
            self._finish(payload)

    def _start_memory(self, header: StreamHeader) -> None:
        memory = self._allocate(header)
        self._pages = _as_pages(memory, header.npages)
        self.memory = memory

    def _apply_batch(self, payload: bytes) -> None:
        assert self.header is not None and self._pages is not None
        if len(payload) < _BATCH.size:
            raise MalformedStream("page batch record too short")
        first, count = _BATCH.unpack_from(payload, 0)
        if not 1 <= count <= MAX_BATCH_PAGES:
            raise MalformedStream(f"page batch count {count} out of range")
        if first != self._next_page:
            raise MalformedStream(
                f"page batch starts at {first}, expected {self._next_page} "
                "(batch missing, reordered or duplicated)")
        if first + count > self.header.npages:
            raise MalformedStream(f"page batch {first}+{count} beyond memory end")
        present = self._bitmap(payload, count)
        n = int(present.sum())
        offset = _BATCH.size + (count + 7) // 8
        if len(payload) != offset + n * PAGE_SIZE:
            raise MalformedStream(
                f"page batch at {first}: {len(payload) - offset} data bytes for "
                f"{n} present pages")
        block = self._pages[first:first + count]
        block[:] = 0  # elided pages are zero even if the destination was not
        if n:
            block[present] = np.frombuffer(payload, np.uint8, n * PAGE_SIZE,
                                           offset).reshape(n, PAGE_SIZE)
        self._mem_h.update(block)
        self._next_page += count
        self._data_pages += n

    @staticmethod
    def _bitmap(payload: bytes, count: int) -> np.ndarray:
        nbytes = (count + 7) // 8
        if len(payload) < _BATCH.size + nbytes:
            raise MalformedStream("page batch bitmap truncated")
        raw = np.frombuffer(payload, np.uint8, nbytes, _BATCH.size)
        bits = np.unpackbits(raw, bitorder="little")
        if bits[count:].any():
            raise MalformedStream("page batch bitmap has bits set past its count")
        return bits[:count].astype(bool)

    def _finish(self, payload: bytes) -> None:
        assert self.header is not None
        if len(payload) != _TRAILER.size:
            raise MalformedStream("trailer has the wrong size")
        npages, data_pages, mem_sha, stream_sha = _TRAILER.unpack(payload)
        if stream_sha != self._stream_h.digest():
            raise DigestMismatch("stream SHA-256 mismatch: the stream was altered")
        if self._next_page != self.header.npages or npages != self.header.npages:
            raise MalformedStream(
                f"trailer after {self._next_page} of {self.header.npages} pages")
        if data_pages != self._data_pages:
            raise MalformedStream(
                f"trailer counts {data_pages} data pages, stream had {self._data_pages}")
        if mem_sha != self._mem_h.digest():
            raise DigestMismatch("memory SHA-256 mismatch: restored memory differs")
        self._memory_sha = mem_sha.hex()
        self._expect = "done"


class GuardedStream:
    """Wraps a stream generator and calls ``on_done(completed)`` exactly once:
    True after the last piece, False if it failed or was closed (or garbage
    collected) early - including never started, which a bare generator
    cannot report.  Lets a driver release the guest it froze for saving."""

    def __init__(self, gen: Iterator[bytes], on_done: Callable[[bool], None]):
        self._gen, self._on_done, self._done = gen, on_done, False

    def __iter__(self) -> GuardedStream:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._gen)
        except StopIteration:
            self._finish(True)
            raise
        except BaseException:
            self._finish(False)
            raise

    def close(self) -> None:
        self._gen.close()
        self._finish(False)

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._finish(False)

    def _finish(self, completed: bool) -> None:
        if not self._done:
            self._done = True
            self._on_done(completed)


def parse_stream(chunks: Iterable[bytes], allocate: Allocator | None = None) -> ParsedStream:
    """Parse a whole stream from an iterable of pieces."""
    parser = SaveStreamParser(allocate)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.close()
