"""vault.format: round trips, tamper detection, random access, space, test vectors.

One record's body and seal on their own (vault.chunks): tests/vault/test_chunks.py.
The module under test is Django-free and so is this file; it runs under the
project's pytest setup, or alone with
``pytest --noconftest -p no:django tests/vault/test_format.py``.
"""
import hashlib
import io
import json
import os
import random
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vault import make_vectors
from vault import format as vf

PAGE = 4096
CS = 8192  # small chunks keep the tests fast
DEK = bytes(range(32))
KEK = bytes(range(100, 132))
VECTORS = Path(__file__).resolve().parent / "vectors"
# The vault conftest has an autouse function-scoped fixture this file does not use.
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
TEXT = b"GET /index.html HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"


def memory_like(size: int, seed: int = 1, unit: int = PAGE) -> bytes:
    """Bytes shaped like guest memory: runs of zeros, text and random bytes."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < size:
        n, kind = rng.randint(1, 2 * unit), rng.random()
        if kind < 0.6:
            parts.append(bytes(n))
        elif kind < 0.85:
            parts.append((TEXT * (n // len(TEXT) + 1))[:n])
        else:
            parts.append(rng.randbytes(n))
        total += n
    return b"".join(parts)[:size]


def paged(size: int, seed: int = 1, zero: float = 0.6) -> bytes:
    """Whole pages: ``zero`` of them all-zero, then text (25%) and random (15%)."""
    rng = random.Random(seed)
    text = (TEXT * 80)[:PAGE]
    pages = [bytes(PAGE) if (k := rng.random()) < zero else
             text if k < zero + (1 - zero) * 0.625 else rng.randbytes(PAGE)
             for _ in range(size // PAGE)]
    return b"".join(pages)


def encode(data, *, chunk_size=CS, algorithm=vf.ALG_AES_256_GCM, compress=True, dek=DEK,
           image_id=None, piece=None, prefix=None):
    """(whole image bytes, stats) for ``data``, fed in pieces of ``piece`` bytes."""
    random_source = (lambda n: prefix) if prefix else None
    encoder = vf.ChunkEncoder(dek, image_id or uuid.uuid4(), chunk_size=chunk_size,
                              algorithm=algorithm, compress=compress, allow_small_chunks=True,
                              _test_random=random_source)
    out = [encoder.header]
    piece = piece or max(len(data), 1)
    for start in range(0, len(data), piece):
        out += encoder.feed(data[start:start + piece])
    out += encoder.finish()
    return b"".join(out), encoder.stats


def split(raw: bytes) -> tuple[bytes, list[bytes]]:
    """(header, [record]) using the length prefixes, as an attacker would."""
    header, pos, records = raw[:vf.HEADER_SIZE], vf.HEADER_SIZE, []
    while pos < len(raw):
        (n,) = struct.unpack_from(">I", raw, pos)
        records.append(raw[pos:pos + 4 + n])
        pos += 4 + n
    return header, records


def read_all(raw: bytes, dek=DEK):
    """(chunks yielded, exception or None) for the sequential reader."""
    got = []
    try:
        for chunk in vf.ImageReader(io.BytesIO(raw), dek).iter_chunks():
            got.append(chunk)
    except vf.FormatError as exc:
        return got, exc
    return got, None


def decode_stream(raw: bytes, piece: int, dek=DEK):
    """(chunks released, exception or None) for the push decoder fed ``piece`` bytes."""
    decoder, got = vf.ChunkDecoder(dek), []
    try:
        for start in range(0, len(raw), piece):
            got += decoder.feed(raw[start:start + piece])
        got += decoder.finish()
    except vf.FormatError as exc:
        return got, exc
    return got, None


def chunks_of(data: bytes, chunk_size=CS) -> list[bytes]:
    return [data[i:i + chunk_size] for i in range(0, len(data) // chunk_size * chunk_size,
                                                   chunk_size)] + [
        data[len(data) // chunk_size * chunk_size:]]


# --- round trips -----------------------------------------------------------------------------

BOUNDARY_SIZES = sorted({max(0, k * m + d) for k in range(4) for m in (PAGE, CS, 2 * CS)
                         for d in (-1, 0, 1)})


@st.composite
def images(draw):
    size = draw(st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(0, 5 * CS)))
    unit = draw(st.sampled_from([100, 1000, PAGE, 3 * PAGE]))
    return memory_like(size, draw(st.integers(0, 2**32 - 1)), unit)


@FAST
@given(data=images(), chunk_size=st.sampled_from([PAGE, CS, 2 * CS]),
       algorithm=st.sampled_from([vf.ALG_AES_256_GCM, vf.ALG_CHACHA20_POLY1305]),
       compress=st.booleans(), piece=st.integers(1, 3 * CS))
def test_round_trip_returns_every_byte(data, chunk_size, algorithm, compress, piece):
    raw, stats = encode(data, chunk_size=chunk_size, algorithm=algorithm, compress=compress,
                        piece=piece)
    got, exc = read_all(raw)
    assert exc is None and got == chunks_of(data, chunk_size)
    streamed, exc = decode_stream(raw, piece)
    assert exc is None and b"".join(streamed) == data
    assert stats.plaintext_size == len(data) and stats.stored_size == len(raw)
    assert stats.sha256 == hashlib.sha256(data).hexdigest()
    assert stats.chunks == len(data) // chunk_size + 1
    assert vf.ImageReader(io.BytesIO(raw), DEK).verify() == stats


@FAST
@given(data=images(), pieces=st.lists(st.integers(1, 3 * CS), min_size=1, max_size=8))
def test_output_does_not_depend_on_how_the_input_is_split(data, pieces):
    prefix = b"\x07" * 7
    whole, _ = encode(data, prefix=prefix, image_id=uuid.UUID(int=1))
    encoder = vf.ChunkEncoder(DEK, uuid.UUID(int=1), chunk_size=CS, allow_small_chunks=True,
                              _test_random=lambda n: prefix)
    out, pos = [encoder.header], 0
    for i in range(len(data)):
        size = pieces[i % len(pieces)]
        if pos >= len(data):
            break
        out += encoder.feed(memoryview(data)[pos:pos + size])
        pos += size
    assert b"".join(out + encoder.finish()) == whole


@pytest.mark.parametrize("pieces", [[CS], [3 * CS], [CS + 1, 5 * CS - 7], [100, 4 * CS]])
def test_hashing_on_another_thread_gives_the_same_image_and_digest(monkeypatch, pieces):
    data = paged(40 * CS) + memory_like(CS + 333, unit=100)
    prefix = b"\x07" * 7
    whole, _ = encode(data, prefix=prefix, image_id=uuid.UUID(int=1))
    monkeypatch.setattr(vf, "PARALLEL_HASH_BYTES", 0)  # every feed hashes on the pool
    encoder = vf.ChunkEncoder(DEK, uuid.UUID(int=1), chunk_size=CS, allow_small_chunks=True,
                              _test_random=lambda n: prefix)
    out, pos, i = [encoder.header], 0, 0
    while pos < len(data):
        size = pieces[i % len(pieces)]
        buffer = bytearray(data[pos:pos + size])
        out += encoder.feed(buffer)
        buffer[:] = bytes(len(buffer))  # the caller reuses its buffer once feed returns
        pos, i = pos + size, i + 1
    assert b"".join(out + encoder.finish()) == whole
    assert encoder.stats.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("pieces", [[CS], [3 * CS], [CS + 1, 5 * CS - 7], [100, 4 * CS]])
def test_sealing_and_hashing_on_threads_of_their_own_give_the_same_image_and_digest(pieces):
    """The upload's two lanes: ``seal`` on one thread and ``hash`` on another, each
    in stream order, the hash lagging behind, equal ``feed`` byte for byte."""
    data = paged(40 * CS) + memory_like(CS + 333, unit=100)
    prefix = b"\x07" * 7
    whole, _ = encode(data, prefix=prefix, image_id=uuid.UUID(int=1))
    encoder = vf.ChunkEncoder(DEK, uuid.UUID(int=1), chunk_size=CS, allow_small_chunks=True,
                              _test_random=lambda n: prefix)
    out, pos, i, hashing = [encoder.header], 0, 0, []
    with ThreadPoolExecutor(1) as hasher:
        while pos < len(data):
            size = pieces[i % len(pieces)]
            piece = bytes(data[pos:pos + size])
            hashing.append(hasher.submit(encoder.hash, piece))
            out += encoder.seal(piece)
            pos, i = pos + size, i + 1
        for future in hashing:
            future.result()
    assert b"".join(out + encoder.finish()) == whole
    assert encoder.stats.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="finished"):
        encoder.hash(b"late")


def test_empty_image_is_one_empty_final_chunk():
    raw, stats = encode(b"")
    header, records = split(raw)
    assert len(records) == 1 and stats.chunks == 1 and stats.plaintext_size == 0
    assert read_all(raw) == ([b""], None)


def test_image_writer_stats_match_the_file_and_verify():
    data = memory_like(5 * CS + 123)
    out = io.BytesIO()
    with vf.ImageWriter(out, DEK, uuid.uuid4(), chunk_size=CS, allow_small_chunks=True) as w:
        w.write(data[:1000])
        w.write(data[1000:])
    stats = w.close()
    assert stats.stored_size == len(out.getvalue())
    out.seek(0)
    assert vf.ImageReader(out, DEK).verify() == stats


def test_stats_count_zero_pages_and_chunks():
    data = bytes(PAGE) + b"x" * PAGE + bytes(PAGE) + bytes(100)  # last page partial, zero
    raw, stats = encode(data)
    assert stats.zero_pages == 3 and stats.chunks == 2
    assert vf.ImageReader(io.BytesIO(raw), DEK).verify().zero_pages == 3


def test_a_failed_writer_leaves_an_image_that_reads_as_truncated():
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with vf.ImageWriter(out, DEK, uuid.uuid4(), chunk_size=CS,
                            allow_small_chunks=True) as writer:
            writer.write(b"a" * (3 * CS))
            raise RuntimeError("upload interrupted")
    got, exc = read_all(out.getvalue())
    # The last record on disk is authentic but not final: the reader says so
    # instead of releasing it as if the image ended there.
    assert isinstance(exc, vf.TruncatedImage) and len(got) == 2


# --- tampering -------------------------------------------------------------------------------

DATA = memory_like(5 * CS + 3000, seed=7)  # 5 full chunks and a partial final chunk
ORIGINAL = chunks_of(DATA)


@pytest.fixture(scope="module")
def stored():
    raw, _ = encode(DATA)
    return split(raw)


def join(header, records):
    return header + b"".join(records)


def flip(blob: bytes, at: int, mask: int = 0x01) -> bytes:
    return blob[:at] + bytes([blob[at] ^ mask]) + blob[at + 1:]


def other_image_final_record():
    return split(encode(b"other", dek=DEK)[0])[1][-1]


# name -> (tamper(header, records) -> bytes, expected exception, good chunks before it)
TAMPERS = {
    "altered ciphertext byte": (lambda h, r: join(h, [*r[:2], flip(r[2], 50), *r[3:]]),
                                vf.TamperedChunk, 2),
    "altered tag byte": (lambda h, r: join(h, [*r[:3], flip(r[3], len(r[3]) - 1), *r[4:]]),
                         vf.TamperedChunk, 3),
    "altered final chunk": (lambda h, r: join(h, [*r[:-1], flip(r[-1], 10)]),
                            vf.TamperedChunk, 5),
    "length prefix made huge": (lambda h, r: join(h, [*r[:1], flip(r[1], 0, 0x80), *r[2:]]),
                                vf.TamperedChunk, 1),
    "length prefix off by one": (lambda h, r: join(h, [*r[:1], flip(r[1], 3, 0x01), *r[2:]]),
                               vf.TamperedChunk, 1),
    "reordered chunks": (lambda h, r: join(h, [r[0], r[2], r[1], *r[3:]]), vf.TamperedChunk, 1),
    "duplicated chunk": (lambda h, r: join(h, [*r[:2], r[1], *r[2:]]), vf.TamperedChunk, 2),
    "dropped middle chunk": (lambda h, r: join(h, [*r[:2], *r[3:]]), vf.TamperedChunk, 2),
    "dropped final chunk": (lambda h, r: join(h, r[:-1]), vf.TruncatedImage, 4),
    "dropped first chunk": (lambda h, r: join(h, r[1:]), vf.TamperedChunk, 0),
    "no chunks at all": (lambda h, r: h, vf.TruncatedImage, 0),
    "final chunk repeated": (lambda h, r: join(h, [*r, r[-1]]), vf.TrailingData, 5),
    "record of another image appended": (lambda h, r: join(h, [*r, other_image_final_record()]),
                                         vf.TrailingData, 5),
    "one trailing byte": (lambda h, r: join(h, r) + b"\x00", vf.TrailingData, 5),
    "trailing garbage": (lambda h, r: join(h, r) + os.urandom(100), vf.TrailingData, 5),
    "truncated mid-record": (lambda h, r: join(h, r)[:-1], vf.TruncatedImage, 5),
    "truncated inside a length prefix": (lambda h, r: join(h, [*r[:3], r[3][:2]]),
                                         vf.TruncatedImage, 3),
    "truncated at a record boundary": (lambda h, r: join(h, r[:3]), vf.TruncatedImage, 2),
    "header from another image (same data key)": (
        lambda h, r: join(split(encode(DATA)[0])[0], r), vf.TamperedChunk, 0),
}


@pytest.mark.parametrize("name", TAMPERS)
def test_tampering_is_rejected_before_the_bad_chunk_is_released(stored, name):
    tamper, expected, good = TAMPERS[name]
    got, exc = read_all(tamper(*stored))
    assert type(exc) is expected, exc
    assert got == ORIGINAL[:good]  # everything released was authentic, nothing after
    if isinstance(exc, vf.TamperedChunk):
        assert exc.index == good


@pytest.mark.parametrize("piece", [1, 1000, 1 << 20])
@pytest.mark.parametrize("name", TAMPERS)
def test_stream_decoder_rejects_tampering_the_same_way(stored, name, piece):
    tamper, expected, good = TAMPERS[name]
    got, exc = decode_stream(tamper(*stored), piece)
    assert type(exc) is expected, exc
    # A feed() that raises returns nothing, so larger pieces release fewer chunks.
    assert got == ORIGINAL[:len(got)] and len(got) <= good
    if piece == 1:
        assert len(got) == good


@pytest.mark.parametrize("name", TAMPERS)
def test_verify_rejects_tampering(stored, name):
    with pytest.raises(TAMPERS[name][1]):
        vf.ImageReader(io.BytesIO(TAMPERS[name][0](*stored)), DEK).verify()


def small_image():
    data = (TEXT * 100)[:PAGE] + bytes(PAGE) + os.urandom(600) + bytes(PAGE) + b"end"
    raw, _ = encode(data, chunk_size=PAGE)
    return raw, chunks_of(data, PAGE)


def test_every_single_bit_flip_anywhere_is_detected():
    raw, original = small_image()
    for at in range(len(raw)):
        bad = flip(raw, at, 1 << (at % 8))
        got, exc = read_all(bad)
        assert isinstance(exc, vf.FormatError), at
        assert got == original[:len(got)], at


def test_every_truncation_is_detected():
    raw, original = small_image()
    for cut in range(len(raw)):
        got, exc = read_all(raw[:cut])
        assert isinstance(exc, vf.TruncatedImage), cut
        assert got == original[:len(got)]
        assert isinstance(decode_stream(raw[:cut], 7)[1], vf.TruncatedImage), cut


@pytest.mark.parametrize("at", range(vf.HEADER_SIZE))
def test_altered_header_byte_is_rejected(stored, at):
    header, records = stored
    with pytest.raises(vf.BadHeader):
        vf.ImageReader(io.BytesIO(join(flip(header, at), records)), DEK)


def test_header_from_another_image_is_rejected_on_open(stored):
    _, records = stored
    other_header = split(encode(b"x", dek=os.urandom(32))[0])[0]
    with pytest.raises(vf.BadHeader, match="does not authenticate"):
        vf.ImageReader(io.BytesIO(join(other_header, records)), DEK)


def test_wrong_data_key_is_rejected_before_any_chunk(stored):
    with pytest.raises(vf.BadHeader):
        vf.ImageReader(io.BytesIO(join(*stored)), os.urandom(32))


def test_absurd_record_length_is_refused_before_allocating(stored):
    header, records = stored
    huge = b"\xff\xff\xff\xff" + records[0][4:]
    got, exc = read_all(join(header, [huge, *records[1:]]))
    assert isinstance(exc, vf.TamperedChunk) and "impossible record length" in str(exc)


def test_decoder_refuses_input_after_a_failure(stored):
    header, records = stored
    decoder = vf.ChunkDecoder(DEK)
    with pytest.raises(vf.TamperedChunk):
        decoder.feed(join(header, [records[1], records[0]]))
    with pytest.raises(vf.FormatError, match="already failed"):
        decoder.feed(records[2])


def test_decoder_rejects_data_after_finish(stored):
    decoder = vf.ChunkDecoder(DEK)
    assert b"".join(decoder.feed(join(*stored)) + decoder.finish()) == DATA
    with pytest.raises(vf.TrailingData):
        decoder.feed(b"more")


def test_decoder_accepts_a_header_read_separately(stored):
    header, records = stored
    decoder = vf.ChunkDecoder(DEK, header=header)
    assert b"".join(decoder.feed(b"".join(records)) + decoder.finish()) == DATA


# --- key envelopes ---------------------------------------------------------------------------

def test_envelope_round_trip_records_the_key_version(stored):
    header = stored[0]
    asked = []
    envelope = vf.wrap_data_key(KEK, 7, DEK, header)
    assert len(envelope) == vf.ENVELOPE_SIZE and vf.envelope_key_version(envelope) == 7
    assert vf.unwrap_data_key(lambda v: asked.append(v) or KEK, envelope, header) == DEK
    assert asked == [7]


def test_wrong_master_key_is_rejected(stored):
    envelope = vf.wrap_data_key(KEK, 1, DEK, stored[0])
    with pytest.raises(vf.WrongKey, match="wrong master key"):
        vf.unwrap_data_key(lambda v: os.urandom(32), envelope, stored[0])


def test_envelope_of_another_image_is_rejected(stored):
    other_header = split(encode(b"x")[0])[0]
    envelope = vf.wrap_data_key(KEK, 1, DEK, other_header)
    with pytest.raises(vf.EnvelopeMismatch):
        vf.unwrap_data_key(lambda v: KEK, envelope, stored[0])


def test_envelope_refuses_an_altered_header(stored):
    envelope = vf.wrap_data_key(KEK, 1, DEK, stored[0])
    for at in range(vf.HEADER_SIZE):
        with pytest.raises(vf.FormatError):
            vf.unwrap_data_key(lambda v: KEK, envelope, flip(stored[0], at))


def test_every_altered_envelope_byte_is_rejected(stored):
    envelope = vf.wrap_data_key(KEK, 1, DEK, stored[0])
    for at in range(len(envelope)):
        with pytest.raises(vf.FormatError):
            vf.unwrap_data_key(lambda v: KEK, flip(envelope, at), stored[0])
    with pytest.raises(vf.BadEnvelope):
        vf.envelope_key_version(envelope[:-1])


def test_rotation_rewraps_the_key_without_touching_image_data(stored):
    header, records = stored
    keys = {1: KEK, 2: os.urandom(32)}
    old = vf.wrap_data_key(keys[1], 1, DEK, header)
    new = vf.wrap_data_key(keys[2], 2, vf.unwrap_data_key(keys.__getitem__, old, header), header)
    del keys[1]  # the old master key is retired
    dek = vf.unwrap_data_key(keys.__getitem__, new, header)
    assert read_all(join(header, records)) == read_all(join(header, records), dek)
    with pytest.raises(KeyError):  # the keyring's own error for an unknown version
        vf.unwrap_data_key(keys.__getitem__, old, header)


def test_keys_must_be_256_bit(stored):
    with pytest.raises(ValueError):
        vf.wrap_data_key(KEK[:16], 1, DEK, stored[0])
    with pytest.raises(ValueError):
        vf.ChunkEncoder(DEK[:16], uuid.uuid4())
    envelope = vf.wrap_data_key(KEK, 1, DEK, stored[0])
    with pytest.raises(vf.WrongKey):
        vf.unwrap_data_key(lambda v: KEK[:16], envelope, stored[0])


# --- random access ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranged():
    data = memory_like(7 * CS + 1234, seed=3)
    return data, encode(data)[0]


def test_read_chunk_returns_each_chunk(ranged):
    data, raw = ranged
    reader = vf.ImageReader(io.BytesIO(raw), DEK)
    assert reader.chunk_count == 8 and reader.plaintext_size == len(data)
    for i, expected in reversed(list(enumerate(chunks_of(data)))):
        assert reader.read_chunk(i) == expected
    with pytest.raises(IndexError):
        reader.read_chunk(8)


@FAST
@given(st.data())
def test_iter_range_matches_slices(ranged, data):
    plain, raw = ranged
    start = data.draw(st.integers(0, len(plain)))
    end = data.draw(st.integers(start, len(plain)))
    reader = vf.ImageReader(io.BytesIO(raw), DEK)
    assert b"".join(reader.iter_range(start, end)) == plain[start:end]


def test_iter_range_rejects_ranges_outside_the_image(ranged):
    plain, raw = ranged
    reader = vf.ImageReader(io.BytesIO(raw), DEK)
    for start, end in [(-1, 5), (5, 4), (0, len(plain) + 1)]:
        with pytest.raises(ValueError):
            list(reader.iter_range(start, end))


def test_random_access_decrypts_only_the_chunks_it_needs(ranged):
    plain, raw = ranged
    header, records = split(raw)
    bad = flip(records[2], len(records[2]) - 1)
    reader = vf.ImageReader(io.BytesIO(join(header, [*records[:2], bad, *records[3:]])), DEK)
    assert b"".join(reader.iter_range(3 * CS + 5, 5 * CS)) == plain[3 * CS + 5:5 * CS]
    with pytest.raises(vf.TamperedChunk):
        list(reader.iter_range(CS, 3 * CS))


def test_random_access_refuses_an_image_truncated_at_a_record_boundary(ranged):
    header, records = split(ranged[1])
    reader = vf.ImageReader(io.BytesIO(join(header, records[:4])), DEK)
    with pytest.raises(vf.TruncatedImage):
        reader.read_chunk(0)


def test_random_access_refuses_appended_records(ranged):
    header, records = split(ranged[1])
    reader = vf.ImageReader(io.BytesIO(join(header, [*records, records[-1]])), DEK)
    with pytest.raises(vf.FormatError):
        reader.read_chunk(0)


# --- space -----------------------------------------------------------------------------------

def test_all_zero_image_stores_in_a_tiny_fraction_of_its_size():
    size = 8 << 20
    raw, stats = encode(bytes(size), chunk_size=vf.DEFAULT_CHUNK_SIZE)
    assert len(raw) < size / 5000 and stats.zero_pages == size // PAGE


@pytest.mark.parametrize("compress", [True, False])
def test_sixty_percent_zero_image_stores_in_under_half(compress):
    data = paged(8 << 20)
    raw, stats = encode(data, chunk_size=vf.DEFAULT_CHUNK_SIZE, compress=compress)
    assert len(raw) <= 0.45 * len(data)
    assert b"".join(read_all(raw)[0]) == data


def test_compression_is_kept_only_where_it_pays():
    noise = os.urandom(3 * CS)
    assert len(encode(noise, compress=True)[0]) == len(encode(noise, compress=False)[0])
    text = (TEXT * 1000)[:3 * CS]
    assert len(encode(text, compress=True)[0]) < len(text) / 10


# --- parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [0, 1000, PAGE + 1, vf.MAX_CHUNK_SIZE + PAGE])
def test_invalid_chunk_sizes_are_refused(chunk_size):
    with pytest.raises(ValueError):
        vf.ChunkEncoder(DEK, uuid.uuid4(), chunk_size=chunk_size, allow_small_chunks=True)


def test_small_chunks_need_an_explicit_test_flag():
    with pytest.raises(ValueError, match="allow_small_chunks"):
        vf.ChunkEncoder(DEK, uuid.uuid4(), chunk_size=64 * 1024)
    assert vf.ChunkEncoder(DEK, uuid.uuid4()).chunk_size == vf.DEFAULT_CHUNK_SIZE == 1 << 20


def test_chunk_counter_overflow_is_refused():
    encoder = vf.ChunkEncoder(DEK, uuid.uuid4(), chunk_size=PAGE, allow_small_chunks=True)
    encoder._index = vf.MAX_CHUNKS - 1  # the last counter value is kept for the final chunk
    with pytest.raises(OverflowError):
        encoder.feed(bytes(PAGE))


def test_headers_parse_and_report_what_is_wrong(stored):
    header = stored[0]
    info = vf.parse_header(header)
    assert (info.chunk_size, info.algorithm, info.flags) == (CS, 1, vf.FLAG_ZSTD)
    assert vf.read_header(io.BytesIO(header + b"rest")) == header
    with pytest.raises(vf.BadHeader, match="bad magic"):
        vf.read_header(io.BytesIO(b"GIF89a" + bytes(100)))
    with pytest.raises(vf.TruncatedImage):
        vf.read_header(io.BytesIO(header[:10]))


# --- test vectors ----------------------------------------------------------------------------

def vectors():
    return sorted(p.stem for p in VECTORS.glob("*.json"))


def load(name):
    doc = json.loads((VECTORS / f"{name}.json").read_text())
    files = {k: (VECTORS / doc[f"{k}_file"]).read_bytes() for k in ("plaintext", "image",
                                                                     "envelope")}
    return doc, files


def spec_decode(image: bytes, dek: bytes) -> bytes:
    """An independent reader written from docs/vault-format.md, for the vectors."""
    header = image[:64]
    alg, chunk_size, prefix = header[9], int.from_bytes(header[28:32], "big"), header[32:39]
    aead = {1: AESGCM, 2: ChaCha20Poly1305}[alg](dek)
    aead.decrypt(prefix + bytes(4) + b"\x02", header[48:], header[:48])  # header tag
    pos, index, out = 64, 0, []
    while pos < len(image):
        n = int.from_bytes(image[pos:pos + 4], "big")
        last = pos + 4 + n == len(image)
        body = aead.decrypt(prefix + index.to_bytes(4, "big") + bytes([last]),
                            image[pos + 4:pos + 4 + n], header)
        flags, size = body[0], int.from_bytes(body[1:5], "big")
        npages = -(-size // PAGE)
        zero = np.unpackbits(np.frombuffer(body[5:5 + -(-npages // 8)], np.uint8))[:npages]
        data = body[5 + -(-npages // 8):]
        data = zstandard.ZstdDecompressor().decompress(data) if flags & 1 else data
        plain, used = bytearray(), 0
        for page in range(npages):
            length = min(PAGE, size - page * PAGE)
            plain += bytes(length) if zero[page] else data[used:used + length]
            used += 0 if zero[page] else length
        assert used == len(data) and (last or size == chunk_size)
        out.append(bytes(plain))
        pos, index = pos + 4 + n, index + 1
    return b"".join(out)


def test_vectors_are_committed():
    assert len(vectors()) >= 3


@pytest.mark.parametrize("name", vectors())
def test_vector_decodes_to_its_plaintext(name):
    doc, files = load(name)
    assert hashlib.sha256(files["image"]).hexdigest() == doc["image_sha256"]
    kek = bytes.fromhex(doc["kek"])
    dek = vf.unwrap_data_key({doc["key_version"]: kek}.__getitem__, files["envelope"],
                             files["image"][:vf.HEADER_SIZE])
    assert dek.hex() == doc["dek"]
    stats = vf.ImageReader(io.BytesIO(files["image"]), dek).verify()
    assert stats.sha256 == doc["plaintext_sha256"] == hashlib.sha256(
        files["plaintext"]).hexdigest()
    assert read_all(files["image"], dek)[0] == chunks_of(files["plaintext"], doc["chunk_size"])
    assert spec_decode(files["image"], dek) == files["plaintext"]


@pytest.mark.parametrize("name", vectors())
def test_vector_re_encodes_to_identical_bytes(name):
    doc, files = load(name)
    if doc["compress"] and doc["zstd_library"] != ".".join(map(str, zstandard.ZSTD_VERSION)):
        pytest.skip("compressed bytes depend on the zstd library version")
    spec = next(s for s in make_vectors.SPECS if s["name"] == name)
    assert spec["plaintext"] == files["plaintext"]
    image, envelope = make_vectors.encode(spec, doc)
    assert image == files["image"] and envelope == files["envelope"]
    assert image[:vf.HEADER_SIZE].hex() == doc["header_hex"]


@pytest.mark.parametrize("name", vectors())
def test_vector_binds_its_image_id_and_key_version(name):
    """Section 4a: what the portal compares with the image's record is authenticated."""
    doc, files = load(name)
    header, envelope = files["image"][:vf.HEADER_SIZE], files["envelope"]
    image_id, kek = uuid.UUID(doc["image_id"]), bytes.fromhex(doc["kek"])
    assert vf.parse_header(header).image_id == image_id
    assert envelope[13:29] == image_id.bytes
    assert vf.envelope_key_version(envelope) == doc["key_version"]
    # To make the object answer to record B, both ids would have to say B:
    other = uuid.uuid4().bytes
    moved_header = header[:12] + other + header[28:]
    moved_envelope = envelope[:13] + other + envelope[29:]
    with pytest.raises(vf.WrongKey):  # the envelope's AAD holds the id and the header digest
        vf.unwrap_data_key(lambda v: kek, moved_envelope, moved_header)
    with pytest.raises(vf.BadHeader):  # and the header's tag holds the id, under the DEK
        vf.ImageReader(io.BytesIO(moved_header + files["image"][vf.HEADER_SIZE:]),
                       bytes.fromhex(doc["dek"]))
    # Another version number, even one whose key is the same, does not unwrap.
    relabelled = envelope[:9] + (doc["key_version"] + 1).to_bytes(4, "big") + envelope[13:]
    with pytest.raises(vf.WrongKey):
        vf.unwrap_data_key(lambda v: kek, relabelled, header)
