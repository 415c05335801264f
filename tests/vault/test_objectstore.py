"""S3Storage against a real S3 protocol server (moto on 127.0.0.1)."""
import datetime
import io
import os
import random
import time
import uuid

import pytest

from vault import format as vformat
from vault.objectstore import MAX_PARTS, PART_BYTES, S3Reader, S3Storage, part_bytes_for
from vault.storage import InvalidImageId, ObjectExists, ObjectNotFound, StorageError

MiB = 1024 * 1024


@pytest.fixture
def store(s3_endpoint, s3_bucket):
    return S3Storage(s3_bucket, prefix="vault", endpoint_url=s3_endpoint, region="us-east-1")


def new_id():
    return str(uuid.uuid4())


def uploads(store):
    return store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])


def keys(store):
    listing = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def commit_image(store, data, image_id=None):
    """Store ``data`` as a committed image; returns its id."""
    image_id = image_id or new_id()
    with store.open_writer(image_id) as writer:
        writer.write(data)
        writer.commit()
    return image_id


def write_in_uneven_pieces(writer, data, seed=0):
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 7, 4096, 100_000, 3 * MiB + 5])
        assert writer.write(data[pos:pos + n]) == len(data[pos:pos + n])
        pos += n


@pytest.mark.parametrize("size", [0, 1, PART_BYTES - 1, PART_BYTES, 2 * PART_BYTES + 12345])
def test_images_written_in_uneven_pieces_read_back_byte_for_byte(store, size):
    data = os.urandom(size)
    image_id = new_id()
    with store.open_writer(image_id) as writer:
        write_in_uneven_pieces(writer, data, seed=size)
        writer.commit()
    assert store.exists(image_id) and store.size(image_id) == size
    assert abs(store.mtime(image_id) - time.time()) < 60
    with store.open_reader(image_id) as f:
        assert f.read() == data
        rng = random.Random(size)
        for _ in range(20):
            start = rng.randrange(size + 1)
            n = rng.choice([0, 4, 1000, MiB + 3])
            assert f.seek(start) == start
            assert f.read(n) == data[start:start + n]
            assert f.tell() == min(start + n, size)
        assert f.seek(0, os.SEEK_END) == size and f.read(1) == b""
    assert uploads(store) == []


def test_the_reader_serves_small_sequential_reads_from_one_window(store):
    data = os.urandom(3 * MiB)
    image_id = commit_image(store, data)
    store.read_ahead_bytes = MiB
    f = store.open_reader(image_id)
    assert isinstance(f, S3Reader) and isinstance(f, io.RawIOBase)
    got = []
    pos = 0
    while pos < len(data):  # ImageReader's pattern: seek, 4-byte length, then a record
        f.seek(pos)
        got.append(f.read(4))
        got.append(f.read(60_000))
        pos += 60_004
    f.close()
    assert b"".join(got) == data
    assert f.requests == 4  # a small first fetch, then one GET per 1 MiB window
    with pytest.raises(ValueError):
        f.read(1)


def test_jumping_from_prefix_to_prefix_does_not_fetch_whole_windows(store):
    data = os.urandom(8 * MiB)
    image_id = commit_image(store, data)
    with store.open_reader(image_id) as f:
        for pos in range(0, len(data), MiB + 4):  # ImageReader building its chunk index
            f.seek(pos)
            assert f.read(4) == data[pos:pos + 4]
        assert f.requests == 8 and f.bytes_fetched <= 8 * 64 * 1024
        f.seek(5)  # then reading a record from there on streams in whole windows
        assert f.read(MiB) == data[5:5 + MiB] and f.read(MiB) == data[5 + MiB:5 + 2 * MiB]
        assert f.requests == 10


def test_a_reader_refuses_an_object_replaced_under_it(store):
    image_id = commit_image(store, b"original")
    with store.open_reader(image_id) as f:
        store.client.put_object(Bucket=store.bucket, Key=f"vault/images/{image_id}.img",
                                Body=b"replaced")
        with pytest.raises(StorageError, match="changed"):
            f.read()


def test_nothing_is_visible_before_commit(store):
    image_id = new_id()
    writer = store.open_writer(image_id)
    writer.write(os.urandom(PART_BYTES + 10))  # one part already uploaded
    assert not store.exists(image_id)
    assert store.list_ids() == []
    with pytest.raises(ObjectNotFound):
        store.open_reader(image_id)
    writer.commit()
    assert store.list_ids() == [image_id]


def test_abort_and_an_exception_in_the_block_leave_nothing(store):
    aborted = store.open_writer(new_id())
    aborted.write(os.urandom(PART_BYTES + 1))
    aborted.abort()
    aborted.abort()  # idempotent
    with pytest.raises(RuntimeError), store.open_writer(new_id()) as writer:
        writer.write(b"half an image")
        raise RuntimeError("client went away")
    with store.open_writer(new_id()) as writer:
        writer.write(b"never committed")
    assert keys(store) == [] and uploads(store) == []
    with pytest.raises(StorageError):
        aborted.write(b"more")


