"""One chunk record of a Berth image: its body, and the STREAM AEAD that seals it.

Byte-level spec: docs/vault-format.md (sections on records and chunk bodies). A record
is a u32 length, then the chunk body sealed with the image's data key under a STREAM
nonce (prefix, counter, last flag) with the image header as associated data. The body
leaves all-zero pages out (a bitmap names them) and zstd-compresses the rest where that
pays. ``vault.format`` builds headers, key envelopes and whole images on top of this.
Django-free on purpose, like ``vault.format``.
"""
from __future__ import annotations

import struct
import threading

import numpy as np
import zstandard
from cryptography.exceptions import InvalidTag

CHUNK_ZSTD = 0x01  # chunk body flags bit 0: this chunk's page data is zstd-compressed
PAGE_SIZE = 4096
TAG_SIZE = 16
MAX_CHUNKS = 1 << 32  # the counter is a u32
ZSTD_LEVEL = 1  # writer choice, not part of the format: ~1.5x faster than 3, ~10% larger
HEADER_TAG_FLAG = 0x02  # flag byte of the header tag's nonce; chunks use 0x00 / 0x01

_NONCE_TAIL = struct.Struct(">IB")  # chunk counter, flag byte
_BODY_HEAD = struct.Struct(">BI")  # chunk flags, plaintext length
RECORD_LEN = struct.Struct(">I")  # the length prefix of a record


class FormatError(Exception):
    """The bytes are not a valid, authentic Berth image (or envelope)."""


class TamperedChunk(FormatError):
    """A chunk failed authentication: altered, reordered, duplicated or missing."""

    def __init__(self, index: int, reason: str = "failed authentication"):
        super().__init__(f"chunk {index} {reason} (altered, reordered, duplicated or "
                         f"dropped chunk)")
        self.index = index


class TruncatedImage(FormatError):
    """The image ends before its final chunk."""


class TrailingData(FormatError):
    """Bytes follow the image's final chunk."""


def stream_nonce(prefix: bytes, counter: int, flag: int) -> bytes:
    """A STREAM nonce: the image's 7-byte prefix, a u32 counter, a flag byte."""
    return prefix + _NONCE_TAIL.pack(counter, flag)


