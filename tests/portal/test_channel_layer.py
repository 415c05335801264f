"""The in-memory channel layer expires in batches: still expires, no longer per receive."""
import asyncio

import pytest
from channels.layers import InMemoryChannelLayer

from portal import channel_layer
from portal.channel_layer import BatchExpiringChannelLayer


def test_the_portal_uses_it_without_redis(settings):
    from channels.layers import get_channel_layer

    if settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("RedisChannelLayer"):
        pytest.skip("this run uses Redis")
    assert isinstance(get_channel_layer(), BatchExpiringChannelLayer)


async def test_a_fan_out_to_many_channels_walks_the_layer_once(monkeypatch):
    walks = []
    original = InMemoryChannelLayer._clean_expired
    monkeypatch.setattr(InMemoryChannelLayer, "_clean_expired",
                        lambda self: walks.append(1) or original(self))
    layer = BatchExpiringChannelLayer()
    channels = [await layer.new_channel() for _ in range(50)]
    for name in channels:
        await layer.group_add("watchers", name)
    await layer.group_send("watchers", {"type": "job.event", "text": "{}"})
    received = [await layer.receive(name) for name in channels]
    assert len(received) == 50 and len(walks) == 1


async def test_expired_messages_and_memberships_still_go(monkeypatch):
    monkeypatch.setattr(channel_layer, "CLEAN_INTERVAL_SECONDS", 0.05)
    layer = BatchExpiringChannelLayer(expiry=0.1, group_expiry=1)
    kept, stale = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("watchers", stale)
    await layer.send(stale, {"type": "old"})
    await asyncio.sleep(0.2)
    await layer.send(kept, {"type": "new"})
    assert (await layer.receive(kept))["type"] == "new"  # this receive cleans
    assert stale not in layer.channels
    assert stale not in layer.groups.get("watchers", {})
