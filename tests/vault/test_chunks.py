"""vault.chunks: one record's body (zero-page bitmap, zstd) and its STREAM seal.

Whole images (framing, header, tampering across records) are tests/vault/test_format.py.
The module under test is Django-free and so is this file; it runs alone with
``pytest --noconftest -p no:django tests/vault/test_chunks.py``.
"""
import os
import random
import struct

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vault import chunks
from vault.chunks import ChunkCipher, TamperedChunk, TrailingData, TruncatedImage

PAGE = chunks.PAGE_SIZE
CS = 4 * PAGE  # small chunks keep the tests fast
DEK = bytes(range(32))
HEADER = b"H" * 64  # only associated data at this level: any bytes do
PREFIX = b"\x07" * 7
TEXT = (b"GET /index.html HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n" * 80)[:PAGE]
# The vault conftest has an autouse function-scoped fixture this file does not use.
FAST = settings(max_examples=80, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def cipher(*, zstd=True, header=HEADER) -> ChunkCipher:
    return ChunkCipher(AESGCM(DEK), header=header, nonce_prefix=PREFIX, chunk_size=CS,
                       zstd=zstd)


def spec_seal(index: int, final: bool, body: bytes) -> bytes:
    """A record's ciphertext built from the spec alone (not vault.chunks): nonce, AAD."""
    return AESGCM(DEK).encrypt(PREFIX + struct.pack(">IB", index, int(final)), body, HEADER)


def ciphertext(record: bytearray) -> bytes:
    (n,) = struct.unpack_from(">I", record)
    assert n == len(record) - 4
    return bytes(record[4:])


def body_of(record: bytearray, index: int = 0, final: bool = True) -> bytes:
    """The sealed body, opened with the spec's nonce rather than the module's."""
    nonce = PREFIX + struct.pack(">IB", index, int(final))
    return AESGCM(DEK).decrypt(nonce, ciphertext(record), HEADER)


@st.composite
def chunk_contents(draw):
    """(chunk, final): whole chunks anywhere, a shorter one only as the final chunk."""
    final = draw(st.booleans())
    size = draw(st.integers(0, CS)) if final else CS
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    kinds = [draw(st.sampled_from(["zero", "text", "random"])) for _ in range(-(-size // PAGE))]
    page = {"zero": lambda: bytes(PAGE), "text": lambda: TEXT,
            "random": lambda: rng.randbytes(PAGE)}
    return b"".join(page[k]() for k in kinds)[:size], final


# --- sealing and opening ----------------------------------------------------------------------

@FAST
@given(content=chunk_contents(), zstd=st.booleans(), index=st.integers(0, 2**32 - 2))
def test_open_returns_what_seal_sealed_and_counts_zero_pages(content, zstd, index):
    chunk, final = content
    record, zero_pages = cipher(zstd=zstd).seal(index, chunk, final)
    pages = [chunk[at:at + PAGE] for at in range(0, len(chunk), PAGE)]
    assert zero_pages == sum(not any(p) for p in pages)
    assert cipher(zstd=zstd).open(index, ciphertext(record), final) == (chunk, zero_pages)


def test_zero_pages_are_a_bitmap_bit_and_no_data():
    record, zero_pages = cipher().seal(0, bytes(CS), final=False)
    # flags + length, one bitmap byte, the tag: nothing for the four pages themselves.
    assert zero_pages == 4 and len(record) == 4 + 5 + 1 + 16
    assert body_of(record, final=False) == struct.pack(">BI", 0, CS) + b"\xf0"


def test_a_chunk_is_compressed_only_where_it_pays():
    text, noise = TEXT * 4, os.urandom(CS)
    assert body_of(cipher().seal(0, text, True)[0])[0] == chunks.CHUNK_ZSTD
    assert body_of(cipher().seal(0, noise, True)[0])[0] == 0
    assert body_of(cipher(zstd=False).seal(0, text, True)[0])[0] == 0  # header forbids it


def test_a_record_opens_only_at_its_own_index_and_under_its_own_header():
    record, _ = cipher().seal(5, TEXT * 4, final=False)
    with pytest.raises(TamperedChunk) as exc:
        cipher().open(4, ciphertext(record), final=False)
    assert exc.value.index == 4
    with pytest.raises(TamperedChunk):
        cipher(header=b"h" * 64).open(5, ciphertext(record), final=False)


def test_a_wrong_last_flag_says_truncated_or_trailing():
    not_final, _ = cipher().seal(2, TEXT * 4, final=False)
    final, _ = cipher().seal(2, TEXT, final=True)
    with pytest.raises(TruncatedImage, match="not the final chunk"):
        cipher().open(2, ciphertext(not_final), final=True)
    with pytest.raises(TrailingData, match="follows the final chunk 2"):
        cipher().open(2, ciphertext(final), final=False)


def test_the_last_counter_value_is_kept_for_the_final_chunk():
    last = chunks.MAX_CHUNKS - 1
    with pytest.raises(OverflowError):
        cipher().seal(last, TEXT * 4, final=False)
    record, _ = cipher().seal(last, b"end", final=True)
    assert cipher().open(last, ciphertext(record), True)[0] == b"end"
    with pytest.raises(TrailingData):
        cipher().open(chunks.MAX_CHUNKS, ciphertext(record), True)


# --- record lengths ---------------------------------------------------------------------------

def test_record_lengths_outside_what_a_valid_record_can_be_are_refused():
    shortest = 5 + 16  # an empty final chunk: flags, length, tag
    longest = 5 + 1 + CS + 16  # every page kept, uncompressed, one bitmap byte
    for n in (shortest, longest):
        assert chunks.record_length(3, struct.pack(">I", n), CS) == n
    for n in (0, shortest - 1, longest + 1, 2**32 - 1):
        with pytest.raises(TamperedChunk, match="impossible record length") as exc:
            chunks.record_length(3, struct.pack(">I", n), CS)
        assert exc.value.index == 3


# --- authentic but malformed bodies: checks that hold even against a buggy writer ---------

@pytest.mark.parametrize(("body", "reason"), [
    (struct.pack(">BI", 0, 100) + b"\x00" + b"x" * 100, "plaintext length"),  # not final
    (struct.pack(">BI", 2, CS) + b"\x00" + b"x" * CS, "flags"),
    (struct.pack(">BI", 0, CS) + b"\x01" + b"x" * CS, "padding"),
    (struct.pack(">BI", 0, CS) + b"\x40" + b"x" * CS, "page data"),
    (struct.pack(">BI", 1, CS) + b"\x10" + zstandard.compress(b"x" * CS), "zstd frame size"),
    (struct.pack(">BI", 1, CS) + b"\x00" + b"not zstd", "zstd"),
    (struct.pack(">BI", 0, CS), "short bitmap"),
    (b"\x00\x00", "short body"),
])
def test_authentic_but_malformed_body_is_rejected(body, reason):
    with pytest.raises(TamperedChunk, match=reason) as exc:
        cipher().open(0, spec_seal(0, False, body), final=False)
    assert exc.value.index == 0


def test_compressed_body_is_refused_when_the_header_does_not_allow_it():
    body = struct.pack(">BI", 1, CS) + b"\x00" + zstandard.compress(TEXT * 4)
    assert cipher().open(0, spec_seal(0, False, body), False)[0] == TEXT * 4
    with pytest.raises(TamperedChunk, match="flags"):
        cipher(zstd=False).open(0, spec_seal(0, False, body), final=False)


def test_body_sealed_by_the_spec_is_accepted():
    # Pages 1 and 3 zero (bitmap 0101....), pages 0 and 2 compressed together.
    body0 = struct.pack(">BI", 1, CS) + b"\x50" + zstandard.compress(TEXT + TEXT[::-1])
    assert cipher().open(0, spec_seal(0, False, body0), False) == (
        TEXT + bytes(PAGE) + TEXT[::-1] + bytes(PAGE), 2)
    final = struct.pack(">BI", 0, 10) + b"\x00" + b"0123456789"
    assert cipher().open(1, spec_seal(1, True, final), True) == (b"0123456789", 0)
