"""Local vault storage: atomic writes, envelopes, crypto-shredding order, clean-up."""
import asyncio
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from vault import storage as vstorage
from vault.storage import (
    InvalidImageId,
    LocalStorage,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    validate_image_id,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path):
    return tmp_path / "vault"


@pytest.fixture
def store(root):
    return LocalStorage(root)


def new_id():
    return str(uuid.uuid4())


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())


def commit(store, image_id, data=b"ciphertext" * 100, envelope=b"wrapped-key"):
    with store.open_writer(image_id) as w:
        w.write(data)
        w.commit()
    if envelope is not None:
        store.put_envelope(image_id, envelope)
    return data


# --- writing and reading ------------------------------------------------------------------

def test_a_long_write_starts_disk_writeback_of_each_range_once(store, monkeypatch):
    started = []
    monkeypatch.setattr(vstorage, "_sync_file_range",
                        lambda fd, offset, length, flags: started.append((offset, length)))
    monkeypatch.setattr(vstorage, "WRITEBACK_BYTES", 1000)
    image_id = new_id()
    with store.open_writer(image_id) as w:
        for i in range(5):
            w.write(bytes([i]) * 700)
        w.commit()
    assert started == [(0, 1400), (1400, 1400)]
    with store.open_reader(image_id) as f:
        assert f.read() == b"".join(bytes([i]) * 700 for i in range(5))


def test_writeback_is_available_on_linux():
    assert vstorage._sync_file_range is not None or not sys.platform.startswith("linux")


def test_committed_object_is_readable_seekable_and_sized(store):
    image_id = new_id()
    data = os.urandom(300_000)
    with store.open_writer(image_id) as w:
        for start in range(0, len(data), 65536):
            w.write(data[start:start + 65536])
        w.commit()
    assert w.committed
    assert store.exists(image_id)
    assert store.size(image_id) == len(data)
    assert store.mtime(image_id) > 0
    with store.open_reader(image_id) as f:
        assert f.seekable()
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        f.seek(0)
        assert f.read() == data


def test_root_and_shards_are_0700_and_objects_0600(store, root):
    image_id = new_id()
    commit(store, image_id)
    assert mode_of(root) == 0o700
    shard = root / image_id[:2]
    assert mode_of(shard) == 0o700
    assert mode_of(shard / f"{image_id}.img") == 0o600
    assert mode_of(shard / f"{image_id}.key") == 0o600
    assert all_files(root) == [f"{image_id[:2]}/{image_id}.img", f"{image_id[:2]}/{image_id}.key"]


def test_nothing_is_visible_before_commit(store, root):
    image_id = new_id()
    writer = store.open_writer(image_id)
    writer.write(b"half an image")
    assert not store.exists(image_id)
    assert store.list_ids() == []
    with pytest.raises(ObjectNotFound):
        store.open_reader(image_id)
    with pytest.raises(ObjectNotFound):
        store.size(image_id)
    [partial] = all_files(root)
    assert Path(partial).name.startswith(f".{image_id}.img.partial-")
    assert Path(partial).parent.name == image_id[:2]  # same directory as the final name
    writer.commit()
    assert store.list_ids() == [image_id]


def test_an_aborted_write_leaves_no_object_and_no_temp_file(store, root):
    image_id = new_id()
    writer = store.open_writer(image_id)
    writer.write(b"x" * 10_000)
    writer.abort()
    writer.abort()  # idempotent
    assert not store.exists(image_id)
    assert all_files(root) == []


def test_leaving_the_context_without_commit_aborts(store, root):
    image_id = new_id()
    with store.open_writer(image_id) as w:
        w.write(b"never committed")
    assert not w.committed
    assert not store.exists(image_id)
    assert all_files(root) == []


def test_an_exception_inside_the_context_leaves_nothing(store, root):
    image_id = new_id()
    with pytest.raises(RuntimeError, match="upload broke"):
        with store.open_writer(image_id) as w:
            w.write(b"x" * 5000)
            raise RuntimeError("upload broke")
    assert not store.exists(image_id)
    assert all_files(root) == []


