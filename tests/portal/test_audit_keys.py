"""Audit key rotation: new records under a new key, the chain runs on through it,
old versions still verify old records, and the keyring pins where each begins."""
import hashlib
import hmac
import json
import os
import stat

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from portal import audit
from portal.audit_keys import AuditKeyError, AuditKeyring
from portal.models import AuditHead, AuditRecord

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def own_keyring(settings, tmp_path):
    """Each test its own keyring file and version-1 key (the settings' defaults
    would touch the shared data directory)."""
    settings.AUDIT_KEYRING = tmp_path / "keys" / "audit-keyring.json"
    settings.AUDIT_KEY = b"1f" * 32
    return settings.AUDIT_KEYRING


def write(n, start=0):
    for i in range(start, start + n):
        audit.record("test.event", actor=audit.Actor.system(), target=f"thing:{i}")


def test_rotation_starts_a_new_key_with_its_own_record_and_the_chain_verifies(own_keyring, capsys):
    write(3)
    call_command("audit", "rotate-key")
    write(2, start=3)
    assert "version 2 MACs records from 4 on" in capsys.readouterr().out
    rotated = AuditRecord.objects.get(seq=4)
    assert rotated.action == "audit.key_rotated"
    assert rotated.details == {"version": 2, "first_seq": 4}
    assert rotated.actor == "manage.py audit rotate-key"
    ring = audit.keyring()
    assert [(v.version, v.first_seq) for v in ring.versions()] == [(1, 1), (2, 4)]
    assert ring.key_for(3).key == b"1f" * 32 and ring.key_for(4).key != b"1f" * 32
    assert stat.S_IMODE(os.stat(own_keyring).st_mode) == 0o600
    assert audit.verify_chain().ok and audit.verify_chain().count == 6
    call_command("audit", "verify")
    assert "intact: 6 records, 2 key versions" in capsys.readouterr().out


def test_records_after_the_rotation_remade_with_the_old_key_are_detected():
    """The threat rotation answers: the old key leaked, the database is writable.
    Re-MACing the records after the rotation with the old key (and the head) does
    not pass: the keyring says which key those records must carry."""
    write(2)
    audit.rotate_key(audit.Actor.system())
    write(3, start=2)
    old_key, previous = b"1f" * 32, ""
    for entry in AuditRecord.objects.order_by("seq"):
        if entry.seq >= 3:  # from the rotation record on
            entry.mac = hmac.new(old_key, previous.encode() + audit.canonical(entry),
                                 hashlib.sha256).hexdigest()
            entry.save(update_fields=["mac"])
        previous = entry.mac
    AuditHead.objects.filter(id=1).update(mac=previous)
    result = audit.verify_chain()
    assert not result.ok and result.broken_seq == 3


def test_a_keyring_without_the_old_version_cannot_verify_old_records(own_keyring):
    write(2)
    audit.rotate_key(audit.Actor.system())
    data = json.loads(own_keyring.read_text())
    data["versions"] = data["versions"][1:]
    own_keyring.write_text(json.dumps(data))
    result = audit.verify_chain()
    assert not result.ok and result.broken_seq == 1
    assert "must begin with version 1" in result.reason
    with pytest.raises(CommandError, match="version 1"):
        call_command("audit", "verify")


def test_an_interrupted_rotation_leaves_a_chain_that_verifies_and_runs_again(monkeypatch):
    """Killed after the keyring was written, before its record: the transaction is
    gone, the keyring's new version begins at the next record whoever writes it."""
    write(2)
    real_append = audit._append

    def die_after_the_keyring(head, action, **fields):
        if action == "audit.key_rotated":
            raise KeyboardInterrupt  # the process stops here
        return real_append(head, action, **fields)

    monkeypatch.setattr(audit, "_append", die_after_the_keyring)
    with pytest.raises(KeyboardInterrupt):
        audit.rotate_key(audit.Actor.system())
    monkeypatch.undo()
    assert AuditRecord.objects.count() == 2
    write(1, start=2)  # record 3: the first under version 2
    assert audit.keyring().key_for(3).version == 2 and audit.verify_chain().ok
    version = audit.rotate_key(audit.Actor.system())  # run again: a further version
    assert (version.version, version.first_seq) == (3, 4)
    assert audit.verify_chain().ok


def test_a_rotation_by_another_process_reaches_this_one_at_once(own_keyring, settings):
    """Portal workers keep writing while `manage.py audit rotate-key` runs elsewhere:
    each checks the keyring file before each record."""
    write(2)
    audit.keyring().key_for(1)  # this process has read the (absent) file already
    head = AuditHead.objects.get(id=1)
    other = AuditKeyring(own_keyring, settings.AUDIT_KEY)  # as another process would
    other.rotate(head.seq + 1)
    write(1, start=2)
    assert audit.keyring().key_for(3).version == 2 and audit.verify_chain().ok


def test_a_different_environment_key_than_the_keyrings_first_is_refused(own_keyring, settings):
    write(1)
    audit.rotate_key(audit.Actor.system())
    with pytest.raises(AuditKeyError, match="BERTH_AUDIT_KEY is not version 1"):
        AuditKeyring(own_keyring, b"2e" * 32)
    settings.AUDIT_KEY = b""  # what settings.py gives once the keyring exists
    assert [v.version for v in AuditKeyring(own_keyring, b"").versions()] == [1, 2]


@pytest.mark.parametrize("content", ["{not json", '{"format": 9, "versions": []}',
                                     '{"format": 1, "versions": [{"version": 2, "key": "'
                                     + "ab" * 32 + '", "first_seq": 1}]}'])
def test_an_unreadable_or_inconsistent_keyring_is_a_clear_error(own_keyring, content):
    own_keyring.parent.mkdir(parents=True, exist_ok=True)
    own_keyring.write_text(content)
    with pytest.raises(AuditKeyError, match="audit keyring"):
        AuditKeyring(own_keyring, b"")
