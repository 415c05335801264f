"""WebSocket routes. Apps append theirs; every consumer authorises on connect."""
websocket_urlpatterns = []