def test_a_failed_commit_leaves_nothing(store, root, monkeypatch):
    image_id = new_id()

    def crash(src, dst):
        raise OSError("disk gone")

    writer = store.open_writer(image_id)
    writer.write(b"data")
    monkeypatch.setattr(vstorage.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        writer.commit()
    monkeypatch.undo()
    assert not writer.committed
    assert all_files(root) == []


def test_writing_after_commit_or_abort_is_refused(store):
    done = store.open_writer(new_id())
    done.commit()
    done.abort()  # a no-op after commit: the object stays
    assert store.exists(done.image_id)
    with pytest.raises(StorageError, match="committed"):
        done.write(b"more")
    aborted = store.open_writer(new_id())
    aborted.abort()
    with pytest.raises(StorageError, match="aborted"):
        aborted.write(b"more")
    with pytest.raises(StorageError, match="aborted"):
        aborted.commit()


def test_image_data_is_written_once(store):
    image_id = new_id()
    commit(store, image_id, data=b"first")
    with pytest.raises(ObjectExists):
        store.open_writer(image_id)
    with store.open_reader(image_id) as f:
        assert f.read() == b"first"


def test_two_writers_for_one_id_cannot_both_commit(store, root):
    image_id = new_id()
    first, second = store.open_writer(image_id), store.open_writer(image_id)
    first.write(b"one")
    second.write(b"two")
    first.commit()
    with pytest.raises(ObjectExists):
        second.commit()
    with store.open_reader(image_id) as f:
        assert f.read() == b"one"
    assert all_files(root) == [f"{image_id[:2]}/{image_id}.img"]


def test_the_writer_works_from_asyncio_through_threads(store):
    image_id = new_id()
    pieces = [os.urandom(10_000) for _ in range(20)]

    async def upload():
        writer = await asyncio.to_thread(store.open_writer, image_id)
        try:
            for piece in pieces:
                await asyncio.to_thread(writer.write, piece)
            await asyncio.to_thread(writer.commit)
        finally:
            await asyncio.to_thread(writer.abort)

    asyncio.run(upload())
    with store.open_reader(image_id) as f:
        assert f.read() == b"".join(pieces)


def test_list_ids_shows_only_committed_objects(store, root):
    committed = sorted(new_id() for _ in range(3))
    for image_id in committed:
        commit(store, image_id)
    in_progress = store.open_writer(new_id())
    in_progress.write(b"partial")
    store.put_envelope(in_progress.image_id, b"wrapped")
    (root / "zz").mkdir()
    (root / "zz" / "notes.img").write_bytes(b"not an object")
    assert store.list_ids() == committed
    in_progress.abort()


def test_missing_objects_raise_object_not_found(store):
    image_id = new_id()
    for call in (store.open_reader, store.size, store.mtime, store.get_envelope):
        with pytest.raises(ObjectNotFound) as info:
            call(image_id)
        assert isinstance(info.value, FileNotFoundError)
    assert store.exists(image_id) is False


# --- envelopes ---------------------------------------------------------------------------

def test_envelope_round_trip_and_replace(store, root):
    image_id = new_id()
    commit(store, image_id, envelope=b"wrapped under v1")
    assert store.get_envelope(image_id) == b"wrapped under v1"
    store.put_envelope(image_id, b"wrapped under v2")
    assert store.get_envelope(image_id) == b"wrapped under v2"
    assert all_files(root) == [f"{image_id[:2]}/{image_id}.img", f"{image_id[:2]}/{image_id}.key"]


def test_envelope_replace_is_atomic(store, root, monkeypatch):
    image_id = new_id()
    commit(store, image_id, envelope=b"old envelope")
    key_path = root / image_id[:2] / f"{image_id}.key"
    with open(key_path, "rb") as reader_of_old:
        store.put_envelope(image_id, b"new envelope")
        # A new file was renamed over the name: the old one was never written in place.
        assert reader_of_old.read() == b"old envelope"
    assert store.get_envelope(image_id) == b"new envelope"

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(vstorage.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.put_envelope(image_id, b"newer envelope")
    monkeypatch.undo()
    assert store.get_envelope(image_id) == b"new envelope"
    assert all_files(root) == [f"{image_id[:2]}/{image_id}.img", f"{image_id[:2]}/{image_id}.key"]


def test_an_implausibly_large_envelope_is_refused(store):
    with pytest.raises(StorageError, match="large"):
        store.put_envelope(new_id(), bytes(vstorage.MAX_ENVELOPE_BYTES + 1))


# --- shredding ---------------------------------------------------------------------------

def test_shred_zeroes_and_removes_the_envelope_before_the_data(store, root, monkeypatch):
    image_id = new_id()
    commit(store, image_id, envelope=b"wrapped data key")
    real_unlink = os.unlink
    seen = []

    def spy(path, *args, **kwargs):
        path = Path(path)
        seen.append((path.name, path.read_bytes() if path.suffix == ".key" else None))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(vstorage.os, "unlink", spy)
    store.shred(image_id)
    monkeypatch.undo()
    assert seen == [(f"{image_id}.key", bytes(len(b"wrapped data key"))),
                    (f"{image_id}.img", None)]
    assert all_files(root) == []
    assert store.list_ids() == []


def test_a_shred_interrupted_after_the_envelope_leaves_undecryptable_data(
        store, root, monkeypatch):
    image_id = new_id()
    commit(store, image_id)
    real_unlink = os.unlink

    def crash_on_data(path, *args, **kwargs):
        if str(path).endswith(".img"):
            raise OSError("crash")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(vstorage.os, "unlink", crash_on_data)
    with pytest.raises(OSError, match="crash"):
        store.shred(image_id)
    monkeypatch.undo()
    with pytest.raises(ObjectNotFound):
        store.get_envelope(image_id)
    assert store.exists(image_id)  # still listed, so clean-up can finish the job
    store.shred(image_id)
    assert all_files(root) == []


def test_shred_and_deletes_are_idempotent(store, root):
    image_id = new_id()
    commit(store, image_id)
    store.shred(image_id)
    store.shred(image_id)
    store.delete(image_id)
    store.delete_envelope(image_id)
    assert all_files(root) == []


def test_delete_removes_the_data_only(store):
    image_id = new_id()
    commit(store, image_id, envelope=b"k")
    store.delete(image_id)
    assert not store.exists(image_id)
    assert store.get_envelope(image_id) == b"k"


# --- clean-up after crashes ---------------------------------------------------------------

def test_cleanup_partials_removes_leftover_temp_files_and_returns_the_count(store, root):
    kept = new_id()
    commit(store, kept)
    crashed = new_id()
    shard = root / crashed[:2]
    shard.mkdir(mode=0o700, exist_ok=True)
    (shard / f".{crashed}.img.partial-0123abcd").write_bytes(b"half an image")
    (shard / f".{crashed}.key.partial-89abcdef").write_bytes(b"half an envelope")
    (shard / f"{crashed}.key").write_bytes(b"envelope of a write that crashed")

    assert store.cleanup_partials() == 3
    assert all_files(root) == [f"{kept[:2]}/{kept}.img", f"{kept[:2]}/{kept}.key"]
    assert store.cleanup_partials() == 0


def test_cleanup_partials_keeps_a_write_in_progress(store, root):
    image_id = new_id()
    writer = store.open_writer(image_id)
    writer.write(b"still uploading")
    store.put_envelope(image_id, b"wrapped")  # as the portal does, before commit
    assert store.cleanup_partials() == 0
    writer.commit()
    assert store.get_envelope(image_id) == b"wrapped"
    with store.open_reader(image_id) as f:
        assert f.read() == b"still uploading"


WRITER = r"""
import sys
from vault.storage import LocalStorage
store = LocalStorage(sys.argv[1])
w = store.open_writer(sys.argv[2])
w.write(b"from another process")
print("ready", flush=True)
sys.stdin.readline()
w.commit()
print("committed", flush=True)
"""


def test_cleanup_partials_keeps_another_process_write_in_progress(store, root):
    image_id = new_id()
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(root), image_id], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert store.cleanup_partials() == 0
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "committed"
    finally:
        child.communicate(timeout=30)
    assert child.returncode == 0
    assert store.list_ids() == [image_id]


def test_cleanup_partials_removes_the_temp_file_of_a_killed_writer(store, root):
    image_id = new_id()
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(root), image_id], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.kill()
    child.communicate(timeout=30)
    assert len(all_files(root)) == 1
    assert store.cleanup_partials() == 1
    assert all_files(root) == []


