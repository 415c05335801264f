import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from portal.models import AuditRecord
from tests.vault.conftest import memory_like, store_image
from vault import format as vformat
from vault import maintenance, service
from vault.models import SavedImage


def read_all(image):
    reader = service.open_reader(image)
    try:
        return b"".join(reader.iter_chunks())
    finally:
        reader.close()


@pytest.fixture
def images(admin_user):
    return [store_image(admin_user, memory_like(200_000, seed=i), name=f"img{i}")
            for i in range(3)]


def image_bytes(image):
    return (service.storage().root / str(image.id)[:2] / f"{image.id}.img").read_bytes()


def test_rotation_rewraps_every_key_without_touching_image_data(images):
    before = {i.id: read_all(i) for i in images}
    raw_before = {i.id: sorted(p.read_bytes() for p in service.storage().root.rglob("*.img"))
                  for i in images[:1]}
    version, count, _, _ = maintenance.rotate_keys()
    assert version == 2 and count == 3
    for image in SavedImage.objects.all():
        assert image.key_version == 2
        assert vformat.envelope_key_version(service.storage().get_envelope(str(image.id))) == 2
        assert read_all(image) == before[image.id]
    raw_after = sorted(p.read_bytes() for p in service.storage().root.rglob("*.img"))
    assert raw_after == raw_before[images[0].id]
    assert AuditRecord.objects.filter(action="vault.rotate_key").exists()


def test_old_key_version_is_no_longer_needed_after_rotation(images):
    before = {i.id: read_all(i) for i in images}
    _, _, retired, _ = maintenance.rotate_keys(retire=True)
    assert retired == [1]
    assert service.keyring().versions() == [2]
    for image in SavedImage.objects.all():
        assert read_all(image) == before[image.id]


def test_interrupted_rotation_reruns_cleanly(images, monkeypatch):
    original = maintenance._rewrap
    calls = {"n": 0}

    def crash_after_first(provider, image, version):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("operator pressed Ctrl-C")
        return original(provider, image, version)

    monkeypatch.setattr(maintenance, "_rewrap", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        maintenance.rotate_keys()
    monkeypatch.setattr(maintenance, "_rewrap", original)
    version, count, _, _ = maintenance.rotate_keys()
    assert version == 2  # finished the interrupted rotation instead of starting another
    assert count == 2
    assert set(SavedImage.objects.values_list("key_version", flat=True)) == {2}
    for image in images:
        assert len(read_all(image)) == 200_000


def test_rotation_goes_past_an_image_with_another_images_envelope_and_reports_it(
        images, capsys):
    root = service.storage().root
    (theirs,) = root.rglob(f"{images[0].id}.key")
    (mine,) = root.rglob(f"{images[1].id}.key")
    mine.write_bytes(theirs.read_bytes())
    with pytest.raises(CommandError, match="1 image.*nothing retired"):
        call_command("vault", "rotate-key", "--retire")
    out = capsys.readouterr().out
    assert f"{images[1].id}  LEFT AS IT IS  (key envelope is for image {images[0].id}" in out
    assert "re-wrapped 2 data key(s)" in out and "retired" not in out
    assert service.keyring().versions() == [1, 2]  # the damaged image's version is kept
    for image in (images[0], images[2]):
        image.refresh_from_db()
        assert image.key_version == 2 and len(read_all(image)) == 200_000
    (record,) = AuditRecord.objects.filter(action="vault.rotate_key")
    assert record.outcome == "failed" and list(record.details["failed"]) == [str(images[1].id)]


def test_wrong_master_key_is_rejected(images, settings, tmp_path):
    settings.VAULT_KEYRING = tmp_path / "other-keyring.json"
    service.reset_caches()
    # To the portal a master key that does not unwrap is an envelope failure:
    # refused as an integrity error, the cause kept for the audit trail.
    with pytest.raises(service.ImageIntegrityError) as refused:
        read_all(images[0])
    assert "wrong master key" in refused.value.reason


def test_rotate_key_command_reports(images, capsys):
    call_command("vault", "rotate-key")
    assert "version 2; re-wrapped 3" in capsys.readouterr().out


def test_verify_command_passes_then_fails_on_tampering(images, capsys):
    call_command("vault", "verify", "--all")
    assert capsys.readouterr().out.count(" OK ") == 3
    path = next(service.storage().root.rglob(f"{images[1].id}.img"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="1 image"):
        call_command("vault", "verify", "--all")
    assert "FAILED" in capsys.readouterr().out


def test_verify_command_rejects_unknown_ids(images):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no such image"):
        call_command("vault", "verify", "00000000-0000-0000-0000-000000000000")


def test_startup_cleanup_removes_partials_and_old_orphans(images, settings):
    store = service.storage()
    # What a crash mid-upload leaves: a partial file nobody holds open.
    crashed = store.root / "ab" / ".ab000000-0000-4000-8000-000000000000.img.partial-dead"
    crashed.parent.mkdir(exist_ok=True)
    crashed.write_bytes(b"ciphertext of an upload that never finished")
    settings.VAULT_ORPHAN_GRACE_SECONDS = 0
    SavedImage.objects.filter(id=images[0].id).delete()  # its object is now an orphan
    partials, orphans = maintenance.cleanup_at_startup()
    assert partials >= 1 and orphans == 1
    assert not store.exists(str(images[0].id))
    assert store.exists(str(images[1].id))
    assert not crashed.exists()
