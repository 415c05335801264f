"""The vault's image format, a chunked streaming AEAD. Byte-level spec: docs/vault-format.md.

A 64-byte header, then length-prefixed chunk records, each sealed with the image's
data key (DEK) under a STREAM nonce (prefix, counter, last flag) with the header as
associated data. The DEK is wrapped by a versioned master key in a separate envelope.
This module has the header, the envelope and whole images (encoder, writer, reader,
decoder); one chunk's record (body, zero-page bitmap, zstd, seal) is ``vault.chunks``,
whose errors (and the constants both share) are importable from here too.
Django-free on purpose: the host agent and tools use it without the portal.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from vault.chunks import (
    HEADER_TAG_FLAG,
    MAX_CHUNKS,
    PAGE_SIZE,
    RECORD_LEN,
    TAG_SIZE,
    ChunkCipher,
    FormatError,
    TrailingData,
    TruncatedImage,
    record_length,
    stream_nonce,
)

# Part of this module's interface too ("as" marks the re-export): callers catch
# vault.format's errors without knowing which module raises them.
from vault.chunks import TamperedChunk as TamperedChunk

FORMAT_VERSION = 1
ENVELOPE_VERSION = 1
MAGIC = b"BERTHIMG"
ENVELOPE_MAGIC = b"BERTHKEY"
ALG_AES_256_GCM = 1
ALG_CHACHA20_POLY1305 = 2
ALGORITHMS = {ALG_AES_256_GCM: AESGCM, ALG_CHACHA20_POLY1305: ChaCha20Poly1305}
FLAG_ZSTD = 0x0001  # header flags bit 0: chunks may be zstd-compressed

KEY_SIZE = 32
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = 64
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1 << 20  # smaller chunks only with allow_small_chunks=True (tests)
MAX_CHUNK_SIZE = 64 << 20  # bounds what a reader ever allocates for one record

# magic, version, algorithm, flags, image id, chunk size, nonce prefix; then reserved, tag
_HEADER = struct.Struct(">8sBBH16sI7s")
_HEADER_TAG_AT = 48
_RESERVED = bytes(_HEADER_TAG_AT - _HEADER.size)
# magic, version, key version, image id; then nonce and wrapped key
_ENVELOPE = struct.Struct(">8sBI16s")
ENVELOPE_SIZE = _ENVELOPE.size + 12 + KEY_SIZE + TAG_SIZE


class BadHeader(FormatError):
    """The image header is malformed, or does not authenticate under the data key."""


class BadEnvelope(FormatError):
    """The key envelope is malformed."""


class EnvelopeMismatch(BadEnvelope):
    """The key envelope belongs to another image."""


class WrongKey(FormatError):
    """The master key does not unwrap the envelope (wrong key, or envelope/header altered)."""


@dataclass(frozen=True)
class Header:
    """The parsed fields of an image header; ``raw`` is the 64 bytes themselves."""

    algorithm: int
    flags: int
    image_id: uuid.UUID
    chunk_size: int
    nonce_prefix: bytes
    raw: bytes


@dataclass(frozen=True)
class ImageStats:
    plaintext_size: int
    stored_size: int  # header and all records: the size of the data file
    sha256: str  # hex digest of the plaintext
    zero_pages: int
    chunks: int


def generate_data_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _uuid_bytes(image_id) -> bytes:
    if isinstance(image_id, uuid.UUID):
        return image_id.bytes
    if isinstance(image_id, bytes | bytearray) and len(image_id) == 16:
        return bytes(image_id)
    return uuid.UUID(str(image_id)).bytes


def _check_key(key: bytes, what: str) -> None:
    # AESGCM would also take 16/24-byte keys; the format promises 256-bit keys.
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes")


def _check_chunk_size(chunk_size: int, *, allow_small: bool) -> None:
    low = PAGE_SIZE if allow_small else MIN_CHUNK_SIZE
    if not (isinstance(chunk_size, int) and low <= chunk_size <= MAX_CHUNK_SIZE
            and chunk_size % PAGE_SIZE == 0):
        hint = "" if allow_small else " (smaller only with allow_small_chunks=True, for tests)"
        raise ValueError(f"chunk_size must be a multiple of {PAGE_SIZE} between {low} "
                         f"and {MAX_CHUNK_SIZE}{hint}")


def _header_tag_nonce(prefix: bytes) -> bytes:
    return stream_nonce(prefix, 0, HEADER_TAG_FLAG)


# --- header ----------------------------------------------------------------------------------

def parse_header(raw: bytes) -> Header:
    """Check a header's structure (not its tag: that needs the data key) and parse it."""
    raw = bytes(raw)
    if len(raw) != HEADER_SIZE:
        raise BadHeader(f"header must be {HEADER_SIZE} bytes, got {len(raw)}")
    magic, version, alg, flags, image_id, chunk_size, prefix = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise BadHeader("not a Berth image (bad magic)")
    if version != FORMAT_VERSION:
        raise BadHeader(f"unsupported format version {version}")
    if alg not in ALGORITHMS:
        raise BadHeader(f"unknown algorithm {alg}")
    if flags & ~FLAG_ZSTD:
        raise BadHeader(f"unknown header flags {flags:#06x}")
    if raw[_HEADER.size:_HEADER_TAG_AT] != _RESERVED:
        raise BadHeader("reserved header bytes are not zero")
    try:
        _check_chunk_size(chunk_size, allow_small=True)
    except ValueError:
        raise BadHeader(f"invalid chunk size {chunk_size}") from None
    return Header(alg, flags, uuid.UUID(bytes=image_id), chunk_size, prefix, raw)


