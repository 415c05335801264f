"""The wire format: PAGES frames, framing limits, fingerprints."""

import hashlib
import socket
import struct
import threading

import numpy as np
import pytest

from migrator.hypervisor import PAGE_SIZE
from migrator.relocation.protocol import (
    DIRECT_RUNS,
    HEADER,
    MAX_BATCH_PAGES,
    Channel,
    Fingerprints,
    FramePrefetcher,
    Msg,
    ProtocolError,
    decode_pages,
    encode_pages,
    max_payload,
)

NPAGES = 64


def pages_with_zeros(indices, zero):
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 256, (len(indices), PAGE_SIZE), dtype=np.uint8)
    pages[list(zero)] = 0
    return pages


def frame_bytes(batch):
    return batch.head + bytes(batch.data)


def test_a_batch_round_trips_and_zero_pages_cost_only_a_bit():
    idx = np.array([1, 5, 6, 20, 63], dtype=np.int64)
    pages = pages_with_zeros(idx, zero={1, 3})
    batch = encode_pages(idx, pages.tobytes())
    assert (batch.pages, batch.data_pages) == (5, 3)
    frame = frame_bytes(batch)
    mtype, length = HEADER.unpack_from(frame)
    assert mtype == Msg.PAGES and length == len(frame) - HEADER.size
    assert length == 4 + 5 * 4 + 1 + 3 * PAGE_SIZE
    payload = memoryview(frame)[HEADER.size:]
    # the documented layout, byte for byte
    assert struct.unpack_from("<I5I", payload) == (5, 1, 5, 6, 20, 63)
    assert payload[24] == 0b10101  # LSB first: pages 0, 2, 4 of the batch carry data
    decoded = decode_pages(payload, NPAGES)
    assert decoded.indices.tolist() == idx.tolist()
    assert decoded.present.tolist() == [True, False, True, False, True]
    assert np.array_equal(decoded.data, pages[[0, 2, 4]])


def test_an_all_zero_batch_has_no_data_and_an_all_data_batch_is_not_copied():
    idx = np.arange(10, dtype=np.int64)
    zero = encode_pages(idx, bytes(10 * PAGE_SIZE))
    assert zero.data_pages == 0 and len(zero.data) == 0
    full = pages_with_zeros(idx, zero=set()).tobytes()
    batch = encode_pages(idx, full)
    assert batch.data.obj is not None and bytes(batch.data) == full


def test_fingerprints_match_the_documented_formula():
    fp = Fingerprints(b"s" * 32, NPAGES)
    page = np.random.default_rng(1).integers(0, 256, (1, PAGE_SIZE), dtype=np.uint8)
    keys = np.frombuffer(hashlib.shake_256(b"berth-relocation-fingerprint-v1" + b"s" * 32)
                         .digest(8192), "<u8")
    words = np.frombuffer(page.tobytes(), "<u4")
    expected = sum(int(w) * int(k) for w, k in zip(words, keys, strict=True)) % 2**64
    assert int(fp.of(page)[0]) == expected
    assert int(fp.of(np.zeros((1, PAGE_SIZE), np.uint8))[0]) == 0