def test_abort_after_commit_is_a_no_op(store):
    image_id = new_id()
    with store.open_writer(image_id) as writer:
        writer.write(b"x")
        writer.commit()
        writer.abort()
    assert store.exists(image_id)
    with pytest.raises(StorageError):
        writer.commit()


def test_image_data_is_written_once(store):
    image_id = commit_image(store, b"first")
    with pytest.raises(ObjectExists):
        store.open_writer(image_id)
    with store.open_reader(image_id) as f:
        assert f.read() == b"first"


@pytest.mark.parametrize("head_check", ["sees it", "misses it"])
def test_of_two_writers_of_one_id_only_the_first_commits(store, monkeypatch, head_check):
    image_id = new_id()
    first, second = store.open_writer(image_id), store.open_writer(image_id)
    first.write(b"first")
    second.write(b"second")
    first.commit()
    if head_check == "misses it":
        # The race: the first completes between the second's HEAD and its complete;
        # then only the conditional complete (If-None-Match: *) refuses.
        monkeypatch.setattr(store, "exists", lambda _id: False)
    with pytest.raises(ObjectExists):
        second.commit()
    assert not second.committed and uploads(store) == []
    with store.open_reader(image_id) as f:
        assert f.read() == b"first"


def test_a_failing_commit_aborts_the_upload_and_raises(store, monkeypatch):
    writer = store.open_writer(new_id())
    writer.write(b"data")

    def refuse(**kwargs):
        raise ConnectionError("network down")

    monkeypatch.setattr(store.client, "complete_multipart_upload", refuse)
    with pytest.raises(ConnectionError):
        writer.commit()
    assert not writer.committed and uploads(store) == [] and keys(store) == []


def test_missing_objects_raise_object_not_found(store):
    image_id = new_id()
    for call in (store.open_reader, store.size, store.mtime, store.get_envelope):
        with pytest.raises(ObjectNotFound):
            call(image_id)
    assert not store.exists(image_id)
    store.delete(image_id)  # idempotent
    store.delete_envelope(image_id)


def test_envelopes_are_stored_replaced_and_deleted(store):
    image_id = new_id()
    store.put_envelope(image_id, b"v1")
    store.put_envelope(image_id, bytearray(b"v2"))
    assert store.get_envelope(image_id) == b"v2"
    assert keys(store) == [f"vault/envelopes/{image_id}.key"]
    store.delete_envelope(image_id)
    with pytest.raises(ObjectNotFound):
        store.get_envelope(image_id)
    with pytest.raises(StorageError):
        store.put_envelope(image_id, bytes(64 * 1024 + 1))
    with pytest.raises(TypeError):
        store.put_envelope(image_id, "not bytes")


def test_an_oversized_envelope_object_is_refused_on_read(store):
    image_id = new_id()
    store.client.put_object(Bucket=store.bucket, Key=f"vault/envelopes/{image_id}.key",
                            Body=bytes(64 * 1024 + 1))
    with pytest.raises(StorageError, match="implausibly large"):
        store.get_envelope(image_id)


def test_shred_deletes_the_envelope_before_the_data(store, monkeypatch):
    image_id = commit_image(store, b"ciphertext")
    store.put_envelope(image_id, b"key")
    order = []
    real_delete = store.client.delete_object

    def record(**kwargs):
        order.append(kwargs["Key"].split("/")[1])
        return real_delete(**kwargs)

    monkeypatch.setattr(store.client, "delete_object", record)
    store.shred(image_id)
    assert order == ["envelopes", "images"]
    assert keys(store) == []


def test_list_ids_lists_committed_images_only(store):
    committed = sorted(new_id() for _ in range(3))
    for image_id in committed:
        commit_image(store, b"x", image_id)
    in_progress = store.open_writer(new_id())
    in_progress.write(b"y")
    store.put_envelope(new_id(), b"envelope without image")
    for foreign in ("vault/images/not-a-uuid.img", f"vault/images/{new_id()}.img.bak",
                    f"vault/images/{new_id().upper()}.img", f"other/images/{new_id()}.img",
                    f"vault/images/sub/{new_id()}.img"):
        store.client.put_object(Bucket=store.bucket, Key=foreign, Body=b"")
    assert store.list_ids() == committed
    in_progress.abort()


def test_the_prefix_keeps_two_vaults_in_one_bucket_apart(store, s3_endpoint):
    other = S3Storage(store.bucket, prefix="other/", endpoint_url=s3_endpoint)
    image_id = commit_image(store, b"x")
    assert other.list_ids() == [] and not other.exists(image_id)
    assert keys(store) == [f"vault/images/{image_id}.img"]


@pytest.fixture
def upload_started(store, monkeypatch):
    """{upload id: start time} that the listing reports; by default now.

    moto lists every multipart upload as started in 2010 (a fixed date in its
    response template) where S3 gives the real time, so the test sets it.
    """
    started = {}
    real_list = store.client.list_multipart_uploads

    def listing(**kwargs):
        response = real_list(**kwargs)
        for upload in response.get("Uploads", []):
            when = started.get(upload["UploadId"], time.time())
            upload["Initiated"] = datetime.datetime.fromtimestamp(when, datetime.UTC)
        return response

    monkeypatch.setattr(store.client, "list_multipart_uploads", listing)
    return started