def record_length(index: int, prefix: bytes, chunk_size: int) -> int:
    """The ciphertext length a record's 4-byte ``prefix`` announces, checked."""
    (n,) = RECORD_LEN.unpack(prefix)
    # Never allocate on an unchecked length: no valid record is outside these bounds.
    longest = _BODY_HEAD.size + (chunk_size // PAGE_SIZE + 7) // 8 + chunk_size + TAG_SIZE
    if not _BODY_HEAD.size + TAG_SIZE <= n <= longest:
        raise TamperedChunk(index, f"has an impossible record length {n}")
    return n


class ChunkCipher:
    """One image's chunk AEAD: STREAM nonces, the image header as associated data.

    ``zstd``: the header allows compressed chunks (the writer then compresses
    where it pays; a reader refuses a compressed chunk otherwise).
    """

    def __init__(self, aead, *, header: bytes, nonce_prefix: bytes, chunk_size: int,
                 zstd: bool):
        self.aead = aead
        self.header = header
        self.nonce_prefix = nonce_prefix
        self.chunk_size = chunk_size
        self.zstd = zstd
        self.dctx = zstandard.ZstdDecompressor()
        self._cctx = None  # made on the first seal: readers never need one

    def nonce(self, index: int, final: bool) -> bytes:
        return stream_nonce(self.nonce_prefix, index, 1 if final else 0)

    def seal(self, index: int, chunk, final: bool) -> tuple[bytearray, int]:
        """Chunk ``index``'s plaintext -> (record, zero pages)."""
        # The final chunk needs its own counter value, so a non-final chunk may
        # not take the last one.
        if index >= MAX_CHUNKS - (0 if final else 1):
            raise OverflowError("image too large: chunk counter exhausted")
        if self.zstd and self._cctx is None:
            self._cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        body, zero_pages = _encode_body(chunk, self._cctx)
        record = bytearray(RECORD_LEN.size + len(body) + TAG_SIZE)
        RECORD_LEN.pack_into(record, 0, len(body) + TAG_SIZE)
        # Sealed straight into the record after its length: no concatenation.
        self.aead.encrypt_into(self.nonce(index, final), body, self.header,
                               memoryview(record)[RECORD_LEN.size:])
        return record, zero_pages

    def open(self, index: int, ct, final: bool) -> tuple[bytes, int]:
        """Authenticate and decode chunk ``index``; ``final``: nothing follows it."""
        if index >= MAX_CHUNKS:
            raise TrailingData(f"more than {MAX_CHUNKS} chunks")
        try:
            body = self.aead.decrypt(self.nonce(index, final), ct, self.header)
        except InvalidTag:
            raise self._diagnose(index, ct, final) from None
        return _decode_body(body, index, final, self.chunk_size, self.zstd, self.dctx)

    def _diagnose(self, index: int, ct, final: bool) -> FormatError:
        # Authentic with the other last-flag: the stream was cut right after a
        # non-final chunk, or goes on after the final one. Its plaintext is not
        # released either way.
        try:
            self.aead.decrypt(self.nonce(index, not final), ct, self.header)
        except InvalidTag:
            return TamperedChunk(index)
        if final:
            return TruncatedImage(f"image ends after chunk {index}, which is not the final "
                                  "chunk (truncated at a record boundary)")
        return TrailingData(f"data follows the final chunk {index}")


# --- chunk bodies ----------------------------------------------------------------------------

def _encode_body(chunk, cctx) -> tuple[bytes | bytearray, int]:
    """Chunk plaintext -> (body, zero pages): flags, length, zero-page bitmap, page data."""
    n = len(chunk)
    full, tail = divmod(n, PAGE_SIZE)
    data = np.frombuffer(chunk, np.uint8)
    pages = data[:full * PAGE_SIZE].reshape(full, PAGE_SIZE)
    # A page's largest u64 is 0 only if the page is all zero: numpy's max is
    # vectorised, ~25 % faster than any() here, and u64 lanes ~2x faster than bytes.
    keep = pages.view(np.uint64).max(axis=1, initial=0) != 0
    if tail:
        keep = np.append(keep, data[full * PAGE_SIZE:].any())
    zero_pages = len(keep) - int(np.count_nonzero(keep))
    bitmap = np.packbits(~keep).tobytes()
    head = _BODY_HEAD.size + len(bitmap)
    keep_full = keep[:full]
    kept = int(np.count_nonzero(keep_full))
    tail_len = tail if tail and keep[-1] else 0
    body = bytearray(head + kept * PAGE_SIZE + tail_len)
    _BODY_HEAD.pack_into(body, 0, 0, n)
    body[_BODY_HEAD.size:head] = bitmap
    if zero_pages == 0:
        body[head:] = chunk
    elif kept or tail_len:
        out = np.frombuffer(body, np.uint8)
        # Gather the non-zero pages straight into the body: no intermediate copy.
        np.compress(keep_full, pages, axis=0,
                    out=out[head:head + kept * PAGE_SIZE].reshape(kept, PAGE_SIZE))
        if tail_len:
            out[head + kept * PAGE_SIZE:] = data[full * PAGE_SIZE:]
        del out
    if cctx is not None and len(body) > head:
        packed = cctx.compress(memoryview(body)[head:])
        if len(packed) < len(body) - head:
            body = b"".join((_BODY_HEAD.pack(CHUNK_ZSTD, n), bitmap, packed))
    return body, zero_pages


def _decode_body(body: bytes, index: int, final: bool, chunk_size: int, zstd: bool,
                 dctx) -> tuple[bytes, int]:
    """Authenticated body -> (plaintext, zero pages). Checks bind a buggy writer too."""
    def bad(reason):
        return TamperedChunk(index, f"is malformed: {reason}")

    if len(body) < _BODY_HEAD.size:
        raise bad("short body")
    flags, n = _BODY_HEAD.unpack_from(body)
    if flags & ~CHUNK_ZSTD or (flags & CHUNK_ZSTD and not zstd):
        raise bad(f"unexpected flags {flags:#04x}")
    if n > chunk_size or (not final and n != chunk_size):
        raise bad(f"plaintext length {n}")
    full, tail = divmod(n, PAGE_SIZE)
    npages = full + (1 if tail else 0)
    head = _BODY_HEAD.size + (npages + 7) // 8
    if len(body) < head:
        raise bad("short bitmap")
    bits = np.unpackbits(np.frombuffer(body, np.uint8, head - _BODY_HEAD.size, _BODY_HEAD.size))
    if bits[npages:].any():
        raise bad("bitmap padding bits set")
    keep = bits[:npages] == 0
    kept = int(np.count_nonzero(keep[:full]))
    tail_len = tail if tail and keep[-1] else 0
    expected = kept * PAGE_SIZE + tail_len
    data = memoryview(body)[head:]
    if flags & CHUNK_ZSTD:
        data = _decompress(dctx, data, expected, bad)
    if len(data) != expected:
        raise bad(f"{len(data)} bytes of page data, expected {expected}")
    zero_pages = npages - kept - (1 if tail_len else 0)
    if zero_pages == 0:
        return bytes(data), 0
    if expected == 0:
        return bytes(n), zero_pages
    return b"".join(_page_runs(keep, full, tail, memoryview(data))), zero_pages


def _page_runs(keep, full: int, tail: int, data: memoryview) -> list:
    """The plaintext as pieces: runs of kept pages from ``data``, runs of zero pages.

    ``bytes.join`` of these builds the chunk in one pass, without a zero-filled
    buffer or a second copy.
    """
    zeros = _zeros(full * PAGE_SIZE + tail)
    pieces, pos = [], 0
    if full:
        flags = keep[:full]
        edges = (np.flatnonzero(flags[1:] != flags[:-1]) + 1).tolist()
        for start, end, kept in zip([0, *edges], [*edges, full], flags[[0, *edges]].tolist(),
                                    strict=True):
            length = (end - start) * PAGE_SIZE
            if kept:
                pieces.append(data[pos:pos + length])
                pos += length
            else:
                pieces.append(zeros[:length])
    if tail:
        pieces.append(data[pos:pos + tail] if keep[-1] else zeros[:tail])
    return pieces


_zero_block = memoryview(b"")
_zero_lock = threading.Lock()


def _zeros(n: int) -> memoryview:
    """At least ``n`` zero bytes, shared (read-only), grown to the largest chunk seen."""
    global _zero_block
    with _zero_lock:
        if len(_zero_block) < n:
            _zero_block = memoryview(bytes(n))
        return _zero_block


def _decompress(dctx, data, expected: int, bad):
    # The writer always records the content size; checking it first means a
    # bogus frame can never make us allocate more than one chunk.
    try:
        if zstandard.frame_content_size(data) != expected:
            raise bad("zstd frame size differs from the bitmap")
        return dctx.decompress(data)
    except zstandard.ZstdError as exc:
        raise bad(f"zstd: {exc}") from None
