"""portal.malloc: malloc settings for streaming processes."""
import pytest

from portal import malloc

glibc_only = pytest.mark.skipif(not malloc.is_glibc(), reason="glibc's mallopt")


@glibc_only
def test_settings_apply_on_glibc(monkeypatch):
    for name in malloc.OPERATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert malloc.tune_for_streaming() is True


@pytest.mark.parametrize("name", malloc.OPERATOR_SETTINGS)
def test_an_operators_own_malloc_setting_wins(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert malloc.tune_for_streaming() is False