def read_header(f: BinaryIO) -> bytes:
    """Read and structurally check the header at the file's current position."""
    raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise TruncatedImage(f"image ends inside its header ({len(raw)} bytes)")
    parse_header(raw)
    return raw


def _build_header(aead, algorithm: int, flags: int, image_id: bytes, chunk_size: int,
                  prefix: bytes) -> bytes:
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, algorithm, flags, image_id, chunk_size,
                          prefix) + _RESERVED
    # The tag lets a reader holding the DEK reject a swapped or altered header up
    # front, instead of reporting it as a bad chunk 0.
    return fields + aead.encrypt(_header_tag_nonce(prefix), b"", fields)


# --- key envelope ----------------------------------------------------------------------------

def _envelope_aad(prefix: bytes, header: bytes) -> bytes:
    return prefix + hashlib.sha256(header).digest()


def _parse_envelope(envelope: bytes) -> tuple[int, bytes]:
    envelope = bytes(envelope)
    if len(envelope) != ENVELOPE_SIZE:
        raise BadEnvelope(f"key envelope must be {ENVELOPE_SIZE} bytes, got {len(envelope)}")
    magic, version, key_version, image_id = _ENVELOPE.unpack_from(envelope)
    if magic != ENVELOPE_MAGIC:
        raise BadEnvelope("not a Berth key envelope (bad magic)")
    if version != ENVELOPE_VERSION:
        raise BadEnvelope(f"unsupported key envelope version {version}")
    return key_version, image_id


def wrap_data_key(kek: bytes, key_version: int, dek: bytes, header: bytes, *,
                  _test_random: Callable[[int], bytes] | None = None) -> bytes:
    """The key envelope: ``dek`` wrapped by master key ``kek`` and bound to ``header``.

    ``_test_random`` replaces os.urandom for the published test vectors only; a
    repeated nonce under one master key would be catastrophic.
    """
    _check_key(kek, "master key")
    _check_key(dek, "data key")
    if not 0 <= key_version < 1 << 32:
        raise ValueError("key version must fit in a u32")
    info = parse_header(header)
    nonce = (_test_random or os.urandom)(12)
    prefix = _ENVELOPE.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, key_version, info.image_id.bytes)
    return prefix + nonce + AESGCM(bytes(kek)).encrypt(nonce, bytes(dek),
                                                       _envelope_aad(prefix, info.raw))