# --- image ids ---------------------------------------------------------------------------

BAD_IDS = [
    "../../etc/passwd", "..", ".", "", "ab/../../x", "/etc/passwd",
    "12345678-1234-1234-1234-1234567890ab/../x", "12345678-1234-1234-1234-1234567890ab\n",
    "{12345678-1234-1234-1234-1234567890ab}", "urn:uuid:12345678-1234-1234-1234-1234567890ab",
    "123456781234123412341234567890ab", "12345678-1234-1234-1234-1234567890zz",
    None, 123, b"12345678-1234-1234-1234-1234567890ab",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_ids_that_are_not_uuids_are_refused_everywhere(store, root, bad):
    calls = [store.open_writer, store.open_reader, store.exists, store.size, store.mtime,
             store.delete, store.get_envelope, store.delete_envelope, store.shred,
             lambda i: store.put_envelope(i, b"k")]
    for call in calls:
        with pytest.raises(InvalidImageId):
            call(bad)
    assert all_files(root) == []


def test_uuid_objects_and_upper_case_name_the_same_object(store):
    image_id = uuid.uuid4()
    commit(store, image_id)
    assert validate_image_id(str(image_id).upper()) == str(image_id)
    assert store.exists(str(image_id).upper())
    assert store.list_ids() == [str(image_id)]
    assert isinstance(InvalidImageId("x"), ValueError)
