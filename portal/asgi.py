"""ASGI entry point: HTTP to Django, WebSockets to the consumers (portal/routing.py).

The image upload is routed ahead of Django (vault.upload), because Django's
ASGI handler spools whole request bodies to a temporary file.
"""
import os

from portal.malloc import tune_for_streaming

# Before anything allocates: streamed images would page-fault every buffer in anew.
tune_for_streaming()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402


class StreamingASGIHandler(ASGIHandler):
    # Django cuts every streamed piece into 64 KiB body messages (a copy and an
    # await each); image downloads yield whole 1 MiB chunks, sent as they are.
    chunk_size = 4 * 1024 * 1024


django.setup(set_prefix=False)  # what get_asgi_application() does before building its handler
django_application = StreamingASGIHandler()

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