def test_cleanup_partials_aborts_only_uploads_older_than_the_grace_period(store, upload_started):
    old = store.open_writer(new_id())
    old.write(b"crashed")
    upload_started[old._upload_id] = time.time() - 7200
    young = store.open_writer(new_id())
    young.write(b"in progress")
    assert store.cleanup_partials(grace_seconds=3600) == 1
    assert [u["UploadId"] for u in uploads(store)] == [young._upload_id]
    assert store.cleanup_partials() == 0  # the default grace period is a day
    with pytest.raises(StorageError):  # the writer of an aborted upload cannot commit
        old.commit()
    young.commit()
    assert store.list_ids() == [young.image_id]


def test_cleanup_partials_deletes_envelopes_of_crashed_writes_only(store, upload_started):
    orphan, committed, writing = new_id(), new_id(), new_id()
    commit_image(store, b"x", committed)
    in_progress = store.open_writer(writing)
    for image_id in (orphan, committed, writing):
        store.put_envelope(image_id, b"key")
    assert store.cleanup_partials(grace_seconds=3600) == 0  # too young to judge
    # Envelopes now count as old; the upload still counts as in progress.
    upload_started[in_progress._upload_id] = time.time() + 60
    assert store.cleanup_partials(grace_seconds=-5) == 1
    kept = [f"vault/envelopes/{committed}.key", f"vault/envelopes/{writing}.key",
            f"vault/images/{committed}.img"]
    assert keys(store) == sorted(kept)
    # Once the upload is old too, it and its envelope go.
    upload_started[in_progress._upload_id] = time.time() - 7200
    assert store.cleanup_partials(grace_seconds=3600) == 1  # the upload; its envelope is young
    assert store.cleanup_partials(grace_seconds=-5) == 1
    assert keys(store) == [f"vault/envelopes/{committed}.key", f"vault/images/{committed}.img"]


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", f"{{{uuid.uuid4()}}}",
                                 str(uuid.uuid4()).replace("-", ""), str(uuid.uuid4()) + "\n",
                                 None, 42])
def test_invalid_ids_are_refused_before_any_request(store, bad, monkeypatch):
    monkeypatch.setattr(store, "client", None)  # any request would fail differently
    for call in (store.open_writer, store.open_reader, store.exists, store.size, store.mtime,
                 store.delete, store.get_envelope, store.delete_envelope, store.shred):
        with pytest.raises(InvalidImageId):
            call(bad)
    with pytest.raises(InvalidImageId):
        store.put_envelope(bad, b"key")


def test_errors_are_one_line_storage_errors_without_credentials(s3_endpoint, s3_bucket):
    missing = S3Storage("berth-no-such-bucket", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError) as raised:
        missing.open_writer(new_id())
    message = str(raised.value)
    assert "\n" not in message and "NoSuchBucket" in message
    assert "testing" not in message and raised.value.__cause__ is None
    with pytest.raises(StorageError, match="list"):
        missing.list_ids()


def test_an_unreachable_server_is_a_storage_error(s3_bucket):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = S3Storage(s3_bucket, endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError, match="EndpointConnectionError"):
        store.exists(new_id())


def test_part_size_fits_the_largest_image_into_s3s_part_limit(store, monkeypatch):
    assert part_bytes_for(64 * 1024**3) == PART_BYTES
    assert part_bytes_for(200 * 1024**3) == 21 * MiB
    assert part_bytes_for(200 * 1024**3) * MAX_PARTS >= 200 * 1024**3 * 1.01
    monkeypatch.setattr("vault.objectstore.MAX_PARTS", 1)
    writer = store.open_writer(new_id())
    with pytest.raises(StorageError, match="exceeds S3's 1 parts"):
        writer.write(os.urandom(2 * PART_BYTES))
    writer.abort()
    assert uploads(store) == []


def test_parts_below_the_s3_minimum_are_refused():
    with pytest.raises(ValueError):
        S3Storage("bucket", part_bytes=MiB, client=object())
    with pytest.raises(ValueError):
        S3Storage("", client=object())


def test_an_encrypted_image_round_trips_through_s3(store):
    """The real encoder writes into S3Storage; ImageReader authenticates it back."""
    dek = vformat.generate_data_key()
    image_id = new_id()
    plain = os.urandom(5 * MiB + 777)
    with store.open_writer(image_id) as writer:
        image = vformat.ImageWriter(writer, dek, uuid.UUID(image_id), chunk_size=MiB)
        for start in range(0, len(plain), 300_000):
            image.write(plain[start:start + 300_000])
        stats = image.close()
        writer.commit()
    assert store.size(image_id) == stats.stored_size
    with store.open_reader(image_id) as f:
        reader = vformat.ImageReader(f, dek)
        assert b"".join(reader.iter_chunks()) == plain
        assert reader.verify() == stats
        assert reader.chunk_count == 6
        for index in (5, 0, 3):
            assert reader.read_chunk(index) == plain[index * MiB:(index + 1) * MiB]
