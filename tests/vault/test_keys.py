"""Versioned master keys: the keyring file, the environment keyring, re-wrapping."""
import base64
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vault import format as vformat
from vault import keys
from vault.keys import (
    EnvProvider,
    InsecureKeyring,
    KeyringError,
    KeyringFileProvider,
    MalformedKeyring,
    ReadOnlyKeyring,
    UnknownKeyVersion,
    new_keyring_json,
    rewrap_envelope,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def keyring_path(tmp_path):
    return tmp_path / "keys" / "vault-keyring.json"


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def write_keyring(path, doc, mode=0o600):
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    os.chmod(path, mode)


def b64(data):
    return base64.b64encode(data).decode()


# --- the keyring file -------------------------------------------------------------------

def test_constructing_a_provider_creates_nothing(keyring_path):
    KeyringFileProvider(keyring_path)
    assert not keyring_path.parent.exists()


def test_keyring_is_created_0600_in_a_0700_directory_on_first_use(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    assert provider.current_version() == 1
    assert len(provider.key(1)) == 32
    assert mode_of(keyring_path) == 0o600
    assert mode_of(keyring_path.parent) == 0o700
    doc = json.loads(keyring_path.read_text())
    assert doc["format"] == 1 and doc["current"] == 1
    assert base64.b64decode(doc["keys"]["1"]) == provider.key(1)
    assert [p.name for p in keyring_path.parent.iterdir() if ".tmp-" in p.name] == []


def test_keyring_created_under_a_permissive_umask_is_still_0600(keyring_path):
    old = os.umask(0)
    try:
        KeyringFileProvider(keyring_path).current_version()
    finally:
        os.umask(old)
    assert mode_of(keyring_path) == 0o600


def test_keyring_is_loaded_not_recreated_on_second_use(keyring_path):
    first = KeyringFileProvider(keyring_path)
    key = first.key(first.current_version())
    second = KeyringFileProvider(keyring_path)
    assert second.versions() == [1]
    assert second.key(1) == key


def test_rotation_adds_a_current_version_and_keeps_old_ones_readable(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    old_key = provider.key(1)
    assert provider.create_version() == 2
    assert provider.current_version() == 2
    assert provider.versions() == [1, 2]
    assert provider.key(1) == old_key
    assert provider.key(2) != old_key and len(provider.key(2)) == 32
    assert provider.current_key() == (2, provider.key(2))
    assert mode_of(keyring_path) == 0o600
    reopened = KeyringFileProvider(keyring_path)
    assert reopened.current_version() == 2
    assert reopened.key(1) == old_key


def test_a_rotation_by_another_process_is_picked_up(keyring_path):
    reader = KeyringFileProvider(keyring_path)
    assert reader.current_version() == 1
    rotator = KeyringFileProvider(keyring_path)
    version = rotator.create_version()
    assert reader.current_version() == version
    assert reader.key(version) == rotator.key(version)


def test_retire_removes_an_old_version_and_refuses_the_current_one(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    provider.create_version()
    provider.create_version()
    provider.retire(1)
    assert provider.versions() == [2, 3]
    with pytest.raises(UnknownKeyVersion):
        provider.key(1)
    with pytest.raises(KeyringError, match="current"):
        provider.retire(3)
    with pytest.raises(UnknownKeyVersion):
        provider.retire(7)
    assert KeyringFileProvider(keyring_path).versions() == [2, 3]
    assert provider.create_version() == 4  # numbers are never reused


def test_unknown_version_raises_unknown_key_version(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    with pytest.raises(UnknownKeyVersion, match="version 9") as info:
        provider.key(9)
    assert isinstance(info.value, keys.KeyError_)
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_keyring_other_users_can_access_is_refused(keyring_path, mode):
    KeyringFileProvider(keyring_path).current_version()
    os.chmod(keyring_path, mode)
    with pytest.raises(InsecureKeyring, match=f"mode {mode:04o}.*chmod 600"):
        KeyringFileProvider(keyring_path).current_version()


def test_a_keyring_made_world_readable_after_loading_is_refused(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    provider.current_version()
    os.chmod(keyring_path, 0o644)
    before = keyring_path.read_bytes()
    with pytest.raises(InsecureKeyring):
        provider.current_version()
    with pytest.raises(InsecureKeyring):
        provider.create_version()
    assert keyring_path.read_bytes() == before


GOOD_KEY = b64(bytes(range(32)))


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"format": 2, "current": 1, "keys": {"1": GOOD_KEY}}), "format 2"),
    (json.dumps({"format": 1, "current": 1, "keys": {}}), "no \"keys\""),
    (json.dumps({"format": 1, "current": 1, "keys": {"1": b64(b"short")}}), "5 bytes"),
    (json.dumps({"format": 1, "current": 1, "keys": {"1": "not base64!"}}), "not valid base64"),
    (json.dumps({"format": 1, "current": 1, "keys": {"one": GOOD_KEY}}), "not a version"),
    (json.dumps({"format": 1, "current": 1, "keys": {"01": GOOD_KEY}}), "not a version"),
    (json.dumps({"format": 1, "current": 2, "keys": {"1": GOOD_KEY}}), "version 2 has no key"),
    (json.dumps({"format": 1, "keys": {"1": GOOD_KEY}}), "\"current\""),
])
def test_a_corrupt_keyring_is_refused_with_a_clear_message(keyring_path, content, message):
    write_keyring(keyring_path, content)
    with pytest.raises(MalformedKeyring, match=message) as info:
        KeyringFileProvider(keyring_path).current_version()
    assert str(keyring_path) in str(info.value)
    assert GOOD_KEY not in str(info.value)
    assert keyring_path.read_text() == content  # never "repaired" by overwriting


def test_an_interrupted_rotation_leaves_the_old_keyring_intact(keyring_path, monkeypatch):
    provider = KeyringFileProvider(keyring_path)
    provider.current_version()
    before = keyring_path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(keys.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        provider.create_version()
    monkeypatch.undo()
    assert keyring_path.read_bytes() == before
    assert [p.name for p in keyring_path.parent.iterdir() if ".tmp-" in p.name] == []
    again = KeyringFileProvider(keyring_path)
    assert again.versions() == [1]
    assert again.create_version() == 2


def test_temporary_files_of_a_crashed_change_are_removed_by_the_next_change(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    provider.current_version()
    leftover = keyring_path.parent / f".{keyring_path.name}.tmp-deadbeef"
    leftover.write_bytes(keyring_path.read_bytes())
    provider.create_version()
    assert not leftover.exists()


RACER = r"""
import os, sys, time
from vault.keys import KeyringFileProvider
path, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.001)
p = KeyringFileProvider(path)
print(p.current_version(), p.key(p.current_version()).hex())
"""


def test_processes_racing_to_create_the_keyring_agree_on_one_key(tmp_path, keyring_path):
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(keyring_path), str(go)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
              for _ in range(8)]
    time.sleep(0.3)  # let them all start and wait
    go.touch()
    outputs = []
    for racer in racers:
        out, err = racer.communicate(timeout=30)
        assert racer.returncode == 0, err
        outputs.append(out.strip())
    assert len(set(outputs)) == 1
    version, key_hex = outputs[0].split()
    assert version == "1"
    assert KeyringFileProvider(keyring_path).key(1).hex() == key_hex
    assert mode_of(keyring_path) == 0o600


# --- the environment keyring -----------------------------------------------------------

def test_env_provider_reads_a_keyring_from_an_environment_variable(monkeypatch):
    doc = new_keyring_json()
    monkeypatch.setenv("BERTH_TEST_KEYRING", doc)
    provider = EnvProvider("BERTH_TEST_KEYRING")
    assert provider.current_version() == 1
    assert provider.key(1) == base64.b64decode(json.loads(doc)["keys"]["1"])
    assert provider.versions() == [1]


def test_env_provider_accepts_an_explicit_environment_mapping():
    material = {1: os.urandom(32), 2: os.urandom(32)}
    doc = json.dumps({"format": 1, "current": 2,
                      "keys": {str(v): b64(k) for v, k in material.items()}})
    provider = EnvProvider("KEYS", environ={"KEYS": doc})
    assert provider.current_key() == (2, material[2])
    assert provider.key(1) == material[1]
    with pytest.raises(UnknownKeyVersion):
        provider.key(3)


def test_env_provider_is_read_only():
    provider = EnvProvider("KEYS", environ={"KEYS": new_keyring_json()})
    with pytest.raises(ReadOnlyKeyring, match="rotation needs a writable keyring"):
        provider.create_version()
    with pytest.raises(ReadOnlyKeyring, match="read-only"):
        provider.retire(1)
    assert provider.versions() == [1]


def test_env_provider_refuses_a_missing_or_malformed_variable():
    with pytest.raises(KeyringError, match="KEYS holds no keyring"):
        EnvProvider("KEYS", environ={})
    with pytest.raises(MalformedKeyring, match="environment variable KEYS.*32 bytes"):
        EnvProvider("KEYS", environ={"KEYS": json.dumps(
            {"format": 1, "current": 1, "keys": {"1": b64(os.urandom(16))}})})


def test_repr_and_messages_never_show_key_material(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    provider.create_version()
    env = EnvProvider("KEYS", environ={"KEYS": keyring_path.read_text()})
    secrets_ = [provider.key(v) for v in provider.versions()]
    shown = [repr(provider), str(provider), repr(env), str(env),
             repr(provider._snapshot), repr(env._snapshot), str(UnknownKeyVersion(5))]
    for text in shown:
        for key in secrets_:
            assert key.hex() not in text
            assert b64(key) not in text
            assert repr(key) not in text
    assert repr(provider) == f"KeyringFileProvider(path={str(keyring_path)!r})"


def test_new_keyring_json_makes_a_valid_one_version_keyring():
    doc = json.loads(new_keyring_json())
    assert doc["format"] == 1 and doc["current"] == 1
    assert len(base64.b64decode(doc["keys"]["1"])) == 32
    assert new_keyring_json() != new_keyring_json()


# --- re-wrapping envelopes -----------------------------------------------------------------

def a_header(image_id=None):
    """A real image header (the envelope is bound to it)."""
    encoder = vformat.ChunkEncoder(os.urandom(32), image_id or uuid.uuid4(), compress=False)
    return encoder.header


def test_rewrap_envelope_moves_an_envelope_to_the_current_version_keeping_the_dek(
        keyring_path):
    provider = KeyringFileProvider(keyring_path)
    dek = vformat.generate_data_key()
    header = a_header()
    old = vformat.wrap_data_key(provider.key(1), 1, dek, header)
    assert provider.create_version() == 2

    new = rewrap_envelope(provider, old, header)

    assert new is not None and new != old
    assert vformat.envelope_key_version(new) == 2
    assert vformat.unwrap_data_key(provider.key, new, header) == dek
    provider.retire(1)  # the old master key is no longer needed for this image
    assert vformat.unwrap_data_key(provider.key, new, header) == dek


def test_rewrap_envelope_returns_none_when_already_current(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    dek = vformat.generate_data_key()
    header = a_header()
    envelope = vformat.wrap_data_key(provider.key(1), 1, dek, header)
    assert rewrap_envelope(provider, envelope, header) is None


def test_rewrap_envelope_refuses_an_envelope_of_another_image(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    envelope = vformat.wrap_data_key(provider.key(1), 1, vformat.generate_data_key(), a_header())
    provider.create_version()
    with pytest.raises(vformat.EnvelopeMismatch):
        rewrap_envelope(provider, envelope, a_header())


def test_rewrap_envelope_needs_the_old_version_still_in_the_keyring(keyring_path):
    provider = KeyringFileProvider(keyring_path)
    header = a_header()
    envelope = vformat.wrap_data_key(provider.key(1), 1, vformat.generate_data_key(), header)
    provider.create_version()
    provider.retire(1)
    with pytest.raises(UnknownKeyVersion):
        rewrap_envelope(provider, envelope, header)


def test_an_envelope_rewrapped_in_one_process_opens_with_a_provider_of_another(keyring_path):
    rotator, server = KeyringFileProvider(keyring_path), KeyringFileProvider(keyring_path)
    header = a_header()
    dek = vformat.generate_data_key()
    envelope = vformat.wrap_data_key(server.key(1), 1, dek, header)
    rotator.create_version()
    new = rewrap_envelope(rotator, envelope, header)
    assert vformat.unwrap_data_key(server.key, new, header) == dek