def test_fingerprint_root_sees_any_change_of_any_page():
    idx = np.arange(NPAGES, dtype=np.int64)
    pages = pages_with_zeros(idx, zero={3, 9})
    a, b = Fingerprints(b"k" * 16, NPAGES), Fingerprints(b"k" * 16, NPAGES)
    encode_pages(idx, pages.tobytes(), a)
    encode_pages(idx, pages.tobytes(), b)
    assert a.root() == b.root()
    for page, offset in ((0, 0), (17, 4095), (3, 100)):  # incl. a zero page turned non-zero
        changed = pages.copy()
        changed[page, offset] ^= 0x80
        c = Fingerprints(b"k" * 16, NPAGES)
        encode_pages(idx, changed.tobytes(), c)
        assert c.root() != a.root()
    other_key = Fingerprints(b"K" * 16, NPAGES)
    encode_pages(idx, pages.tobytes(), other_key)
    assert other_key.root() != a.root()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p[:3], "truncated"),
    (lambda p: struct.pack("<I", 0) + p[4:], "holds 0 pages"),
    (lambda p: struct.pack("<I", MAX_BATCH_PAGES + 1) + p[4:], "holds 2049 pages"),
    (lambda p: p[:4] + struct.pack("<I", 5) + p[8:], "increase strictly"),      # 5, 5
    (lambda p: p[:20] + struct.pack("<I", NPAGES) + p[24:], "stay below 64"),
    (lambda p: p[:24] + bytes([0b110101]) + p[25:], "padding bits"),
    (lambda p: p + b"\0", "its bitmap says"),
    (lambda p: p[:-1], "its bitmap says"),
])
def test_malformed_page_frames_are_rejected(mutate, message):
    idx = np.array([1, 5, 6, 20, 63], dtype=np.int64)
    frame = frame_bytes(encode_pages(idx, pages_with_zeros(idx, {1, 3}).tobytes()))
    payload = mutate(frame[HEADER.size:])
    with pytest.raises(ProtocolError, match=message):
        decode_pages(memoryview(payload), NPAGES)


class _Pair:
    """A Channel over a plain socket pair (framing does not care about TLS)."""

    def __init__(self):
        self.a, self.b = socket.socketpair()
        self.chan = Channel(self.b, io_timeout=2.0)

    def close(self):
        self.a.close()
        self.b.close()


def test_channel_refuses_oversized_or_unknown_frames_before_reading_them():
    pair = _Pair()
    try:
        pair.a.sendall(HEADER.pack(Msg.HELLO, max_payload(Msg.HELLO) + 1))
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            pair.chan.recv()
        assert pair.chan._big is None  # nothing large was allocated for it
        pair.a.sendall(HEADER.pack(0x42, 0))
        with pytest.raises(ProtocolError, match="unknown frame type 0x42"):
            pair.chan.recv()
    finally:
        pair.close()


def test_channel_frames_survive_arbitrary_fragmentation():
    pair = _Pair()
    try:
        idx = np.arange(8, dtype=np.int64)
        frame = frame_bytes(encode_pages(idx, pages_with_zeros(idx, {2}).tobytes()))
        frame += HEADER.pack(Msg.COMMIT, 2) + b"{}"

        def dribble():
            for i in range(0, len(frame), 777):
                pair.a.sendall(frame[i:i + 777])

        threading.Thread(target=dribble).start()
        msg, payload = pair.chan.recv()
        assert msg is Msg.PAGES and bytes(payload) == frame[HEADER.size:len(payload) + 5]
        assert pair.chan.recv_json({Msg.COMMIT}) == (Msg.COMMIT, {})
    finally:
        pair.close()


def test_channel_reports_a_peer_that_hangs_up_or_stalls():
    pair = _Pair()
    try:
        pair.a.sendall(HEADER.pack(Msg.COMMIT, 10) + b"{")
        with pytest.raises(TimeoutError):
            pair.chan.recv(timeout=0.2)
        pair.a.close()
        with pytest.raises(ConnectionError):
            Channel(pair.b, io_timeout=1.0).recv()
    finally:
        pair.close()


def test_channel_wait_can_be_interrupted():
    from migrator.relocation.protocol import Interrupted

    pair = _Pair()
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    try:
        with pytest.raises(Interrupted):
            pair.chan.recv(timeout=5.0, stop=stop)
    finally:
        pair.close()


def test_json_frames_must_be_objects():
    pair = _Pair()
    try:
        pair.a.sendall(HEADER.pack(Msg.COMMIT, 2) + b"[]" + HEADER.pack(Msg.COMMIT, 1) + b"{")
        with pytest.raises(ProtocolError, match="not a JSON object"):
            pair.chan.recv_json({Msg.COMMIT})
        with pytest.raises(ProtocolError, match="not valid JSON"):
            pair.chan.recv_json({Msg.COMMIT})
        pair.a.sendall(HEADER.pack(Msg.ACTIVATE, 2) + b"{}")
        with pytest.raises(ProtocolError, match="unexpected ACTIVATE"):
            pair.chan.recv_json({Msg.COMMIT})
    finally:
        pair.close()