def unwrap_data_key(kek_lookup: Callable[[int], bytes], envelope: bytes, header: bytes) -> bytes:
    """The data key from ``envelope``, using ``kek_lookup(key_version)`` for the master key.

    Exceptions of ``kek_lookup`` (an unknown key version) propagate unchanged.
    """
    key_version, image_id = _parse_envelope(envelope)
    info = parse_header(header)
    if image_id != info.image_id.bytes:
        raise EnvelopeMismatch(f"key envelope is for image {uuid.UUID(bytes=image_id)}, "
                               f"not {info.image_id}")
    kek = kek_lookup(key_version)
    if not isinstance(kek, bytes | bytearray) or len(kek) != KEY_SIZE:
        raise WrongKey(f"master key version {key_version} is not a {KEY_SIZE}-byte key")
    prefix, nonce = envelope[:_ENVELOPE.size], envelope[_ENVELOPE.size:_ENVELOPE.size + 12]
    try:
        return AESGCM(bytes(kek)).decrypt(bytes(nonce), bytes(envelope[_ENVELOPE.size + 12:]),
                                          _envelope_aad(bytes(prefix), info.raw))
    except InvalidTag:
        raise WrongKey(f"cannot unwrap the data key with master key version {key_version}: "
                       "wrong master key, or the envelope or image header was altered") from None


def envelope_key_version(envelope: bytes) -> int:
    """The master key version an envelope is wrapped with (no key needed)."""
    return _parse_envelope(envelope)[0]


# --- the chunk cipher -----------------------------------------------------------------------

def _chunk_cipher(info: Header, dek: bytes) -> ChunkCipher:
    _check_key(dek, "data key")
    return ChunkCipher(ALGORITHMS[info.algorithm](bytes(dek)), header=info.raw,
                       nonce_prefix=info.nonce_prefix, chunk_size=info.chunk_size,
                       zstd=bool(info.flags & FLAG_ZSTD))


def _reading_cipher(info: Header, dek: bytes) -> ChunkCipher:
    """The chunk cipher, once the header's tag proves the header and the data key."""
    cipher = _chunk_cipher(info, dek)
    try:
        cipher.aead.decrypt(_header_tag_nonce(info.nonce_prefix), info.raw[_HEADER_TAG_AT:],
                            info.raw[:_HEADER_TAG_AT])
    except InvalidTag:
        raise BadHeader("header does not authenticate under this data key (altered, "
                        "swapped from another image, or wrong data key)") from None
    return cipher


