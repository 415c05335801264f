"""The save-stream format on its own: layout, round trip, rejection."""

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrator.hypervisor.savestream import (
    MAGIC,
    PAGE_SIZE,
    DigestMismatch,
    MalformedStream,
    SaveStreamError,
    SaveStreamParser,
    StreamHeader,
    TruncatedStream,
    decode_header,
    encode_header,
    parse_stream,
    read_header,
    write_stream,
)

UUID = "6f1c2b1e-8a4d-4c5e-9f00-0123456789ab"
NPAGES = 256  # 1 MiB


def make_header(**kw):
    base = dict(uuid=UUID, name="etch", memory_mib=1, vcpus=2, arch="x86_64",
                virt_features=("vmx",), config={"kernel": "/boot/vmlinuz", "ip": "10.0.0.5"})
    base.update(kw)
    return StreamHeader(**base)


def make_memory(seed=1, nonzero=0.4):
    rng = np.random.default_rng(seed)
    mem = np.zeros(NPAGES * PAGE_SIZE, np.uint8)
    pages = mem.reshape(NPAGES, PAGE_SIZE)
    for i in np.flatnonzero(rng.random(NPAGES) < nonzero):
        pages[i] = np.frombuffer(rng.bytes(PAGE_SIZE), np.uint8)
    return mem


def stream_bytes(mem=None, batch_pages=64, vcpu=b"\x01" * 512, header=None):
    mem = make_memory() if mem is None else mem
    return b"".join(write_stream(header or make_header(), vcpu, mem, batch_pages=batch_pages))


def records(data):
    """Split a stream into (offset, tag, payload) after the 12-byte preamble."""
    pos, out = 12, []
    while pos < len(data):
        tag, length = struct.unpack_from("<cI", data, pos)
        out.append((pos, tag, data[pos + 5:pos + 5 + length]))
        pos += 5 + length
    return out


def reseal(data):
    """Recompute the trailer's stream digest after tampering with the body, so
    only the memory digest can catch the change."""
    off, tag, payload = records(data)[-1]
    assert tag == b"T"
    npages, data_pages, mem_sha, _ = struct.unpack("<QQ32s32s", payload)
    body = data[:off]
    trailer = struct.pack("<QQ32s32s", npages, data_pages, mem_sha,
                          hashlib.sha256(body).digest())
    return body + struct.pack("<cI", b"T", len(trailer)) + trailer


def test_round_trip_restores_everything():
    mem = make_memory()
    parsed = parse_stream([stream_bytes(mem, vcpu=b"regs" * 64)])
    assert np.array_equal(parsed.memory, mem)
    assert parsed.vcpu_state == b"regs" * 64
    assert parsed.header == make_header()
    assert parsed.memory_sha256 == hashlib.sha256(mem).hexdigest()
    nonzero = int(mem.reshape(NPAGES, PAGE_SIZE).any(axis=1).sum())
    assert parsed.data_pages == nonzero


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), nonzero=st.floats(0, 1),
       batch=st.integers(1, 300), cuts=st.lists(st.integers(1, 50_000), max_size=20))
def test_round_trip_any_batching_and_piece_sizes(seed, nonzero, batch, cuts):
    mem = make_memory(seed, nonzero)
    data = stream_bytes(mem, batch_pages=batch)
    parser = SaveStreamParser()
    pos = 0
    for cut in cuts:
        parser.feed(data[pos:pos + cut])
        pos += cut
    parser.feed(data[pos:])
    assert np.array_equal(parser.close().memory, mem)


