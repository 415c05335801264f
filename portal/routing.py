"""WebSocket routes. Every consumer authorises on connect.

Browser sockets go through the origin check and session authentication; the
agent socket authenticates by host credential and sends no Origin header.
"""
from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from migrator.consumers import AgentConsumer, JobsConsumer

browser_routes = [
    path("ws/jobs/", JobsConsumer.as_asgi()),
    path("ws/jobs/<uuid:job_id>/", JobsConsumer.as_asgi()),
]


def _browser(app):
    """The origin check and session authentication every browser socket goes through."""
    return AllowedHostsOriginValidator(AuthMiddlewareStack(app))


# One outer route per browser socket: Channels nests only a bare URLRouter, so a
# path("", <wrapped URLRouter>) is an endpoint that matches the empty path alone.
websocket_application = URLRouter([
    path("ws/agent/", AgentConsumer.as_asgi()),
    *[path(str(route.pattern), _browser(route.callback)) for route in browser_routes],
])