class _Digest:
    """Running plaintext statistics shared by writers and readers."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.plaintext = self.zero_pages = self.chunks = 0
        self.stored = HEADER_SIZE

    def add(self, plain, stored: int, zero_pages: int) -> None:
        self.sha.update(plain)
        self.count(len(plain), stored, zero_pages)

    def count(self, plain_size: int, stored: int, zero_pages: int) -> None:
        """Everything but the hash (which the caller feeds to ``sha`` itself)."""
        self.plaintext += plain_size
        self.stored += stored
        self.zero_pages += zero_pages
        self.chunks += 1

    def stats(self) -> ImageStats:
        return ImageStats(self.plaintext, self.stored, self.sha.hexdigest(), self.zero_pages,
                          self.chunks)


# SHA-256 is the one step of the encoder that cannot be split (~1.4 GB/s on one
# core); hashlib releases the GIL, so hashing a fed piece on another thread
# while its chunks are sealed here runs both at once on two cores.
PARALLEL_HASH_BYTES = 256 * 1024  # below this a thread hop costs more than it saves
_hash_pool: ThreadPoolExecutor | None = None
_hash_pool_lock = threading.Lock()


def _hasher() -> ThreadPoolExecutor:
    global _hash_pool
    with _hash_pool_lock:
        if _hash_pool is None:
            _hash_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2,
                                            thread_name_prefix="berth-sha256")
        return _hash_pool


# --- writing ---------------------------------------------------------------------------------

class ChunkEncoder:
    """Push-style encoder: plaintext pieces in, records (bytes to store or send) out.

    ``header`` must be stored/sent first; ``feed`` and ``finish`` return only
    records. Memory: one chunk of buffered plaintext plus the record being built.
    ``_test_random`` replaces os.urandom for the published test vectors only.
    """

    def __init__(self, dek: bytes, image_id, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 algorithm: int = ALG_AES_256_GCM, compress: bool = True,
                 allow_small_chunks: bool = False,
                 _test_random: Callable[[int], bytes] | None = None):
        _check_key(dek, "data key")
        _check_chunk_size(chunk_size, allow_small=allow_small_chunks)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm}")
        prefix = (_test_random or os.urandom)(NONCE_PREFIX_SIZE)
        aead = ALGORITHMS[algorithm](bytes(dek))
        self.header = _build_header(aead, algorithm, FLAG_ZSTD if compress else 0,
                                    _uuid_bytes(image_id), chunk_size, prefix)
        self._cipher = _chunk_cipher(parse_header(self.header), dek)
        self._buf = bytearray(chunk_size)
        self._fill = 0
        self._index = 0
        self._digest = _Digest()
        self.chunk_size = chunk_size
        self.stats: ImageStats | None = None  # set by finish()

    def feed(self, data) -> list[bytearray]:
        """Hash and buffer ``data``; return the records of every chunk it completed.

        ``data`` is only read, and not after ``feed`` returns. Chunk-aligned
        pieces are sealed straight from the caller's buffer, without a copy.
        Large pieces are hashed on another thread while they are sealed here.
        """
        view = memoryview(data).cast("B")
        if len(view) < PARALLEL_HASH_BYTES:
            self.hash(view)
            return self.seal(view)
        hashing = _hasher().submit(self.hash, view)
        try:
            return self.seal(view)
        finally:
            hashing.result()  # even on error: the caller may reuse its buffer after we return

    def hash(self, data) -> None:
        """Add ``data`` to the plaintext digest only.

        For callers that run the two halves of ``feed`` on threads of their own:
        ``hash`` and ``seal`` may run at the same time, each given the same pieces
        in stream order; ``finish`` comes after both have seen every piece.
        """
        self._require_open()
        self._digest.sha.update(data)

    def seal(self, data) -> list[bytearray]:
        """Buffer ``data`` without hashing it; return the records of completed chunks."""
        self._require_open()
        view = memoryview(data).cast("B")
        size, records = self.chunk_size, []
        if self._fill:
            take = min(size - self._fill, len(view))
            self._buf[self._fill:self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == size:
                records.append(self._seal(memoryview(self._buf), final=False))
                self._fill = 0
        whole = len(view) // size * size
        records += [self._seal(view[start:start + size], final=False)
                    for start in range(0, whole, size)]
        if whole < len(view):
            self._buf[:len(view) - whole] = view[whole:]
            self._fill = len(view) - whole
        return records

    def finish(self) -> list[bytearray]:
        """Seal the final chunk (0 .. chunk_size-1 bytes) and set ``stats``."""
        self._require_open()
        record = self._seal(memoryview(self._buf)[:self._fill], final=True)
        self._buf = bytearray()
        self.stats = self._digest.stats()
        return [record]

    def _require_open(self) -> None:
        if self.stats is not None:
            raise ValueError("encoder already finished")

    def _seal(self, chunk, final: bool) -> bytearray:
        record, zero_pages = self._cipher.seal(self._index, chunk, final)
        self._index += 1
        self._digest.count(len(chunk), len(record), zero_pages)
        return record


class ImageWriter:
    """Writes a whole image (header, then records) to a binary file object.

    Used as a context manager, an exception inside the block leaves the image
    without its final chunk, so it can never be read as complete.
    """

    def __init__(self, out: BinaryIO, dek: bytes, image_id, **options):
        self._out = out
        self._encoder = ChunkEncoder(dek, image_id, **options)
        self.header = self._encoder.header
        out.write(self.header)

    def write(self, data) -> None:
        for record in self._encoder.feed(data):
            self._out.write(record)

    def close(self) -> ImageStats:
        if self._encoder.stats is None:
            for record in self._encoder.finish():
                self._out.write(record)
        return self._encoder.stats

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


# --- reading ---------------------------------------------------------------------------------

class ImageReader:
    """Reads an image from a seekable binary file positioned at its header.

    Every chunk is authenticated before any of its plaintext is returned. Each
    read seeks first, so the generators may be interleaved.
    """

    def __init__(self, f: BinaryIO, dek: bytes):
        self._f, self._base = f, f.tell()
        self.header = read_header(f)
        self.info = parse_header(self.header)
        self._cipher = _reading_cipher(self.info, dek)
        self._offsets: list[int] | None = None
        self._size = 0

    def _read_at(self, pos: int, n: int) -> bytes:
        self._f.seek(pos)
        return self._f.read(n)

    def _record_at(self, pos: int, index: int) -> bytes:
        prefix = self._read_at(pos, RECORD_LEN.size)
        if len(prefix) < RECORD_LEN.size:
            raise TruncatedImage(f"image ends before chunk {index}")
        n = record_length(index, prefix, self.info.chunk_size)
        ct = self._read_at(pos + RECORD_LEN.size, n)
        if len(ct) < n:
            raise TruncatedImage(f"image ends inside chunk {index}")
        return ct

    def _opened(self) -> Iterator[tuple[bytes, int, int]]:
        """(plaintext, stored bytes, zero pages) per chunk, in order, authenticated."""
        pos = self._base + HEADER_SIZE
        for index in range(MAX_CHUNKS + 1):
            ct = self._record_at(pos, index)
            pos += RECORD_LEN.size + len(ct)
            # Whether anything follows decides which last-flag the chunk must carry.
            last = not self._read_at(pos, 1)
            plain, zero_pages = self._cipher.open(index, ct, last)
            yield plain, RECORD_LEN.size + len(ct), zero_pages
            if last:
                return

    def iter_chunks(self) -> Iterator[bytes]:
        """Each chunk's plaintext in order, each authenticated before it is yielded."""
        for plain, _, _ in self._opened():
            yield plain

    def verify(self) -> ImageStats:
        """Authenticate the whole image without keeping plaintext."""
        digest = _Digest()
        for plain, stored, zero_pages in self._opened():
            digest.add(plain, stored, zero_pages)
        return digest.stats()

    def _index(self) -> list[int]:
        """Record offsets from the length prefixes alone, then the final chunk proven."""
        if self._offsets is None:
            end = self._f.seek(0, os.SEEK_END)
            pos, offsets = self._base + HEADER_SIZE, []
            while not offsets or pos < end:
                if len(offsets) >= MAX_CHUNKS:
                    raise TrailingData(f"more than {MAX_CHUNKS} chunks")
                offsets.append(pos)
                prefix = self._read_at(pos, RECORD_LEN.size)
                if len(prefix) < RECORD_LEN.size:
                    raise TruncatedImage(f"image ends before chunk {len(offsets) - 1}")
                pos += RECORD_LEN.size + record_length(len(offsets) - 1, prefix,
                                                  self.info.chunk_size)
            if pos > end:
                raise TruncatedImage(f"image ends inside chunk {len(offsets) - 1}")
            # Lengths are not authenticated, the final chunk is: if it opens as the
            # final chunk at this index, the image has exactly this many chunks.
            last = self._open_at(offsets, len(offsets) - 1)
            self._size = (len(offsets) - 1) * self.info.chunk_size + len(last)
            self._offsets = offsets
        return self._offsets

    def _open_at(self, offsets: list[int], index: int) -> bytes:
        ct = self._record_at(offsets[index], index)
        return self._cipher.open(index, ct, index == len(offsets) - 1)[0]

    @property
    def chunk_count(self) -> int:
        return len(self._index())

    @property
    def plaintext_size(self) -> int:
        self._index()
        return self._size

    def read_chunk(self, index: int) -> bytes:
        """Chunk ``index``'s plaintext, authenticated, without reading the others."""
        offsets = self._index()
        if not 0 <= index < len(offsets):
            raise IndexError(f"chunk {index} out of range 0..{len(offsets) - 1}")
        return self._open_at(offsets, index)

    def iter_range(self, start: int, end: int) -> Iterator[bytes]:
        """Verified plaintext of bytes [start, end), decrypting only the chunks it spans."""
        size, chunk_size = self.plaintext_size, self.info.chunk_size
        if not 0 <= start <= end <= size:
            raise ValueError(f"range {start}..{end} outside 0..{size}")
        index = start // chunk_size
        while start < end:
            plain = self.read_chunk(index)
            lo, hi = start - index * chunk_size, min(end - index * chunk_size, len(plain))
            yield plain if lo == 0 and hi == len(plain) else plain[lo:hi]
            start, index = index * chunk_size + hi, index + 1

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ChunkDecoder:
    """Push-style decoder for a stream (header first, unless ``header`` is given).

    ``feed`` returns the plaintext of each chunk authenticated so far (a call that
    raises returns nothing). A complete record is held back until more bytes or
    ``finish()`` tell whether it is the final one, so memory stays near two
    chunks plus the piece fed. After an error the decoder refuses all input.
    """

    def __init__(self, dek: bytes, *, header: bytes | None = None):
        self._dek = bytes(dek)
        _check_key(self._dek, "data key")
        self._cipher: ChunkCipher | None = None
        self._buf = bytearray()
        self._pending: bytes | None = None
        self._index = 0
        self._digest = _Digest()
        self._failed: FormatError | None = None
        self.stats: ImageStats | None = None  # set by finish()
        if header is not None:
            self._start(bytes(header))

    @property
    def header(self) -> bytes | None:
        return self._cipher.header if self._cipher else None

    def _start(self, raw: bytes) -> None:
        self._cipher = _reading_cipher(parse_header(raw), self._dek)

    def feed(self, data) -> list[bytes]:
        if self.stats is not None and len(data):
            raise TrailingData("data after the end of the image")
        return self._guard(self._feed, data)

    def finish(self) -> list[bytes]:
        """Open the held-back record as the final chunk; the stream must end there."""
        return [] if self.stats is not None else self._guard(self._finish)

    def _guard(self, step, *args) -> list[bytes]:
        if self._failed is not None:
            raise FormatError(f"decoder already failed: {self._failed}")
        try:
            return step(*args)
        except FormatError as exc:
            self._failed = exc
            raise

    def _feed(self, data) -> list[bytes]:
        self._buf += data
        if self._cipher is None:
            if len(self._buf) < HEADER_SIZE:
                return []
            self._start(bytes(self._buf[:HEADER_SIZE]))
            del self._buf[:HEADER_SIZE]
        out = []
        while True:
            if self._pending is not None and self._buf:
                out.append(self._open(final=False))  # more bytes follow it: not final
            if len(self._buf) < RECORD_LEN.size:
                return out
            n = record_length(self._index, bytes(self._buf[:RECORD_LEN.size]),
                               self._cipher.chunk_size)
            if len(self._buf) < RECORD_LEN.size + n:
                return out
            self._pending = bytes(self._buf[RECORD_LEN.size:RECORD_LEN.size + n])
            del self._buf[:RECORD_LEN.size + n]

    def _finish(self) -> list[bytes]:
        if self._cipher is None or self._buf or self._pending is None:
            raise TruncatedImage(f"stream ended before the final chunk ({self._index} "
                                 "chunks authenticated)")
        out = [self._open(final=True)]
        self.stats = self._digest.stats()
        return out

    def _open(self, final: bool) -> bytes:
        ct, self._pending = self._pending, None
        plain, zero_pages = self._cipher.open(self._index, ct, final)
        self._index += 1
        self._digest.add(plain, RECORD_LEN.size + len(ct), zero_pages)
        return plain