def _prefetched(frames: bytes, memory: np.ndarray) -> list:
    """What a FramePrefetcher over a socket pair makes of ``frames``."""
    pair = _Pair()
    try:
        pair.a.sendall(frames + HEADER.pack(Msg.VCPU, 0))
        reader = FramePrefetcher(pair.chan, [bytearray(max_payload(Msg.PAGES))] * 2,
                                 memory, len(memory))
        got = []
        while True:
            try:
                msg, payload, buf = reader.get()
            except ProtocolError as exc:
                return [*got, exc]
            got.append(payload)
            reader.release(buf)
            if msg is Msg.VCPU:
                return got
    finally:
        pair.close()


def test_a_run_of_pages_is_read_straight_into_guest_memory():
    memory = np.zeros((NPAGES, PAGE_SIZE), np.uint8)
    idx = np.arange(10, 20, dtype=np.int64)
    pages = pages_with_zeros(idx, zero={0, 9})  # present pages: one run, 11..18
    batch = _prefetched(frame_bytes(encode_pages(idx, pages.tobytes())), memory)[0]
    assert batch.placed == [(11, 19)] and len(batch.data) == 0
    assert np.array_equal(memory[10:20], pages)
    assert not memory[:10].any() and not memory[20:].any()


def test_a_scattered_batch_lands_in_the_frame_buffer_not_in_memory():
    memory = np.zeros((NPAGES, PAGE_SIZE), np.uint8)
    idx = np.arange(0, 2 * (DIRECT_RUNS + 1), 2, dtype=np.int64)  # DIRECT_RUNS + 1 runs
    pages = pages_with_zeros(idx, zero=set())
    batch = _prefetched(frame_bytes(encode_pages(idx, pages.tobytes())), memory)[0]
    assert batch.placed is None and np.array_equal(batch.data, pages)
    assert not memory.any()  # the server applies it through the driver


def test_pages_of_a_round_must_increase_across_its_frames():
    memory = np.zeros((NPAGES, PAGE_SIZE), np.uint8)
    first, again = np.arange(4, 8, dtype=np.int64), np.arange(7, 9, dtype=np.int64)
    frames = b"".join(frame_bytes(encode_pages(i, pages_with_zeros(i, set()).tobytes()))
                      for i in (first, again))
    got = _prefetched(frames, memory)
    assert isinstance(got[-1], ProtocolError) and "across the frames" in str(got[-1])
    assert not memory[8].any()  # refused before its pages were read


def test_a_page_whose_fingerprint_is_zero_is_still_sent():
    class Unlucky(Fingerprints):  # every fingerprint collides with the zero page's
        def of(self, pages):
            return np.zeros(len(pages), dtype=np.uint64)

    idx = np.arange(4, dtype=np.int64)
    pages = pages_with_zeros(idx, zero={2})
    batch = encode_pages(idx, pages.tobytes(), Unlucky(b"u" * 16, NPAGES))
    assert batch.data_pages == 3
    assert np.array_equal(decode_pages(memoryview(frame_bytes(batch))[HEADER.size:],
                                       NPAGES).data, pages[[0, 1, 3]])


@pytest.mark.parametrize("late", [1, 7])  # few pages to look at closely, or many
def test_a_page_whose_data_starts_late_is_not_taken_for_a_zero_page(late):
    idx = np.arange(8, dtype=np.int64)
    pages = pages_with_zeros(idx, zero={0})
    pages[1:1 + late, :PAGE_SIZE - 1] = 0  # only their last byte is set
    pages[1:1 + late, -1] = 9
    batch = encode_pages(idx, pages.tobytes())
    decoded = decode_pages(memoryview(frame_bytes(batch))[HEADER.size:], NPAGES)
    assert decoded.present.tolist() == [False] + [True] * 7
    assert np.array_equal(decoded.data, pages[1:])