def test_layout_matches_the_documented_bytes():
    data = stream_bytes(batch_pages=128)
    assert data[:8] == MAGIC == b"BERTHSAV"
    assert struct.unpack_from("<HH", data, 8) == (1, 0)
    recs = records(data)
    assert [r[1] for r in recs] == [b"H", b"C", b"P", b"P", b"T"]
    assert recs[0][2] == encode_header(make_header())
    raw_uuid, page_size, mib, npages, vcpus = struct.unpack_from("<16sIIQH", recs[0][2])
    assert (page_size, mib, npages, vcpus) == (4096, 1, 256, 2)
    first, count = struct.unpack_from("<QI", recs[3][2])
    assert (first, count) == (128, 128)
    bitmap = np.unpackbits(np.frombuffer(recs[3][2][12:28], np.uint8), bitorder="little")
    assert len(recs[3][2]) == 12 + 16 + int(bitmap.sum()) * PAGE_SIZE
    _, _, _, stream_sha = struct.unpack("<QQ32s32s", recs[4][2])
    assert stream_sha == hashlib.sha256(data[:recs[4][0]]).digest()


def test_worked_example_in_the_docs():
    header = StreamHeader(uuid=UUID, name="etch", memory_mib=1, vcpus=1, arch="x86_64",
                          virt_features=("vmx",), config={"ip": "10.0.0.5"})
    mem = np.zeros(NPAGES * PAGE_SIZE, np.uint8)
    mem[3 * PAGE_SIZE:4 * PAGE_SIZE] = 0x41
    data = b"".join(write_stream(header, bytes(8), mem))
    assert len(data) == 4334
    assert data[0x0C:0x11] == b"H\x4a\x00\x00\x00"
    assert data[0x5B:0x60] == b"C\x08\x00\x00\x00"
    assert data[0x68:0x6D] == b"P\x2c\x10\x00\x00"
    assert data[0x79] == 0x08 and data[0x99:0x1099] == b"A" * PAGE_SIZE
    assert data[0x1099:0x109E] == b"T\x50\x00\x00\x00"
    assert data[0x10AE:0x10CE] == hashlib.sha256(mem).digest()


def test_zero_pages_are_elided():
    zero = np.zeros(NPAGES * PAGE_SIZE, np.uint8)
    assert len(stream_bytes(zero)) < 1024
    mostly_zero = make_memory(nonzero=0.4)
    assert len(stream_bytes(mostly_zero)) < 0.5 * mostly_zero.size


def test_writer_pieces_are_bounded_by_one_batch():
    pieces = list(write_stream(make_header(), b"", make_memory(nonzero=1.0), batch_pages=32))
    assert max(len(p) for p in pieces) <= 32 * PAGE_SIZE
    assert all(isinstance(p, bytes) for p in pieces)


def test_read_header_from_a_prefix():
    data = stream_bytes()
    assert read_header(data[:300]) == make_header()
    with pytest.raises(TruncatedStream):
        read_header(data[:20])


@pytest.mark.parametrize("cut", [0, 5, 11, 12, 40, 200, 5000, -200, -81, -1])
def test_truncated_stream_is_rejected(cut):
    data = stream_bytes()
    with pytest.raises(TruncatedStream):
        parse_stream([data[:cut] if cut else b""])


def test_every_short_prefix_is_truncated_not_accepted():
    data = stream_bytes(make_memory(nonzero=0.05), batch_pages=256)
    for cut in range(0, len(data), 97):
        with pytest.raises(TruncatedStream):
            parse_stream([data[:cut]])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_bit_flip_is_rejected(data):
    stream = stream_bytes(make_memory(nonzero=0.05))
    pos = data.draw(st.integers(0, len(stream) - 1))
    bit = data.draw(st.integers(0, 7))
    bad = bytearray(stream)
    bad[pos] ^= 1 << bit
    with pytest.raises(SaveStreamError):
        parse_stream([bytes(bad)])


def test_altered_page_with_resealed_stream_fails_memory_digest():
    data = bytearray(stream_bytes())
    off, tag, payload = records(bytes(data))[2]
    assert tag == b"P"
    data[off + 5 + len(payload) - 1] ^= 0xFF  # last byte of the last page sent
    with pytest.raises(DigestMismatch, match="memory"):
        parse_stream([reseal(bytes(data))])


