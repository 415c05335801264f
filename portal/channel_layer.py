"""The single-process channel layer: Channels' in-memory layer, expiring in batches.

Channels' InMemoryChannelLayer walks every channel and every group membership on
each receive to drop expired messages. One job event to N watchers is N receives,
so each event cost O(N²): with 200 watchers that walk was most of the portal's
CPU per event. Expiring at most once a second keeps the semantics (messages
expire after ``expiry`` seconds, memberships after ``group_expiry``) to within a
second and makes an event O(N).
"""
import time

from channels.layers import InMemoryChannelLayer

CLEAN_INTERVAL_SECONDS = 1.0


class BatchExpiringChannelLayer(InMemoryChannelLayer):
    _last_clean = float("-inf")

    def _clean_expired(self):
        now = time.monotonic()
        if now - self._last_clean < CLEAN_INTERVAL_SECONDS:
            return
        self._last_clean = now
        super()._clean_expired()
