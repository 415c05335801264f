"""Secrets Berth generates for itself: created once, owner-only."""
import stat

from portal.secrets import load_or_create


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_created_once_owner_only_in_a_private_directory(tmp_path):
    path = tmp_path / "keys" / "audit.key"
    first = load_or_create(path, 32)
    assert len(first) == 64 and int(first, 16) >= 0
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert load_or_create(path, 32) == first  # the next start reads it back