def test_altered_header_fails_stream_digest():
    data = stream_bytes().replace(b"10.0.0.5", b"10.0.0.6")
    with pytest.raises(DigestMismatch, match="stream"):
        parse_stream([data])


def _without_record(data, index):
    recs = records(data)
    off, _, payload = recs[index]
    return data[:off] + data[off + 5 + len(payload):]


def test_dropped_batch_is_rejected():
    data = stream_bytes(batch_pages=64)
    with pytest.raises(MalformedStream, match="expected 64"):
        parse_stream([_without_record(data, 3)])


def test_reordered_batches_are_rejected():
    data = stream_bytes(batch_pages=128)
    recs = records(data)
    (o1, _, p1), (o2, _, p2) = recs[2], recs[3]
    end1, end2 = o1 + 5 + len(p1), o2 + 5 + len(p2)
    swapped = data[:o1] + data[o2:end2] + data[o1:end1] + data[end2:]
    with pytest.raises(MalformedStream, match="expected 0"):
        parse_stream([swapped])


def test_appended_bytes_are_rejected():
    with pytest.raises(MalformedStream, match="after the trailer"):
        parse_stream([stream_bytes() + b"\x00"])
    parser = SaveStreamParser()
    parser.feed(stream_bytes())
    with pytest.raises(MalformedStream, match="after the trailer"):
        parser.feed(b"x")


@pytest.mark.parametrize("prefix, message", [
    (b"NOTBERTH\x01\x00\x00\x00", "magic"),
    (MAGIC + b"\x02\x00\x00\x00", "version 2"),
    (MAGIC + b"\x01\x00\x01\x00", "flags"),
])
def test_bad_preamble(prefix, message):
    with pytest.raises(MalformedStream, match=message):
        parse_stream([prefix + stream_bytes()[12:]])


def test_unknown_and_oversized_records_fail_before_buffering():
    head = MAGIC + b"\x01\x00\x00\x00"
    with pytest.raises(MalformedStream, match="unknown record"):
        SaveStreamParser().feed(head + b"Z\x00\x00\x00\x00")
    with pytest.raises(MalformedStream, match="too long"):
        SaveStreamParser().feed(head + b"H\xff\xff\xff\x7f")
    with pytest.raises(MalformedStream, match="where H was expected"):
        SaveStreamParser().feed(head + b"P\x00\x00\x00\x00")


def test_parser_refuses_input_after_an_error():
    parser = SaveStreamParser()
    with pytest.raises(MalformedStream):
        parser.feed(b"garbage-garbage")
    with pytest.raises(MalformedStream, match="already failed"):
        parser.feed(stream_bytes())
    with pytest.raises(MalformedStream, match="already failed"):
        parser.close()


def test_allocator_sees_header_first_and_may_refuse():
    seen = []

    def allocate(header):
        seen.append(header)
        raise MemoryError("no room")

    with pytest.raises(MemoryError):
        parse_stream([stream_bytes()], allocate)
    assert seen == [make_header()]


def test_elided_pages_are_zeroed_in_a_dirty_destination():
    mem = make_memory(nonzero=0.3)
    dest = np.full(NPAGES * PAGE_SIZE, 0xAA, np.uint8)
    parsed = parse_stream([stream_bytes(mem)], lambda h: dest)
    assert parsed.memory is dest
    assert np.array_equal(dest, mem)


def test_header_validation():
    body = bytearray(encode_header(make_header()))
    body[24:32] = struct.pack("<Q", 999)  # npages inconsistent with memory_mib
    with pytest.raises(MalformedStream, match="page count"):
        decode_header(bytes(body))
    with pytest.raises(MalformedStream, match="trailing"):
        decode_header(encode_header(make_header()) + b"x")
    with pytest.raises(MalformedStream, match="too short"):
        decode_header(encode_header(make_header())[:-1])
