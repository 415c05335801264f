"""ASGI entry point: HTTP to Django, WebSockets to the consumers (portal/routing.py).

The image upload is routed ahead of Django (vault.upload), because Django's
ASGI handler spools whole request bodies to a temporary file.
"""
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_application = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from portal.routing import websocket_application  # noqa: E402
from portal.startup import run_startup_housekeeping  # noqa: E402
from vault import upload  # noqa: E402

run_startup_housekeeping()

application = ProtocolTypeRouter({
    # Image uploads stream into the vault before Django could spool them to disk.
    "http": upload.route(django_application),
    "websocket": websocket_application,
})
