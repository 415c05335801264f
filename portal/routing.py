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

websocket_application = URLRouter([
    path("ws/agent/", AgentConsumer.as_asgi()),
    path("", AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(browser_routes)))),
])
